"""
Fault tests: the real `twistd gateway` process against real OpenSSH in the
namespace lab (tests/system/netlab.py), while the lab breaks things underneath it.

 - L{FailoverTests} (its own lab: it silences proxy-a and restarts proxy-b's
   sshd): keepalive detection of a silent proxy node, failover to the next
   candidate, failback to the preferred one, reconnection after an sshd
   restart.
 - L{PathTests} (another lab, shared by its tests): exec mode against an sshd
   with C{AllowTcpForwarding no}, C{proxy_command}, C{jump} (cluster and
   address forms), slowloris clients against the handshake time-out, drain on
   SIGTERM (its own gateway process).

Measured times are printed (trial shows stdout).  Needs root; skipped with the
reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import TestCase

from tests.system.netlab import Lab
from tests.system.support import (
    HANDSHAKE_TIMEOUT,
    INTERNAL,
    KEEPALIVE_COUNT_MAX,
    KEEPALIVE_INTERVAL,
    GatewayProcess,
    curl,
    defaults_table,
    shared_lab,
)

BODY = {"a": b"internal-a\n", "b": b"internal-b\n"}

WINDOW_SIZE = 2 * 1024 * 1024  # the gateway's default window_size
LIMIT_RATE = 1024 * 1024  # curl --limit-rate 1M
DRAIN_TIMEOUT = 5.0  # short, so that the drain test ends in seconds


def _url(path: str = "/") -> str:
    return f"http://{INTERNAL}:8080{path}"


#: A SOCKS5 client with exact timing, run in the ctl namespace (argv[1] = mode):
#:  hold  SOCKS HOST PORT USER TOKEN                 open a tunnel, read the first line
#:        (e.g. an sshd banner), print "ready", then wait for the end: {"end": "eof"/"reset", "t_end"}
#:  http  SOCKS HOST PORT USER TOKEN PATH RATE CLOSE  GET PATH reading at RATE bytes/s (small
#:        receive buffer); CLOSE=1 sends "Connection: close" and reads to EOF, else reads
#:        Content-Length bytes; prints "started" after the head, then the outcome
#:  burst SOCKS HOST PORT USER TOKEN COUNT            COUNT tunnels whose CONNECTs are sent
#:        back to back, then GET / on each: {"replies": [...], "bodies": [...]}
#: t_* values are time.monotonic(), comparable with the test process's.
CLIENT = r"""
import json, os, socket, sys, time

TIMEOUT = float(os.environ.get("CLIENT_TIMEOUT", "60"))

mode, sport, host, port, user, token = sys.argv[1:7]
sport, port = int(sport), int(port)


def exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def greet(s):
    s.sendall(b"\x05\x01\x02")
    if exact(s, 2) != b"\x05\x02":
        raise SystemExit("no username/password method")
    u, p = user.encode(), token.encode()
    s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
    if exact(s, 2)[1] != 0:
        raise SystemExit("SOCKS authentication failed")


def connect_request():
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


def reply(s):
    rep = exact(s, 10)
    return rep[1]


def tunnel(rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(TIMEOUT)
    s.connect(("127.0.0.1", sport))
    greet(s)
    s.sendall(connect_request())
    code = reply(s)
    if code != 0:
        raise SystemExit(f"SOCKS reply {code}")
    return s


def wait_end(s, received=0):
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return "eof", received
            received += len(data)
    except ConnectionResetError:
        return "reset", received


if mode == "hold":
    s = tunnel()
    line = b""
    while not line.endswith(b"\n"):
        line += exact(s, 1)
    print("ready", line.decode(errors="replace").strip(), flush=True)
    end, _ = wait_end(s)
    print(json.dumps({"end": end, "t_end": time.monotonic()}), flush=True)

elif mode == "http":
    path, rate, close = sys.argv[7], float(sys.argv[8]), sys.argv[9] == "1"
    s = tunnel(rcvbuf=32768)
    extra = "Connection: close\r\n" if close else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += exact(s, 1)
    status = int(head.split()[1])
    length = None
    for line in head.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    print("started", flush=True)
    received, start, end = 0, time.monotonic(), None
    try:
        while end is None:
            if not close and received >= length:
                end = "complete"
                break
            ahead = received - (time.monotonic() - start) * rate
            if ahead > 0:
                time.sleep(min(0.05, ahead / rate))
                continue
            data = s.recv(16384)
            if not data:
                end = "eof"
            received += len(data)
    except ConnectionResetError:
        end = "reset"
    except TimeoutError:
        end = "timeout"
    s.close()
    print(json.dumps({"status": status, "length": length, "received": received, "end": end,
                      "t_end": time.monotonic()}), flush=True)

elif mode == "burst":
    count = int(sys.argv[7])
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", sport), timeout=TIMEOUT)
        greet(s)
        socks.append(s)
    request = connect_request()
    for s in socks:  # back to back: the gateway gets them in one go
        s.sendall(request)
    replies = [reply(s) for s in socks]
    bodies = []
    for s, code in zip(socks, replies):
        if code != 0:
            bodies.append(None)
            continue
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += exact(s, 1)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        bodies.append(exact(s, length).decode(errors="replace"))
        s.close()
    print(json.dumps({"replies": replies, "bodies": bodies}), flush=True)
"""


class _LabTestCase(TestCase):
    """
    A lab and gateway shared by the tests of one class (trial has no
    setUpClass): built by the first test's setUp, stopped at interpreter exit
    (the lab registers its own atexit too, which also runs after failures).
    """

    lab: Lab
    gateway: GatewayProcess
    workdir: str

    def setUp(self) -> None:
        cls = type(self)
        self.lab, self.gateway, self.workdir = shared_lab(f"faults_{cls.__name__}", "fault tests", cls.build)

    @classmethod
    def build(cls, lab: Lab, workdir: str) -> GatewayProcess:
        raise NotImplementedError

    # -- clients -----------------------------------------------------------

    def client(
        self,
        mode: str,
        cluster: str,
        token: str,
        port: int,
        *args: object,
        socks: int | None = None,
        timeout: float = 60,
    ):
        """Start the CLIENT script (see there) in the ctl namespace; stdout is a pipe."""
        script = os.path.join(self.workdir, "client.py")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write(CLIENT)
        proc = self.lab.spawn(
            self.lab.ctl_ns,
            [
                sys.executable,
                "-I",
                script,
                mode,
                str(socks or self.gateway.socks),
                INTERNAL,
                str(port),
                cluster,
                token,
                *map(str, args),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, CLIENT_TIMEOUT=str(timeout)),
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def client_line(self, proc: subprocess.Popen, timeout: float = 20) -> str:
        """The client's next output line (bounded wait)."""
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            if proc.poll() is None:
                proc.kill()
            raise AssertionError(f"client said nothing within {timeout:g} s: {proc.stderr.read()!r}")
        return box[0].decode().strip()

    def curl(self, *args: str, max_time: float = 30) -> tuple[int, bytes, bytes]:
        return curl(self.lab, *args, max_time=max_time)

    def socks_args(self, cluster: str, token: str = "", gateway: GatewayProcess | None = None) -> list[str]:
        port = (gateway or self.gateway).socks
        return ["--socks5-hostname", f"127.0.0.1:{port}", "-U", f"{cluster}:{token}"]

    def http_args(self, cluster: str, token: str = "", gateway: GatewayProcess | None = None) -> list[str]:
        port = (gateway or self.gateway).http
        return ["-x", f"http://{cluster}:{token}@127.0.0.1:{port}"]

    def get(self, cluster: str, token: str = "", path: str = "/", max_time: float = 30) -> tuple[int, bytes, bytes]:
        return self.curl(*self.socks_args(cluster, token), _url(path), max_time=max_time)

    def wait_served(self, cluster: str, token: str, body: bytes, timeout: float, interval: float = 0.2) -> float:
        """Poll with short requests until one answers ``body``; seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        last = None
        while True:
            last = self.get(cluster, token, max_time=min(5.0, max(1.0, deadline - time.monotonic())))
            if last[0] == 0 and last[1] == body:
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{cluster} did not answer {body!r} within {timeout:g} s; last: {last}\n"
                    + self.gateway.read_log()[-3000:]
                )
            time.sleep(interval)


# ---------------------------------------------------------------------------
# keepalive, failover, failback, sshd restart
# ---------------------------------------------------------------------------


class FailoverTests(_LabTestCase):
    TOKENS = {"fo": "token-fo", "rb": "token-rb"}

    @classmethod
    def build(cls, lab: Lab, workdir: str) -> GatewayProcess:
        a, b = lab.proxy_addr["a"], lab.proxy_addr["b"]
        gateway = GatewayProcess(
            lab,
            workdir,
            "gateway",
            f"""
            [listen]
            socks = "tcp:1080:interface=127.0.0.1"
            http  = "tcp:3128:interface=127.0.0.1"

            [gateway]
            handshake_timeout = {HANDSHAKE_TIMEOUT}

            {defaults_table(lab)}

            [clusters.fo]
            proxies = ["{a}:22", "{b}:22"]
            networks = ["10.251.0.0/24"]
            token = "{cls.TOKENS["fo"]}"

            [clusters.rb]
            proxies = ["{b}:22"]
            networks = ["10.251.0.0/24"]
            token = "{cls.TOKENS["rb"]}"
            """,
            1080,
            3128,
        )
        gateway.wait_listening()
        gateway.wait_up(["fo", "rb"])
        return gateway

    def test_silent_proxy_failover_and_failback(self):
        """
        proxy-a goes silent (no RST, no ICMP): the keepalives notice, the
        in-flight streams end, cluster fo fails over to proxy-b (which reaches
        internal-b); when proxy-a answers again, fo moves back to it.
        """
        lab, token = self.lab, self.TOKENS["fo"]
        self.assertEqual(lab.silenced(), set())
        self.addCleanup(lab.unsilence, "proxy-a")
        # fo starts on its preferred proxy (also after a previous failback)
        self.wait_served("fo", token, BODY["a"], timeout=40)
        log_before = len(self.gateway.read_log())

        # two in-flight streams: an idle tunnel (internal-a's sshd, banner
        # read), whose end shows when the gateway gave up on the link, and a
        # rate-limited download, which must not hang either
        idle = self.client("hold", "fo", token, 22)
        self.assertTrue(self.client_line(idle).startswith("ready SSH-2.0-OpenSSH"))
        download = lab.spawn(
            lab.ctl_ns,
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "60",
                "--limit-rate",
                "1M",
                "-w",
                "%{size_download}",
                *self.socks_args("fo", token),
                _url("/bytes/2000000000"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: download.poll() is None and download.kill())
        time.sleep(1.5)
        self.assertIsNone(download.poll(), "the long download ended before the fault")
        # bytes already queued toward curl in the kernel (curl's receive queue,
        # the gateway's send queue): curl still reads them after any close
        queues = lab.run(lab.ctl_ns, ["ss", "-tnH", "state", "established", "( sport = :1080 or dport = :1080 )"])
        queued = sum(int(line.split()[0]) + int(line.split()[1]) for line in queues.stdout.decode().splitlines())

        lab.silence("proxy-a", verify=False)
        t0 = time.monotonic()
        # meanwhile, prove it is really silent (a connect times out: no RST,
        # no ICMP) -- in a thread so that polling starts at once
        silent: list[str] = []
        checker = threading.Thread(
            target=lambda: silent.append(lab.probe_tcp(lab.ctl_ns, lab.proxy_addr["a"], 22, timeout=1.0))
        )
        checker.start()

        bound_detect = KEEPALIVE_INTERVAL * KEEPALIVE_COUNT_MAX + 3
        bound_failover = KEEPALIVE_INTERVAL * KEEPALIVE_COUNT_MAX + 2
        download_end = first_ok = None
        results = []

        def poll_once(started: float):
            rc, out, err = self.get("fo", token, max_time=6)
            return started, time.monotonic() - t0, rc, out, err

        # a fresh short request every 0.25 s until one is served by internal-b
        with ThreadPoolExecutor(max_workers=64) as pool:
            futures = []
            deadline = t0 + 15
            next_poll = time.monotonic()
            while time.monotonic() < deadline and (download_end is None or first_ok is None or idle.poll() is None):
                now = time.monotonic()
                if first_ok is None and now >= next_poll:
                    futures.append(pool.submit(poll_once, now - t0))
                    next_poll = now + 0.25
                if download_end is None and download.poll() is not None:
                    download_end = time.monotonic() - t0
                for fut in [f for f in futures if f.done()]:
                    futures.remove(fut)
                    result = fut.result()
                    results.append(result)
                    if result[2] == 0 and result[3] == BODY["b"] and first_ok is None:
                        first_ok = result[1]
                time.sleep(0.02)
            for fut in futures:
                results.append(fut.result())
        checker.join(10)

        summary = "\n".join(
            f"  start {s:5.2f} end {e:5.2f} rc {rc} {out!r} {err[-80:]!r}" for s, e, rc, out, err in results
        )
        failed = sum(1 for r in results if r[2] != 0)
        print(f"\nsilent proxy: {len(results)} polling requests, {failed} failed (those sent to the dead link)")
        self.assertEqual(silent, ["timeout"], "silence() is not silent")
        idle_end = json.loads(self.client_line(idle, timeout=5)) if idle.poll() is not None else None
        self.assertIsNotNone(idle_end, "the idle in-flight tunnel did not end within 15 s")
        detected = idle_end["t_end"] - t0
        self.assertIsNotNone(download_end, "the in-flight download did not end within 15 s")
        dl_out, dl_err = download.communicate(timeout=10)
        self.assertNotEqual(download.returncode, 0, f"the in-flight download ended well? {dl_out!r} {dl_err!r}")
        self.assertIsNotNone(first_ok, f"nothing served by proxy-b:\n{summary}\n{self.gateway.read_log()[-3000:]}")
        self.assertFalse([r for r in results if r[3] == BODY["a"]], f"served by the silent proxy?\n{summary}")
        print(
            f"silent proxy: detection {detected:.2f} s (idle tunnel ended: {idle_end['end']}); "
            f"in-flight download ended after {download_end:.2f} s (curl exit {download.returncode}, "
            f"{int(dl_out or 0) / 1e6:.1f} MB received); failover: first request served by proxy-b "
            f"{first_ok:.2f} s after silencing"
        )
        self.assertLessEqual(detected, bound_detect)
        self.assertLessEqual(first_ok, bound_failover, summary)

        log = self.gateway.read_log()[log_before:]
        # "... did not answer 3 keepalives in 3 s" / "... answered no keepalive for 3.0 s"
        self.assertRegex(log, rf"cluster fo: {re.escape(lab.proxy_addr['a'])}:22 [^\n]*keepalive")
        self.assertIn("cluster fo backoff", log)
        self.assertIn(f"cluster fo up ({lab.proxy_addr['b']}:22)", log)

        # failback: proxy-a answers again, fo moves back to it
        lab.unsilence("proxy-a")
        failback = self.wait_served("fo", token, BODY["a"], timeout=35, interval=0.25)
        print(f"silent proxy: failback {failback:.2f} s after proxy-a answers again")
        log = self.gateway.read_log()[log_before:]
        self.assertIn(
            f"cluster fo: preferred proxy {lab.proxy_addr['a']}:22 is back; moving from {lab.proxy_addr['b']}:22",
            log,
        )
        # and it stays there: several requests, all internal-a
        for _ in range(5):
            self.assertEqual(self.get("fo", token, max_time=10)[1], BODY["a"])

        # The rate-limited download cannot end within bound_detect: whatever
        # sits in the kernel queues toward it (MBs on loopback) is still read
        # at 1 MiB/s after the gateway closes (even after an RST), plus what
        # the gateway itself holds (at most about a window).  It must end,
        # with an error, once that is consumed.
        drain_time = (queued + WINDOW_SIZE) / LIMIT_RATE
        print(f"silent proxy: {queued / 1e6:.1f} MB were queued in the kernel toward curl at the fault")
        self.assertLessEqual(download_end, bound_detect + drain_time + 1)

    def test_sshd_restart(self):
        """proxy-b's sshd (and its sessions) killed and restarted: rb reconnects by itself."""
        lab, token = self.lab, self.TOKENS["rb"]
        self.wait_served("rb", token, BODY["b"], timeout=40)
        ups = self.gateway.read_log().count("cluster rb up")
        old = lab.sshd_pid("proxy-b")
        t0 = time.monotonic()
        lab.restart_sshd("proxy-b")
        restarted = time.monotonic() - t0
        self.assertNotEqual(lab.sshd_pid("proxy-b"), old)
        self.wait_served("rb", token, BODY["b"], timeout=20, interval=0.1)
        total = time.monotonic() - t0
        print(
            f"\nsshd restart: sshd back after {restarted:.2f} s, cluster rb serving again {total:.2f} s after the kill"
        )
        self.assertLess(total, 10)
        # it really lost the connection and made a new one
        deadline = time.monotonic() + 5
        while self.gateway.read_log().count("cluster rb up") <= ups and time.monotonic() < deadline:
            time.sleep(0.1)
        log = self.gateway.read_log()
        self.assertGreater(log.count("cluster rb up"), ups, log[-3000:])
        self.assertIn(f"cluster rb: connection to {lab.proxy_addr['b']}:22 lost", log)


# ---------------------------------------------------------------------------
# exec mode, proxy_command, jump, slowloris, drain
# ---------------------------------------------------------------------------


class PathTests(_LabTestCase):
    @classmethod
    def build(cls, lab: Lab, workdir: str) -> GatewayProcess:
        a, b = lab.proxy_addr["a"], lab.proxy_addr["b"]
        # proxy-a:2222 refuses TCP forwarding; same host keys as proxy-a:22
        lab.start_sshd("proxy-a-nofwd", lab.proxy_ns["a"], a, 2222, "AllowTcpForwarding no")
        netns_nc = f"ip netns exec {lab.proxy_ns['a']} nc {{host}} {{port}}"
        clusters = {
            "ex": f'proxies = ["{a}:2222"]',  # mode "auto" by default
            "ex-burst": f'proxies = ["{a}:2222"]',
            # netcat-openbsd keeps its stdout open until its stdin ends, so a
            # destination's close would not reach the client; socat passes it on.
            "ex-socat": f'proxies = ["{a}:2222"]\nmode = "exec"\nexec_command = "socat STDIO TCP:{{host}}:{{port}}"',
            "dt": f'proxies = ["{a}:2222"]\nmode = "direct-tcpip"',
            "pc": f'proxies = ["{INTERNAL}:22"]\nproxy_command = "{netns_nc}"',
            "hop-b": f'proxies = ["{b}:22"]',
            "jc": f'proxies = ["{INTERNAL}:22"]\njump = "hop-b"',
            "ja": f'proxies = ["{INTERNAL}:22"]\njump = "root@{b}:22"',
        }
        tables = "\n".join(
            f'[clusters.{name}]\n{body}\nnetworks = ["10.251.0.0/24"]\n' for name, body in clusters.items()
        )
        gateway = GatewayProcess(
            lab,
            workdir,
            "gateway",
            f"""
[listen]
# backlog: Twisted's default (50) overflows when the 500 slowloris clients
# connect at once; the kernel then holds the excess in SYN-RECV and
# retransmits SYN-ACKs (1, 2, 4 s), so clients would wait seconds to be
# accepted at all -- the handshake time-out is what is measured here
socks = "tcp:1080:interface=127.0.0.1:backlog=1024"
http  = "tcp:3128:interface=127.0.0.1"

[gateway]
handshake_timeout = {HANDSHAKE_TIMEOUT}
max_clients = 2000

{defaults_table(lab)}

{tables}
""",
            1080,
            3128,
        )
        gateway.wait_listening()
        gateway.wait_up(list(clusters))
        return gateway

    def exec_switches(self, cluster: str) -> int:
        return len(
            re.findall(
                rf"cluster {re.escape(cluster)}: proxy node \S+ refuses TCP forwarding .*switching to exec mode",
                self.gateway.read_log(),
            )
        )

    # -- exec mode -----------------------------------------------------------

    def test_exec_mode_auto(self):
        """An sshd that refuses forwarding: auto mode switches to exec (nc) once and streams intact."""
        self.assertEqual(self.exec_switches("ex"), 0)
        status, out, err = self.get("ex")
        self.assertEqual((status, out), (0, BODY["a"]), err)
        self.assertEqual(self.exec_switches("ex"), 1)
        for args in (self.socks_args("ex"), self.http_args("ex"), self.http_args("ex") + ["-p"]):
            t = time.monotonic()
            status, out, err = self.curl(*args, _url("/big"), max_time=60)
            self.assertEqual(status, 0, err)
            self.assertEqual(len(out), self.lab.big_size)
            self.assertEqual(hashlib.sha256(out).hexdigest(), self.lab.big_sha256)
            print(f"\nexec mode: 20 MiB via {args[0]} {args[-1]} in {time.monotonic() - t:.2f} s")
        for _ in range(3):
            status, out, err = self.get("ex")
            self.assertEqual((status, out), (0, BODY["a"]), err)
        self.assertEqual(self.exec_switches("ex"), 1)
        self.assertIn("Server listening on 10.250.1.2 port 2222", self.lab.sshd_log("proxy-a-nofwd"))

    def test_exec_mode_auto_concurrent_first_requests(self):
        """Several CONNECTs refused at once, before the switch: all are retried in exec mode."""
        self.assertEqual(self.exec_switches("ex-burst"), 0)
        burst = self.client("burst", "ex-burst", "", 8080, 8)
        result = json.loads(self.client_line(burst, timeout=60))
        print(f"\nexec mode: 8 simultaneous first requests: SOCKS replies {result['replies']}")
        self.assertEqual(self.exec_switches("ex-burst"), 1)
        self.assertEqual(result["replies"], [0] * 8)
        self.assertEqual(result["bodies"], ["internal-a\n"] * 8)

    def test_exec_mode_destination_close_reaches_client(self):
        """
        In exec mode too, a destination that closes its side (here HTTP
        `Connection: close`) ends the client's stream: the client reads to EOF
        -- with an exec_command that passes the close on (socat; Debian's
        netcat-openbsd does not, see docs/operating.md).
        """
        t = time.monotonic()
        reader = self.client("http", "ex-socat", "", 8080, "/", 10**9, 1, timeout=10)
        self.assertEqual(self.client_line(reader), "started")
        end = json.loads(self.client_line(reader, timeout=20))
        print(f"\nexec mode: response with Connection: close: {end['end']} after {time.monotonic() - t:.2f} s")
        self.assertEqual((end["end"], end["received"]), ("eof", len(BODY["a"])))

    def test_direct_tcpip_mode_is_refused(self):
        """mode = "direct-tcpip" on that sshd: SOCKS reply 0x02, HTTP 502, no exec switch."""
        status, out, err = self.get("dt")
        self.assertEqual(status, 97, err)  # curl: SOCKS proxy handshake failed
        self.assertIn(b"(2)", err)  # reply 0x02: not allowed by ruleset
        status, out, err = self.curl(*self.http_args("dt"), "-w", "%{http_code}", _url())
        self.assertTrue(out.endswith(b"502"), (status, out, err))
        self.assertEqual(self.exec_switches("dt"), 0)

    # -- reaching the proxy node --------------------------------------------

    def test_proxy_command(self):
        """The internal-a sshd, unreachable from ctl, through `ip netns exec <proxy-a> nc`."""
        self.assertEqual(self.lab.run(self.lab.ctl_ns, ["nc", "-z", "-w1", INTERNAL, "22"], timeout=10).returncode, 1)
        for args in (self.socks_args("pc"), self.http_args("pc")):
            status, out, err = self.curl(*args, _url())
            self.assertEqual((status, out), (0, BODY["a"]), err)

    def test_jump_cluster(self):
        """SSH over SSH: internal-b's sshd through cluster hop-b's connection to proxy-b."""
        for args in (self.socks_args("jc"), self.http_args("jc")):
            status, out, err = self.curl(*args, _url())
            self.assertEqual((status, out), (0, BODY["b"]), err)
        log = self.lab.sshd_log("internal-b")
        self.assertIn(f"Connection from {self.lab.internal_gw}", log)  # came from proxy-b

    def test_jump_address(self):
        """jump = "root@10.250.2.2:22": the same through a hidden hop connection."""
        for args in (self.socks_args("ja"), self.http_args("ja")):
            status, out, err = self.curl(*args, _url())
            self.assertEqual((status, out), (0, BODY["b"]), err)
        self.assertRegex(self.gateway.read_log(), r"cluster ja~jump up")

    # -- slow clients ----------------------------------------------------------

    SLOWLORIS = r"""
import json, selectors, socket, sys, time

port, count, wait = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
opened = {}
refused = 0
start = time.monotonic()
for _ in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        refused += 1
        continue
    s.setblocking(False)
    opened[s] = time.monotonic()
    sel.register(s, selectors.EVENT_READ)
print(f"opened {len(opened)} in {time.monotonic() - start:.2f} s", flush=True)
lifetimes, unexpected = [], 0
deadline = time.monotonic() + wait
while len(lifetimes) < len(opened) and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.1):
        s = key.fileobj
        try:
            data = s.recv(64)
        except ConnectionResetError:
            data = b""
        except BlockingIOError:
            continue
        if data:
            unexpected += 1
            continue
        lifetimes.append(time.monotonic() - opened[s])
        sel.unregister(s)
        s.close()
print(json.dumps({
    "opened": len(opened), "refused": refused, "closed": len(lifetimes), "unexpected": unexpected,
    "min": min(lifetimes, default=None), "max": max(lifetimes, default=None),
    "last_close": time.monotonic() - start,
}), flush=True)
"""

    def test_slowloris_clients_are_cut(self):
        """500 clients that send nothing are cut after handshake_timeout; a real client is served meanwhile."""
        lab = self.lab
        script = os.path.join(self.workdir, "slowloris.py")
        with open(script, "w") as f:
            f.write(self.SLOWLORIS)
        slow = lab.spawn(
            lab.ctl_ns,
            [sys.executable, "-I", script, str(self.gateway.socks), "500", "15"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: slow.poll() is None and slow.kill())
        first = slow.stdout.readline().decode()
        self.assertTrue(first.startswith("opened 500 "), (first, slow.stderr.read() if slow.poll() is not None else ""))
        t = time.monotonic()
        status, out, err = self.get("hop-b", max_time=10)
        served = time.monotonic() - t
        self.assertEqual((status, out), (0, BODY["b"]), err)
        rest, errout = slow.communicate(timeout=30)
        report = json.loads(rest.decode().strip().splitlines()[-1])
        print(f"\nslowloris: {first.strip()}; {report}; a normal client was served in {served:.2f} s meanwhile")
        self.assertEqual(
            (report["opened"], report["refused"], report["closed"], report["unexpected"]), (500, 0, 500, 0), report
        )
        self.assertGreaterEqual(report["min"], HANDSHAKE_TIMEOUT - 0.2)
        self.assertLessEqual(report["max"], HANDSHAKE_TIMEOUT + 2.0)
        self.assertLess(served, HANDSHAKE_TIMEOUT)
        log = self.gateway.read_log()
        self.assertGreaterEqual(log.count(f"sent no complete request in {HANDSHAKE_TIMEOUT:g} s"), 500)
        self.assertNotIn("client limit reached", log)

    # -- shutdown ----------------------------------------------------------------

    def drain_gateway(self, name: str, socks: int, http: int) -> GatewayProcess:
        lab = self.lab
        gateway = GatewayProcess(
            lab,
            self.workdir,
            name,
            f"""
            [listen]
            socks = "tcp:{socks}:interface=127.0.0.1"
            http  = "tcp:{http}:interface=127.0.0.1"

            [gateway]
            drain_timeout = {DRAIN_TIMEOUT}

            [clusters.d]
            proxies = ["{lab.proxy_addr["b"]}:22"]
            user = "root"
            key_file = "{lab.client_key_ed25519}"
            known_hosts = "{lab.known_hosts}"
            networks = ["10.251.0.0/24"]
            """,
            socks,
            http,
        )
        self.addCleanup(lambda: gateway.proc.poll() is None and gateway.proc.kill())
        gateway.wait_listening()
        gateway.wait_up(["d"])
        return gateway

    def test_drain_on_sigterm(self):
        """
        SIGTERM: the listeners close at once, a download that ends within
        drain_timeout completes, a longer one is cut at drain_timeout, and the
        process exits.
        """
        lab = self.lab
        gateway = self.drain_gateway("drain", 1081, 3129)
        rate = 1_000_000
        size = 3_000_000  # ~3 s at `rate`: 2 s of it after SIGTERM
        short = self.client("http", "d", "", 8080, f"/bytes/{size}", rate, 0, socks=gateway.socks)
        long = self.client("http", "d", "", 8080, "/bytes/2000000000", rate, 0, socks=gateway.socks)
        for proc in (short, long):
            self.assertEqual(self.client_line(proc), "started")
        time.sleep(1.0)
        self.assertEqual((short.poll(), long.poll()), (None, None))
        gateway.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        exit_time: list[float] = []
        waiter = threading.Thread(
            target=lambda: (gateway.proc.wait(DRAIN_TIMEOUT + 10), exit_time.append(time.monotonic() - t0)),
            daemon=True,
        )
        waiter.start()

        # the listener is closed at once: a new connection is refused (RST)
        refused_after = None
        while time.monotonic() - t0 < 2:
            if lab.probe_tcp(lab.ctl_ns, "127.0.0.1", gateway.socks, timeout=1) == "ECONNREFUSED":
                refused_after = time.monotonic() - t0
                break
            time.sleep(0.05)
        self.assertIsNotNone(refused_after, "the SOCKS listener still accepts during the drain")
        status, out, err = self.curl(*self.socks_args("d", gateway=gateway), _url(), max_time=5)
        self.assertEqual(status, 7, (status, out, err))  # curl: couldn't connect
        self.assertIsNone(short.poll(), "the short download ended early")

        short_end = json.loads(self.client_line(short, timeout=DRAIN_TIMEOUT + 5))
        long_end = json.loads(self.client_line(long, timeout=DRAIN_TIMEOUT + 5))
        waiter.join(DRAIN_TIMEOUT + 10)
        self.assertTrue(exit_time, "the gateway did not exit")
        exit_status, exited = gateway.proc.returncode, exit_time[0]
        print(
            f"\ndrain: listener refused {refused_after:.2f} s after SIGTERM; short download "
            f"{short_end['end']} at {short_end['t_end'] - t0:.2f} s ({short_end['received']} bytes), long one "
            f"{long_end['end']} at {long_end['t_end'] - t0:.2f} s, gateway exited at {exited:.2f} s "
            f"(status {exit_status})"
        )
        self.assertEqual((short_end["end"], short_end["received"]), ("complete", size))
        self.assertIn(long_end["end"], ("eof", "reset"))
        # cut at the drain time-out (and it then reads what the kernel still holds)
        self.assertGreaterEqual(long_end["t_end"] - t0, DRAIN_TIMEOUT - 0.5)
        self.assertGreaterEqual(exited, DRAIN_TIMEOUT - 0.5)
        self.assertLessEqual(exited, DRAIN_TIMEOUT + 3)
        # twistd ends a SIGTERM shutdown by re-raising the signal (status -15)
        self.assertIn(exit_status, (0, -signal.SIGTERM))
        log = gateway.read_log()
        self.assertIn(f"draining 2 open streams for up to {DRAIN_TIMEOUT:g} s", log)
        self.assertIn("drain time-out: closing 1 streams", log)
