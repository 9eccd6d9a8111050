"""
Several `twistd gateway` processes on one listening socket, handed over the
way systemd's socket activation hands it (docs/operating.md, "More cores"):
each process listens with `[listen] socks = "systemd:domain=INET:name=socks"`.

The processes run the in-process demo cluster (`--demo`: a fake proxy node
and web server on loopback, no root and no namespace), and the socket is on
127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing import DEMO_PAGE, DEMO_WEB
from tests.support import socks_get
from tests.system.support import twistd_argv

#: What systemd does between its fork and the service's exec, for the child
#: it starts: the socket as descriptor 3 (inheritable), and the variables
#: naming it, LISTEN_PID being the child's own pid (known only after the fork).
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.set_inheritable(3, True)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='socks', LISTEN_PID=str(os.getpid()))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

#: Seconds a worker has to start (its demo cluster up) or to stop.
BOUND = 30.0


class SharedSocketTests(SynchronousTestCase):
    """Two workers accept from one socket; one stopped, the other serves all of it."""

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.config = os.path.join(self.workdir, "gateway.toml")
        with open(self.config, "w") as f:
            f.write('[listen]\nsocks = "systemd:domain=INET:name=socks"\nhttp = ""\n')
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(self.sock.close)
        self.port = self.sock.getsockname()[1]

    def start_worker(self, name: str) -> tuple[subprocess.Popen, str]:
        """A worker on the shared socket, its demo cluster up; and its log file."""
        log = os.path.join(self.workdir, f"{name}.log")
        argv = twistd_argv(self.config, log, "--demo", "--control=", f"--state-file={self.workdir}/{name}.json")
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(self.sock.fileno()), *argv],
            pass_fds=(self.sock.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(self.stop, proc)
        deadline = time.monotonic() + BOUND
        while "cluster demo up" not in self.read(log):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.fail(f"{name} did not start:\n{self.read(log)[-3000:]}")
            time.sleep(0.1)
        return proc, log

    @staticmethod
    def read(path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """SIGTERM by its pid; SIGKILL if it has not exited within the bound."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def assertServed(self, requests: int) -> None:
        """C{requests} SOCKS5 requests through the shared socket, each answered by a demo web server."""
        for _ in range(requests):
            code, answer = socks_get(self.port, *DEMO_WEB)
            self.assertEqual(code, 0)
            self.assertTrue(answer.endswith(DEMO_PAGE), answer[:200])

    def served(self, log: str) -> int:
        """How many requests the worker logging to C{log} answered (its demo web server logs each)."""
        return self.read(log).count('"GET / HTTP/1.0" 200')

    def test_two_workers_share_one_socket(self) -> None:
        """
        Each worker in turn is seen to accept from the socket (which one gets
        a connection while both wait is the kernel's choice, so the split is
        not checked): the first alone, then both, then the second alone
        once the first has stopped.
        """
        first, first_log = self.start_worker("w1")
        self.assertServed(5)
        self.assertEqual(self.served(first_log), 5)
        _, second_log = self.start_worker("w2")
        for log in (first_log, second_log):
            self.assertIn("socks listener on systemd:domain=INET:name=socks", self.read(log))
        self.assertServed(20)
        self.assertEqual(self.served(first_log) + self.served(second_log), 25)
        # A stopping worker closes its copy of the socket, not the socket: the other one accepts everything.
        before = self.served(second_log)
        self.stop(first)
        self.assertEqual(first.returncode, -signal.SIGTERM)  # twistd ends by the signal it stopped for
        self.assertServed(10)
        self.assertEqual(self.served(second_log), before + 10)

    def test_a_restart_refuses_no_connection(self) -> None:
        """
        The socket outlives every worker (systemd keeps it open): a client
        that connects while none runs waits in the backlog and is answered by
        the next worker to start, as during a restart.
        """
        first, _ = self.start_worker("w1")
        self.stop(first)
        with socket.create_connection(("127.0.0.1", self.port), timeout=BOUND) as waiting:
            waiting.sendall(b"\x05\x01\x00")  # SOCKS5, one method: no authentication
            self.start_worker("w2")
            self.assertEqual(waiting.recv(2), b"\x05\x00")
        self.assertServed(1)
