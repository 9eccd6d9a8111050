"""
The SSH client transport of one cluster connection, and the factory that
builds it (its connection service is L{gateway.ssh.connection}).

The transport verifies the proxy node's host key (L{HostKeyPolicy}), then
authenticates with the cluster's key (L{KeyAuthClient}) and starts a
L{TunnelConnection}.  C{GatewayClientTransport.ready} fires with that
connection once it can open channels, or fails with L{SSHConnectError} saying
why it never got there (host key, authentication, network) -- which is what
a reconnecting service needs to log and what a waiting client is told -- and
of which L{ConnectFailure} kind, which is what its back-off goes by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

from twisted.conch.ssh import connection, transport
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.errors import peer_text
from gateway.sockets import set_no_delay, write_through
from gateway.ssh._conch import SEQUENCE_MASK, quiet_conch_logs
from gateway.ssh.auth import KeyAuthClient
from gateway.ssh.connection import TunnelConnection
from gateway.ssh.failure import ConnectFailure
from gateway.ssh.handshake import HandshakeTransport
from gateway.ssh.hostkeys import HostKeyPolicy
from gateway.ssh.packets import (
    FastSSHCiphers,
    PacketError,
)
from gateway.ssh.quickack import quick_ack
from gateway.ssh.reader import PacketReader

log = Logger()


#: OpenSSH's defaults for RekeyLimit: about 1 GiB for AES, and one hour.
DEFAULT_REKEY_BYTES = 1 << 30
DEFAULT_REKEY_INTERVAL = 3600.0

_MSG_CHANNEL_DATA = connection.MSG_CHANNEL_DATA


class ICarrierTransport(ITransport):
    """
    The byte stream an SSH connection to a proxy node runs over: TCP, a
    proxy command's stdio (L{gateway.ssh.proxycommand.CommandTransport}) or
    a channel of a jump host's connection
    (L{gateway.ssh.jump.ChannelTransport}).  Each can be cut at once, which
    a handshake time-out and a dead keepalive do.

    All three have C{abortConnection} (TCP's from C{ITCPTransport}) but none
    declares this interface: it names what they share for the type checker.
    """

    def abortConnection() -> None:
        """Close now, dropping what is still buffered."""


#: What sshd writes before closing a connection it drops unread (sshd.c,
#: drop_connection): from OpenSSH 9.8 past MaxStartups or for a penalised
#: source, and before that past MaxStartups.
_SSHD_DROPPED = (b"Not allowed at this time", b"Exceeded MaxStartups")


class SSHConnectError(Exception):
    """The SSH connection to a proxy node could not be established, for a reason of C{kind}."""

    def __init__(self, why: str, kind: ConnectFailure = ConnectFailure.NETWORK) -> None:
        super().__init__(why)
        self.kind = kind


#: Conch logs each key exchange step, cipher choice and ordinary disconnect
#: at info/debug level: ten lines per connection, which at hundreds of
#: clusters buries the gateway's own events.  Its warnings and errors (a
#: peer's disconnect reason, bad packets) still get through.
@quiet_conch_logs("gateway.ssh.transport")
class GatewayClientTransport(HandshakeTransport):
    """
    An SSH client transport for one proxy node.

    Packets are sealed and opened by L{FastSSHCiphers} and L{PacketReader}
    (AEAD ciphers included) once the first key exchange has set them up;
    until then, and for messages held back during a key exchange, Conch's
    own C{sendPacket} runs.
    """

    ciphers_class = FastSSHCiphers
    transport: ICarrierTransport

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        private_key: Key,
        host_keys: HostKeyPolicy,
        clock: IReactorTime,
        rekey_bytes: int = DEFAULT_REKEY_BYTES,
        rekey_interval: float = DEFAULT_REKEY_INTERVAL,
        allow_sha1_signatures: bool = False,
        algorithms: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(host, port, host_keys, clock, allow_sha1_signatures, algorithms)
        self._user = user
        self._private_key = private_key
        self.ready: Deferred[TunnelConnection] = Deferred()
        #: Fires when the connection is gone, with why in words if known:
        #: an error the gateway or the proxy node disconnected with.
        self.lost: Deferred[str | None] = Deferred()
        self._rekey_bytes = rekey_bytes
        self._rekey_interval = rekey_interval
        self._bytes_since_kex = 0
        self._rekey_timer: IDelayedCall | None = None
        #: Key exchanges this side started after the first (for tests, status).
        self.rekeys = 0
        self._secured = False
        self._reader = PacketReader()
        self._reading = False
        #: Set once we disconnect (a malformed or forged packet, or any
        #: other reason): what arrives after that is not read.
        self._stop_reading = False
        self._auth: KeyAuthClient | None = None
        #: Sets TCP_QUICKACK on the socket (see L{quick_ack}); None where not TCP.
        self._quick_ack: Callable[[], None] | None = None

    # -- rekeying, like OpenSSH's RekeyLimit: by volume and by time ----------

    def _count(self, size: int) -> None:
        self._bytes_since_kex += size
        if self._bytes_since_kex >= self._rekey_bytes:
            self._rekey()

    def _rekey(self) -> None:
        if self.key_exchange_running or self.sessionID is None:
            return  # one is already running, or the first has not finished
        self._bytes_since_kex = 0
        self.rekeys += 1
        log.debug("rekeying with {address}", address=self.address)
        self.sendKexInit()

    def _schedule_time_rekey(self) -> None:
        if self._rekey_timer is not None and self._rekey_timer.active():
            self._rekey_timer.cancel()
        if self._rekey_interval > 0:
            self._rekey_timer = self._clock.callLater(self._rekey_interval, self._time_rekey)

    def _time_rekey(self) -> None:
        self._rekey()
        self._schedule_time_rekey()

    # -- packets -------------------------------------------------------------

    def seal_packet(self, messageType: int, payload: bytes, data: bytes = b"") -> bytes | None:
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, FastSSHCiphers):
            return None
        if self.outgoingCompression:
            message = bytes((messageType,)) + payload + data
            message = self.outgoingCompression.compress(message) + self.outgoingCompression.flush(2)
            return ciphers.seal(self.outgoingPacketSequence, message[0], message[1:])
        return ciphers.seal(self.outgoingPacketSequence, messageType, payload, data)

    def packet_sent(self, size: int) -> None:
        self._count(size)

    def dataReceived(self, data: bytes) -> None:
        if self._stop_reading:
            return
        if self._quick_ack is not None:
            try:
                self._quick_ack()
            except OSError:  # the socket is going away
                self._quick_ack = None
        super().dataReceived(data)
        self._count(len(data))

    def packets_arrived(self, data: bytes) -> None:
        self._reader.feed(data)
        self._dispatch_packets()

    def _dispatch_packets(self) -> None:
        if self._reading:
            return  # called from a message handler: the loop below reads on
        self._reading = True
        try:
            while True:
                packet = self._next_packet()
                if packet is None:
                    break
                message, start, end = packet
                kind = message[start]
                service = self.service
                if kind == _MSG_CHANNEL_DATA and isinstance(service, TunnelConnection):
                    service.channel_data(message, start + 1, end)
                else:
                    self.dispatchMessage(kind, message[start + 1 : end])
        finally:
            self._reading = False
            self._reader.compact()

    def _next_packet(self) -> tuple[bytes, int, int] | None:
        """
        The next incoming message, if it has arrived, as C{(data, start, end)}:
        its number is C{data[start]}, its payload C{data[start + 1:end]}.
        """
        if self._stop_reading:
            return None
        try:
            packet = self._reader.read(self.currentEncryptions, self.incomingPacketSequence)
        except PacketError as e:
            self._stop_reading = True
            if self.currentEncryptions.inCipType == b"none":
                # Not even the first, unencrypted packets make sense.
                self.note_failure("not an SSH server: " + e.description.decode(), ConnectFailure.PROTOCOL)
            self.sendDisconnect(e.reason, e.description)
            return None
        if packet is None:
            return None
        plain, start, end = packet
        self.incomingPacketSequence = (self.incomingPacketSequence + 1) & SEQUENCE_MASK
        if self.incomingCompression:
            try:
                data = self.incomingCompression.decompress(plain[start:end])
                return data, 0, len(data)
            except Exception:
                log.failure("Error decompressing payload")
                self._stop_reading = True
                self.sendDisconnect(transport.DISCONNECT_COMPRESSION_ERROR, b"compression error")
                return None
        return packet

    def next_payload(self, buffered: bytes) -> bytes | None:
        if buffered:
            self._reader.feed(buffered)
        packet = self._next_packet()
        self._reader.compact()
        if packet is None:
            return None
        message, start, end = packet
        return message[start:end]

    def _phase_failure(self) -> ConnectFailure:
        """The kind of an SSH-level failure now: the key exchange until the first one is done, then authentication."""
        return ConnectFailure.AUTH if self._secured else ConnectFailure.KEX

    def keys_set_up(self) -> None:
        self._bytes_since_kex = 0
        self._schedule_time_rekey()

    def connectionMade(self) -> None:
        self.choose_offer()
        set_no_delay(self.transport)
        self._quick_ack = quick_ack(self.transport)
        self.write_packet = write_through(self.transport)
        super().connectionMade()

    def version_not_supported(self) -> None:
        # Conch would put the peer's version bytes into the error text.
        self.note_failure("not an SSH server: its version line is not SSH-2.0", ConnectFailure.PROTOCOL)
        super().version_not_supported()

    def connectionSecure(self) -> None:
        # Conch's client calls this after *every* key exchange; after a rekey
        # (ours or the server's) asking for ssh-userauth again would restart
        # authentication on a live connection.  Only the first one counts.
        if self._secured:
            return
        self._secured = True
        self._auth = KeyAuthClient(
            self._user,
            self._private_key,
            TunnelConnection(self.ready, self._clock),
            allow_sha1_signatures=self._allow_sha1_signatures,
        )
        self.requestService(self._auth)

    def loseConnection(self) -> None:
        # Conch says "connection lost" (code 10); we are closing on purpose.
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"gateway closing the connection")

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # Whatever the peer sent after what made us give up may already be
        # under keys we never set up (e.g. after a refused host key).
        self._stop_reading = True
        self.cancel_kexinit_wait()  # no KEXINIT after our DISCONNECT
        if self._failure is None:
            if reason == transport.DISCONNECT_BY_APPLICATION:
                self._failure = "connection closed by the gateway"
            elif reason == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
                self._failure = f"authentication as {self._user!r} failed: the proxy node refused the key"
                self._failure_kind = ConnectFailure.AUTH
                unlisted = self._auth.unlisted_algorithm if self._auth is not None else None
                if unlisted is not None:
                    self._failure += (
                        f" (signed with {unlisted.decode()}, which the node does not list in server-sig-algs;"
                        " a node that accepts only ssh-rsa (SHA-1) needs allow_sha1_signatures = true)"
                    )
            elif not self.gotVersion:
                # Conch gives up on a peer that sends 4 KiB without a version line.
                self.note_failure("not an SSH server: no SSH version line", ConnectFailure.PROTOCOL)
            else:
                self.note_failure(desc.decode("utf-8", "replace"), self._phase_failure())
        super().sendDisconnect(reason, desc)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # Not Conch's: it logs the peer's description raw and whole.  The
        # cluster logs this text when the connection is gone.
        self.note_failure(f"proxy node disconnected: {peer_text(description)}", self._phase_failure())

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._rekey_timer is not None and self._rekey_timer.active():
            self._rekey_timer.cancel()
        self.cancel_kexinit_wait()
        super().connectionLost(reason)
        if not self.ready.called:
            dropped = next((line for line in _SSHD_DROPPED if self.buf.startswith(line)), None)
            if not self.gotVersion and dropped is not None:
                self.note_failure(
                    f"the proxy node's sshd dropped the connection unread ({dropped.decode()!r}:"
                    " MaxStartups, or PerSourcePenalties from OpenSSH 9.8)",
                    ConnectFailure.DROPPED,
                )
            elif not self.gotVersion and self.buf:
                self.note_failure("not an SSH server: no SSH version line", ConnectFailure.PROTOCOL)
            # Conch's signature allows None; a transport always passes a Failure.
            lost = f": {reason.getErrorMessage()}" if reason is not None else ""
            why = self._failure or f"connection closed before authentication{lost}"
            self.ready.errback(SSHConnectError(why, self._failure_kind))
        self.lost.callback(self._failure)


def client_factory(
    host: str,
    port: int,
    user: str,
    private_key: Key,
    host_keys: HostKeyPolicy,
    clock: IReactorTime,
    *,
    rekey_bytes: int = DEFAULT_REKEY_BYTES,
    rekey_interval: float = DEFAULT_REKEY_INTERVAL,
    allow_sha1_signatures: bool = False,
    algorithms: Mapping[str, Sequence[str]] | None = None,
) -> Factory:
    """A factory of L{GatewayClientTransport}s for one proxy node address."""
    factory: Factory = Factory.forProtocol(
        partial(
            GatewayClientTransport,
            host,
            port,
            user,
            private_key,
            host_keys,
            clock,
            rekey_bytes=rekey_bytes,
            rekey_interval=rekey_interval,
            allow_sha1_signatures=allow_sha1_signatures,
            algorithms=algorithms,
        )
    )
    factory.noisy = False
    return factory
