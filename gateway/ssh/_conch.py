"""
Every place the gateway reaches into Twisted Conch's private internals.

Conch's client is close to what the gateway needs but not close enough: its
packet layer is slow (a fresh HMAC and a copy of the receive buffer per
packet), it has no AEAD ciphers, it would log a peer's version bytes and
each key-exchange step, and it checks less than OpenSSH does.  The fixes
need names Conch does not promise to keep.  They are all here, each with
what we rely on and why, so that the rest of C{gateway/ssh} uses Conch's
public API and the names below only; C{tests/test_conch_pins.py} checks
that each still exists with the kind and signature we expect, so a Twisted
release that changes one fails in one place (see docs/architecture.md,
"Conch").

Private names used:

 - C{SSHTransportBase._keyExchangeState}, C{_KEY_EXCHANGE_NONE},
   C{_allowedKeyExchangeMessageType}: L{ConchClientTransport.may_send_now}.
 - C{SSHTransportBase._keySetup}: L{ConchClientTransport.keys_set_up}.
 - C{SSHTransportBase._unsupportedVersionReceived}:
   L{ConchClientTransport.version_not_supported}.
 - C{SSHTransportBase._getKey} (the key derivation): overridden, with the
   hash of our own key exchange (L{gateway.ssh.handshake}).
 - C{SSHCiphers._getCipher}, C{SSHCiphers._getMAC} and the key of the
   private C{_MACParams}: L{conch_cipher}, L{conch_mac}, L{mac_key}.
 - C{KnownHostsEntry._hostnames}: L{entry_host_patterns}.
 - C{_log} of Conch's transport, connection, channel and user-auth classes:
   L{quiet_conch_logs}.

Public methods overridden for a behaviour of Conch's that its API does not
state (that C{dataReceived} takes packets through C{getPacket} once the
version line is in; that C{sendPacket} queues during a key exchange and
C{_newKeys} sends the queue through C{sendPacket} again; that
C{SSHTransportBase.ssh_KEXINIT} negotiates, sets C{nextEncryptions} and
C{otherKexInitPayload} and answers a server-begun exchange with our KEXINIT,
so that calling it instead of C{SSHClientTransport}'s skips only Conch's own
key exchange; that C{ssh_KEX_DH_GEX_GROUP} is where message 31, every
exchange's reply, arrives; that C{sendKexInit} is how Conch starts every
exchange): the overrides of those live in L{ConchClientTransport}, and
L{OVERRIDDEN} lists every Conch method a C{gateway.ssh} class overrides,
for the pin test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives.ciphers import Cipher
from twisted.conch.client.knownhosts import PlainEntry
from twisted.conch.ssh import channel, connection, transport, userauth
from twisted.internet.interfaces import ITransport
from twisted.logger import Logger, LogLevel

#: Sequence numbers wrap at 2**32 (RFC 4253 6.4); Conch's never wrap.
SEQUENCE_MASK = 0xFFFFFFFF

_T = TypeVar("_T", bound=type)


class _WarningsLogger(Logger):
    """
    A logger that drops everything below a warning before an event is built.

    Conch logs every channel open and close and each step of a key exchange
    at info or debug level.  Per stream that would be two events built,
    dispatched and filtered away, and a new L{Logger} made at each
    C{self._log} (L{Logger} is a descriptor); this one is shared and returns
    at once.
    """

    _kept = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})

    def __get__(self, instance: object, owner: type | None = None) -> Logger:
        return self

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level in self._kept:
            super().emit(level, format, **kwargs)


def quiet_conch_logs(namespace: str) -> Callable[[_T], _T]:
    """
    A class decorator for a subclass of a Conch class: Conch's own events
    (logged through the private class attribute C{_log}) keep only warnings
    and worse, under C{namespace}.  At thousands of streams and hundreds of
    clusters its chatter would drown the gateway's one event per stream and
    two per connection.
    """

    def quiet(cls: _T) -> _T:
        cls._log = _WarningsLogger(namespace=namespace)  # type: ignore[attr-defined]
        return cls

    return quiet


def conch_cipher(ciphers: transport.SSHCiphers, name: bytes, iv: bytes, key: bytes) -> Cipher[Any]:
    """
    Conch's C{cryptography} C{Cipher} for the classic cipher C{name}
    (C{SSHCiphers._getCipher}): for one direction of a key exchange whose
    other direction is AEAD, where Conch's C{setKeys} (both at once) cannot
    be used.
    """
    return ciphers._getCipher(name, iv, key)


def conch_mac(ciphers: transport.SSHCiphers, name: bytes, key: bytes) -> tuple:
    """
    Conch's MAC parameters for C{name} (C{SSHCiphers._getMAC}): a tuple
    (digest module, inner pad, outer pad, digest size), as C{outMAC} and
    C{inMAC} hold them; for the same one-direction case as L{conch_cipher}.
    """
    return ciphers._getMAC(name, key)


def mac_key(params: tuple) -> bytes:
    """
    The HMAC key of MAC parameters from Conch (an attribute of its private
    C{_MACParams}): we key one C{hmac.HMAC} per direction with it.
    """
    return params.key  # type: ignore[attr-defined]


def entry_host_patterns(entry: PlainEntry) -> list[bytes]:
    """
    The host names and patterns of a plain known_hosts entry (Conch keeps
    them in C{_hostnames}): Conch matches them literally, we apply
    OpenSSH's C{*}, C{?} and C{!} patterns to them.
    """
    return entry._hostnames


class ConchClientTransport(transport.SSHClientTransport):
    """
    Conch's client transport with its internals turned into named hooks.

    Subclasses provide the packet layer: L{seal_packet} (a whole outgoing
    packet, or None for Conch's own C{sendPacket}), L{packets_arrived} (bytes
    after the version line) and L{next_payload} (one packet for Conch's
    C{getPacket} loop); the key exchange: L{start_key_exchange},
    L{key_exchange_reply}, L{kex_hash}; and may override L{keys_set_up},
    L{version_not_supported}, L{kexinit_for_conch}, L{kexinit_may_go_now},
    L{kexinit_received}, L{message_arrived}, L{newkeys_sent} and
    L{packet_sent}.  C{ciphers_class} replaces Conch's C{SSHCiphers} at every
    key exchange.
    """

    ciphers_class: type[transport.SSHCiphers] = transport.SSHCiphers
    #: Set by C{makeConnection}, before any packet is sent or read.
    transport: ITransport
    #: Where sealed packets go: the transport's C{write}, or a faster one;
    #: a subclass sets it in C{connectionMade}, before any packet is sent.
    write_packet: Callable[[bytes], None]

    # -- hooks ------------------------------------------------------------

    def seal_packet(self, messageType: int, payload: bytes, data: bytes = b"") -> bytes | None:
        """The wire form of this packet (payload C{payload + data}) under the current keys; None: let Conch send it."""
        return None

    def packets_arrived(self, data: bytes) -> None:
        """Bytes after the version line arrived (Conch would buffer and call C{getPacket})."""
        raise NotImplementedError

    def next_payload(self, buffered: bytes) -> bytes | None:
        """
        For Conch's C{getPacket}: take C{buffered} (what came with the version
        line, else empty) and return the next message (number and payload),
        or None.
        """
        raise NotImplementedError

    def packet_sent(self, size: int) -> None:
        """A packet with a C{size}-byte payload was sent (or queued by Conch)."""

    def keys_set_up(self) -> None:
        """A key exchange derived its keys (NEWKEYS is on its way)."""

    def version_not_supported(self) -> None:
        """The peer's version line is not SSH-2.0 (Conch would quote it back)."""
        self.sendDisconnect(transport.DISCONNECT_PROTOCOL_VERSION_NOT_SUPPORTED, b"protocol version not supported")

    def kexinit_for_conch(self, packet: bytes) -> bytes:
        """The server's KEXINIT as Conch should negotiate from it."""
        return packet

    def kexinit_may_go_now(self) -> bool:
        """Whether our KEXINIT goes out now (Conch calls C{sendKexInit} at connect and for rekeys)."""
        return True

    def kexinit_received(self, packet: bytes) -> bool:
        """The server's KEXINIT arrived, before negotiation; False: refused (we disconnected)."""
        return True

    def start_key_exchange(self) -> None:
        """The algorithms are agreed on (C{kexAlg}, C{keyAlg}, C{nextEncryptions}): send the first message."""
        raise NotImplementedError

    def key_exchange_reply(self, packet: bytes) -> None:
        """Message 31, the server's reply: check it and call C{_keySetup(K, H)}, or disconnect."""
        raise NotImplementedError

    @property
    def kex_hash(self) -> Callable[..., Any]:
        """The hash of the exchange under way (for the key derivation)."""
        raise NotImplementedError

    def message_arrived(self, message: int) -> bool:
        """A message is about to be handled; False: refused (we disconnected)."""
        return True

    def newkeys_sent(self) -> None:
        """Our NEWKEYS went out (its sequence number counted)."""

    # -- Conch's internals ------------------------------------------------

    def may_send_now(self, messageType: int) -> bool:
        """
        Whether a message of this type goes out now rather than into Conch's
        queue of messages held back during a key exchange (RFC 4253 7.1).
        Conch's own C{sendPacket} queues, and its C{_newKeys} sends the
        queue through C{sendPacket} again once the exchange is done.
        """
        return self._keyExchangeState == self._KEY_EXCHANGE_NONE or self._allowedKeyExchangeMessageType(messageType)

    @property
    def key_exchange_running(self) -> bool:
        """Whether a key exchange (ours or the peer's) is under way."""
        return self._keyExchangeState != self._KEY_EXCHANGE_NONE

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.send_message(messageType, payload)

    def send_message(self, messageType: int, payload: bytes, data: bytes = b"") -> None:
        """
        Send the message C{payload + data}, without joining the two first: a
        CHANNEL_DATA message's header and data are joined once, into the
        packet (L{seal_packet}), instead of twice more on the way there.
        """
        packet = self.seal_packet(messageType, payload, data) if self.may_send_now(messageType) else None
        if packet is None:
            # Before the first key exchange, or held back during one.
            super().sendPacket(messageType, payload + data)
        else:
            self.write_packet(packet)
            self.outgoingPacketSequence = (self.outgoingPacketSequence + 1) & SEQUENCE_MASK
        if messageType == transport.MSG_NEWKEYS:
            self.newkeys_sent()
        self.packet_sent(len(payload) + len(data))

    def dataReceived(self, data: bytes) -> None:
        if self.gotVersion:
            self.packets_arrived(data)
        else:
            # Conch parses the version line, then takes packets via getPacket.
            super().dataReceived(data)

    def getPacket(self) -> bytes | None:
        # Called by Conch's dataReceived for the data that came with the
        # version line.  It also calls this before any version line when the
        # buffer ends in a newline: lines a server may send first (RFC 4253
        # 4.2) are no packets.
        if not self.gotVersion:
            return None
        buffered, self.buf = self.buf, b""
        return self.next_payload(buffered)

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        super()._keySetup(sharedSecret, exchangeHash)
        self.keys_set_up()

    def _unsupportedVersionReceived(self, remoteVersion: bytes) -> None:
        self.version_not_supported()

    def sendKexInit(self) -> None:
        if self.kexinit_may_go_now():
            super().sendKexInit()

    def ssh_KEXINIT(self, packet: bytes) -> None:
        if not self.kexinit_received(packet):
            return
        for_conch = self.kexinit_for_conch(packet)
        # The base class negotiates (and answers with our KEXINIT when the
        # server began); Conch's client class would then start an exchange
        # of its own: ours starts below, after the same checks.
        if transport.SSHTransportBase.ssh_KEXINIT(self, for_conch) is None:
            return  # no common algorithms: the base class disconnected
        if for_conch is not packet:
            # The exchange hash covers what the server really sent.
            self.otherKexInitPayload = bytes((transport.MSG_KEXINIT,)) + packet
        negotiated = self.nextEncryptions
        if negotiated is not None and not isinstance(negotiated, self.ciphers_class):
            self.nextEncryptions = self.ciphers_class(
                negotiated.outCipType,
                negotiated.inCipType,
                negotiated.outMACType,
                negotiated.inMACType,
            )
        self.start_key_exchange()

    def ssh_KEX_DH_GEX_GROUP(self, packet: bytes) -> None:
        # Message 31: the reply of every exchange we offer (KEX_ECDH_REPLY, KEX_HYBRID_REPLY).
        self.key_exchange_reply(packet)

    def _getKey(self, c: bytes, sharedSecret: bytes, exchangeHash: bytes) -> bytes:
        # Conch's, with the hash of our exchange: Conch's table of hashes
        # (the private _kex) knows no post-quantum hybrid.
        digest = self.kex_hash
        assert self.sessionID is not None, "session ID must already have been assigned"
        k1: bytes = digest(sharedSecret + exchangeHash + c + self.sessionID).digest()
        k2: bytes = digest(sharedSecret + exchangeHash + k1).digest()
        k3: bytes = digest(sharedSecret + exchangeHash + k1 + k2).digest()
        k4: bytes = digest(sharedSecret + exchangeHash + k1 + k2 + k3).digest()
        return k1 + k2 + k3 + k4

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if self.message_arrived(messageNum):
            super().dispatchMessage(messageNum, payload)


#: Every Conch method a class in gateway.ssh overrides, by the Conch class
#: it subclasses: the pin test checks that each still exists with the
#: parameters of our override, and that no override is left off this list.
OVERRIDDEN: dict[type, tuple[str, ...]] = {
    transport.SSHClientTransport: (
        "sendPacket",
        "dataReceived",
        "getPacket",
        "_keySetup",
        "_getKey",
        "_unsupportedVersionReceived",
        "sendKexInit",
        "ssh_KEXINIT",
        "ssh_KEX_DH_GEX_GROUP",
        "dispatchMessage",
        "connectionSecure",
        "connectionMade",
        "connectionLost",
        "loseConnection",
        "sendDisconnect",
        "receiveError",
    ),
    transport.SSHCiphers: ("setKeys", "makeMAC", "verify"),
    connection.SSHConnection: (
        "serviceStarted",
        "serviceStopped",
        "packetReceived",
        "sendData",
        "ssh_CHANNEL_DATA",
        "ssh_CHANNEL_EXTENDED_DATA",
        "channelClosed",
    ),
    channel.SSHChannel: (
        "channelOpen",
        "openFailed",
        "dataReceived",
        "extReceived",
        "eofReceived",
        "closeReceived",
        "closed",
        "loseConnection",
        "addWindowBytes",
        "stopWriting",
        "startWriting",
    ),
    userauth.SSHUserAuthClient: ("tryAuth", "auth_publickey"),
}
