"""
Shared pieces of the system tier: the real `twistd gateway` process in a
namespace lab (L{tests.system.netlab}), the labs and etcd clusters
(L{tests.system.etcdlab}) started once per run, the short timers and the
[defaults] table the fault and hostile-client labs share, and curl run in the
lab's ctl namespace.  Test modules import these from here, never from each
other.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from twisted.trial.unittest import SkipTest

from tests.system.etcdlab import EtcdCluster, etcd_skip_reason
from tests.system.netlab import Lab, lab_skip_reason, wait_for_port

T = TypeVar("T")

VENV_BIN = os.path.dirname(sys.executable)
#: The internal host's address in every lab cluster (each cluster's host serves its own content).
INTERNAL = "10.251.0.10"

# Short timers so that faults are noticed in seconds (see each test's bound).
KEEPALIVE_INTERVAL = 1.0
KEEPALIVE_COUNT_MAX = 3
CONNECT_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 2.0


#: What L{shared} made, by key: the thing, or why making it failed.
_SHARED: dict[str, object] = {}


def shared(key: str, make: Callable[[], T]) -> T:
    """
    C{make()}, once per test run under C{key}: labs and etcd clusters take
    seconds to start, and trial has no class fixtures.  A failure is
    remembered: the first test sees the error itself, every later one an
    AssertionError naming it (not a second start that fails the same way).
    """
    if key not in _SHARED:
        try:
            _SHARED[key] = make()
        except BaseException as e:
            _SHARED[key] = e
            raise
    made = _SHARED[key]
    if isinstance(made, BaseException):
        raise AssertionError(f"{key} did not start: {made}")
    return made  # type: ignore[return-value]  # made by this key's make


def shared_lab(key: str, needs: str, build: Callable[[Lab, str], T]) -> tuple[Lab, T, str]:
    """
    The lab of C{key} (see L{shared}) with what C{build(lab, workdir)} puts
    on it (a gateway, an extra sshd, an etcd cluster).  Stopped at exit (the
    lab registers its own atexit too), which runs after failures too.

    @param needs: who needs it, for the skip reason (C{"fault tests"}).
    @raise SkipTest: without the means to build a lab (not root, no sshd).
    """
    reason = lab_skip_reason()
    if reason:
        raise SkipTest(f"{needs} need the namespace lab: {reason}")

    def make() -> tuple[Lab, T, str]:
        workdir = os.path.abspath(f"_{key}_{os.getpid()}")
        os.makedirs(workdir, exist_ok=True)
        lab = Lab(os.path.join(workdir, "lab"))
        atexit.register(lab.stop)
        try:
            lab.start()
            return lab, build(lab, workdir), workdir
        except BaseException:
            lab.stop()
            raise

    return shared(key, make)


def shared_etcd(key: str, needs: str, members: int = 3) -> EtcdCluster:
    """
    The etcd cluster of C{key} (see L{shared}) in the root namespace, on
    127.0.0.1 only: for tests that need etcd but no sshd lab.  Its start
    registers its stop at exit.

    @raise SkipTest: without etcd installed.
    """
    reason = etcd_skip_reason()
    if reason:
        raise SkipTest(f"{needs} need etcd: {reason}")

    def make() -> EtcdCluster:
        cluster = EtcdCluster(os.path.abspath(f"_{key}_{os.getpid()}"), members)
        cluster.start()
        return cluster

    return shared(key, make)


def twistd_argv(config: str, logfile: str, *extra_args: str) -> list[str]:
    """The command line of a foreground `twistd gateway` with C{config}, logging to C{logfile}."""
    return [
        os.path.join(VENV_BIN, "twistd"),
        "--nodaemon",
        "--pidfile=",
        f"--logfile={logfile}",
        "gateway",
        f"--config={config}",
        *extra_args,
    ]


def curl(lab: Lab, *args: str, max_time: float = 30) -> tuple[int, bytes, bytes]:
    """curl in the lab's ctl namespace (bounded by C{max_time}): its exit status, stdout and stderr."""
    done = lab.run(lab.ctl_ns, ["curl", "-sS", "--max-time", f"{max_time:g}", *args], timeout=max_time + 15)
    return done.returncode, done.stdout, done.stderr


def _twistd_options() -> list[str]:
    """
    Extra `twistd gateway` options: no control API listener where the
    gateway has one (two gateways share a namespace in the fault tests, and
    these tests need no API or state file).
    """
    try:
        from gateway.app.tap import Options
    except ImportError:
        return []
    names = {p[0] for p in Options.optParameters}
    return ["--control="] if "control" in names else []


def defaults_table(lab: Lab) -> str:
    """The [defaults] every fault and hostile-client gateway shares: the lab's key and short timers."""
    return (
        "[defaults]\n"
        'user = "root"\n'
        f'key_file = "{lab.client_key_ed25519}"\n'
        f'known_hosts = "{lab.known_hosts}"\n'
        f"keepalive_interval = {KEEPALIVE_INTERVAL}\n"
        f"keepalive_count_max = {KEEPALIVE_COUNT_MAX}\n"
        f"connect_timeout = {CONNECT_TIMEOUT}\n"
    )


class GatewayProcess:
    """One `twistd gateway` process in the lab's ctl namespace, with its own config and log file."""

    def __init__(
        self, lab: Lab, workdir: str, name: str, config: str, socks: int, http: int, extra_args: Sequence[str] = ()
    ) -> None:
        """C{extra_args} go after the defaults of L{_twistd_options}, so they win (e.g. C{--control=...})."""
        self.lab = lab
        self.socks = socks
        self.http = http
        self.config = os.path.join(workdir, f"{name}.toml")
        self.log = os.path.join(workdir, f"{name}.log")
        with open(self.config, "w") as f:
            f.write(textwrap.dedent(config))
        self.proc = lab.spawn(
            lab.ctl_ns,
            twistd_argv(self.config, self.log, *_twistd_options(), *extra_args),
        )

    def wait_listening(self, timeout: float = 20) -> None:
        for port in (self.socks, self.http):
            wait_for_port(self.lab, self.lab.ctl_ns, "127.0.0.1", port, timeout=timeout)

    def wait_up(self, clusters: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.read_log()
            if all(re.search(rf"cluster {re.escape(c)} up\b", log) for c in clusters):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"clusters {clusters} did not come up:\n" + self.read_log()[-4000:])

    def read_log(self) -> str:
        """The whole log, including files twistd rotated away (gateway.log.N)."""
        rotated = [p for p in glob.glob(self.log + ".*") if p.rsplit(".", 1)[1].isdigit()]
        rotated.sort(key=lambda p: -int(p.rsplit(".", 1)[1]))
        text = []
        for path in [*rotated, self.log]:
            try:
                with open(path, errors="replace") as f:
                    text.append(f.read())
            except OSError:
                pass
        return "".join(text)
