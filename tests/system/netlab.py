"""Network-namespace test lab for the SSH tunnel gateway.

Topology built by :class:`Lab` (all names carry a unique per-run suffix)::

    ctl (gateway + clients run here; lo up; NO default route)
     |- veth to-pa 10.250.1.1/24 <-> proxy-a to-ctl 10.250.1.2/24   sshd :22
     `- veth to-pb 10.250.2.1/24 <-> proxy-b to-ctl 10.250.2.2/24   sshd :22
    proxy-a to-int 10.251.0.1/24 <-> internal-a to-px 10.251.0.10/24
    proxy-b to-int 10.251.0.1/24 <-> internal-b to-px 10.251.0.10/24
                                     (same address: overlapping tenant networks)

Each internal namespace runs an sshd on 10.251.0.10:22 and an HTTP/1.1
server on 10.251.0.10:8080 (``/`` names the namespace, ``/big`` is a
deterministic 20 MiB body, ``/echo`` echoes a POSTed body, ``/host`` answers
the ``Host`` header it got; for browsers, ``/ws`` is a WebSocket echo and
``/ws-page`` a page whose script talks to it).  The internal
networks are reachable only from their own proxy namespace: no default
routes anywhere and IPv4 forwarding is off in every namespace.

Fault injection (for resilience tests; all inside the lab's namespaces):

* ``start_sshd(name, ns, addr, port, extra_config)`` -- an additional sshd
  (e.g. proxy-a:2222 with ``AllowTcpForwarding no``) reusing that namespace's
  host keys; known_hosts files get its ``[addr]:port`` entries;
* ``restart_sshd(name)`` -- kill an sshd and its sessions by pid, start it
  again with the same config, wait for its port;
* ``silence(name)`` / ``unsilence(name)`` -- proxy-a / proxy-b drop all
  traffic from ctl without RST or ICMP (a blackhole route in the proxy
  namespace), so only keepalives / time-outs can notice;
* ``probe_tcp(ns, host, port)`` -- one connect attempt, classified.

Safety: veth pairs are created *inside* the lab namespaces (``ip -n NS link
add ... peer ... netns NS2``), so nothing is ever added to, or removed from,
the root namespace.  Cleanup kills only processes this lab started (by pid)
or processes that live inside this lab's namespaces, then deletes exactly
this lab's namespaces.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Self

log = logging.getLogger(__name__)

NS_PREFIX = "gwlab-"
SSHD = "/usr/sbin/sshd"

BIG_SEED = b"gwlab-big-v1"
BIG_SIZE = 20 * 1024 * 1024
BIG_SHA256 = "682ae520c78c53c0812d98ba24e1e68d8c36c819180790e57e8fd6ede723733e"

SSHD_NAMES = ("proxy-a", "proxy-b", "internal-a", "internal-b")
#: Resolves to the internal host only inside the proxy namespaces.
INTERNAL_NAME = "master.cluster.internal"
#: Names of the proxy namespaces' hosts files outside any cluster's
#: ``hostnames`` (for names resolved on the proxy node): one resolving to
#: the internal host, one outside the tenant network (to the proxy node's
#: own loopback), one with an address on each side.
RESOLVED_NAME = "web.tenant.test"
OUTSIDE_NAME = "evil.tenant.test"
MIXED_NAME = "mixed.tenant.test"

_counter = itertools.count(1)
_HOST_KEY_TYPES = (("ed25519", []), ("ecdsa", ["-b", "256"]), ("rsa", ["-b", "2048"]))


class LabError(RuntimeError):
    pass


class LabTimeout(LabError, TimeoutError):
    pass


@functools.lru_cache(maxsize=1)
def big_body() -> bytes:
    """The exact bytes served at ``/big`` (SHAKE-256 stream, not periodic)."""
    return hashlib.shake_256(BIG_SEED).digest(BIG_SIZE)


# --------------------------------------------------------------------------
# HTTP server run inside the internal namespaces (written to the workdir).
# argv: NAME HOST PORT SEED_HEX SIZE
# --------------------------------------------------------------------------
HTTP_SERVER_SCRIPT = r"""
import base64
import hashlib
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
BIG = hashlib.shake_256(bytes.fromhex(sys.argv[4])).digest(int(sys.argv[5]))
ZEROS = bytes(1 << 20)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_MAX_PAYLOAD = 1 << 15  # its echo still fits a 16-bit length
# What a browser loads: the script opens a WebSocket to the server the page
# came from, sends one message and writes the echo (or the failure) into
# #echo, then sets the title to "done", the sign a reader waits for.
WS_PAGE = '''<!DOCTYPE html>
<html><head><title>waiting</title></head><body>
<p id="served">%s</p><p id="echo">no answer</p>
<script>
const out = document.getElementById("echo");
const done = (text) => { out.textContent = text; document.title = "done"; };
const ws = new WebSocket("ws://" + location.host + "/ws");
ws.onopen = () => ws.send("hello from " + location.host);
ws.onmessage = (event) => { done("echo: " + event.data); ws.close(); };
ws.onerror = () => done("websocket error");
</script></body></html>
'''


class BadRequest(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: without TCP_NODELAY, Nagle and
    # delayed ACKs add ~40 ms to every kept-alive response.
    disable_nagle_algorithm = True
    server_version = "gwlab-http/1"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))
        sys.stderr.flush()

    def _send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", NAME)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(memoryview(body))

    def _send_zeros(self, size):
        # For benchmarks: any size, from one shared buffer (no big allocation).
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        view = memoryview(ZEROS)
        while size > 0:
            size -= self.wfile.write(view[: min(size, len(view))])

    def _path(self):
        return self.path.split("?", 1)[0]

    def do_GET(self):
        path = self._path()
        if path == "/":
            self._send(200, (NAME + "\n").encode())
        elif path == "/host":
            self._send(200, (self.headers.get("Host", "") + "\n").encode())
        elif path == "/ws-page":
            self._send(200, (WS_PAGE % NAME).encode(), "text/html; charset=utf-8")
        elif path == "/ws" and self.command == "GET":
            self._websocket()
        elif path == "/big":
            self._send(200, BIG, "application/octet-stream")
        elif path.startswith("/bytes/") and path[7:].isdigit():
            self._send_zeros(int(path[7:]))
        else:
            self._send(404, b"not found\n")

    do_HEAD = do_GET

    def _websocket(self):
        # RFC 6455, as much as a browser needs: the handshake, then each text
        # message comes back as "NAME: message" (the echo names the tenant),
        # a ping gets its pong, a close is answered; anything else ends it.
        key = self.headers.get("Sec-WebSocket-Key", "")
        if "websocket" not in self.headers.get("Upgrade", "").lower() or not key:
            self.close_connection = True
            self._send(400, b"not a websocket handshake\n")
            return
        self.close_connection = True
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            frame = self._ws_frame()
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 1:
                self._ws_send(1, NAME.encode() + b": " + payload)
            elif opcode == 9:
                self._ws_send(10, payload)
            elif opcode == 8:
                self._ws_send(8, payload[:2])
                return
            elif opcode != 10:  # binary, continuation, reserved: "unsupported data"
                self._ws_send(8, struct.pack("!H", 1003))
                return

    def _ws_frame(self):
        # One whole client frame as (opcode, unmasked payload); None when the
        # client closed, or sent a fragment, an unmasked or an oversized frame.
        head = self._read_exactly(2)
        if head is None or not head[0] & 0x80 or not head[1] & 0x80:
            return None
        size = head[1] & 0x7F
        if size >= 126:
            extended = self._read_exactly(2 if size == 126 else 8)
            if extended is None:
                return None
            size = int.from_bytes(extended, "big")
        if size > WS_MAX_PAYLOAD:
            return None
        mask = self._read_exactly(4)
        data = self._read_exactly(size)
        if mask is None or data is None:
            return None
        return head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def _read_exactly(self, size):
        data = self.rfile.read(size)
        return data if len(data) == size else None

    def _ws_send(self, opcode, payload):
        size = len(payload)
        head = bytes([0x80 | opcode, size]) if size < 126 else bytes([0x80 | opcode, 126]) + struct.pack("!H", size)
        self.wfile.write(head + payload)
        self.wfile.flush()

    def _line(self):
        line = self.rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise BadRequest("truncated chunked body")
        return line

    def _read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            parts = []
            while True:
                try:
                    size = int(self._line().split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadRequest("bad chunk size")
                if size == 0:
                    while self._line() not in (b"\r\n", b"\n"):
                        pass  # trailers
                    return b"".join(parts)
                data = self.rfile.read(size)
                if len(data) != size:
                    raise BadRequest("truncated chunk")
                parts.append(data)
                self._line()
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad content-length")
        data = self.rfile.read(n)
        if len(data) != n:
            raise BadRequest("truncated body")
        return data

    def do_POST(self):
        if self._path() == "/sink" and "Content-Length" in self.headers:
            # For benchmarks: read and count a body of any size, keep none of it.
            left = int(self.headers["Content-Length"])
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            self._send(200, (str(int(self.headers["Content-Length"]) - left) + "\n").encode())
            return
        try:
            body = self._read_body()
        except BadRequest as e:
            self.close_connection = True
            self._send(400, (str(e) + "\n").encode())
            return
        if self._path() == "/echo":
            ctype = self.headers.get("Content-Type", "application/octet-stream")
            self._send(200, body, ctype)
        else:
            self._send(404, b"not found\n")

    do_PUT = do_POST


class Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True


srv = Server((HOST, PORT), Handler)
sys.stderr.write("%s: listening on %s:%d\n" % (NAME, HOST, PORT))
sys.stderr.flush()
srv.serve_forever()
"""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _sh(argv: Sequence[str], timeout: float = 30, input: bytes | None = None) -> str:
    """Run a host command (bounded); raise LabError with its stderr on failure."""
    try:
        cp = subprocess.run(
            list(argv),
            check=False,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if cp.returncode != 0:
        raise LabError(
            f"command failed ({cp.returncode}): {' '.join(argv)}\n{cp.stderr.decode(errors='replace').strip()}"
        )
    return cp.stdout.decode(errors="replace")


def _ns_key(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/run/netns/{ns}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _proc_ns_key(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:  # gone, zombie, or kernel thread
        return None
    return (st.st_dev, st.st_ino)


def _pids_in(keys: set[tuple[int, int]]) -> list[int]:
    me = os.getpid()
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if e.isdigit():
            pid = int(e)
            if pid != me and _proc_ns_key(pid) in keys:
                out.append(pid)
    return out


def _kill_in_ns(pid: int, keys: set[tuple[int, int]], sig: int) -> None:
    """Signal pid only if it still lives in one of ``keys`` (race-free via pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        fd = None
    try:
        if _proc_ns_key(pid) not in keys:
            return
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        if fd is not None:
            os.close(fd)


def stop_processes(procs: Iterable[subprocess.Popen | None], timeout: float = 15, sig: int = signal.SIGTERM) -> None:
    """
    Send C{sig} to each process still running (by its pid: only ones we
    started), wait up to C{timeout} seconds for all of them, SIGKILL the
    stragglers.  For the benchmarks' daemons and the tests' own servers.
    """
    live = [p for p in procs if p is not None and p.poll() is None]
    for proc in live:
        proc.send_signal(sig)
    end = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(timeout=max(0.01, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[0:1]
    return state not in ([b"Z"], [b"X"])


def _descendants(pid: int) -> list[int]:
    """All processes descended from pid (children, grandchildren, ...), by /proc."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
            parents[int(e)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in out:
                out.append(child)
                frontier.append(child)
    return out


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError as e:
        return f"<{e}>"
    return "\n".join(data.splitlines()[-lines:])


@functools.lru_cache(maxsize=1)
def lab_skip_reason() -> str | None:
    """None if a Lab can run here, else a human readable reason (for SkipTest)."""
    if os.geteuid() != 0:
        return "netlab needs root (network namespaces)"
    for tool in ("ip", "curl", "nc", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"netlab needs {tool!r} on PATH"
    if not os.access(SSHD, os.X_OK):
        return f"netlab needs {SSHD}"
    try:
        _sh(["ip", "netns", "list"], timeout=10)
        probe = f"{NS_PREFIX}{os.getpid()}-probe{next(_counter)}-{secrets.token_hex(2)}"
        _sh(["ip", "netns", "add", probe], timeout=10)
        try:
            _sh(
                ["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"],
                timeout=10,
            )
        finally:
            _sh(["ip", "netns", "del", probe], timeout=10)
    except (LabError, OSError) as e:
        return f"network namespaces unusable here: {e}"
    return None


def wait_for_port(lab: Lab, ns: str, host: str, port: int, timeout: float = 10) -> None:
    """Poll ``nc -z`` from inside ``ns`` until host:port accepts; bounded."""
    lab._wait_port(ns, host, port, timeout, check_daemons=False)


def cleanup_stale_labs() -> list[str]:
    """Opt-in: delete gwlab-<pid>-... namespaces whose creating pid is dead.

    For use after a hard-killed test run (atexit never ran).  Namespaces of
    live processes (parallel runs) are left alone.  Returns removed names.
    """
    removed: list[str] = []
    try:
        names = sorted(os.listdir("/run/netns"))
    except OSError:
        return removed
    for name in names:
        if not name.startswith(NS_PREFIX):
            continue
        owner = name[len(NS_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        key = _ns_key(name)
        if key is not None:
            keys = {key}
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                pids = _pids_in(keys)
                if not pids:
                    break
                for pid in pids:
                    _kill_in_ns(pid, keys, signal.SIGKILL)
                time.sleep(0.05)
        shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)  # its hosts file
        try:
            _sh(["ip", "netns", "del", name], timeout=10)
            removed.append(name)
        except LabError as e:
            log.warning("could not delete stale namespace %s: %s", name, e)
    return removed


# --------------------------------------------------------------------------
# key generation (optionally cached per process, see Lab.reuse_keys)
# --------------------------------------------------------------------------
_CLIENT_ED25519 = "client_ed25519"
_CLIENT_RSA = "client_rsa"
_keycache_lock = threading.Lock()
_keycache_dir: str | None = None


def _host_key_file(name: str, ktype: str) -> str:
    return f"hostkey-{name}-{ktype}"


def _key_specs() -> list[tuple[str, list[str], str]]:
    """(file name, ssh-keygen type args, comment)"""
    specs = [
        (_CLIENT_ED25519, ["-t", "ed25519"], "gwlab-client-ed25519"),
        (_CLIENT_RSA, ["-t", "rsa", "-b", "3072", "-m", "PEM"], "gwlab-client-rsa"),
    ]
    for name in SSHD_NAMES:
        for ktype, extra in _HOST_KEY_TYPES:
            specs.append((_host_key_file(name, ktype), ["-t", ktype, *extra], f"gwlab-{name}"))
    return specs


def _key_files() -> list[str]:
    return [f for fname, _, _ in _key_specs() for f in (fname, fname + ".pub")]


def _start_keygen(keydir: str) -> list[tuple[list[str], subprocess.Popen]]:
    jobs = []
    for fname, args, comment in _key_specs():
        cmd = ["ssh-keygen", "-q", "-N", "", *args, "-C", comment, "-f", os.path.join(keydir, fname)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        jobs.append((cmd, proc))
    return jobs


def _finish_keygen(jobs: list[tuple[list[str], subprocess.Popen]]) -> None:
    deadline = time.monotonic() + 60
    failed = []
    for cmd, p in jobs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            failed.append(f"timeout: {' '.join(cmd)}")
            continue
        if p.returncode != 0:
            failed.append(f"{' '.join(cmd)}: {out.decode(errors='replace').strip()}")
    if failed:
        raise LabError("ssh-keygen failed:\n" + "\n".join(failed))


def _cached_keydir() -> str | None:
    with _keycache_lock:
        return _keycache_dir


def _publish_keydir(keydir: str) -> bool:
    """Make keydir the process-wide key cache; False if one already exists."""
    global _keycache_dir
    with _keycache_lock:
        if _keycache_dir is not None:
            return False
        _keycache_dir = keydir
    atexit.register(shutil.rmtree, keydir, True)
    return True


# --------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------
class Lab:
    #: Generate the key set (client + host keys) once per test process and
    #: copy it into each lab's workdir; saves ~1-2 s of RSA keygen per lab.
    #: Every sshd still has its own distinct host keys.
    reuse_keys: bool = True
    #: False (default): internal-a and internal-b share one host key set, so
    #: the single known_hosts file is unambiguous for 10.251.0.10 -- paramiko
    #: and Twisted conch only honour the *first* known_hosts entry of a key
    #: type for a host (OpenSSH accepts any).  True: each internal sshd gets
    #: its own keys and known_hosts lists both sets for 10.251.0.10 (then only
    #: OpenSSH clients accept both; build per-tenant files from host_key_lines).
    distinct_internal_host_keys: bool = False

    internal_addr: str = "10.251.0.10"
    internal_gw: str = "10.251.0.1"
    http_port: int = 8080
    ssh_port: int = 22

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.suffix = f"{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"
        base = f"{NS_PREFIX}{self.suffix}"
        self.ctl_ns = f"{base}-ctl"
        self.proxy_ns = {"a": f"{base}-pa", "b": f"{base}-pb"}
        self.internal_ns = {"a": f"{base}-ia", "b": f"{base}-ib"}
        self.proxy_addr = {"a": "10.250.1.2", "b": "10.250.2.2"}
        self.ctl_addr = {"a": "10.250.1.1", "b": "10.250.2.1"}
        w = self.workdir
        self.client_key_ed25519 = os.path.join(w, _CLIENT_ED25519)
        self.client_key_rsa = os.path.join(w, _CLIENT_RSA)
        self.authorized_keys = os.path.join(w, "authorized_keys")
        self.known_hosts = os.path.join(w, "known_hosts")
        self.known_hosts_hashed = os.path.join(w, "known_hosts_hashed")
        self.http_script = os.path.join(w, "http_server.py")
        self.host_key_lines: dict[str, list[str]] = {}
        self.big_sha256 = BIG_SHA256
        self.big_size = BIG_SIZE
        self.stop_errors: list[str] = []
        self._namespaces: list[str] = []  # created by us, in creation order
        self._etc_dirs: list[str] = []  # /etc/netns/NS directories we wrote
        self._procs: list[subprocess.Popen] = []
        self._daemons: dict[str, subprocess.Popen] = {}
        #: daemon name -> (namespace, argv, log file name): how to start it again
        self._daemon_specs: dict[str, tuple[str, list[str], str]] = {}
        #: sshd name -> (namespace, listen address, port), the lab's and start_sshd()'s
        self._sshds: dict[str, tuple[str, str, int]] = {}
        self._silenced: set[str] = set()
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    # -- public helpers --------------------------------------------------
    @property
    def namespaces(self) -> list[str]:
        return [self.ctl_ns, *self.proxy_ns.values(), *self.internal_ns.values()]

    def ns_cmd(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """subprocess.run inside ns; captures output unless told otherwise."""
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        if "input" not in kw:
            kw.setdefault("stdin", subprocess.DEVNULL)
        check = kw.pop("check", False)
        return subprocess.run(self.ns_cmd(ns, argv), check=check, timeout=timeout, **kw)

    def spawn(self, ns: str, argv: Sequence[str], *, pdeathsig: bool = True, **kw) -> subprocess.Popen:
        """Popen inside ns, tracked so stop() kills it by pid.

        The child is the command itself (``ip netns exec`` execs), so
        ``proc.pid`` is the command's pid.  With ``pdeathsig`` (default) the
        child gets SIGTERM if the *thread* that spawned it dies (covers a
        hard-killed test run); pass ``pdeathsig=False`` when spawning from a
        short-lived thread.
        """
        if self._stopped:
            raise LabError("lab is stopped")
        argv = list(argv)
        if pdeathsig and shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        if "stdin" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.ns_cmd(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """pids of tracked processes still running plus any pid inside our namespaces."""
        out = [p.pid for p in self._procs if p.poll() is None]
        keys = {k for k in map(_ns_key, self._namespaces) if k is not None}
        for pid in _pids_in(keys):
            if pid not in out:
                out.append(pid)
        return out

    def ns_pids(self, ns: str) -> list[int]:
        """pids of all processes currently inside namespace ns (empty if it is gone)."""
        key = _ns_key(ns)
        return _pids_in({key}) if key is not None else []

    def sshd_log(self, name: str) -> str:
        return self._read_log(f"sshd-{name}.log")

    def http_log(self, name: str) -> str:
        """name: "internal-a" / "internal-b"."""
        return self._read_log(f"http-{name}.log")

    def _read_log(self, fname: str) -> str:
        try:
            with open(os.path.join(self.workdir, fname), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- fault injection ----------------------------------------------------
    # For tests of how clients of the lab (the gateway) live through faults.
    # Everything acts inside the lab's own namespaces and on processes the lab
    # started, by pid; stop() cleans up whatever these leave behind.

    def sshd_pid(self, name: str) -> int:
        """pid of the listening sshd ``name`` (a lab sshd or one from start_sshd())."""
        proc = self._daemons.get(f"sshd {name}")
        if proc is None or name not in self._sshds:
            raise LabError(f"no sshd named {name!r} (known: {', '.join(self._sshds)})")
        return proc.pid

    def start_sshd(
        self,
        name: str,
        ns: str,
        listen_addr: str,
        port: int,
        extra_config: str = "",
        *,
        keys_of: str | None = None,
        timeout: float = 15,
    ) -> None:
        """
        Start an additional sshd, tracked and stopped by the lab like its own.

        ``name`` must be new (its log: ``sshd_log(name)``); ``ns`` is one of the
        lab's namespaces.  ``extra_config`` (sshd_config lines, e.g.
        ``"AllowTcpForwarding no"``) is put *before* the lab's defaults, so its
        values win (sshd keeps the first value of each keyword); no ``Match``
        blocks.  The host keys are those of ``keys_of`` (default: the lab sshd
        of that namespace, so the same keys as e.g. proxy-a's :22 one), and
        known_hosts / known_hosts_hashed get entries for ``listen_addr:port``
        (``[addr]:port`` when port != 22, as OpenSSH and the gateway look them
        up).  Returns once the port accepts connections inside ``ns``.
        """
        if self._stopped or not self._started:
            raise LabError("start_sshd() needs a running lab")
        if name in self._sshds or not name or "/" in name:
            raise LabError(f"sshd name {name!r} is invalid or already used")
        if ns not in self._namespaces:
            raise LabError(f"{ns} is not one of this lab's namespaces")
        if keys_of is None:
            keys_of = next((n for n, (n_ns, _, _) in self._sshds.items() if n_ns == ns and n in SSHD_NAMES), None)
            if keys_of is None:
                raise LabError(f"no lab sshd in {ns} to take host keys from: pass keys_of")
        if keys_of not in SSHD_NAMES:
            raise LabError(f"keys_of must be one of {SSHD_NAMES}")
        conf = self._sshd_config(name, listen_addr, port, extra_config, keys_of)
        self._add_known_hosts(keys_of, listen_addr, port)
        self._sshds[name] = (ns, listen_addr, port)
        self._spawn_daemon(f"sshd {name}", ns, [SSHD, "-D", "-e", "-f", conf], f"sshd-{name}.log")
        try:
            self._wait_port(ns, listen_addr, port, timeout)
        except LabError as e:
            # forget it, so that the lab's other daemons can still be waited for
            proc = self._daemons.pop(f"sshd {name}")
            self._daemon_specs.pop(f"sshd {name}", None)
            self._sshds.pop(name, None)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            raise LabError(f"sshd {name} did not start: {e}\n{_tail(os.path.join(self.workdir, f'sshd-{name}.log'))}")

    def _add_known_hosts(self, keys_of: str, addr: str, port: int) -> None:
        host = addr if port == 22 else f"[{addr}]:{port}"
        with open(self.known_hosts) as f:
            present = set(f.read().splitlines())
        new = []
        for pub in self.host_key_lines[keys_of]:
            keytype, b64 = pub.split()[:2]
            entry = f"{host} {keytype} {b64}"
            if entry not in present:
                new.append(entry)
        if not new:
            return
        with open(self.known_hosts, "a") as f:
            f.write("\n".join(new) + "\n")
        # hash the new lines on their own, then append them to the hashed file
        tmp = os.path.join(self.workdir, f"known_hosts_new-{secrets.token_hex(4)}")
        try:
            with open(tmp, "w") as f:
                f.write("\n".join(new) + "\n")
            _sh(["ssh-keygen", "-q", "-H", "-f", tmp])
            with open(tmp) as f:
                hashed = f.read()
            with open(self.known_hosts_hashed, "a") as f:
                f.write(hashed)
        finally:
            for path in (tmp, tmp + ".old"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def restart_sshd(self, name: str, *, sessions: bool = True, timeout: float = 15) -> None:
        """
        Kill sshd ``name`` (by pid) and start it again with the same config.

        With ``sessions`` (default) its per-connection processes are killed
        too -- what a crash or a reboot of the node does, and what makes the
        clients' connections end (``systemctl restart ssh`` would leave them
        running).  They are found as the descendants of the listener while it
        is stopped (SIGSTOP), so none can be forked behind our back.  Returns
        once the port accepts connections again (probed inside its namespace).
        """
        pid = self.sshd_pid(name)
        ns, addr, port = self._sshds[name]
        proc = self._daemons[f"sshd {name}"]
        keys = {k for k in [_ns_key(ns)] if k is not None}
        _kill_in_ns(pid, keys, signal.SIGSTOP)
        doomed = _descendants(pid) if sessions else []
        _kill_in_ns(pid, keys, signal.SIGKILL)
        for child in doomed:
            _kill_in_ns(child, keys, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"sshd {name} (pid {pid}) survived SIGKILL") from e
        deadline = time.monotonic() + 3
        while True:
            alive = [child for child in doomed if pid_alive(child) and _proc_ns_key(child) in keys]
            if not alive:
                break
            if time.monotonic() >= deadline:
                for child in alive:
                    _kill_in_ns(child, keys, signal.SIGKILL)
                break
            time.sleep(0.02)
        ns_, argv, logname = self._daemon_specs[f"sshd {name}"]
        self._spawn_daemon(f"sshd {name}", ns_, argv, logname)
        self._wait_port(ns, addr, port, timeout)

    def _tenant(self, name: str) -> str:
        if name not in ("proxy-a", "proxy-b"):
            raise LabError(f"only proxy-a and proxy-b can be silenced, not {name!r}")
        return name[-1]

    def silence(self, name: str, *, verify: bool = True) -> None:
        """
        Make proxy node ``name`` ("proxy-a"/"proxy-b") drop all traffic from
        ctl silently: no RST, no ICMP -- a VM that froze, or packets dropped
        on the way.  Clients must notice by their own time-outs / keepalives.

        How: a ``blackhole`` route to ctl's address *inside the proxy
        namespace*.  Packets from ctl still arrive (and ARP is still answered,
        so ctl never even sees a neighbour failure), but nothing the node
        sends back (SYN-ACKs, data, ACKs, RSTs) leaves it, and a blackhole
        route, unlike ``unreachable``/``prohibit``, sends no ICMP.  Rejected
        alternatives: deleting the node's address makes ARP fail, so ctl's
        kernel reports EHOSTUNREACH to new connections after ~3 s; setting the
        link down drops the carrier on ctl's side of the veth.  Nothing in
        ctl or the root namespace is touched.

        With ``verify`` (default) a TCP connect from ctl to the node's sshd is
        checked to time out (not refused, not unreachable); takes ~1 s.
        """
        t = self._tenant(name)
        if name not in self._silenced:
            self._ip(self.proxy_ns[t], "route", "add", "blackhole", f"{self.ctl_addr[t]}/32")
            self._silenced.add(name)
        if verify:
            outcome = self.probe_tcp(self.ctl_ns, self.proxy_addr[t], self.ssh_port, timeout=1.0)
            if outcome != "timeout":
                raise LabError(f"{name} is not silent: a connect from ctl ended with {outcome!r}")

    def unsilence(self, name: str) -> None:
        """Undo silence(name): the node answers again (no-op if it does)."""
        t = self._tenant(name)
        if name in self._silenced:
            self._ip(self.proxy_ns[t], "route", "del", "blackhole", f"{self.ctl_addr[t]}/32")
            self._silenced.discard(name)

    def silenced(self) -> set[str]:
        return set(self._silenced)

    def probe_tcp(self, ns: str, host: str, port: int, timeout: float = 1.0) -> str:
        """
        One TCP connect from inside ``ns``: "connected", "timeout", or the
        errno name of the failure ("ECONNREFUSED" = an RST came back,
        "EHOSTUNREACH"/"ENETUNREACH" = an ICMP error or no route).
        """
        code = (
            "import errno, socket, sys\n"
            "s = socket.socket()\n"
            "s.settimeout(float(sys.argv[3]))\n"
            "try:\n"
            "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
            "    print('connected')\n"
            "except socket.timeout:\n"
            "    print('timeout')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode.get(e.errno, str(e.errno)))\n"
        )
        cp = self.run(ns, [sys.executable, "-I", "-c", code, host, str(port), str(timeout)], timeout=timeout + 10)
        if cp.returncode != 0:
            raise LabError(f"probe_tcp failed: {cp.stderr.decode(errors='replace')}")
        return cp.stdout.decode().strip()

    # -- start -----------------------------------------------------------
    def start(self) -> None:
        if self._started or self._stopped:
            raise LabError("Lab.start() may only be called once, and not after stop()")
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except Exception as e:
            self.stop()  # first, so the log tails include the daemons' last words
            msg = f"netlab start failed: {e}\n{self._log_tails()}"
            raise LabError(msg) from e
        except BaseException:
            self.stop()
            raise

    def _log_tails(self) -> str:
        parts = []
        for name in self._sshds or SSHD_NAMES:
            parts.append(f"--- sshd {name} log tail ---\n{_tail(os.path.join(self.workdir, f'sshd-{name}.log'))}")
        for name in ("internal-a", "internal-b"):
            parts.append(f"--- http {name} log tail ---\n{_tail(os.path.join(self.workdir, f'http-{name}.log'))}")
        return "\n".join(parts)

    def _start(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd privsep dir

        keydir = _cached_keydir() if self.reuse_keys else None
        jobs = None
        if keydir is None:
            keydir = tempfile.mkdtemp(prefix=f"gwlab-keys-{os.getpid()}-")
            jobs = _start_keygen(keydir)  # runs while the namespaces are built
        try:
            try:
                self._build_network()
            finally:
                if jobs is not None:
                    _finish_keygen(jobs)
        except BaseException:
            if jobs is not None:
                shutil.rmtree(keydir, ignore_errors=True)
            raise
        try:
            for fname in _key_files():
                shutil.copy2(os.path.join(keydir, fname), os.path.join(self.workdir, fname))
        finally:
            if jobs is not None and not (self.reuse_keys and _publish_keydir(keydir)):
                shutil.rmtree(keydir, ignore_errors=True)
        if not self.distinct_internal_host_keys:
            for ktype, _ in _HOST_KEY_TYPES:
                for ext in ("", ".pub"):
                    src = self._host_key("internal-a", ktype) + ext
                    shutil.copy2(src, self._host_key("internal-b", ktype) + ext)
        self._write_key_files()
        self._start_daemons()
        self._check_invariants()

    def _host_key(self, name: str, ktype: str) -> str:
        return os.path.join(self.workdir, _host_key_file(name, ktype))

    def _ip(self, ns: str, *args: str) -> str:
        return _sh(["ip", "-n", ns, *args], timeout=15)

    def _build_network(self) -> None:
        for ns in self.namespaces:
            if _ns_key(ns) is not None:
                raise LabError(f"namespace {ns} already exists (not ours; refusing)")
            try:
                _sh(["ip", "netns", "add", ns], timeout=15)
            finally:  # it did not exist a moment ago: if it exists now, it is ours
                if _ns_key(ns) is not None:
                    self._namespaces.append(ns)
            self._ip(ns, "link", "set", "lo", "up")

        ctl = self.ctl_ns
        for t in ("a", "b"):
            px, inn = self.proxy_ns[t], self.internal_ns[t]
            # veth pairs are created directly inside the lab namespaces
            self._ip(ctl, *f"link add to-p{t} type veth peer name to-ctl netns {px}".split())
            self._ip(px, *f"link add to-int type veth peer name to-px netns {inn}".split())
            self._ip(ctl, "addr", "add", f"{self.ctl_addr[t]}/24", "dev", f"to-p{t}")
            self._ip(px, "addr", "add", f"{self.proxy_addr[t]}/24", "dev", "to-ctl")
            self._ip(px, "addr", "add", f"{self.internal_gw}/24", "dev", "to-int")
            self._ip(inn, "addr", "add", f"{self.internal_addr}/24", "dev", "to-px")
            self._ip(ctl, "link", "set", f"to-p{t}", "up")
            self._ip(px, "link", "set", "to-ctl", "up")
            self._ip(px, "link", "set", "to-int", "up")
            self._ip(inn, "link", "set", "to-px", "up")

        # no routing between the tenant nets and ctl (new netns default is 0;
        # enforce it anyway -- this only touches the lab's own namespaces)
        for ns in self.namespaces:
            fwd = _sh(self.ns_cmd(ns, ["cat", "/proc/sys/net/ipv4/ip_forward"])).strip()
            if fwd != "0":
                _sh(self.ns_cmd(ns, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"]))

    def _write_key_files(self) -> None:
        def read(p: str) -> str:
            with open(p) as f:
                return f.read().strip()

        pubs = [
            read(self.client_key_ed25519 + ".pub"),
            read(self.client_key_rsa + ".pub"),
        ]
        with open(self.authorized_keys, "w") as f:
            f.write("\n".join(pubs) + "\n")

        addr = {
            "proxy-a": self.proxy_addr["a"],
            "proxy-b": self.proxy_addr["b"],
            "internal-a": self.internal_addr,
            "internal-b": self.internal_addr,
        }
        lines_all = []
        for name in SSHD_NAMES:
            lines = []
            for ktype, _ in _HOST_KEY_TYPES:
                pub = read(self._host_key(name, ktype) + ".pub")  # "TYPE BASE64 COMMENT"
                keytype, b64 = pub.split()[:2]
                lines.append(pub)
                entry = f"{addr[name]} {keytype} {b64}"
                if entry not in lines_all:
                    lines_all.append(entry)
            self.host_key_lines[name] = lines
        with open(self.known_hosts, "w") as f:
            f.write("\n".join(lines_all) + "\n")
        shutil.copyfile(self.known_hosts, self.known_hosts_hashed)
        _sh(["ssh-keygen", "-q", "-H", "-f", self.known_hosts_hashed])
        try:
            os.unlink(self.known_hosts_hashed + ".old")
        except FileNotFoundError:
            pass

    def _sshd_config(
        self, name: str, listen: str, port: int | None = None, extra_config: str = "", keys_of: str | None = None
    ) -> str:
        w = self.workdir
        keys_of = keys_of or name
        hostkeys = "".join(f'HostKey "{self._host_key(keys_of, t)}"\n' for t, _ in _HOST_KEY_TYPES)
        # sshd keeps the *first* value it reads for a keyword, so the caller's
        # extra settings go before the lab defaults and win over them.
        extra = textwrap.dedent(extra_config).strip()
        conf = (
            (f"{extra}\n" if extra else "") + f"ListenAddress {listen}:{port or self.ssh_port}\n"
            f"{hostkeys}"
            f'PidFile "{os.path.join(w, f"sshd-{name}.pid")}"\n'
            f'AuthorizedKeysFile "{self.authorized_keys}"\n'
            "StrictModes no\n"
            "UsePAM no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin yes\n"
            "AllowTcpForwarding yes\n"
            "PermitOpen any\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "UseDNS no\n"
            "LoginGraceTime 30\n"
            "MaxStartups 200:30:400\n"
            "MaxSessions 100\n"
            "LogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"
        )
        path = os.path.join(w, f"sshd-{name}.conf")
        with open(path, "w") as f:
            f.write(conf)
        return path

    def _spawn_daemon(self, name: str, ns: str, argv: list[str], logname: str) -> None:
        self._daemon_specs[name] = (ns, list(argv), logname)
        with open(os.path.join(self.workdir, logname), "ab") as logf:
            self._daemons[name] = self.spawn(ns, argv, stdout=logf, stderr=logf)

    def _write_proxy_hosts(self) -> None:
        # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts, so
        # each proxy node resolves INTERNAL_NAME (and RESOLVED_NAME) to its own
        # internal host: names that only the proxy side can resolve, like a
        # cluster's own DNS.
        for t in ("a", "b"):
            directory = os.path.join("/etc/netns", self.proxy_ns[t])
            os.makedirs(directory, exist_ok=True)
            self._etc_dirs.append(directory)
            with open(os.path.join(directory, "hosts"), "w") as f:
                f.write(
                    f"127.0.0.1 localhost {OUTSIDE_NAME} {MIXED_NAME}\n"
                    f"{self.internal_addr} {INTERNAL_NAME} {RESOLVED_NAME} {MIXED_NAME}\n"
                )

    def _start_daemons(self) -> None:
        self._write_proxy_hosts()
        for name, ns, addr in (
            ("proxy-a", self.proxy_ns["a"], self.proxy_addr["a"]),
            ("proxy-b", self.proxy_ns["b"], self.proxy_addr["b"]),
            ("internal-a", self.internal_ns["a"], self.internal_addr),
            ("internal-b", self.internal_ns["b"], self.internal_addr),
        ):
            conf = self._sshd_config(name, addr)
            self._sshds[name] = (ns, addr, self.ssh_port)
            self._spawn_daemon(f"sshd {name}", ns, [SSHD, "-D", "-e", "-f", conf], f"sshd-{name}.log")
        with open(self.http_script, "w") as f:
            f.write(HTTP_SERVER_SCRIPT)
        for t in ("a", "b"):
            name = f"internal-{t}"
            argv = [sys.executable, "-I", "-u", self.http_script, name, self.internal_addr, str(self.http_port)]
            argv += [BIG_SEED.hex(), str(BIG_SIZE)]
            self._spawn_daemon(f"http {name}", self.internal_ns[t], argv, f"http-{name}.log")

        # readiness, probed over the links the tests will use
        for t in ("a", "b"):
            self._wait_port(self.ctl_ns, self.proxy_addr[t], self.ssh_port, 15)
            self._wait_port(self.proxy_ns[t], self.internal_addr, self.ssh_port, 15)
            self._wait_port(self.proxy_ns[t], self.internal_addr, self.http_port, 15)

    def _wait_port(self, ns: str, host: str, port: int, timeout: float, check_daemons: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self._daemons.items() if check_daemons else ():
                if p.poll() is not None:
                    raise LabError(f"{name} exited with status {p.returncode}")
            try:
                cp = self.run(ns, ["nc", "-z", "-w1", host, str(port)], timeout=5)
                if cp.returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                raise LabTimeout(f"{host}:{port} not reachable from {ns} within {timeout}s")
            time.sleep(0.05)

    def _check_invariants(self) -> None:
        for ns in self.namespaces:
            if self._ip(ns, "route", "show", "default").strip():
                raise LabError(f"unexpected default route in {ns}")
            if self._ip(ns, "-6", "route", "show", "default").strip():
                raise LabError(f"unexpected IPv6 default route in {ns}")
        cp = self.run(self.ctl_ns, ["ip", "route", "get", self.internal_addr], timeout=10)
        if cp.returncode == 0:
            raise LabError(f"ctl has a route to {self.internal_addr}: {cp.stdout!r}")

    # -- stop --------------------------------------------------------------
    def stop(self) -> None:
        """Idempotent, bounded, never raises.  Problems go to self.stop_errors."""
        try:
            with self._lock:
                if self._stopped:
                    return
                self._stopped = True
                atexit.unregister(self.stop)
                self._stop_procs()
                self._sweep_namespaces()
                self._delete_namespaces()
        except BaseException as e:  # never raise from cleanup
            self.stop_errors.append(f"stop: {e!r}")
            log.exception("netlab: stop failed")
        for err in self.stop_errors:
            log.warning("netlab: %s", err)

    def _stop_procs(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + 3
        for p in live:
            try:
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            if p.poll() is None:
                try:
                    p.kill()
                    p.wait(timeout=3)
                except (OSError, subprocess.TimeoutExpired) as e:
                    self.stop_errors.append(f"pid {p.pid} survived SIGKILL: {e!r}")

    def _sweep_namespaces(self) -> None:
        """Kill leftovers (sshd session children, orphans) living in our namespaces."""
        keys = {k for k in map(_ns_key, self._namespaces) if k is not None}
        if not keys:
            return
        start = time.monotonic()
        sig = signal.SIGTERM
        while True:
            pids = _pids_in(keys)
            if not pids:
                return
            elapsed = time.monotonic() - start
            if elapsed > 4:
                self.stop_errors.append(f"processes left in lab namespaces: {pids}")
                return
            if elapsed > 1.5:
                sig = signal.SIGKILL
            for pid in pids:
                _kill_in_ns(pid, keys, sig)
            time.sleep(0.05)

    def _delete_namespaces(self) -> None:
        for directory in self._etc_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._etc_dirs.clear()
        for ns in reversed(self._namespaces):
            try:
                _sh(["ip", "netns", "del", ns], timeout=15)
            except (LabError, OSError) as e:
                if _ns_key(ns) is not None:
                    self.stop_errors.append(f"could not delete {ns}: {e}")
        self._namespaces = [ns for ns in self._namespaces if _ns_key(ns) is not None]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
