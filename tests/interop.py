"""
Real SSH servers for interop tests, and what the tests send through them:
OpenSSH's sshd on 127.0.0.1 (L{OpenSSHServer}), local TCP sources and sinks,
and the gateway's client connected to either (L{connect}, L{download}).
Loopback only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.conch.ssh.keys import Key
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from gateway.ssh.hostkeys import HostKeyPolicy
from gateway.ssh.transport import client_factory
from gateway.testing import generate_key, public_line
from tests.support import within
from tests.system.netlab import stop_processes

ORIGIN = ("127.0.0.1", 0)
SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
MiB = 1 << 20
PAYLOAD = hashlib.shake_256(b"gateway AEAD interop").digest(8 * MiB)


def first_difference(a: bytes, b: bytes) -> str:
    if a == b:
        return "equal"
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return f"first difference at byte {i} (lengths {len(a)}, {len(b)})"
    return f"lengths differ: {len(a)} != {len(b)}"


# -- against OpenSSH ------------------------------------------------------------

#: Names no list the gateway sends may hold.
WEAK = {
    "3des-cbc",
    "aes128-cbc",
    "aes192-cbc",
    "aes256-cbc",
    "hmac-md5",
    "hmac-sha1",
    "diffie-hellman-group1-sha1",
    "diffie-hellman-group14-sha1",
    "diffie-hellman-group-exchange-sha1",
    "ssh-rsa",
    "ssh-dss",
    "zlib",
    "zlib@openssh.com",
}


def sshd_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run sshd"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed"
    if not os.access(SSH_KEYGEN, os.X_OK):
        return "ssh-keygen is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenSSHServer:
    """An sshd on 127.0.0.1 with its own host key, offering only C{ciphers}."""

    def __init__(self, workdir: str, ciphers: str, client_key: Key, extra: str = "") -> None:
        self.workdir = workdir
        self.extra = extra
        self.ciphers = ciphers
        self.client_key = client_key
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        host_key = os.path.join(self.workdir, "host_ed25519")
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True, timeout=30)
        self.host_key = Key.fromFile(host_key + ".pub")
        authorized = os.path.join(self.workdir, "authorized_keys")
        with open(authorized, "w") as f:
            f.write(public_line(self.client_key) + "\n")
        for _attempt in range(3):
            self.port = free_port()
            config = os.path.join(self.workdir, "sshd_config")
            with open(config, "w") as f:
                # sshd takes the first value of a keyword: the extra lines win.
                f.write(
                    f"{self.extra}ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {host_key}\n"
                    f"AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\n"
                    f"PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    f"PidFile {os.path.join(self.workdir, 'sshd.pid')}\nCiphers {self.ciphers}\n"
                    f"AllowTcpForwarding yes\nLogLevel VERBOSE\n"
                )
            self.log = os.path.join(self.workdir, "sshd.log")
            with open(self.log, "wb") as log:
                self.process = subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if f"listening on 127.0.0.1 port {self.port}" in self.read_log():
                    return
                if self.process.poll() is not None:
                    break
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"sshd did not start: {self.read_log()}")

    def read_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop_processes([self.process], timeout=5)  # by pid: only the sshd we started
        self.process = None


class Source(Protocol):
    """Writes C{factory.payload} (or C{factory.size} bytes of it, repeated), then closes."""

    def connectionMade(self) -> None:
        self._chunks = self.factory.chunks()
        self.transport.registerProducer(self, True)
        self._paused = False
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._chunks = iter(())

    def resumeProducing(self) -> None:
        self._paused = False
        for chunk in self._chunks:
            self.transport.write(chunk)
            if self._paused:
                return
        self.transport.unregisterProducer()
        self.transport.loseConnection()


class SourceFactory(Factory):
    protocol = Source
    noisy = False

    def __init__(self, payload: bytes, repeat: int = 1) -> None:
        self.payload = payload
        self.repeat = repeat

    def chunks(self):
        view = memoryview(self.payload)
        for _ in range(self.repeat):
            for i in range(0, len(view), 256 * 1024):
                yield view[i : i + 256 * 1024].tobytes()


class Sink(Protocol):
    def connectionMade(self) -> None:
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.factory.received.callback(bytes(self.data))


class SinkFactory(Factory):
    protocol = Sink
    noisy = False

    def __init__(self) -> None:
        self.received: Deferred[bytes] = Deferred()


class Collector:
    """A TunnelPeer keeping (or only counting) what arrives."""

    def __init__(self, keep: bool = True, on_data=None) -> None:
        self.keep = keep
        self.data = bytearray()
        self.count = 0
        self.done: Deferred[bytes] = Deferred()
        self.on_data = on_data
        self.channel = None

    def attach_to(self, channel):
        self.channel = channel
        channel.attach(self)
        return channel

    def tunnel_data(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.data += data
        if self.on_data is not None:
            self.on_data()

    def tunnel_eof(self) -> None:
        # sshd keeps the channel until we are done too, as a client would be.
        if self.channel is not None:
            self.channel.close()

    def tunnel_closed(self) -> None:
        self.done.callback(bytes(self.data))

    def tunnel_pause_writing(self) -> None:
        pass

    def tunnel_resume_writing(self) -> None:
        pass


async def connect(server: OpenSSHServer | AsyncSSHServer, client_key: Key, **options):
    factory = client_factory(
        "127.0.0.1", server.port, "root", client_key, HostKeyPolicy(pinned=[server.host_key]), reactor, **options
    )
    protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, timeout=10).connect(factory)
    connection = await within(protocol.ready, 20)
    return protocol, connection


async def download(connection, source_port: int, keep: bool = True, on_data=None) -> tuple[Collector, float]:
    collector = Collector(keep, on_data)
    opened = connection.open_tunnel("127.0.0.1", source_port, ORIGIN)
    opened.addCallback(collector.attach_to)
    started = time.perf_counter()
    await opened
    await collector.done
    return collector, time.perf_counter() - started


class AsyncSSHServer:
    """An asyncssh server (L{tests.asyncssh_peer}) on 127.0.0.1 offering only C{kex_algs}."""

    def __init__(self, workdir: str, kex_algs: str, client_key: Key, rekey_bytes: int = 1 << 30) -> None:
        self.workdir = workdir
        self.kex_algs = kex_algs
        self.client_key = client_key
        self.rekey_bytes = rekey_bytes
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        host_key = os.path.join(self.workdir, "asyncssh_host_ed25519")
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True, timeout=30)
        self.host_key = Key.fromFile(host_key + ".pub")
        authorized = os.path.join(self.workdir, "asyncssh_authorized_keys")
        with open(authorized, "w") as f:
            f.write(public_line(self.client_key) + "\n")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "asyncssh_peer.py")
        self.log = os.path.join(self.workdir, "asyncssh.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, script, host_key, authorized, self.kex_algs, str(self.rekey_bytes)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the port, or EOF if it died
        if not line.strip().isdigit():
            self.stop()
            with open(self.log, errors="replace") as f:
                raise RuntimeError(f"asyncssh did not start: {f.read()[-2000:]}")
        self.port = int(line)

    def stop(self) -> None:
        stop_processes([self.process], timeout=5)  # by pid: only the server we started
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None


class InteropTestCase(TestCase):
    """The gateway's client against a real server: connect, then 8 MiB down and 8 MiB up, byte for byte."""

    timeout = 120

    def setUp(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="interop-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.client_key = generate_key()

    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def connected(self, server: OpenSSHServer | AsyncSSHServer, **options):
        protocol, connection = await connect(server, self.client_key, **options)

        def disconnect():
            if protocol.transport.connected:
                protocol.loseConnection()
            return within(protocol.lost, 10)

        self.addCleanup(disconnect)
        return protocol, connection

    def count_key_exchanges(self, protocol) -> None:
        """From now on, C{protocol.key_exchanges} counts the exchanges finished, whoever began them."""
        protocol.key_exchanges = 0
        new_keys = protocol._newKeys

        def count_new_keys() -> None:
            protocol.key_exchanges += 1
            new_keys()

        protocol._newKeys = count_new_keys

    async def send_both_ways(self, connection) -> None:
        # Down: the local server sends 8 MiB.
        collector, _ = await within(
            Deferred.fromCoroutine(download(connection, self.listen(SourceFactory(PAYLOAD)))), 60
        )
        self.assertTrue(collector.data == PAYLOAD, first_difference(bytes(collector.data), PAYLOAD))
        # Up: we send 8 MiB, the local server checks it.
        sink = SinkFactory()
        channel = await within(connection.open_tunnel("127.0.0.1", self.listen(sink), ORIGIN), 20)
        done = Collector()
        done.attach_to(channel)
        channel.send(PAYLOAD)
        channel.send_eof()
        received = await within(sink.received, 60)
        self.assertTrue(received == PAYLOAD, first_difference(received, PAYLOAD))
        await within(done.done, 20)
