"""
Shared pieces for the in-process tests: a gateway with a fake proxy node on
loopback, real destination services, and blocking clients run in threads.

Everything listens on 127.0.0.1 or on unix sockets in the test's temp dir;
"internal" addresses such as 10.99.0.10 exist only inside the fake proxy node's
route table, so no packet ever leaves the machine.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gateway.app.service import GatewayService
from gateway.config import GatewayConfig, GatewaySettings, ListenConfig, parse_cluster
from gateway.ssh.channel import TunnelChannel
from gateway.ssh.connection import TunnelConnection
from gateway.testing import FakeProxyNode, demo_web_site, generate_key, private_pem, public_line

WEB = ("10.99.0.10", 80)
WEB2 = ("10.99.0.11", 80)
WEB2_PAGE = b"the other web server\n"
#: A web server that closes idle keep-alive connections after 0.3 s (nginx-style).
IMPATIENT_WEB = ("10.99.0.12", 80)
ECHO = ("10.99.0.10", 7)
FLOOD = ("10.99.0.10", 19)
PROHIBITED = ("10.99.0.10", 25)
FLOOD_BYTES = 32 * 1024 * 1024


def inline(f: Callable[[Any], Coroutine[Any, Any, Any]]) -> Callable[[Any], Deferred[Any]]:
    """Run an async test method as a Deferred: trial waits for those, not for coroutines."""

    def wrapper(self: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


def capture_events(testcase: SynchronousTestCase) -> list[dict]:
    """Every log event emitted until the end of C{testcase}, for assertions on what was logged."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


async def sleep(seconds: float) -> None:
    """Let the real reactor run for C{seconds} (the loopback tier only; in-memory tests advance a Clock)."""
    await deferLater(reactor, seconds, lambda: None)


class FakeSSHTransport:
    """Stands for an SSH transport under a connection service: records packets instead of encrypting them."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []
        self.disconnects: list[bytes] = []
        self.sessionID = b"session-id"
        self.peerExtensions: dict[bytes, bytes] = {}

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.packets.append((kind, payload))

    def send_message(self, kind: int, payload: bytes, data: bytes = b"") -> None:
        self.packets.append((kind, payload + data))

    def sendDisconnect(self, reason: int, description: bytes) -> None:
        self.disconnects.append(description)

    def of_kind(self, kind: int) -> list[bytes]:
        return [payload for k, payload in self.packets if k == kind]


class MemoryProxyNode:
    """
    One cluster's SSH connection in memory, its proxy node played by the test.

    It stands where L{gateway.proxy.opener.StreamOpener} stands for a front end:
    C{open_stream} opens a real L{TunnelChannel} on a real L{TunnelConnection}
    over a L{FakeSSHTransport}; the test confirms or refuses opens, reads what
    each channel sent and answers with data, EOF and close, packet by packet.
    """

    def __init__(self, clock: Clock, settings: GatewaySettings | None = None, *, auto_open: bool = True) -> None:
        self.settings = settings or GatewaySettings()
        self.ssh = FakeSSHTransport()
        self.conn = TunnelConnection(Deferred(), clock)
        self.conn.transport = self.ssh
        self.conn.serviceStarted()
        self.auto_open = auto_open
        self.requests: list[Any] = []
        self.channels: list[TunnelChannel] = []
        self.handshake_errors: Counter[str] = Counter()
        #: What serves /proxy.pac (the StreamOpener's C{pac}); a test sets it.
        self.pac: Any = None
        self._remote_ids = itertools.count(100)
        self._remote: dict[TunnelChannel, bytes] = {}

    # what a front end calls (the StreamOpener's interface)

    def authenticate(self, username: str, password: str, cluster: str | None = None) -> bool:
        return True

    def is_cluster(self, name: str) -> bool:
        return False

    def destination_host(self, host: str) -> str:
        return host

    def route(self, request: Any) -> tuple[None, MemoryProxyNode]:
        return None, self

    def open_stream(self, request: Any) -> Deferred[TunnelChannel]:
        self.requests.append(request)
        opened = self.conn.open_tunnel(request.host, request.port, request.origin)
        channel = self.conn.channels[max(self.conn.channels)]
        channel.cluster = self
        self.channels.append(channel)
        if self.auto_open:
            self.confirm(channel)
        return opened

    # the proxy node's side

    def confirm(self, channel: TunnelChannel, window: int = 1 << 20) -> None:
        remote = next(self._remote_ids)
        self._remote[channel] = struct.pack(">L", remote)
        confirmation = struct.pack(">4L", channel.id, remote, window, 32768)
        self.conn.packetReceived(connection.MSG_CHANNEL_OPEN_CONFIRMATION, confirmation)

    def received(self, channel: TunnelChannel) -> bytes:
        """Everything the gateway sent on C{channel} so far."""
        remote = self._remote[channel]
        return b"".join(p[8:] for p in self.ssh.of_kind(connection.MSG_CHANNEL_DATA) if p[:4] == remote)

    def sent(self, kind: int, channel: TunnelChannel) -> int:
        """How many messages of C{kind} the gateway sent on C{channel}."""
        return sum(1 for p in self.ssh.of_kind(kind) if p[:4] == self._remote[channel])

    def reply(self, channel: TunnelChannel, data: bytes) -> None:
        message = struct.pack(">L", channel.id) + NS(data)
        self.conn.channel_data(message, 0, len(message))

    def eof(self, channel: TunnelChannel) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_EOF, struct.pack(">L", channel.id))

    def close(self, channel: TunnelChannel) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", channel.id))

    def window(self, channel: TunnelChannel, size: int) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", channel.id, size))


class MemoryClient:
    """A front-end protocol on a L{StringTransport}, built by its factory like a real connection."""

    def __init__(self, factory_class: Callable[..., Any], node: MemoryProxyNode, clock: Clock) -> None:
        self.factory = factory_class(node, clock)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        """What the client received so far (and forget it)."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def half_close(self) -> None:
        self.protocol.readConnectionLost()

    def lose(self) -> None:
        """The connection is gone (the client reset, or the gateway's close took effect)."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def slots_used(self) -> int:
        return self.factory.clients.count


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    """Echoes; on the client's EOF answers b'bye' and closes its side."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Flood(Protocol):
    """Writes FLOOD_BYTES as fast as the consumer takes them, then closes."""

    def connectionMade(self) -> None:
        self._left = FLOOD_BYTES
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._left = 0

    def resumeProducing(self) -> None:
        self._paused = False
        chunk = b"x" * 65536
        while self._left > 0 and not self._paused:
            self._left -= len(chunk)
            self.transport.write(chunk)
        if self._left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()


def _impatient_site():
    site = demo_web_site()
    site.timeOut = 0.3
    return site


def quiet_factory(protocol: type[Protocol]) -> Factory:
    """A server factory for a destination service that does not log every connection."""
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    return factory


class GatewayHarness:
    """A running gateway in this process, with one fake cluster behind it."""

    def __init__(self, testcase, settings: GatewaySettings | None = None, **cluster_overrides: Any) -> None:
        self.testcase = testcase
        self.dir = testcase.mktemp()
        os.makedirs(self.dir)
        self.client_key = generate_key()
        self.cluster_overrides = cluster_overrides
        self.settings = settings or GatewaySettings()
        self.node: FakeProxyNode | None = None
        #: Every proxy node (candidate) and its listening port, in order.
        self.nodes: list[FakeProxyNode] = []
        self.ports: list = []
        self.service: GatewayService | None = None

    async def start(self, nodes: int = 1) -> None:
        """Start the destinations, C{nodes} proxy nodes (candidates) and the gateway."""
        routes = {}
        for name, address, factory in (
            ("web", WEB, demo_web_site()),
            ("web2", WEB2, demo_web_site(WEB2_PAGE)),
            ("impatient", IMPATIENT_WEB, _impatient_site()),
            ("echo", ECHO, quiet_factory(HalfCloseEcho)),
            ("flood", FLOOD, quiet_factory(Flood)),
        ):
            path = os.path.join(self.dir, f"{name}.sock")
            port = await serverFromString(reactor, f"unix:{path}").listen(factory)
            self.testcase.addCleanup(port.stopListening)
            routes[address] = f"unix:{path}"
        host_key = generate_key()
        for _ in range(nodes):
            node = FakeProxyNode(reactor, [self.client_key], routes=routes, prohibited=[PROHIBITED], host_key=host_key)
            self.nodes.append(node)
            self.ports.append(await node.listen())
        self.testcase.addCleanup(self._stop_nodes)
        self.node = self.nodes[0]
        self.ssh_port = self.ports[0].getHost().port
        cluster = parse_cluster("demo", self.cluster_settings(), "(test)", "clusters.demo")
        config = GatewayConfig(
            listen=ListenConfig(socks=("tcp:0:interface=127.0.0.1",), http=("tcp:0:interface=127.0.0.1",), control=()),
            clusters={"demo": cluster},
            source="(test)",
            settings=self.settings,
        )
        self.service = GatewayService(config, reactor)
        self.service.startService()
        self.testcase.addCleanup(self.service.stopService)
        await self.cluster_up("demo")

    def cluster_settings(self, **more: Any) -> dict:
        settings = {
            "proxies": [f"127.0.0.1:{port.getHost().port}" for port in self.ports],
            "user": "demo",
            "key": private_pem(self.client_key),
            "host_keys": [public_line(self.node.host_key)],
            "networks": ["10.99.0.0/24"],
            "connect_timeout": 5.0,
        }
        settings.update(self.cluster_overrides)
        settings.update(more)
        return settings

    async def _stop_nodes(self) -> None:
        for port in self.ports:
            if port is not None:
                await port.stopListening()

    async def take_down(self, index: int) -> None:
        """Node C{index} stops accepting and stops answering (a VM gone)."""
        self.nodes[index].frozen = True
        port, self.ports[index] = self.ports[index], None
        self._down_port = port.getHost().port
        await port.stopListening()

    async def bring_back(self, index: int, port_number: int) -> None:
        self.nodes[index].frozen = False
        self.ports[index] = await self.nodes[index].listen(f"tcp:{port_number}:interface=127.0.0.1")

    async def cluster_up(self, name: str) -> None:
        await self.service.clusters[name].connection()

    async def until_no_streams(self, timeout: float = 5.0, cluster: str = "demo") -> None:
        """Wait until the cluster's streams have closed (and been counted in its stats)."""
        connection = self.service.clusters[cluster]
        for _ in range(int(timeout / 0.05)):
            if connection.open_streams == 0:
                return
            await sleep(0.05)
        raise AssertionError(f"{connection.open_streams} streams still open")

    @property
    def socks_port(self) -> int:
        return int(self.service.listening_address("socks").rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.service.listening_address("http").rsplit(":", 1)[1])


# -- blocking clients (run with deferToThread) ---------------------------------


def recv_all(sock: socket.socket, limit: int = 1 << 26) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def socks5_open(
    port: int,
    host: str,
    dest_port: int,
    username: str | None = None,
    password: str = "",
    timeout: float = 10,
) -> tuple[socket.socket, int]:
    """SOCKS5 CONNECT; returns the socket and the reply code (0 = success)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    method = 2 if username is not None else 0
    sock.sendall(bytes([5, 1, method]))
    greeting = sock.recv(2)
    if greeting != bytes([5, method]):
        return sock, -1
    if username is not None:
        user, pw = username.encode(), password.encode()
        sock.sendall(bytes([1, len(user)]) + user + bytes([len(pw)]) + pw)
        if sock.recv(2) != b"\x01\x00":
            return sock, -2
    try:
        address = b"\x01" + socket.inet_aton(host)
    except OSError:  # a name, sent for the gateway to route and resolve
        address = b"\x03" + bytes([len(host.encode())]) + host.encode()
    sock.sendall(b"\x05\x01\x00" + address + struct.pack(">H", dest_port))
    reply = b""
    while len(reply) < 10:
        chunk = sock.recv(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    return sock, reply[1] if len(reply) > 1 else -3


def socks_get(port: int, host: str, dest_port: int, **credentials: Any) -> tuple[int, bytes]:
    """A SOCKS5 CONNECT and C{GET /} over it: the reply code and everything the destination sent."""
    sock, code = socks5_open(port, host, dest_port, **credentials)
    with sock:
        if code != 0:
            return code, b""
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        return code, recv_all(sock)


def http_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the HTTP listener and read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return recv_all(sock)


# -- endpoint tests (proxy command, jump) -----------------------------------------

#: Seconds an endpoint test waits for one step on the real reactor.
WAIT = 5.0


def within(d: Deferred, seconds: float = WAIT) -> Deferred:
    """C{d}, failing with a time-out after C{seconds} of the real reactor."""
    return d.addTimeout(seconds, reactor)


class Collector(Protocol):
    """Records what it receives; C{until} waits for enough of it."""

    def __init__(self) -> None:
        self.data = b""
        #: Fires with the exception connectionLost was given.
        self.lost: Deferred[BaseException] = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, d))
                d.callback(self.data)

    def until(self, marker: bytes) -> Deferred:
        if marker in self.data:
            d: Deferred = Deferred()
            d.callback(self.data)
            return d
        d = Deferred()
        self._waiting.append((marker, d))
        return within(d)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(reason.value)


class OneShot(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        self.address = addr
        return self.protocol_instance


async def fetch(conn) -> bytes:
    """GET / from the demo web server through a tunnel of C{conn}; the response body."""
    channel = await within(conn.open_tunnel(*WEB, ("127.0.0.1", 0)))
    received: list[bytes] = []
    closed: Deferred = Deferred()

    class Peer:
        def tunnel_data(self, data):
            received.append(data)

        def tunnel_eof(self):
            channel.close()  # the server answered and closed: so do we

        def tunnel_closed(self):
            closed.callback(None)

        def tunnel_pause_writing(self):
            pass

        def tunnel_resume_writing(self):
            pass

    channel.attach(Peer())
    channel.send(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
    await within(closed)
    response = b"".join(received)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body
