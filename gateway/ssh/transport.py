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

import enum
import struct
from collections.abc import Callable
from functools import partial

from twisted.conch.ssh import connection, transport
from twisted.conch.ssh.common import NS, ffs, getNS
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.addresses import host_port
from gateway.errors import peer_text
from gateway.proxy.splice import set_no_delay
from gateway.ssh._conch import SEQUENCE_MASK, ConchClientTransport, quiet_conch_logs
from gateway.ssh.auth import KeyAuthClient
from gateway.ssh.connection import TunnelConnection
from gateway.ssh.hostkeys import HostKeyError, HostKeyPolicy
from gateway.ssh.packets import (
    AEAD_CIPHERS,
    PREFERRED_CIPHERS,
    PREFERRED_MACS,
    SUPPORTED_AEAD_CIPHERS,
    FastSSHCiphers,
    PacketError,
    PacketReader,
    offered,
)
from gateway.ssh.quickack import quick_ack

log = Logger()


#: OpenSSH's defaults for RekeyLimit: about 1 GiB for AES, and one hour.
DEFAULT_REKEY_BYTES = 1 << 30
DEFAULT_REKEY_INTERVAL = 3600.0

_MSG_CHANNEL_DATA = connection.MSG_CHANNEL_DATA

#: Key exchanges offered, best first: X25519, then the NIST curves (for nodes
#: restricted to FIPS algorithms).  No SHA-1 exchange, and no finite-field
#: Diffie-Hellman: Conch has group14 only with SHA-1, and its group exchange
#: would accept a 1024-bit group from the node.  (Conch's client has no
#: post-quantum hybrid yet.)  See docs/architecture.md, "SSH algorithms".
KEX_ALGORITHMS = (
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
#: Host-key algorithms offered, best first (reordered per node so that the
#: types of the keys we hold for it lead, L{HostKeyPolicy}).  RSA host keys
#: with SHA-2 signatures only; C{ssh-rsa} (SHA-1) is appended only for a
#: cluster with C{allow_sha1_signatures}.  No DSA.
HOST_KEY_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)
SHA1_RSA = b"ssh-rsa"


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


class ConnectFailure(enum.Enum):
    """
    Why an attempt to reach a proxy node failed, as far as its back-off cares:
    sshd's PerSourcePenalties counts every kind but C{PROTOCOL} and
    C{NETWORK} against the gateway's address (see gateway.cluster.penalty).
    """

    #: The node refused the key (or the user), or ended authentication.
    AUTH = "auth"
    #: The key exchange failed: no common algorithm, a bad signature, the node ended it.
    KEX = "kex"
    #: The node's host key is not the one expected.
    HOSTKEY = "hostkey"
    #: sshd closed the connection at once ("Not allowed at this time": PerSourcePenalties, MaxStartups).
    DROPPED = "dropped"
    #: Not an SSH server at that address.
    PROTOCOL = "protocol"
    #: Refused, unreachable, timed out, reset, or closed with no SSH reason.
    NETWORK = "network"


#: What sshd writes before closing a connection it drops unread (sshd.c,
#: drop_connection): from OpenSSH 9.8 past MaxStartups or for a penalised
#: source, and before that past MaxStartups.
_SSHD_DROPPED = (b"Not allowed at this time", b"Exceeded MaxStartups")


class SSHConnectError(Exception):
    """The SSH connection to a proxy node could not be established, for a reason of C{kind}."""

    def __init__(self, why: str, kind: ConnectFailure = ConnectFailure.NETWORK) -> None:
        super().__init__(why)
        self.kind = kind


#: Conch's client, whose algorithm lists say what it implements.
_CONCH = transport.SSHClientTransport


#: Conch logs each key exchange step, cipher choice and ordinary disconnect
#: at info/debug level: ten lines per connection, which at hundreds of
#: clusters buries the gateway's own events.  Its warnings and errors (a
#: peer's disconnect reason, bad packets) still get through.
@quiet_conch_logs("gateway.ssh.transport")
class GatewayClientTransport(ConchClientTransport):
    """
    An SSH client transport for one proxy node.

    Packets are sealed and opened by L{FastSSHCiphers} and L{PacketReader}
    (AEAD ciphers included) once the first key exchange has set them up;
    until then, and for messages held back during a key exchange, Conch's
    own C{sendPacket} runs.
    """

    ciphers_class = FastSSHCiphers
    transport: ICarrierTransport

    # Every list explicit, in our order, and only what Conch (or the
    # backend, for AEAD) implements: Conch's own lists end in CBC, 3DES,
    # hmac-md5/sha1, SHA-1 key exchanges, ssh-dss and zlib.
    supportedCiphers = offered(PREFERRED_CIPHERS, SUPPORTED_AEAD_CIPHERS + _CONCH.supportedCiphers)
    supportedMACs = offered(PREFERRED_MACS, _CONCH.supportedMACs)
    supportedKeyExchanges = offered(KEX_ALGORITHMS, _CONCH.supportedKeyExchanges)
    supportedPublicKeys = offered(HOST_KEY_ALGORITHMS, _CONCH.supportedPublicKeys)
    #: Compression costs CPU for little on a LAN, and zlib has had its CVEs.
    supportedCompressions = [b"none"]

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
    ) -> None:
        self.host = host
        self.port = port
        self._user = user
        self._private_key = private_key
        self._host_keys = host_keys
        self._clock = clock
        self._failure: str | None = None
        self._failure_kind = ConnectFailure.NETWORK
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
        self._allow_sha1_signatures = allow_sha1_signatures
        self._auth: KeyAuthClient | None = None
        #: Sets TCP_QUICKACK on the socket (see L{quick_ack}); None where not TCP.
        self._quick_ack: Callable[[], None] | None = None

    def note_failure(self, why: str, kind: ConnectFailure = ConnectFailure.NETWORK) -> None:
        """Record why (and of which kind) the connection is about to fail, unless a reason is known."""
        if self._failure is None:
            self._failure = why
            self._failure_kind = kind

    def _phase_failure(self) -> ConnectFailure:
        """The kind of an SSH-level failure now: the key exchange until the first one is done, then authentication."""
        return ConnectFailure.AUTH if self._secured else ConnectFailure.KEX

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

    def seal_packet(self, messageType: int, payload: bytes) -> bytes | None:
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, FastSSHCiphers):
            return None
        if self.outgoingCompression:
            data = bytes((messageType,)) + payload
            data = self.outgoingCompression.compress(data) + self.outgoingCompression.flush(2)
            return ciphers.seal(self.outgoingPacketSequence, data[0], data[1:])
        return ciphers.seal(self.outgoingPacketSequence, messageType, payload)

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

    def keys_set_up(self) -> None:
        self._bytes_since_kex = 0
        self._schedule_time_rekey()

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def connectionMade(self) -> None:
        algorithms = list(self.supportedPublicKeys)
        if self._allow_sha1_signatures and SHA1_RSA in _CONCH.supportedPublicKeys:
            algorithms.append(SHA1_RSA)
        self.supportedPublicKeys = self._host_keys.preferred_algorithms(self.host, self.port, algorithms)
        set_no_delay(self.transport)
        self._quick_ack = quick_ack(self.transport)
        super().connectionMade()

    def version_not_supported(self) -> None:
        # Conch would put the peer's version bytes into the error text.
        self.note_failure("not an SSH server: its version line is not SSH-2.0", ConnectFailure.PROTOCOL)
        super().version_not_supported()

    def ecdh_reply_acceptable(self, reply: bytes) -> bool:
        """
        Whether the node signed the exchange hash with the negotiated host-key
        algorithm.  Conch checks only that the signature is valid for the
        key, so an RSA node could answer with C{ssh-rsa} (SHA-1) although
        only C{rsa-sha2-*} was agreed on (OpenSSH's client refuses that too).
        """
        try:
            _, _, signature, _ = getNS(reply, 3)
            algorithm = getNS(signature)[0]
        except struct.error:
            return True  # malformed: Conch's parser says so
        if algorithm == self.keyAlg:
            return True
        self.note_failure(
            f"the proxy node signed the key exchange with another algorithm than {self.keyAlg.decode()}",
            ConnectFailure.KEX,
        )
        self.sendDisconnect(transport.DISCONNECT_KEY_EXCHANGE_FAILED, b"host key signature algorithm mismatch")
        return False

    def kexinit_for_conch(self, packet: bytes) -> bytes:
        """
        C{packet} (the server's KEXINIT), or a copy in which a direction that
        will use an AEAD cipher but has no MAC in common lists our first MAC:
        an AEAD cipher implies its MAC and the name lists do not matter
        (OpenSSH PROTOCOL 1.6), but Conch would give up on the mismatch.
        """
        try:
            *lists, rest = getNS(packet[16:], 10)
        except Exception:
            return packet  # malformed: Conch will say so
        lists = list(lists)
        changed = False
        # Client to server: lists 2 (cipher) and 4 (MAC); server to client: 3 and 5.
        for cipher_list, mac_list in ((2, 4), (3, 5)):
            cipher = ffs(self.supportedCiphers, lists[cipher_list].split(b","))
            if cipher in AEAD_CIPHERS and ffs(self.supportedMACs, lists[mac_list].split(b",")) is None:
                lists[mac_list] = b",".join([self.supportedMACs[0], lists[mac_list]])
                changed = True
        if not changed:
            return packet
        return packet[:16] + b"".join(NS(name_list) for name_list in lists) + rest

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        offered = Key.fromString(hostKey)
        try:
            self._host_keys.verify(self.host, self.port, offered)
        except HostKeyError as e:
            self.note_failure(str(e), ConnectFailure.HOSTKEY)
            log.error("refusing proxy node {address}: {why}", address=self.address, why=e)
            return fail(e)
        if self._host_keys.accept_any:
            log.warn(
                "accepting unverified host key of {address} (insecure_accept_any_host_key)",
                address=self.address,
            )
        return succeed(True)

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
        )
    )
    factory.noisy = False
    return factory
