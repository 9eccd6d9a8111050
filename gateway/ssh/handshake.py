"""
The first packets of a connection to a proxy node: which algorithms are
offered, strict key exchange, the key exchange itself and the host key
check.  L{HandshakeTransport} is the part of the gateway's client transport
(L{gateway.ssh.transport}) that runs them, on the hooks of
L{gateway.ssh._conch.ConchClientTransport}.

Why the gateway runs its own key exchange rather than Conch's: Conch (26.10)
has no post-quantum hybrid, no strict key exchange (Twisted #12057), no host
certificates, and checks only that the server's signature is valid for the
key, not that it is made with the algorithm agreed on.  The exchanges
themselves are in L{gateway.ssh.kex}; this module sends and reads their
messages.

The order of the first exchange: the client waits (at most
L{KEXINIT_WAIT} seconds) for the server's KEXINIT before sending its own.
That costs no round trip -- the server sends its KEXINIT right after the
version lines, and the client's KEXINIT goes out together with its
KEX_ECDH_INIT -- and it lets the client offer C{chacha20-poly1305} only to a
server that agrees to strict key exchange (against which the Terrapin
prefix truncation is no longer possible): without strict KEX, chacha20 is
left out (OpenSSH PROTOCOL, CVE-2023-48795).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from gateway.addresses import host_port
from gateway.ssh import kex
from gateway.ssh._conch import ConchClientTransport
from gateway.ssh.certs import CERT_ALGORITHMS, SHA1_CERT_ALGORITHM, is_certificate_algorithm, signature_algorithm
from gateway.ssh.failure import ConnectFailure
from gateway.ssh.hostkeys import HostKeyError, HostKeyPolicy
from gateway.ssh.negotiation import no_common_reason, with_aead_macs
from gateway.ssh.packets import (
    CHACHA20_POLY1305,
    ETM_MACS,
    PREFERRED_CIPHERS,
    PREFERRED_MACS,
    SUPPORTED_AEAD_CIPHERS,
    offered,
)

__all__ = ["HOST_KEY_ALGORITHMS", "KEXINIT_WAIT", "OFFERED", "SHA1_RSA", "HandshakeTransport"]

log = Logger()

#: Seconds the client waits for the server's KEXINIT before sending its own
#: anyway (then without chacha20: strict KEX is not known to be agreed).
KEXINIT_WAIT = 2.0

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

#: Conch's client, whose algorithm lists say what it implements.
_CONCH = transport.SSHClientTransport

#: Messages a server may send during the first exchange under strict KEX
#: (besides its KEXINIT, which must be its first packet): the exchange's own
#: (30-49), NEWKEYS, and DISCONNECT.  IGNORE and DEBUG too are violations.
_STRICT_ALLOWED = frozenset({transport.MSG_DISCONNECT, transport.MSG_KEXINIT, transport.MSG_NEWKEYS, *range(30, 50)})


#: Each algorithm list, by the cluster key that may restrict it: the transport attribute that holds it.
_LISTS = {
    "kex_algorithms": "supportedKeyExchanges",
    "host_key_algorithms": "supportedPublicKeys",
    "ciphers": "supportedCiphers",
    "macs": "supportedMACs",
}

_said: set[str] = set()


def _say_once_without_mlkem() -> None:
    """Where C{cryptography} has no ML-KEM, the hybrid is not offered: say so once per process."""
    if not kex.MLKEM_AVAILABLE and "mlkem" not in _said:
        _said.add("mlkem")
        log.warn(
            "not offering {kex}: this cryptography/OpenSSL has no ML-KEM (the post-quantum hybrid);"
            " key exchanges stay classic (curve25519)",
            kex=kex.MLKEM768X25519.decode(),
        )


class HandshakeTransport(ConchClientTransport):
    """
    Key exchange and host key check for one proxy node (see the module).

    Every list offered is explicit, in our order, and holds only what is
    implemented here or by Conch: Conch's own lists end in CBC, 3DES,
    hmac-md5/sha1, SHA-1 key exchanges, ssh-dss and zlib.
    """

    supportedCiphers = offered(PREFERRED_CIPHERS, SUPPORTED_AEAD_CIPHERS + _CONCH.supportedCiphers)
    supportedMACs = offered(PREFERRED_MACS, [*ETM_MACS, *_CONCH.supportedMACs])
    supportedKeyExchanges = list(kex.KEX_ALGORITHMS)
    # Certificates after the plain keys: the policy moves them first where a CA is trusted.
    supportedPublicKeys = [*offered(HOST_KEY_ALGORITHMS, _CONCH.supportedPublicKeys), *CERT_ALGORITHMS]
    #: Compression costs CPU for little on a LAN, and zlib has had its CVEs.
    supportedCompressions = [b"none"]

    def __init__(
        self,
        host: str,
        port: int,
        host_keys: HostKeyPolicy,
        clock: IReactorTime,
        allow_sha1_signatures: bool,
        algorithms: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.host = host
        #: A cluster's own lists (its kex_algorithms, ciphers, macs, host_key_algorithms), by key.
        self._algorithms = algorithms or {}
        self.port = port
        self._host_keys = host_keys
        self._clock = clock
        self._allow_sha1_signatures = allow_sha1_signatures
        self._failure: str | None = None
        self._failure_kind = ConnectFailure.NETWORK
        self._kex: kex.KeyExchange | None = None
        #: Whether the server agreed to strict key exchange (in its first KEXINIT).
        self.strict_kex = False
        #: Until the first NEWKEYS from the server: strict KEX's checks apply.
        self.initial_kex = True
        #: Whether our first KEXINIT may go out: the server's is in, or we stopped waiting.
        self._kexinit_free = False
        self._kexinit_timer: IDelayedCall | None = None
        #: Whether the server's KEXINIT of the exchange under way is in (one per exchange).
        self._server_kexinit_in = False
        #: Whether our NEWKEYS is out and the server's is the next it may send (one per exchange).
        self._newkeys_due = False
        #: Whether the next packet is the server's wrong guess of the exchange (RFC 4253 7: ignored).
        self._skip_guess = False

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def note_failure(self, why: str, kind: ConnectFailure = ConnectFailure.NETWORK) -> None:
        """Record why (and of which kind) the connection is about to fail, unless a reason is known."""
        if self._failure is None:
            self._failure = why
            self._failure_kind = kind

    def _refuse(self, reason: int, why: str, description: bytes, kind: ConnectFailure = ConnectFailure.KEX) -> None:
        """Disconnect for a handshake failure: of the key exchange, unless C{kind} says otherwise."""
        self.note_failure(why, kind)
        self.sendDisconnect(reason, description)

    # -- what is offered -------------------------------------------------------

    def choose_offer(self) -> None:
        """Set this connection's lists (called before the first KEXINIT is built)."""
        _say_once_without_mlkem()
        chosen = {key: [name.encode() for name in names] for key, names in self._algorithms.items() if names}
        for key in ("kex_algorithms", "ciphers", "macs"):
            if key in chosen:
                setattr(self, _LISTS[key], chosen[key])
        algorithms = list(self.supportedPublicKeys)
        if self._allow_sha1_signatures and SHA1_RSA in _CONCH.supportedPublicKeys:
            algorithms += [SHA1_RSA, SHA1_CERT_ALGORITHM]
        if "host_key_algorithms" in chosen:
            # The cluster's order, as it is: no reordering by the keys held.
            sha1 = [a for a in algorithms if a in (SHA1_RSA, SHA1_CERT_ALGORITHM)]
            self.supportedPublicKeys = chosen["host_key_algorithms"] + sha1
        else:
            self.supportedPublicKeys = self._host_keys.preferred_algorithms(self.host, self.port, algorithms)
        # The markers only in the first KEXINIT (Conch adds ext-info-c itself).
        self.supportedKeyExchanges = [*self.supportedKeyExchanges, kex.STRICT_CLIENT]

    def kexinit_may_go_now(self) -> bool:
        if self.sessionID is not None or self._kexinit_free:
            return True  # a rekey, or the server's KEXINIT is in: ours goes now
        if self._kexinit_timer is None:
            self._kexinit_timer = self._clock.callLater(KEXINIT_WAIT, self._kexinit_anyway)
        return False

    def _kexinit_anyway(self) -> None:
        """The server did not send its KEXINIT first: send ours, without chacha20 (strict KEX unknown)."""
        self._kexinit_timer = None
        if self._kexinit_free:
            return
        self._kexinit_free = True
        self._without(CHACHA20_POLY1305)
        self.sendKexInit()

    def _without(self, cipher: bytes) -> None:
        self.supportedCiphers = [c for c in self.supportedCiphers if c != cipher]

    def cancel_kexinit_wait(self) -> None:
        if self._kexinit_timer is not None and self._kexinit_timer.active():
            self._kexinit_timer.cancel()
        self._kexinit_timer = None

    # -- the server's KEXINIT ----------------------------------------------------

    def kexinit_received(self, packet: bytes) -> bool:
        """The server's KEXINIT, before it is negotiated from: False when it is refused (we disconnected)."""
        if self._server_kexinit_in:
            # Conch would negotiate again from it, and start a second exchange (or undo strict KEX).
            self._refuse(
                transport.DISCONNECT_PROTOCOL_ERROR,
                "the proxy node sent a second KEXINIT during one key exchange",
                b"unexpected KEXINIT",
            )
            return False
        try:
            *lists, rest = getNS(packet[16:], 10)
        except struct.error:
            return True  # malformed: Conch says so
        self._server_kexinit_in = True
        server_kex, server_host_keys = lists[0].split(b","), lists[1].split(b",")
        if rest[:1] not in (b"", b"\0"):
            # first_kex_packet_follows: a guess other than our first choices is ignored.
            self._skip_guess = (server_kex[0], server_host_keys[0]) != (
                self.supportedKeyExchanges[0],
                self.supportedPublicKeys[0],
            )
        if self.sessionID is None:
            self.strict_kex = kex.STRICT_SERVER in server_kex
            if self.strict_kex and self.incomingPacketSequence != 1:
                self._refuse(
                    transport.DISCONNECT_PROTOCOL_ERROR,
                    "strict key exchange violated: the proxy node's KEXINIT was not its first packet",
                    b"strict KEX violation: KEXINIT was not the first packet",
                )
                return False
            if not self._kexinit_free and not self.strict_kex:
                self._without(CHACHA20_POLY1305)
            self._kexinit_free = True
            self.cancel_kexinit_wait()
        self._note_no_common(lists)
        return True

    def _note_no_common(self, lists: list[bytes]) -> None:
        offers = {key: getattr(self, attribute) for key, attribute in _LISTS.items()}
        why = no_common_reason(offers, lists, self._algorithms)
        if why is not None:
            self.note_failure(why, ConnectFailure.KEX)

    def kexinit_for_conch(self, packet: bytes) -> bytes:
        return with_aead_macs(packet, self.supportedCiphers, self.supportedMACs)

    # -- the exchange ----------------------------------------------------------

    def start_key_exchange(self) -> None:
        """The algorithms are agreed on: send our public value (KEX_ECDH_INIT or KEX_HYBRID_INIT, both 30)."""
        if self.kexAlg in kex.MARKERS:
            self._refuse(
                transport.DISCONNECT_KEY_EXCHANGE_FAILED,
                "the proxy node chose a marker as its key exchange method",
                b"no key exchange method in common",
            )
            return
        try:
            self._kex = kex.start(self.kexAlg)
        except kex.KexError:
            self._refuse(
                transport.DISCONNECT_KEY_EXCHANGE_FAILED,
                f"the proxy node chose a key exchange the gateway does not offer ({self.kexAlg!r})",
                b"unknown key exchange method",
            )
            return
        self.sendPacket(transport.MSG_KEX_DH_GEX_REQUEST_OLD, NS(self._kex.client_public))

    @property
    def kex_hash(self) -> Callable[..., Any]:
        assert self._kex is not None, "no key exchange under way"
        return self._kex.hash

    def key_exchange_reply(self, packet: bytes) -> None:
        """
        The server's reply (KEX_ECDH_REPLY or KEX_HYBRID_REPLY): its host key,
        its public value and its signature of the exchange hash.  Checked in
        the order OpenSSH checks them: the signature's algorithm, the host
        key, the public value, the signature.
        """
        exchange = self._kex
        if exchange is None:
            why = "the proxy node sent a key exchange reply out of turn"
            self._refuse(transport.DISCONNECT_PROTOCOL_ERROR, why, b"unexpected")
            return
        try:
            host_blob, server_public, signature, rest = getNS(packet, 3)
            algorithm = getNS(signature)[0]
        except (struct.error, ValueError):
            self._refuse(transport.DISCONNECT_PROTOCOL_ERROR, "a malformed key exchange reply", b"malformed reply")
            return
        expected = signature_algorithm(self.keyAlg)
        if algorithm != expected:
            self._refuse(
                transport.DISCONNECT_KEY_EXCHANGE_FAILED,
                f"the proxy node signed the key exchange with another algorithm than {expected.decode()}",
                b"host key signature algorithm mismatch",
            )
            return
        try:
            host_key = self.verify_host_key(host_blob)
        except HostKeyError as e:
            log.error("refusing proxy node {address}: {why}", address=self.address, why=e)
            self._refuse(
                transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE, str(e), b"host key not verified", ConnectFailure.HOSTKEY
            )
            return
        try:
            shared = exchange.shared_secret(server_public)
        except kex.KexError as e:
            self._refuse(transport.DISCONNECT_KEY_EXCHANGE_FAILED, f"a bad key exchange value ({e})", b"bad value")
            return
        digest = kex.exchange_hash(
            exchange,
            self.ourVersionString,
            self.otherVersionString,
            self.ourKexInitPayload,
            self.otherKexInitPayload,
            host_blob,
            server_public,
            shared,
        )
        if not host_key.verify(signature, digest):
            self._refuse(
                transport.DISCONNECT_KEY_EXCHANGE_FAILED,
                "the proxy node's signature of the key exchange is not valid for its host key",
                b"bad signature",
            )
            return
        self._keySetup(shared, digest)
        self._kex = None  # one reply per exchange: a replayed one would key the ciphers in use afresh

    def verify_host_key(self, blob: bytes) -> Key:
        """
        The key that signs the exchange: the host key of blob C{blob}, or the
        key a host certificate certifies, once the policy accepts it;
        L{HostKeyError} otherwise.
        """
        key = self._certified_key(blob) if is_certificate_algorithm(self.keyAlg) else self._plain_key(blob)
        if self._host_keys.accept_any:
            log.warn(
                "accepting unverified host key of {address} (insecure_accept_any_host_key)",
                address=self.address,
            )
        return key

    def _certified_key(self, blob: bytes) -> Key:
        certified = self._host_keys.verify_certificate(self.host, self.port, self.keyAlg, blob, self._clock.seconds())
        if certified.refused is not None:
            log.warn(
                "proxy node {address}: its host certificate is refused ({why}), its key is known: accepted",
                address=self.address,
                why=certified.refused,
            )
        elif not self._host_keys.accept_any:
            log.info(
                "proxy node {address}: host certificate {certificate}", address=self.address, certificate=str(certified)
            )
        return certified.key

    def _plain_key(self, blob: bytes) -> Key:
        try:
            offered_key = Key.fromString(blob)
        except (BadKeyError, ValueError, struct.error):
            raise HostKeyError("the proxy node's host key cannot be read") from None
        if self.keyAlg not in offered_key.supportedSignatureAlgorithms():
            # As OpenSSH's "type mismatch": Conch's Ed25519 keys would verify under any name.
            raise HostKeyError(
                f"the proxy node's host key is an {offered_key.sshType().decode()} key,"
                f" not one for {self.keyAlg.decode()}"
            )
        self._host_keys.verify(self.host, self.port, offered_key)
        return offered_key

    # -- strict key exchange ---------------------------------------------------

    def message_arrived(self, message: int) -> bool:
        """Before a message is handled: False when it is ignored, or refused (we disconnected)."""
        if self._skip_guess:
            self._skip_guess = False
            return False
        if self.initial_kex and self.incomingPacketSequence == 0:
            # Counted past 2**32 before the first NEWKEYS: as OpenSSH (since 9.6), a prefix attack, not traffic.
            self._refuse(
                transport.DISCONNECT_PROTOCOL_ERROR,
                "the proxy node's sequence number wrapped during the first key exchange",
                b"sequence number wrapped during the initial key exchange",
            )
            return False
        if self.initial_kex and self.strict_kex and message not in _STRICT_ALLOWED:
            self._refuse(
                transport.DISCONNECT_PROTOCOL_ERROR,
                f"strict key exchange violated: message {message} from the proxy node during the first exchange",
                b"strict KEX violation: unexpected message",
            )
            return False
        if message == transport.MSG_NEWKEYS:
            if not self._newkeys_due:
                # Before its reply (or a second one): Conch would take keys it has not made, or fail.
                self._refuse(
                    transport.DISCONNECT_PROTOCOL_ERROR,
                    "the proxy node sent NEWKEYS out of turn",
                    b"unexpected NEWKEYS",
                )
                return False
            self._newkeys_due = self._server_kexinit_in = False
            if self.strict_kex:
                self.incomingPacketSequence = 0
            self.initial_kex = False
        return True

    def newkeys_sent(self) -> None:
        self._newkeys_due = True
        if self.strict_kex:
            self.outgoingPacketSequence = 0
        if self.sessionID is not None:
            # The markers belong to the first KEXINIT only.
            self.supportedKeyExchanges = [k for k in self.supportedKeyExchanges if k not in kex.MARKERS]


#: What the gateway offers by default, by the cluster key that may restrict it
#: (L{gateway.config.algorithms}).
OFFERED: dict[str, tuple[bytes, ...]] = {
    key: tuple(getattr(HandshakeTransport, attribute)) for key, attribute in _LISTS.items()
}
