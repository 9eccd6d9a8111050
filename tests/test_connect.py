"""
gateway-connect (L{gateway.scripts.connect}), the ProxyCommand helper: as a
real subprocess against an in-process gateway on loopback, and its argument
checks and relay loop called directly.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gateway.scripts import connect
from tests.support import GatewayHarness, inline


class GatewayConnectTests(TestCase):
    """The ProxyCommand helper, as a real subprocess."""

    @inline
    async def setUp(self):
        self.harness = GatewayHarness(self, token="t0ken")
        await self.harness.start()

    async def _gateway_connect(self, *args: str, stdin: bytes = b"") -> tuple[bytes, bytes, int]:
        argv = [
            sys.executable,
            "-m",
            "gateway.scripts.connect",
            "--socks",
            f"127.0.0.1:{self.harness.socks_port}",
            *args,
        ]

        def run():
            done = subprocess.run(argv, input=stdin, capture_output=True, timeout=30)
            return done.stdout, done.stderr, done.returncode

        return await deferToThread(run)

    @inline
    async def test_relays_stdin_and_stdout_with_half_close(self):
        out, err, status = await self._gateway_connect(
            "--cluster", "demo", "--token", "t0ken", "10.99.0.10", "7", stdin=b"hello"
        )
        self.assertEqual((out, status), (b"hellobye", 0), err)

    @inline
    async def test_refusal_in_words_and_non_zero_exit(self):
        out, err, status = await self._gateway_connect("--cluster", "demo", "--token", "t0ken", "10.99.0.10", "81")
        self.assertEqual(status, 3)
        self.assertIn(b"connection refused", err)
        self.assertIn(b"0x05", err)

    @inline
    async def test_wrong_token(self):
        out, err, status = await self._gateway_connect("--cluster", "demo", "--token", "nope", "10.99.0.10", "7")
        self.assertEqual(status, 3)
        self.assertIn(b"rejected the credentials", err)
        self.assertNotIn(b"nope", err)

    @inline
    async def test_gateway_not_listening(self):
        def run():
            return subprocess.run(
                [sys.executable, "-m", "gateway.scripts.connect", "--socks", "127.0.0.1:1", "10.0.0.1", "22"],
                capture_output=True,
                timeout=30,
            )

        done = await deferToThread(run)
        self.assertEqual(done.returncode, 2)
        self.assertIn(b"cannot reach the gateway", done.stderr)


class GatewayConnectArgumentTests(TestCase):
    """gateway-connect's own failures: one line and a status, never a traceback."""

    def main(self, *args: str) -> tuple[int, str]:
        defaults = ("GATEWAY_CLUSTER", "GATEWAY_TOKEN")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k not in defaults})
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        # Nothing listens on port 1: reaching the gateway would say so.
        status = connect.main(["--socks", "127.0.0.1:1", *args])
        return status, stderr.getvalue()

    def test_arguments_socks5_cannot_carry(self):
        """Checked before connecting: a usage error, whatever the gateway would say."""
        cases = [
            (("a..b.example", "22"), "is not a valid host name"),
            (("x" * 64 + ".example", "22"), "is not a valid host name"),
            (("a." * 128 + "b", "22"), "host name is longer than 255 bytes"),
            (("fe80::1%eth0", "22"), "zone ids are not accepted"),
            (("10.0.0.1", "0"), "port 0 is not between 1 and 65535"),
            (("10.0.0.1", "70000"), "port 70000 is not between 1 and 65535"),
            (("--cluster", "c" * 256, "10.0.0.1", "22"), "cluster name is longer than 255 bytes"),
            (("--cluster", "c", "--token", "S3CRET" * 43, "10.0.0.1", "22"), "token is longer than 255 bytes"),
            (("--cluster", "c", "--token", "S3CRET\udcff", "10.0.0.1", "22"), "token is not valid UTF-8"),
        ]
        for args, words in cases:
            status, err = self.main(*args)
            self.assertEqual(status, connect.EXIT_USAGE, args)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith("gateway-connect: "), err)
            self.assertIn(words, err)
            self.assertNotIn("S3CRET", err)

    def test_reader_of_stdout_gone_is_a_normal_end(self):
        """The SSH client closed its end of our stdout: relay() ends quietly (exit 0), not with EPIPE."""
        ours, theirs = socket.socketpair()
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        os.close(stdout_read)
        os.close(stdin_write)  # and stdin ends too, so nothing can block
        theirs.sendall(b"from the destination")
        theirs.close()
        try:
            connect.relay(ours, stdin_read, stdout_write)
        finally:
            os.close(stdin_read)
            os.close(stdout_write)
        self.assertEqual(ours.fileno(), -1)  # closed
