"""
A real etcd cluster for system tests: Debian's etcd 3.4 (/usr/bin/etcd,
/usr/bin/etcdctl), several members on loopback ports, inside a namespace
lab's ctl namespace (L{tests.system.netlab.Lab}) or, without a lab, in the
root namespace on 127.0.0.1 only.  Fast elections (50 ms heartbeats, 500 ms
election timeout), no auto-compaction, a unique cluster token each.
"""

# How etcd 3.4.23's v3 HTTP/JSON gateway answers: pinned by test_etcdlab's GatewayJSONTests and AuthTests,
# except what is marked (by hand): seen with curl and http.client in a loopback-only namespace.
# - Keys, values and range_end are base64 both ways.  Every int64 in an answer is a JSON string ("revision": "7");
#   requests take numbers or strings.  Zero/false/empty fields are omitted: a range that finds nothing has no "kvs"
#   and no "count"; a txn whose compare failed has no "succeeded"; the first watch of a stream has no "watch_id"; a
#   status without a leader has no "leader".
# - /v3/kv/range -> {"header": {"revision"}, "kvs": [{"key", "create_revision", "mod_revision", "version",
#   "value"}], "count"}.  /v3/kv/put -> {"header": {"revision"}} ("prev_kv" if asked).
# - /v3/kv/txn {"compare": [{"target": "MOD", "result": "LESS", "key", "range_end", "mod_revision"}], "success":
#   [{"request_put": {..}}], "failure": [{"request_range": {..}}]}: the compare holds for every key in [key,
#   range_end) (for none there: it holds) -> {"header", "succeeded": true, "responses": [{"response_put": {"header":
#   {"revision"}}}]}; failed: [{"response_range": {..}}].
# - /v3/watch is one chunked 200 response, one JSON object a line, each {"result": {..}}: first {"header",
#   "created": true}, then {"header": {"revision"}, "events": [..]}, several events a message when catching up.  A
#   PUT event is {"kv": {..}} -- "type" omitted --, a delete {"type": "DELETE", "kv": {"key", "mod_revision"}} (+
#   "prev_kv" with prev_kv: true).  start_revision below the compacted revision: "created", then {"canceled": true,
#   "compact_revision": "C"} (no revision in its header), and (by hand) the stream stays open: close it, re-read,
#   watch from the read's revision + 1.
# - A member's watch stream ends (EOF) when it dies.  A member that lost quorum keeps its watches open and silent --
#   unless created with the header "Grpc-Metadata-Hasleader: true": then after ~2 s (3 election timeouts) the stream
#   ends with {"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader", "http_status":
#   "Service Unavailable"}} (not under "result").
# - (by hand) Without quorum: put and range wait 6 s (5 s + 2 election timeouts), then 503 code 14 "etcdserver:
#   request timed out" or 500 code 2 "context deadline exceeded"; a range with "serializable": true answers at once
#   from the member's copy; GET /health -> 503 {"health": "false"} (with quorum: 200 {"health": "true"}, a string;
#   POST is 405); /v3/maintenance/status answers, "errors": ["etcdserver: no leader"].  A stopped member's port
#   refuses the connection.
# - Errors: HTTP status + {"error": msg, "message": msg, "code": gRPC code}.  400/3: bad JSON, bad base64,
#   "etcdserver: key is not provided", "etcdserver: user name is empty" (auth on, no token), "etcdserver:
#   authentication failed, invalid user ID or password".  400/11: "etcdserver: mvcc: required revision has been
#   compacted" / "... is a future revision" (range at, or compact to, such a revision).  401/16 "etcdserver: invalid
#   auth token" (unknown or expired token; "Bearer <token>" too: the header is the bare token).  403/7 "etcdserver:
#   permission denied".  404/5 "etcdserver: requested lease not found".
# - Auth: /v3/auth/authenticate {"name", "password"} -> {"token": "<random>.<raft index>"}, sent as "Authorization:
#   <token>".  (by hand) A token whose index is above the member's applied index makes the request wait for that
#   index: made-up tokens can hang; bound every request.  Tokens survived member restarts (replayed from the raft
#   log) but expire after --auth-token-ttl (300 s) unused: on 401, authenticate again.  A watch's auth failure is a
#   200 stream: {"watch_id": "-1", "created": true, "canceled": true, "cancel_reason": "rpc error: code =
#   Unauthenticated desc = ..."}.
# - (by hand) Leases: /v3/lease/grant {"TTL": 5} -> {"ID": "..", "TTL": "5"}; /v3/lease/keepalive {"ID"} streams
#   {"result": {"ID", "TTL"}} like watch; /v3/lease/revoke {"ID"}.
# - etcdctl -w json prints the same shapes with the int64s as JSON numbers.

from __future__ import annotations

import atexit
import base64
import functools
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.system.netlab import Lab, stop_processes
from tests.system.pki import TLSFiles, write_tls_files

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
HEARTBEAT_MS = 50
ELECTION_MS = 500
#: Where the lab's member ports start inside a namespace (member i: +10*i client, +10*i+1 peer).
NS_BASE_PORT = 2379
_counter = itertools.count(1)
#: etcdctl's flags for polls: a member not serving yet fails fast and the poll comes again, where
#: etcdctl itself would wait out gRPC's 1 s reconnect back-off.
_POLL = ("--dial-timeout=300ms", "--command-timeout=300ms")
#: Variables that would point etcd or etcdctl elsewhere (ETCD_*, ETCDCTL_*, proxies).
_SCRUBBED_ENV = ("ETCD", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class EtcdLabError(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def etcd_skip_reason() -> str | None:
    """None if etcd and etcdctl are here, else why the etcd tests are skipped."""
    for path in (ETCD, ETCDCTL):
        if not os.access(path, os.X_OK):
            return f"etcd not installed ({path}): apt-get install etcd-server etcd-client (make test does as root)"
    return None


def _env() -> dict[str, str]:
    """Our environment without what would reconfigure etcd or send etcdctl off loopback."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_SCRUBBED_ENV)}
    env["ETCDCTL_API"] = "3"
    return env


def _root_ns_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, chosen by the kernel (held together, so distinct)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    """One etcd member: its ports, its data dir and log in the workdir, its process while it runs."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log: str
    proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """
    C{members} etcd members on loopback; in C{lab}'s namespace C{ns} (default
    its ctl namespace) when a lab is given (started: the ports are picked
    here, so L{endpoints} are known before L{start}), else in the root
    namespace.  Member C{i} is C{m<i>}: data dir C{m<i>.etcd} and log
    C{m<i>.log} in C{workdir}.

    With C{tls}, the client URLs are https with a certificate of a lab CA
    (L{tls_files}); with C{client_certs} too, etcd requires a client
    certificate of that CA.  Peer traffic stays plain http on loopback.
    """

    def __init__(
        self,
        workdir: str,
        members: int = 3,
        *,
        lab: Lab | None = None,
        ns: str | None = None,
        tls: bool = False,
        client_certs: bool = False,
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.lab = lab
        self.ns = (ns or lab.ctl_ns) if lab is not None else None
        self.token = f"gwlab-etcd-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        self.scheme = "https" if tls or client_certs else "http"
        self.client_certs = client_certs
        #: The CA and certificates (written here, so a gateway's configuration can name them before start()).
        self.tls_files: TLSFiles | None = write_tls_files(self._path("tls")) if self.scheme == "https" else None
        self.stop_errors: list[str] = []
        ports = self._pick_ports(2 * members)
        self._members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], self._path(f"m{i}.etcd"), self._path(f"m{i}.log"))
            for i in range(members)
        ]
        #: etcdctl's --user once enable_auth() ran (root's credentials).
        self._root_user: str | None = None
        self._started = False
        self._stopped = False

    # -- what clients need ---------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [f"{self.scheme}://127.0.0.1:{m.client_port}" for m in self._members]

    @property
    def members(self) -> list[Member]:
        """The members, by index (a copy of the list: add or remove none)."""
        return list(self._members)

    def member_log(self, i: int) -> str:
        try:
            with open(self._members[i].log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # -- start and stop --------------------------------------------------------
    def start(self, timeout: float = 20) -> None:
        """Start every member and wait (bounded) until all are healthy; on failure, stop and raise."""
        if self._started:
            raise EtcdLabError("EtcdCluster.start() may only be called once")
        self._started = True
        atexit.register(self.stop)
        try:
            os.makedirs(self.workdir, exist_ok=True)
            for i in range(len(self._members)):
                self._spawn(i, "new")
                self._wait_serving_peers(i)
            self.wait_healthy(timeout)
        except Exception as e:
            self.stop()
            raise EtcdLabError(f"etcd cluster did not start: {e}\n{self._log_tails()}") from e
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL every member, remove the data dirs (the logs stay).  Idempotent, bounded, never raises."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            self._end(range(len(self._members)), signal.SIGKILL)  # the data goes anyway: no goodbyes
        except Exception as e:  # cleanup goes on
            self.stop_errors.append(repr(e))
        for m in self._members:
            shutil.rmtree(m.data_dir, ignore_errors=True)

    def kill(self, i: int) -> None:
        """SIGKILL member C{i} (a crash: no goodbye to its peers); its data dir stays."""
        self._end([i], signal.SIGKILL)

    def stop_member(self, i: int, timeout: float = 5) -> None:
        """SIGTERM member C{i} (SIGKILL after C{timeout} s); its data dir stays."""
        self._end([i], signal.SIGTERM, timeout)

    def start_member(self, i: int, *, wait: bool = True, timeout: float = 15) -> None:
        """
        Start member C{i} again from its data dir.  C{wait=False} when a
        quorum is still down: a member serves clients only once its cluster
        has a leader.
        """
        if self._members[i].running:
            raise EtcdLabError(f"member m{i} is running")
        self._spawn(i, "existing")
        if wait:
            self.wait_healthy(timeout, [i])

    def stop_members(self, timeout: float = 5) -> None:
        """
        SIGTERM every member, followers first (SIGKILL after C{timeout} s):
        the whole of etcd is down.  A leader stopped while it still counts a
        follower as alive hands its leadership over and waits up to 6 s for
        the handover, bumping terms on the way: it gets 1 s, then SIGKILL.
        """
        leader = self._agreed_leader()
        self._end([i for i in range(len(self._members)) if i != leader], signal.SIGTERM, timeout)
        self._end(range(len(self._members)), signal.SIGTERM, min(timeout, 1))

    def start_members(self, timeout: float = 15) -> None:
        """Start every stopped member, then wait until all are healthy."""
        for i, m in enumerate(self._members):
            if not m.running:
                self.start_member(i, wait=False)
        self.wait_healthy(timeout)

    # -- state -------------------------------------------------------------
    def wait_healthy(self, timeout: float = 10, members: Sequence[int] | None = None) -> None:
        """Wait (bounded) until C{members} (default: all) answer etcd's health check with true."""
        indices = range(len(self._members)) if members is None else members
        endpoints = [self.endpoints[i] for i in indices]
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            for i in indices:
                if not self._members[i].running:
                    raise EtcdLabError(f"member m{i} is not running\n{self._log_tails([i])}")
            done = self.etcdctl("endpoint", "health", "-w", "json", *_POLL, endpoints=endpoints, timeout=10)
            try:
                health = json.loads(done.stdout or b"[]")
            except ValueError:
                health = []
            if done.returncode == 0 and len(health) == len(endpoints) and all(h["health"] for h in health):
                return
            last = (done.stdout + done.stderr).decode(errors="replace").strip()
            if time.monotonic() >= deadline:
                raise EtcdLabError(f"etcd members {list(indices)} not healthy within {timeout} s: {last[-2000:]}")
            time.sleep(0.1)

    def leader(self, timeout: float = 5) -> int:
        """
        The index of the leader every running member agrees on, waiting
        (bounded) while an election is going on.
        """
        deadline = time.monotonic() + timeout
        while (leader := self._agreed_leader()) is None:
            if time.monotonic() >= deadline:
                running = [i for i, m in enumerate(self._members) if m.running]
                raise EtcdLabError(f"no leader among members {running} within {timeout} s")
            time.sleep(0.05)
        return leader

    def _agreed_leader(self) -> int | None:
        """The leader's index if every running member names the same running one now, else None."""
        running = [i for i, m in enumerate(self._members) if m.running]
        statuses = self._statuses(running)
        ids = {s["Status"]["header"]["member_id"]: i for i, s in statuses.items()}
        leaders = {s["Status"].get("leader") for s in statuses.values()}  # none (0, omitted) mid-election
        if len(statuses) == len(running) and len(leaders) == 1 and (leader := leaders.pop()) in ids:
            return ids[leader]
        return None

    def revision(self) -> int:
        """The cluster's current revision."""
        return int(self.etcdctl_json("get", "--keys-only", "--", "x")["header"]["revision"])

    # -- data ----------------------------------------------------------------
    def put(self, key: str, value: bytes | str) -> int:
        """C{key} = C{value} (any bytes: etcdctl reads it from stdin); the revision it made."""
        raw = value.encode() if isinstance(value, str) else value
        return int(self.etcdctl_json("put", "--", key, input=raw)["header"]["revision"])

    def get(self, key: str) -> bytes | None:
        """The raw value of C{key} (as etcd holds it: what a gateway stored, sealed or not); None when absent."""
        return self._get(key).get(key)

    def items(self, prefix: str) -> dict[str, bytes]:
        """Every key under C{prefix} with its raw value (to compare etcd with the gateways' registries)."""
        return self._get("--prefix", prefix)

    def _get(self, *args: str) -> dict[str, bytes]:
        kvs = self.etcdctl_json("get", *args[:-1], "--", args[-1]).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in kvs}

    def compact(self, revision: int | None = None) -> int:
        """Compact (physically) up to C{revision}, default the current one; returns it."""
        rev = self.revision() if revision is None else revision
        done = self.etcdctl("compact", str(rev), "--physical")
        if done.returncode != 0:
            raise EtcdLabError(f"compact {rev} failed: {done.stderr.decode(errors='replace').strip()}")
        return rev

    def enable_auth(self, user: str, password: str, prefix: str = "/") -> None:
        """
        Turn on etcd auth: the root user etcd requires (its password random,
        used by this lab's etcdctl from now on) and C{user} (not root) with a
        role of its name that may read and write under C{prefix}.
        """
        root_password = secrets.token_urlsafe(16)
        steps = [
            ("user", "add", f"root:{root_password}"),
            ("user", "grant-role", "root", "root"),
            ("user", "add", f"{user}:{password}"),
            ("role", "add", user),
            ("role", "grant-permission", user, "--prefix=true", "readwrite", prefix),
            ("user", "grant-role", user, user),
            ("auth", "enable"),
        ]
        for step in steps:
            done = self.etcdctl(*step)
            if done.returncode != 0:
                raise EtcdLabError(f"etcdctl {step[0]} {step[1]} failed: {done.stderr.decode(errors='replace')}")
        self._root_user = f"root:{root_password}"

    # -- etcdctl -------------------------------------------------------------
    def etcdctl(
        self, *args: str, endpoints: Sequence[str] | None = None, input: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        """etcdctl (API 3) against C{endpoints} (default: all), in the cluster's namespace; bytes out."""
        argv = [ETCDCTL, "--endpoints=" + ",".join(endpoints or self.endpoints), "--dial-timeout=2s"]
        argv += ["--command-timeout=5s", *self._client_flags(), *args]
        kw: dict[str, Any] = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        if self.lab is not None and self.ns is not None:
            return self.lab.run(self.ns, argv, timeout=timeout, env=_env(), **kw)
        return subprocess.run(argv, capture_output=True, timeout=timeout, env=_env(), check=False, **kw)

    def etcdctl_json(self, *args: str, input: bytes | None = None) -> Any:
        """etcdctl C{args} -w json, parsed; raises L{EtcdLabError} with etcdctl's stderr when it fails."""
        done = self.etcdctl("-w", "json", *args, input=input)
        if done.returncode != 0:
            raise EtcdLabError(f"etcdctl {' '.join(args[:1])} failed: {done.stderr.decode(errors='replace')}")
        return json.loads(done.stdout)

    def _client_flags(self) -> list[str]:
        flags = []
        if self.tls_files is not None:
            flags.append(f"--cacert={self.tls_files.ca_file}")
            if self.client_certs:
                flags += [f"--cert={self.tls_files.cert_file}", f"--key={self.tls_files.key_file}"]
        if self._root_user is not None:
            flags.append(f"--user={self._root_user}")
        return flags

    # -- internals -----------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def _pick_ports(self, count: int) -> list[int]:
        if self.lab is None or self.ns is None:
            return _root_ns_ports(count)
        listening = self.lab.run(self.ns, ["ss", "-Htln"], timeout=10, check=True).stdout.decode()
        used = {int(line.split()[3].rsplit(":", 1)[1]) for line in listening.splitlines() if line.strip()}
        for base in range(NS_BASE_PORT, NS_BASE_PORT + 50 * 100, 100):
            ports = [base + 10 * (j // 2) + j % 2 for j in range(count)]
            if not used.intersection(ports):
                return ports
        raise EtcdLabError(f"no free ports for etcd in {self.ns}")

    def _argv(self, i: int, state: str) -> list[str]:
        m = self._members[i]
        client = f"{self.scheme}://127.0.0.1:{m.client_port}"
        peer = f"http://127.0.0.1:{m.peer_port}"
        cluster = ",".join(f"{o.name}=http://127.0.0.1:{o.peer_port}" for o in self._members)
        argv = [
            ETCD,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.token}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--auto-compaction-retention=0",
            # etcd 3.5's default: a member cut off from its cluster does not bump the term while alone, so
            # coming back does not depose a working leader (and elections after restarts settle sooner).
            "--pre-vote=true",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls_files is not None:
            argv += [f"--cert-file={self.tls_files.server_cert}", f"--key-file={self.tls_files.server_key}"]
            if self.client_certs:
                argv += ["--client-cert-auth", f"--trusted-ca-file={self.tls_files.ca_file}"]
        return argv

    def _spawn(self, i: int, state: str) -> None:
        m = self._members[i]
        argv = self._argv(i, state)
        with open(m.log, "ab") as log:
            kw: dict[str, Any] = {"stdout": log, "stderr": subprocess.STDOUT, "env": _env()}
            if self.lab is not None and self.ns is not None:
                m.proc = self.lab.spawn(self.ns, argv, **kw)
            else:
                # As Lab.spawn does: SIGTERM when this thread dies, out of our session's signals.
                if shutil.which("setpriv"):
                    argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
                m.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)

    def _wait_serving_peers(self, i: int, timeout: float = 1) -> None:
        """
        Wait a little until member C{i} answers its peers.  A new member
        first asks its peers whether the cluster exists, 1 s per peer that
        listens but does not answer yet: members started all at once take 2 s
        longer.  Past C{timeout} it goes on (slower, never wrong).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._members[i].running:
            if '"msg":"serving peer traffic"' in self.member_log(i):
                return
            time.sleep(0.01)

    def _end(self, indices: Iterable[int], sig: int, timeout: float = 5) -> None:
        """Signal the running members of C{indices} at once, wait for them (bounded), SIGKILL the stragglers."""
        stop_processes([self._members[i].proc for i in indices], timeout, sig)

    def _statuses(self, indices: Sequence[int]) -> dict[int, Any]:
        """etcdctl endpoint status of members C{indices}, by index (members that did not answer left out)."""
        if not indices:
            return {}
        endpoints = [self.endpoints[i] for i in indices]
        done = self.etcdctl("endpoint", "status", "-w", "json", *_POLL, endpoints=endpoints, timeout=10)
        try:
            statuses = json.loads(done.stdout or b"[]")
        except ValueError:
            return {}
        return {indices[endpoints.index(s["Endpoint"])]: s for s in statuses if s["Endpoint"] in endpoints}

    def _log_tails(self, indices: Sequence[int] | None = None) -> str:
        parts = []
        for i in range(len(self._members)) if indices is None else indices:
            tail = self.member_log(i).splitlines()[-15:]
            parts.append(f"--- etcd m{i} log tail ---\n" + "\n".join(tail))
        return "\n".join(parts)
