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
            (("", "22"), "the host name is empty"),
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

    def test_stdin_from_a_file(self):
        """
        stdin may be a file or /dev/null (C{gateway-connect HOST PORT < request}),
        which epoll refuses (EPERM): relay() copies it like a pipe.
        """
        ours, theirs = socket.socketpair()
        theirs.sendall(b"reply")
        theirs.shutdown(socket.SHUT_WR)
        request = self.mktemp()
        with open(request, "wb") as f:
            f.write(b"request")
        stdout_read, stdout_write = os.pipe()
        stdin = os.open(request, os.O_RDONLY)
        try:
            connect.relay(ours, stdin, stdout_write)  # closes stdout_write at the socket's end
            self.assertEqual(os.read(stdout_read, 100), b"reply")
        finally:
            os.close(stdin)
            os.close(stdout_read)
        self.assertEqual(theirs.recv(100), b"request")
        self.assertEqual(theirs.recv(100), b"")
        theirs.close()


USAGE = """\
usage: gateway-connect [-h] [--socks SOCKS] [--cluster CLUSTER]
                       [--token TOKEN] [--timeout TIMEOUT]
                       host port
"""


class GatewayConnectCommandLineTests(TestCase):
    """
    The command line reads as it did with argparse (options, abbreviations,
    help, messages, status 2), without argparse: importing and running it
    was a fifth of gateway-connect's start.
    """

    def setUp(self):
        defaults = ("GATEWAY_SOCKS", "GATEWAY_CLUSTER", "GATEWAY_TOKEN")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k not in defaults})

    def parse(self, *args: str) -> tuple[connect.Arguments | int, str, str]:
        """parse_args(args): the arguments, or the exit status; and what it wrote to stdout and stderr."""
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        try:
            result: connect.Arguments | int = connect.parse_args(list(args))
        except SystemExit as e:
            result = e.code
        return result, stdout.getvalue(), stderr.getvalue()

    def test_help(self):
        """argparse's help at 80 columns; the default listener shown is $GATEWAY_SOCKS's when set."""
        expected = (
            USAGE
            + """
Relay stdin/stdout to HOST:PORT through the gateway's SOCKS5 listener.

positional arguments:
  host
  port

options:
  -h, --help         show this help message and exit
  --socks SOCKS      gateway SOCKS listener, HOST:PORT or unix:PATH (default:
                     $GATEWAY_SOCKS or 127.0.0.1:1080)
  --cluster CLUSTER  cluster name or alias (default: $GATEWAY_CLUSTER; route
                     by address)
  --token TOKEN      the cluster's token (default: $GATEWAY_TOKEN)
  --timeout TIMEOUT  seconds for the handshake (default: 30)
"""
        )
        for args in (["-h"], ["--help"], ["--he"], ["-hh"], ["--socks", "unix:/x", "10.0.0.1", "-h"]):
            self.assertEqual(self.parse(*args), (0, expected, ""), args)
        os.environ["GATEWAY_SOCKS"] = "unix:/run/gw.sock"
        status, out, _ = self.parse("-h")
        self.assertIn("$GATEWAY_SOCKS or unix:/run/gw.sock)\n", out)

    def test_usage_errors(self):
        """The usage and one line on stderr, status 2, nothing on stdout; in argparse's order."""
        cases = [
            ((), "the following arguments are required: host, port"),
            (("10.0.0.1",), "the following arguments are required: port"),
            (("10.0.0.1", "ssh"), "argument port: invalid int value: 'ssh'"),
            (("--timeout", "soon", "10.0.0.1", "22"), "argument --timeout: invalid float value: 'soon'"),
            (("--cluster",), "argument --cluster: expected one argument"),
            (("--cluster", "--token", "t", "10.0.0.1", "22"), "argument --cluster: expected one argument"),
            (("--socks", "--", "10.0.0.1", "22"), "argument --socks: expected one argument"),
            (("10.0.0.1", "22", "--t", "x"), "ambiguous option: --t could match --token, --timeout"),
            (("10.0.0.1", "ssh", "--t=x"), "ambiguous option: --t=x could match --token, --timeout"),
            (("10.0.0.1", "22", "--verbose"), "unrecognized arguments: --verbose"),
            (("10.0.0.1", "22", "23", "-1e3"), "unrecognized arguments: 23 -1e3"),
            (("10.0.0.1", "22", "--cluster", "c", "--"), "unrecognized arguments: --"),
            (("10.0.0.1", "--", "--help"), "argument port: invalid int value: '--help'"),
            (("-hx",), "argument -h/--help: ignored explicit argument 'x'"),
            (("--help=yes",), "argument -h/--help: ignored explicit argument 'yes'"),
        ]
        for args, message in cases:
            self.assertEqual(self.parse(*args), (2, "", f"{USAGE}gateway-connect: error: {message}\n"), args)

    def test_options(self):
        """Abbreviations, --option=value, negative numbers, '--' and the environment's defaults."""

        def values(arguments):
            return tuple(getattr(arguments, name) for name in ("socks", "cluster", "token", "timeout", "host", "port"))

        os.environ.update(GATEWAY_SOCKS="unix:/run/gw.sock", GATEWAY_CLUSTER="env", GATEWAY_TOKEN="envtoken")
        cases = [
            (("10.0.0.1", "22"), ("unix:/run/gw.sock", "env", "envtoken", 30.0, "10.0.0.1", 22)),
            (
                ("--so=127.0.0.1:1", "--clu", "a", "--tok=", "--time", "2.5", "h", "22"),
                ("127.0.0.1:1", "a", "", 2.5, "h", 22),
            ),
            (("h", "--cluster", "a", "22", "--cluster=b"), ("unix:/run/gw.sock", "b", "envtoken", 30.0, "h", 22)),
            (
                ("--cluster", "-1", "--timeout", "-.5", "-x y", "22"),
                ("unix:/run/gw.sock", "-1", "envtoken", -0.5, "-x y", 22),
            ),
            (("--", "-h", "22"), ("unix:/run/gw.sock", "env", "envtoken", 30.0, "-h", 22)),
        ]
        for args, expected in cases:
            result, out, err = self.parse(*args)
            self.assertEqual((values(result), out, err), (expected, "", ""), args)

    def test_imports_stdlib_only(self):
        """
        Sahara and Ansible start gateway-connect once per SSH connection:
        importing it and reading its command line loads no third-party
        module, none of the gateway's own but the reply words, and none of
        the heavy standard ones (argparse, dataclasses, ipaddress until an
        address is parsed...) that made a start take 170-260 ms instead of ~20.
        """
        code = (
            "import sys; before = set(sys.modules); from gateway.scripts import connect; "
            "connect.parse_args(['--socks', '127.0.0.1:1', '--cluster', 'c', '--timeout', '5', '10.0.0.1', '22']); "
            "print(' '.join(sorted(set(sys.modules) - before)))"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(connect.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        loaded = set(done.stdout.split())
        self.assertIn("gateway.scripts.connect", loaded)
        ours = {"gateway", "gateway.proxy", "gateway.proxy.socks", "gateway.proxy.socks.replies", "gateway.scripts"}
        self.assertEqual({name for name in loaded if name.startswith("gateway")} - ours, {"gateway.scripts.connect"})
        foreign = {name for name in loaded if name.split(".")[0] not in (*sys.stdlib_module_names, "gateway")}
        self.assertEqual(foreign, set())
        heavy = {"argparse", "dataclasses", "inspect", "ipaddress", "re", "typing", "shutil", "gettext"}
        self.assertEqual(loaded & heavy, set())
