"""
L{FakeProxyNode}: a Conch SSH server playing a cluster's proxy node, the way
OpenSSH answers where the gateway can tell the difference (open failures and
their codes, C{AllowTcpForwarding no}, C{exec nc HOST PORT}, C{getent ahosts
NAME}, keepalives).  Its channels are in L{gateway.testing.channels}.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.ssh import common, connection, factory, forwarding, keys, transport, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.service import SSHService
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from zope.interface import Interface, implementer

from gateway.ssh._conch import quiet_conch_logs
from gateway.testing.channels import DestinationProtocol, Program, ServerSession, ServerStream, ServerTunnel
from gateway.testing.keys import generate_key

#: The node's own Conch events (each step of every key exchange and login at
#: debug or info level) would bury the demo's instructions: warnings only.
_quiet = quiet_conch_logs("gateway.testing.proxy_node")

#: The login a node accepts unless told otherwise: the demo's user.
DEMO_USER = "demo"


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
        if not isinstance(channel, ServerStream):
            return super().ssh_CHANNEL_DATA(packet)
        channel.localWindowLeft -= length
        channel.dataReceived(packet[8 : 8 + length])

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        # A frozen peer (VM gone, packets dropped) answers nothing at all.
        if not _node_of(self).frozen:
            super().ssh_GLOBAL_REQUEST(packet)

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> SSHChannel:
        if channelType == b"session":
            return ServerSession(
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
        tunnel = ServerTunnel(remoteWindow=window, remoteMaxPacket=max_packet, conn=self)
        destination = DestinationProtocol(tunnel)
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
    @param names: what C{getent ahosts NAME} answers: name -> addresses (a
        name not there is not found, status 2).
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
        names: Mapping[str, Sequence[str]] | None = None,
        dial: Callable[[str, Protocol], defer.Deferred] | None = None,
    ) -> None:
        self.reactor = reactor
        #: How the node reaches a route's target: C{dial(target, protocol)}.
        self.dial = dial or self._dial_endpoint
        self.routes = dict(routes or {})
        self.prohibited = set(prohibited)
        self.allow_tcp_forwarding = allow_tcp_forwarding
        self.allow_exec = allow_exec
        self.names = dict(names or {})
        #: The commands a session can run, by program name; a test may add
        #: its own (one that never finishes, one that floods stdout).
        self.programs: dict[str, Program] = {
            "nc": ServerSession.run_netcat,
            "netcat": ServerSession.run_netcat,
            "getent": ServerSession.run_getent,
        }
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
