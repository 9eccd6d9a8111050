"""
An in-process stand-in for a cluster: a Conch SSH server playing the proxy
node, and a small web service that only that server can reach.

Used by the embedded demo (C{twistd -n gateway --demo}), by the in-process
tests, and available to anyone who wants to exercise the gateway without
root or a network.  The fake proxy node behaves like OpenSSH where the
gateway can tell the difference: it answers C{direct-tcpip} opens only after
connecting to the destination (so "connection refused" is an open failure
with code 2), answers code 1 for destinations it is told to prohibit, and
carries half-close in both directions.

Destinations are virtual: the node maps C{(host, port)} pairs to client
endpoint strings, e.g. C{("10.99.0.10", 80)} to a unix socket in a private
directory, so the "internal network" exists only behind the fake proxy node.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.ssh import common, connection, factory, forwarding, keys, userauth
from twisted.cred.portal import Portal
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from gateway.ssh.channel import OrderedEOFChannel, quiet_logger

log = Logger()

DEMO_USER = "demo"
DEMO_NETWORK = "10.99.0.0/24"
DEMO_WEB = ("10.99.0.10", 80)
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

    def __init__(self, tunnel: _ServerTunnel) -> None:
        self._tunnel = tunnel
        self._halves_done = 0

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.write(data)

    def _half_done(self) -> None:
        self._halves_done += 1
        if self._halves_done == 2:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self._tunnel.send_eof()
        self._half_done()

    def writeConnectionLost(self) -> None:
        self._half_done()

    def connectionLost(self, reason: object) -> None:
        self._tunnel.loseConnection()


class _ServerTunnel(OrderedEOFChannel):
    """Server side of a direct-tcpip channel, already connected."""

    name = b"direct-tcpip"

    def __init__(self, destination: _DestinationProtocol | None = None, **kw) -> None:
        super().__init__(**kw)
        self.destination = destination

    def dataReceived(self, data: bytes) -> None:
        self.destination.transport.write(data)

    def eofReceived(self) -> None:
        self.destination.transport.loseWriteConnection()

    def closed(self) -> None:
        self.destination.transport.loseConnection()


class _ProxyNodeConnection(connection.SSHConnection):
    """Opens direct-tcpip channels the way OpenSSH does: connect, then confirm."""

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        kind, rest = common.getNS(packet)
        if kind != b"direct-tcpip":
            return super().ssh_CHANNEL_OPEN(packet)
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        (host, port), _origin = forwarding.unpackOpen_direct_tcpip(rest[12:])
        host = host.decode("utf-8") if isinstance(host, bytes) else host
        node: FakeProxyNode = self.transport.factory.node

        def fail(code: int, text: str) -> None:
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE,
                struct.pack(">2L", sender, code) + common.NS(text.encode()) + common.NS(b""),
            )

        if (host, port) in node.prohibited:
            return fail(connection.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")
        target = node.routes.get((host, port))
        if target is None:
            return fail(connection.OPEN_CONNECT_FAILED, "Connection refused")
        tunnel = _ServerTunnel(remoteWindow=window, remoteMaxPacket=max_packet, conn=self)
        destination = _DestinationProtocol(tunnel)
        tunnel.destination = destination
        connecting = clientFromString(node.reactor, target).connect(
            _OneProtocol(destination)
        )

        def connected(_: object) -> None:
            local = self.localChannelID
            self.localChannelID += 1
            tunnel.id = local
            self.channels[local] = tunnel
            self.channelsToRemoteChannel[tunnel] = sender
            self.localToRemoteChannel[local] = sender
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_CONFIRMATION,
                struct.pack(
                    ">4L", sender, local, tunnel.localWindowSize, tunnel.localMaxPacket
                ),
            )

        connecting.addCallbacks(
            connected,
            lambda f: fail(connection.OPEN_CONNECT_FAILED, f.getErrorMessage()),
        )


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class _Realm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return interfaces[0], ConchUser(), lambda: None


class FakeProxyNode:
    """
    An SSH server that forwards C{direct-tcpip} channels to virtual addresses.

    @param routes: C{(host, port)} -> client endpoint string of the real service.
    @param prohibited: destinations answered "administratively prohibited".
    """

    def __init__(
        self,
        reactor,
        authorized_keys: Iterable[keys.Key],
        user: str = DEMO_USER,
        routes: Mapping[tuple[str, int], str] | None = None,
        prohibited: Iterable[tuple[str, int]] = (),
        host_key: keys.Key | None = None,
    ) -> None:
        self.reactor = reactor
        self.routes = dict(routes or {})
        self.prohibited = set(prohibited)
        self.host_key = host_key or generate_key()
        db = InMemorySSHKeyDB({user.encode(): [k.public() for k in authorized_keys]})
        self.factory = factory.SSHFactory()
        self.factory.portal = Portal(_Realm(), [SSHPublicKeyChecker(db)])
        self.factory.publicKeys = {self.host_key.sshType(): self.host_key.public()}
        self.factory.privateKeys = {self.host_key.sshType(): self.host_key}
        self.factory.services = {
            b"ssh-userauth": userauth.SSHUserAuthServer,
            b"ssh-connection": _ProxyNodeConnection,
        }
        self.factory.node = self
        self.factory.noisy = False
        _ProxyNodeConnection._log = quiet_logger("gateway.testing.proxy_node")

    def listen(self, description: str = "tcp:0:interface=127.0.0.1"):
        """Listen on an endpoint string; fires with the IListeningPort."""
        return serverFromString(self.reactor, description).listen(self.factory)


class _Page(Resource):
    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request) -> bytes:
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

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.client_key = generate_key()
        self._dir = tempfile.mkdtemp(prefix="gateway-demo-")
        os.chmod(self._dir, 0o700)
        self.web_socket = os.path.join(self._dir, "web.sock")
        self.node = FakeProxyNode(
            reactor,
            [self.client_key],
            routes={DEMO_WEB: f"unix:{self.web_socket}"},
        )
        self._ports: list[IListeningPort] = []
        self.ssh_port: int | None = None

    async def start(self) -> None:
        web = serverFromString(self.reactor, f"unix:{self.web_socket}:mode=600")
        self._ports.append(await web.listen(demo_web_site()))
        ssh = await self.node.listen()
        self._ports.append(ssh)
        self.ssh_port = ssh.getHost().port

    async def stop(self) -> None:
        for port in self._ports:
            await port.stopListening()
        self._ports.clear()
        if os.path.exists(self.web_socket):
            os.unlink(self.web_socket)
        os.rmdir(self._dir)

    def cluster_settings(self) -> dict:
        """The demo cluster as a C{[clusters.demo]} table would give it."""
        return {
            "proxies": [f"127.0.0.1:{self.ssh_port}"],
            "user": DEMO_USER,
            "key": private_pem(self.client_key),
            "host_keys": [public_line(self.node.host_key)],
            "networks": [DEMO_NETWORK],
        }
