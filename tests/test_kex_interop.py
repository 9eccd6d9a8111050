"""
The gateway's key exchanges against real servers: mlkem768x25519-sha256
against asyncssh (OpenSSH here is 9.2; the hybrid came with 9.9) forced to
it, with rekeys begun by either side, 8 MiB each way byte for byte; and
against an OpenSSH that has it where the machine has one (skipped with the
reason otherwise).  Loopback only.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess

from twisted.trial.unittest import SkipTest

from gateway.ssh import kex
from tests.interop import SSHD, AsyncSSHServer, InteropTestCase, MiB, OpenSSHServer, sshd_skip_reason
from tests.support import inline

MLKEM = kex.MLKEM768X25519.decode()


class AsyncSSHTests(InteropTestCase):
    def setUp(self) -> None:
        if importlib.util.find_spec("asyncssh") is None:
            raise SkipTest("asyncssh is not installed (the test extra installs it)")
        if not kex.MLKEM_AVAILABLE:
            raise SkipTest("this cryptography has no ML-KEM: the gateway does not offer mlkem768x25519-sha256")
        super().setUp()

    def start(self, kex_algs: str, rekey_bytes: int = 1 << 30) -> AsyncSSHServer:
        server = AsyncSSHServer(self.workdir, kex_algs, self.client_key, rekey_bytes)
        server.start()
        self.addCleanup(server.stop)
        return server

    async def exchange(self, kex_algs: str, server_rekey: int = 1 << 30, **options):
        protocol, connection = await self.connected(self.start(kex_algs, server_rekey), **options)
        self.assertEqual(protocol.kexAlg.decode(), kex_algs)
        self.count_key_exchanges(protocol)
        await self.send_both_ways(connection)
        return protocol

    @inline
    async def test_mlkem768x25519(self):
        protocol = await self.exchange(MLKEM)
        self.assertTrue(protocol.strict_kex)  # asyncssh agrees to strict KEX too

    @inline
    async def test_mlkem768x25519_client_rekeys_every_mib(self):
        protocol = await self.exchange(MLKEM, rekey_bytes=MiB)
        self.assertGreaterEqual(protocol.rekeys, 12)

    @inline
    async def test_mlkem768x25519_server_rekeys_every_mib(self):
        protocol = await self.exchange(MLKEM, server_rekey=MiB)
        self.assertEqual(protocol.rekeys, 0)
        self.assertGreaterEqual(protocol.key_exchanges, 6)  # asyncssh counts its own way: 7 seen for 16 MiB

    @inline
    async def test_curve25519_control(self):
        await self.exchange("curve25519-sha256")


def _openssh_version() -> tuple[int, int] | None:
    try:
        done = subprocess.run([SSHD, "-V"], capture_output=True, timeout=10)
    except OSError:
        return None
    found = re.search(rb"OpenSSH_(\d+)\.(\d+)", done.stdout + done.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else None


class OpenSSHMLKEMTests(InteropTestCase):
    def setUp(self) -> None:
        reason = sshd_skip_reason()
        if reason:
            raise SkipTest(reason)
        version = _openssh_version()
        if version is None or version < (9, 9):
            shown = ".".join(map(str, version)) if version else "of an unknown version"
            raise SkipTest(f"sshd here is OpenSSH {shown}: mlkem768x25519-sha256 needs 9.9 or later")
        if not kex.MLKEM_AVAILABLE:
            raise SkipTest("this cryptography has no ML-KEM")
        super().setUp()

    @inline
    async def test_mlkem768x25519(self):
        server = OpenSSHServer(self.workdir, "aes128-gcm@openssh.com", self.client_key, f"KexAlgorithms {MLKEM}\n")
        server.start()
        self.addCleanup(server.stop)
        protocol, connection = await self.connected(server, rekey_bytes=MiB)
        self.assertEqual(protocol.kexAlg.decode(), MLKEM)
        await self.send_both_ways(connection)
