"""
An in-process stand-in for a cluster: a Conch SSH server playing the proxy
node, and a small web service that only that server can reach.

Used by the embedded demo (C{twistd -n gateway --demo}), by the in-process
tests, and available to anyone who wants to exercise the gateway without
root or a network.  The fake proxy node behaves like OpenSSH where the
gateway can tell the difference: it answers C{direct-tcpip} opens only after
connecting to the destination (so "connection refused" is an open failure
with code 2), answers code 1 for destinations it is told to prohibit, and
carries half-close in both directions.  Like an OpenSSH server it also runs
C{nc HOST PORT} in C{session} channels (exec), the way the gateway reaches
destinations through nodes configured with C{AllowTcpForwarding no}
(C{FakeProxyNode(allow_tcp_forwarding=False)}), with netcat-openbsd's
stderr and exit status on failure.

Destinations are virtual: the node maps C{(host, port)} pairs to client
endpoint strings, e.g. C{("10.99.0.10", 80)} to a unix socket in a private
directory, so the "internal network" exists only behind the fake proxy node.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.ssh import common, connection, factory, forwarding, keys, transport, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.service import SSHService
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.test.iosim import IOPump
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import Interface, implementer

from gateway.config import ProxyAddress
from gateway.proxy.splice import IClientTransport
from gateway.ssh._conch import quiet_conch_logs
from gateway.ssh.channel import OrderedEOFChannel

log = Logger()

#: The node's own Conch events (each step of every key exchange and login at
#: debug or info level) would bury the demo's instructions: warnings only.
_quiet = quiet_conch_logs("gateway.testing.proxy_node")

#: The client protocol L{MemoryNetwork} joins to a server, handed back as it came.
_Client = TypeVar("_Client")

DEMO_USER = "demo"
DEMO_NETWORK = "10.99.0.0/24"
DEMO_WEB = ("10.99.0.10", 80)
#: The same web server under a name, for the cluster the demo registers
#: through the API: a name of its own, so the two clusters never overlap.
DEMO_API_WEB = ("web.demo-api.internal", 80)
DEMO_PAGE = b"Hello from 10.99.0.10, a web server inside the demo cluster.\n"


def generate_key() -> keys.Key:
    """A fresh Ed25519 private key, in memory."""
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def private_pem(key: keys.Key) -> str:
    return key.toString("OPENSSH").decode("ascii")


def public_line(key: keys.Key) -> str:
    return key.public().toString("OPENSSH").decode("ascii")


@implementer(IHalfCloseableProtocol)
class _DestinationProtocol(Protocol):
    """The proxy node's TCP connection to a destination, joined to a channel."""

    #: Set by C{makeConnection}; as a listener's client connection, the
    #: destination's is a consumer and a push producer that can half-close.
    transport: IClientTransport

    def __init__(self, tunnel: _ServerStream) -> None:
        self._tunnel = tunnel
        self._halves_done = 0
        self.read_closed = False

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.write(data)

    def _half_done(self) -> None:
        self._halves_done += 1
        if self._halves_done == 2:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.read_closed = True
        self._tunnel.destination_eof()
        self._half_done()

    def writeConnectionLost(self) -> None:
        self._half_done()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.read_closed = True
        self._tunnel.destination_lost()


@implementer(IPushProducer)
class _ServerStream(OrderedEOFChannel):
    """
    Server side of a channel joined to a destination connection.

    Flow control both ways, as sshd does it: data from the channel goes to
    the destination (queued until it is connected) and window is granted back
    only while the destination keeps up (the channel is the destination
    transport's producer), so an upload to a destination that stops reading
    stalls at one window instead of piling up in the node; the destination
    is paused while the gateway's window is full, so the node buffers at most
    what one read brings.
    """

    def __init__(self, destination: _DestinationProtocol | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.destination = destination
        self._connected = destination is not None
        self._queued: list[bytes] = []
        self._client_eof = False
        self._paused = False

    # -- window toward the gateway (IPushProducer of the destination transport)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._grant_window()

    def stopProducing(self) -> None:
        self.loseConnection()

    def _grant_window(self) -> None:
        consumed = self.localWindowSize - self.localWindowLeft
        if self._connected and not self._paused and consumed >= self.localWindowSize // 2 and not self.localClosed:
            self.conn.adjustWindow(self, consumed)

    def _destination_transport(self) -> IClientTransport | None:
        if self.destination is None:
            return None
        return self.destination.transport

    def _connected_transport(self) -> IClientTransport:
        """The destination's transport, once C{destination_connected} has said it is there."""
        transport = self._destination_transport()
        assert transport is not None, "connected, so there is a destination"
        return transport

    def destination_connected(self) -> None:
        self._connected = True
        transport = self._connected_transport()
        if self.localClosed or self.remoteClosed:
            transport.loseConnection()
            return
        transport.registerProducer(self, True)
        queued, self._queued = self._queued, []
        for data in queued:
            transport.write(data)
        if self._client_eof:
            transport.loseWriteConnection()
        if not self.areWriting:
            transport.pauseProducing()
        self._grant_window()

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self._connected_transport().write(data)
        else:
            self._queued.append(data)
        self._grant_window()

    def eofReceived(self) -> None:
        self._client_eof = True
        if self._connected:
            self._connected_transport().loseWriteConnection()

    def stopWriting(self) -> None:
        transport = self._destination_transport() if self._connected else None
        if transport is not None:
            transport.pauseProducing()

    def startWriting(self) -> None:
        transport = self._destination_transport() if self._connected else None
        if transport is not None and self.destination is not None and not self.destination.read_closed:
            transport.resumeProducing()

    def destination_eof(self) -> None:
        self.send_eof()

    def destination_lost(self) -> None:
        self.loseConnection()

    def closed(self) -> None:
        transport = self._destination_transport() if self._connected else None
        if transport is not None:
            transport.loseConnection()


class _ServerTunnel(_ServerStream):
    """Server side of a direct-tcpip channel, already connected."""

    name = b"direct-tcpip"


class _ServerSession(_ServerStream):
    """
    Server side of a C{session} channel: runs C{nc HOST PORT} (exec) the way
    netcat-openbsd under OpenSSH would, and nothing else.
    """

    name = b"session"

    def __init__(self, node: FakeProxyNode, **kw: Any) -> None:
        super().__init__(**kw)
        self.node = node
        self._started = False
        self._finished = False

    def request_exec(self, data: bytes) -> bool:
        if not self.node.allow_exec or self._started:
            return False
        self._started = True
        command = common.getNS(data)[0].decode("utf-8", "replace")
        # sshd answers once the command is started: output comes after that.
        self.node.reactor.callLater(0, self._run, command)
        return True

    def _run(self, command: str) -> None:
        try:
            argv = shlex.split(command)
        except ValueError:
            return self.finish(2, f"sh: 1: Syntax error: {command}\n")
        if argv and argv[0] == "exec":
            argv = argv[1:]
        if not argv:
            return self.finish(0)
        if os.path.basename(argv[0]) not in ("nc", "netcat"):
            return self.finish(127, f"sh: 1: {argv[0]}: command not found\n")
        # Options (-N, -w 5 ...) are accepted and ignored: HOST PORT come last.
        if len(argv) < 3 or not argv[-1].isdigit():
            return self.finish(1, "usage: nc [-46CDdFhklNnrStUuvZz] destination [port]\n")
        host, port = argv[-2], int(argv[-1])
        target = self.node.routes.get((host, port))
        if target is None:
            return self._refused(host, port, "Connection refused")
        self.destination = _DestinationProtocol(self)
        connecting = self.node.dial(target, self.destination)

        def failed(f: Failure) -> None:
            self.destination = None
            text = "Connection refused" if f.check(ConnectionRefusedError) else f.getErrorMessage()
            self._refused(host, port, text)

        connecting.addCallbacks(lambda _: self.destination_connected(), failed)

    def _refused(self, host: str, port: int, text: str) -> None:
        self.finish(1, f"nc: connect to {host} port {port} (tcp) failed: {text}\n")

    def destination_eof(self) -> None:
        # netcat-openbsd exits once the network side has closed.
        self.finish(0)

    def destination_lost(self) -> None:
        self.finish(0)

    def finish(self, status: int, stderr: str = "") -> None:
        """The command exits: stderr, then (after all data) EOF, exit-status, close."""
        if self._finished:
            return
        self._finished = True
        if self.localClosed:
            return
        if stderr:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, stderr.encode())

        def exit() -> None:
            if self.localClosed:
                return
            self.conn.sendEOF(self)
            self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status))
            self.loseConnection()

        self.after_data(exit)


@_quiet
class _ProxyNodeConnection(connection.SSHConnection):
    """
    Opens direct-tcpip channels the way OpenSSH does (connect, then confirm;
    "administratively prohibited" when forwarding is off) and session channels
    for exec.
    """

    #: Set by the transport's C{setService}, before the service starts.
    transport: SSHServerTransport

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        # Conch re-opens the window before delivering, whatever the
        # destination's pace; the stream grants it itself (_grant_window).
        local_id, length = struct.unpack(">2L", packet[:8])
        channel = self.channels[local_id]
        if not isinstance(channel, _ServerStream):
            return super().ssh_CHANNEL_DATA(packet)
        channel.localWindowLeft -= length
        channel.dataReceived(packet[8 : 8 + length])

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        # A frozen peer (VM gone, packets dropped) answers nothing at all.
        if not _node_of(self).frozen:
            super().ssh_GLOBAL_REQUEST(packet)

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> SSHChannel:
        if channelType == b"session":
            return _ServerSession(
                _node_of(self),
                remoteWindow=windowSize,
                remoteMaxPacket=maxPacket,
                conn=self,
            )
        return super().getChannel(channelType, windowSize, maxPacket, data)

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        kind, rest = common.getNS(packet)
        if kind != b"direct-tcpip":
            return super().ssh_CHANNEL_OPEN(packet)
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        (host, port), _origin = forwarding.unpackOpen_direct_tcpip(rest[12:])
        host = host.decode("utf-8") if isinstance(host, bytes) else host
        node = _node_of(self)

        def fail(code: int, text: str) -> None:
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE,
                struct.pack(">2L", sender, code) + common.NS(text.encode()) + common.NS(b""),
            )

        if not node.allow_tcp_forwarding or (host, port) in node.prohibited:
            return fail(connection.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")
        target = node.routes.get((host, port))
        if target is None:
            return fail(connection.OPEN_CONNECT_FAILED, "Connection refused")
        tunnel = _ServerTunnel(remoteWindow=window, remoteMaxPacket=max_packet, conn=self)
        destination = _DestinationProtocol(tunnel)
        tunnel.destination = destination
        connecting = node.dial(target, destination)

        def connected(_: object) -> None:
            local = self.localChannelID
            self.localChannelID += 1
            # Conch's SSHChannel.__init__ sets id = None, which mypy reads as the type.
            tunnel.id = local  # type: ignore[assignment]
            self.channels[local] = tunnel
            self.channelsToRemoteChannel[tunnel] = sender
            self.localToRemoteChannel[local] = sender
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_CONFIRMATION,
                struct.pack(">4L", sender, local, tunnel.localWindowSize, tunnel.localMaxPacket),
            )
            tunnel.destination_connected()

        connecting.addCallbacks(
            connected,
            lambda f: fail(connection.OPEN_CONNECT_FAILED, f.getErrorMessage()),
        )


@_quiet
class _NodeTransport(transport.SSHServerTransport):
    pass


@_quiet
class _NodeUserAuth(userauth.SSHUserAuthServer):
    """Conch's user authentication, timed by the node's clock, not the global reactor."""

    def serviceStarted(self) -> None:
        self.clock = _node_of(self).reactor
        super().serviceStarted()


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


@implementer(IRealm)
class _Realm:
    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], object, Callable[[], None]]:
        return interfaces[0], ConchUser(), lambda: None


@_quiet
class _NodeFactory(factory.SSHFactory):
    """The node's C{SSHFactory}: its services find their node through it."""

    protocol = _NodeTransport
    node: FakeProxyNode
    portal: Portal


def _node_of(service: SSHService) -> FakeProxyNode:
    """The fake node whose SSH server runs C{service}."""
    transport = service.transport
    assert transport is not None and isinstance(transport.factory, _NodeFactory), "a service of a node's server"
    return transport.factory.node


class FakeProxyNode:
    """
    An SSH server that forwards C{direct-tcpip} channels to virtual addresses.

    @param routes: C{(host, port)} -> client endpoint string of the real service.
    @param prohibited: destinations answered "administratively prohibited".
    @param allow_tcp_forwarding: False answers every C{direct-tcpip} open
        "administratively prohibited", like sshd's C{AllowTcpForwarding no};
        C{exec nc HOST PORT} in a session channel still reaches C{routes}.
    @param allow_exec: False refuses every C{exec} request.
    @param dial: connects a protocol to a route's target; by default the
        target is a client endpoint string (L{MemoryNetwork} passes its own).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        authorized_keys: Iterable[keys.Key],
        user: str = DEMO_USER,
        routes: Mapping[tuple[str, int], str] | None = None,
        prohibited: Iterable[tuple[str, int]] = (),
        host_key: keys.Key | None = None,
        allow_tcp_forwarding: bool = True,
        allow_exec: bool = True,
        dial: Callable[[str, Protocol], defer.Deferred] | None = None,
    ) -> None:
        self.reactor = reactor
        #: How the node reaches a route's target: C{dial(target, protocol)}.
        self.dial = dial or self._dial_endpoint
        self.routes = dict(routes or {})
        self.prohibited = set(prohibited)
        self.allow_tcp_forwarding = allow_tcp_forwarding
        self.allow_exec = allow_exec
        #: True: ignore keepalives, like a peer whose packets are dropped.
        self.frozen = False
        self.host_key = host_key or generate_key()
        db = InMemorySSHKeyDB({user.encode(): [k.public() for k in authorized_keys]})
        self.factory = _NodeFactory()
        self.factory.portal = Portal(_Realm(), [SSHPublicKeyChecker(db)])
        self.factory.publicKeys = {self.host_key.sshType(): self.host_key.public()}
        self.factory.privateKeys = {self.host_key.sshType(): self.host_key}
        self.factory.services = {
            b"ssh-userauth": _NodeUserAuth,
            b"ssh-connection": _ProxyNodeConnection,
        }
        self.factory.node = self
        self.factory.noisy = False

    def _dial_endpoint(self, target: str, protocol: Protocol) -> defer.Deferred:
        """Connect C{protocol} to a route's target, an endpoint string."""
        return clientFromString(self.reactor, target).connect(_OneProtocol(protocol))

    def listen(self, description: str = "tcp:0:interface=127.0.0.1") -> defer.Deferred[IListeningPort]:
        """Listen on an endpoint string; fires with the IListeningPort."""
        return serverFromString(self.reactor, description).listen(self.factory)


class _Page(Resource):
    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self._page


def demo_web_site(page: bytes = DEMO_PAGE) -> Site:
    """The demo cluster's internal web service: one plain-text page."""
    site = Site(_Page(page))
    site.noisy = False
    site.displayTracebacks = False
    return site


class DemoCluster:
    """
    The embedded demo: a fake proxy node on loopback and a web service on a
    unix socket in a private directory, reachable only through that node.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.client_key = generate_key()
        self._dir = tempfile.mkdtemp(prefix="gateway-demo-")
        os.chmod(self._dir, 0o700)
        self.web_socket = os.path.join(self._dir, "web.sock")
        self.node = FakeProxyNode(
            reactor,
            [self.client_key],
            routes={DEMO_WEB: f"unix:{self.web_socket}", DEMO_API_WEB: f"unix:{self.web_socket}"},
        )
        self._ports: list[IListeningPort] = []
        self._files: list[str] = []
        self.ssh_port: int | None = None

    async def start(self) -> None:
        web = serverFromString(self.reactor, f"unix:{self.web_socket}:mode=600")
        self._ports.append(await web.listen(demo_web_site()))
        ssh = await self.node.listen()
        self._ports.append(ssh)
        address = ssh.getHost()
        assert isinstance(address, IPv4Address)
        self.ssh_port = address.port

    async def stop(self) -> None:
        for port in self._ports:
            await defer.maybeDeferred(port.stopListening)
        self._ports.clear()
        for path in [self.web_socket, *self._files]:
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(self._dir)

    def write_cluster_file(self, name: str = "demo-api", token: str = "demo-token") -> str:
        """
        A cluster file for C{gateway-ctl add}: the same proxy node under
        another name, with a token (mode 0600: it holds the private key).
        It reaches the web server by name (L{DEMO_API_WEB}), not through the
        demo cluster's network: two clusters on one network would make the
        demo's own tokenless commands ambiguous.
        """
        settings = {**self.cluster_settings(), "aliases": [f"net-{name}"], "token": token}
        del settings["networks"]
        settings["hostnames"] = [DEMO_API_WEB[0]]
        lines = [f"[clusters.{name}]"]
        for key, value in settings.items():
            if key == "key":
                lines.append(f'key = """\n{value}"""')
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        path = os.path.join(self._dir, f"{name}.toml")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._files.append(path)
        return path

    def cluster_settings(self) -> dict[str, Any]:
        """The demo cluster as a C{[clusters.demo]} table would give it."""
        return {
            "proxies": [f"127.0.0.1:{self.ssh_port}"],
            "user": DEMO_USER,
            "key": private_pem(self.client_key),
            "host_keys": [public_line(self.node.host_key)],
            "networks": [DEMO_NETWORK],
        }


class MemoryNetwork:
    """
    Fake proxy nodes and their destinations, reached in memory.

    The tier below the real sockets, like Conch's C{test_endpoints} and
    C{treq.testing}: L{connect} is a cluster's C{Connector} that wires the
    gateway's real SSH client (L{GatewayClientTransport} and
    L{TunnelConnection}) to a L{FakeProxyNode}'s Conch server through
    C{twisted.test.iosim}, and each node reaches L{destinations} the same
    way.  Everything runs on one C{MemoryReactorClock}: a test calls
    L{advance} (time passes, then the bytes it caused are delivered) and
    needs no sleep and no socket.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.nodes: dict[tuple[str, int], FakeProxyNode] = {}
        #: Route target -> factory of the service there; None: a destination
        #: that never answers (a firewall dropping the SYN).
        self.destinations: dict[str, Factory | None] = {}
        self.down: set[tuple[str, int]] = set()
        #: (clock time, "host:port") of every connection attempt to a node.
        self.attempts: list[tuple[float, str]] = []
        self._pumps: list[IOPump] = []

    def add_node(self, host: str, port: int, authorized_keys: Iterable[keys.Key], **options: Any) -> FakeProxyNode:
        """A proxy node at C{host:port}; C{options} as for L{FakeProxyNode}."""
        node = FakeProxyNode(self.clock, authorized_keys, dial=self._dial, **options)
        node.factory.doStart()  # what listening would do: SSHFactory reads its moduli there
        self.nodes[(host, port)] = node
        return node

    def connect(self, proxy: ProxyAddress, factory: Factory) -> defer.Deferred:
        """A cluster's C{Connector}: refused for an unknown or downed node."""
        address = (proxy.host, proxy.port)
        self.attempts.append((self.clock.seconds(), f"{proxy.host}:{proxy.port}"))
        node = self.nodes.get(address)
        if node is None or address in self.down:
            return defer.fail(ConnectionRefusedError(proxy.host, proxy.port))
        peer = IPv4Address("TCP", *address)
        client = factory.buildProtocol(peer)
        assert client is not None, "a cluster's SSH client factory builds a protocol for every connection"
        return defer.succeed(self._join(client, node.factory, peer))

    def _dial(self, target: str, protocol: Protocol) -> defer.Deferred:
        if target not in self.destinations:
            return defer.fail(ConnectionRefusedError())
        service = self.destinations[target]
        if service is None:
            return defer.Deferred()
        return defer.succeed(self._join(protocol, service, IPv4Address("TCP", "127.0.0.1", 0)))

    def _join(self, client: _Client, server_factory: Factory, address: IPv4Address) -> _Client:
        server = server_factory.buildProtocol(address)
        self._pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
                clock=self.clock,
            )
        )
        return client

    def take_down(self, host: str, port: int) -> None:
        """The node at C{host:port} crashes: its connections drop, new ones are refused."""
        self.down.add((host, port))
        node = self.nodes[(host, port)]
        for pump in self._pumps:
            if pump.server.factory is node.factory:
                pump.serverIO.abortConnection()

    def bring_back(self, host: str, port: int) -> None:
        """The node at C{host:port} accepts connections again."""
        self.down.discard((host, port))

    def flush(self) -> None:
        """Deliver bytes (and disconnects) until nothing moves."""
        for _ in range(10_000):
            moved = [pump for pump in list(self._pumps) if pump.pump()]
            self._pumps = [p for p in self._pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)]
            if not moved:
                return
        raise AssertionError("the in-memory network never went quiet")

    def advance(self, seconds: float = 0.0) -> None:
        """
        Let C{seconds} pass, delivering what each timer causes before the
        next one is due -- as a running reactor would: one jump of the clock
        would fire a keepalive once, late, and find its answers missing.
        """
        end = self.clock.seconds() + seconds
        self.flush()
        for _ in range(100_000):
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= end]
            step_to = min(due, default=end)
            self.clock.advance(max(0.0, step_to - self.clock.seconds()))
            self.flush()
            if not due:
                return
        raise AssertionError("timers kept firing without the clock reaching its end")
