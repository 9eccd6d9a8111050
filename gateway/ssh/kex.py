"""
The key exchanges the gateway offers, sans I/O: each makes the client's
public value, takes the server's, and gives the shared secret K already
encoded as the exchange hash and the key derivation take it.

Offered, best first (see docs/ssh-algorithms.md):

 - C{mlkem768x25519-sha256} (draft-ietf-sshm-mlkem-hybrid-kex; OpenSSH
   9.9's C{kexmlkem768x25519.c}, its default from 10.0): ML-KEM-768 and
   X25519 together, so the session keys stay secret if either holds --
   against a recording decrypted later by a quantum computer too.  The
   client sends its ML-KEM public key and its X25519 public key
   (1184 + 32 bytes); the server answers with an ML-KEM ciphertext and its
   X25519 public key (1088 + 32).  K = SHA-256(K_PQ || K_CL), encoded as an
   SSH I{string} (not an mpint, unlike every classic exchange).  Offered only
   when C{cryptography} has ML-KEM (L{MLKEM_AVAILABLE}).
 - C{curve25519-sha256} (and its old name C{@libssh.org}): RFC 8731.
 - C{ecdh-sha2-nistp256/384/521}: RFC 5656, for nodes limited to FIPS
   curves.

Not offered: C{sntrup761x25519-sha512} (no Streamlined NTRU Prime in
C{cryptography}), finite-field Diffie-Hellman (Conch has group14 only with
SHA-1, and group exchange would take a 1024-bit group from the node), and
every SHA-1 exchange.

Strict key exchange (OpenSSH PROTOCOL, "kex-strict"; the Terrapin
counter-measure, CVE-2023-48795) is no method: its markers go at the end of
the first KEXINIT's list (L{STRICT_CLIENT}, L{STRICT_SERVER}); see
L{gateway.ssh.handshake}.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from twisted.conch.ssh.common import MP, NS

__all__ = [
    "KEX_ALGORITHMS",
    "MARKERS",
    "MLKEM768X25519",
    "MLKEM_AVAILABLE",
    "STRICT_CLIENT",
    "STRICT_SERVER",
    "KexError",
    "KeyExchange",
    "exchange_hash",
    "start",
]

MLKEM768X25519 = b"mlkem768x25519-sha256"
STRICT_CLIENT = b"kex-strict-c-v00@openssh.com"
STRICT_SERVER = b"kex-strict-s-v00@openssh.com"
#: Names in a KEXINIT's key exchange list that are no method: a server that
#: "agrees" on one of them is refused (RFC 8308 2.2 for ext-info).
MARKERS = frozenset({b"ext-info-c", b"ext-info-s", STRICT_CLIENT, STRICT_SERVER})

try:
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

    MLKEM768PrivateKey.generate()  # a build without the algorithm raises here
    MLKEM_AVAILABLE = True
except Exception:  # ImportError, or UnsupportedAlgorithm from an OpenSSL without it
    MLKEM_AVAILABLE = False

#: Every exchange this module implements, best first.
_ALL = (
    MLKEM768X25519,
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
#: What is offered: all of them, less ML-KEM where the backend lacks it.
KEX_ALGORITHMS = tuple(name for name in _ALL if name != MLKEM768X25519 or MLKEM_AVAILABLE)

_MLKEM768_PUBLIC = 1184
_MLKEM768_CIPHERTEXT = 1088
_X25519_PUBLIC = 32


class KexError(ValueError):
    """The server's public value is unusable (wrong size, not on the curve, a low-order point)."""


class KeyExchange(Protocol):
    """One run of one exchange, client side."""

    #: The hash of the exchange hash and the key derivation.
    hash: Callable[..., Any]

    @property
    def client_public(self) -> bytes:
        """Q_C: what the client's KEX_ECDH_INIT (or KEX_HYBRID_INIT) carries."""

    def shared_secret(self, server_public: bytes) -> bytes:
        """K, encoded for the hash (mpint or string), from Q_S; L{KexError} for a bad one."""


class _X25519:
    hash = hashlib.sha256

    def __init__(self, private: x25519.X25519PrivateKey | None = None) -> None:
        self._private = private or x25519.X25519PrivateKey.generate()

    @property
    def client_public(self) -> bytes:
        return self._private.public_key().public_bytes_raw()

    def raw_secret(self, server_public: bytes) -> bytes:
        if len(server_public) != _X25519_PUBLIC:
            raise KexError(f"an X25519 public key of {len(server_public)} bytes")
        try:
            return self._private.exchange(x25519.X25519PublicKey.from_public_bytes(server_public))
        except ValueError:  # the all-zero result of a low-order point
            raise KexError("an X25519 public key of low order") from None

    def shared_secret(self, server_public: bytes) -> bytes:
        return MP(int.from_bytes(self.raw_secret(server_public), "big"))


class _Nist:
    def __init__(self, curve: ec.EllipticCurve, hash: Callable[..., Any]) -> None:
        self._curve = curve
        self.hash = hash
        self._private = ec.generate_private_key(curve)

    @property
    def client_public(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def shared_secret(self, server_public: bytes) -> bytes:
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(self._curve, server_public)
            secret = self._private.exchange(ec.ECDH(), point)
        except ValueError:
            raise KexError("a point that is not on the curve") from None
        return MP(int.from_bytes(secret, "big"))


class _MLKEMHybrid:
    hash = hashlib.sha256

    def __init__(self, kem_seed: bytes | None = None, x25519_private: x25519.X25519PrivateKey | None = None) -> None:
        """Fresh keys; or given ones, for known-answer tests only (a key exchange's keys are never reused)."""
        self._kem = MLKEM768PrivateKey.from_seed_bytes(kem_seed) if kem_seed else MLKEM768PrivateKey.generate()
        self._x25519 = _X25519(x25519_private)

    @property
    def client_public(self) -> bytes:
        return self._kem.public_key().public_bytes_raw() + self._x25519.client_public

    def shared_secret(self, server_public: bytes) -> bytes:
        if len(server_public) != _MLKEM768_CIPHERTEXT + _X25519_PUBLIC:
            raise KexError(f"a hybrid reply of {len(server_public)} bytes")
        ciphertext, theirs = server_public[:_MLKEM768_CIPHERTEXT], server_public[_MLKEM768_CIPHERTEXT:]
        try:
            k_pq = self._kem.decapsulate(ciphertext)
        except ValueError:
            raise KexError("an ML-KEM ciphertext that does not decapsulate") from None
        return NS(hashlib.sha256(k_pq + self._x25519.raw_secret(theirs)).digest())


#: The NIST exchanges: each one's curve and hash (RFC 5656 6.2.1).
_CURVES: dict[bytes, tuple[ec.EllipticCurve, Callable[..., Any]]] = {
    b"ecdh-sha2-nistp256": (ec.SECP256R1(), hashlib.sha256),
    b"ecdh-sha2-nistp384": (ec.SECP384R1(), hashlib.sha384),
    b"ecdh-sha2-nistp521": (ec.SECP521R1(), hashlib.sha512),
}


def start(name: bytes) -> KeyExchange:
    """A new run of exchange C{name} (one of L{KEX_ALGORITHMS}): fresh keys each time."""
    if name == MLKEM768X25519 and MLKEM_AVAILABLE:
        return _MLKEMHybrid()
    if name in (b"curve25519-sha256", b"curve25519-sha256@libssh.org"):
        return _X25519()
    if name in _CURVES:
        return _Nist(*_CURVES[name])
    raise KexError(f"no key exchange {name!r}")


def exchange_hash(
    kex: KeyExchange,
    client_version: bytes,
    server_version: bytes,
    client_kexinit: bytes,
    server_kexinit: bytes,
    host_key: bytes,
    server_public: bytes,
    shared_secret: bytes,
) -> bytes:
    """
    H (RFC 5656 4, RFC 8731 3, and the hybrid draft alike): the versions,
    both KEXINIT payloads, the host key blob, both public values as strings,
    then K as L{KeyExchange.shared_secret} encoded it.
    """
    h = kex.hash()
    for part in (client_version, server_version, client_kexinit, server_kexinit, host_key, kex.client_public):
        h.update(NS(part))
    h.update(NS(server_public))
    h.update(shared_secret)
    digest: bytes = h.digest()
    return digest
