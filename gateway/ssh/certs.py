"""
OpenSSH host certificates (C{PROTOCOL.certkeys} in OpenSSH's source), sans-IO.

A proxy node with C{HostCertificate} in its sshd_config presents, instead of
its plain host key, that key signed by a certificate authority (CA).  The
gateway trusts the CA (C{@cert-authority} in known_hosts, or the cluster's
C{host_ca_keys}) instead of each node's key.  This module parses a
certificate blob (L{parse_certificate}, which also verifies the CA's
signature, as OpenSSH does while decoding) and checks what OpenSSH's client
checks of a host certificate (L{check_host_certificate}, after
C{sshkey_cert_check_host}).  Which CAs are trusted and which keys are
C{@revoked} is L{gateway.ssh.hostkeys}' business.

Certificates of Ed25519, ECDSA (NIST P-256/384/521) and RSA keys are
understood, signed by an Ed25519, ECDSA or RSA CA; an RSA CA's SHA-1
(C{ssh-rsa}) signature only where the cluster allows SHA-1, as OpenSSH's
C{CASignatureAlgorithms} default has refused it since 8.2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime

from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key

from gateway.errors import peer_text

#: The certificate types of C{PROTOCOL.certkeys}.
USER_CERTIFICATE = 1
HOST_CERTIFICATE = 2

#: valid_before of a certificate that never expires (C{ssh-keygen -V always}).
FOREVER = 2**64 - 1

#: The key type a certificate blob starts with -> the type of the key it certifies.
_CERTIFIED_TYPE = {
    b"ssh-ed25519-cert-v01@openssh.com": b"ssh-ed25519",
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": b"ecdsa-sha2-nistp521",
    b"ssh-rsa-cert-v01@openssh.com": b"ssh-rsa",
}

#: Host-key algorithms for certificates -> the algorithm the certified key
#: signs the exchange hash with.  As for plain RSA keys, one key type
#: (C{ssh-rsa-cert-v01@openssh.com}) goes by the name of its signature
#: algorithm in the key exchange (OpenSSH's C{rsa-sha2-512-cert-v01@openssh.com}).
_SIGNED_WITH = {
    b"ssh-ed25519-cert-v01@openssh.com": b"ssh-ed25519",
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512-cert-v01@openssh.com": b"rsa-sha2-512",
    b"rsa-sha2-256-cert-v01@openssh.com": b"rsa-sha2-256",
    b"ssh-rsa-cert-v01@openssh.com": b"ssh-rsa",
}

#: The certificate host-key algorithms a transport offers, best first, in
#: the order of the plain ones.  No SHA-1: see L{SHA1_CERT_ALGORITHM}.
CERT_ALGORITHMS = (
    b"ssh-ed25519-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com",
    b"rsa-sha2-512-cert-v01@openssh.com",
    b"rsa-sha2-256-cert-v01@openssh.com",
)
#: Offered after the others only for a cluster with C{allow_sha1_signatures}
#: (the node signs the exchange hash with SHA-1), like plain C{ssh-rsa}.
SHA1_CERT_ALGORITHM = b"ssh-rsa-cert-v01@openssh.com"

#: The signature algorithms each CA key type may sign a certificate with
#: (an ECDSA key: its own name only); C{ssh-rsa} is SHA-1.
_CA_SIGNATURES = {
    "Ed25519": (b"ssh-ed25519",),
    "RSA": (b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"),
}
_SHA1_SIGNATURE = b"ssh-rsa"
#: The key types that can be a CA (OpenSSH has security-key CAs too; Conch cannot check them).
CA_KEY_TYPES = frozenset(
    {b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp384", b"ecdsa-sha2-nistp521", b"ssh-rsa"}
)

#: OpenSSH's limits: C{SSHKEY_CERT_MAX_PRINCIPALS}, C{SSH_RSA_MINIMUM_MODULUS_SIZE}.
_MAX_PRINCIPALS = 256
_MIN_RSA_BITS = 1024


class CertificateError(ValueError):
    """A certificate is malformed or fails a check; the message is the reason, fit for a log line."""


def is_certificate_algorithm(name: bytes) -> bool:
    """Whether the host-key algorithm C{name} is one of a certificate."""
    return name in _SIGNED_WITH


def signature_algorithm(host_key_algorithm: bytes) -> bytes:
    """
    The algorithm the node's host key signs the exchange hash with when
    C{host_key_algorithm} was agreed on: for a certificate, that of the key
    it certifies (C{rsa-sha2-512-cert-v01@openssh.com} -> C{rsa-sha2-512});
    a plain algorithm is its own.
    """
    return _SIGNED_WITH.get(host_key_algorithm, host_key_algorithm)


def _certificate_type(host_key_algorithm: bytes) -> bytes | None:
    """The key type a certificate blob must have for C{host_key_algorithm}; None for a plain algorithm."""
    if not is_certificate_algorithm(host_key_algorithm):
        return None
    if signature_algorithm(host_key_algorithm).startswith(b"rsa-sha2-"):
        return SHA1_CERT_ALGORITHM  # the one RSA certificate type, whatever it signs with
    return host_key_algorithm


class _Reader:
    """Reads SSH wire types from a blob; running short is a L{CertificateError}, never a struct.error."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self._data):
            raise CertificateError("malformed certificate: truncated")
        chunk = self._data[self.offset : end]
        self.offset = end
        return chunk

    def uint32(self) -> int:
        return int(struct.unpack(">L", self.take(4))[0])

    def uint64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.uint32())

    @property
    def done(self) -> bool:
        return self.offset == len(self._data)


def _strings(packed: bytes) -> list[bytes]:
    """The strings packed one after the other in C{packed} (principals, option names and data)."""
    reader = _Reader(packed)
    items = []
    while not reader.done:
        items.append(reader.string())
    return items


def _public_key(blob: bytes, what: str) -> Key:
    """A plain public key from its wire blob; Conch's errors (which may quote the data) become ours."""
    try:
        key = Key.fromString(blob, type="blob")
        small = key.type() == "RSA" and key.size() < _MIN_RSA_BITS
    except Exception:  # noqa: BLE001 - a malformed key makes Conch raise nearly anything
        raise CertificateError(f"malformed certificate: bad {what} data") from None
    if small:
        raise CertificateError(f"malformed certificate: the {what} is an RSA key of fewer than {_MIN_RSA_BITS} bits")
    return key


@dataclass(frozen=True)
class HostCertificate:
    """
    A decoded certificate; neither its CA signature (L{verify_signature})
    nor what it says (L{check_host_certificate}) is checked yet.
    C{key_id} and C{principals} are the CA's bytes: show them with
    L{peer_text}.
    """

    #: The blob's key type, e.g. C{ssh-ed25519-cert-v01@openssh.com}.
    key_type: bytes
    #: The certified public key: the one that signs the key exchange.
    key: Key = field(repr=False)
    serial: int
    #: L{HOST_CERTIFICATE} or L{USER_CERTIFICATE} (or any number the CA wrote).
    cert_type: int
    key_id: bytes
    principals: tuple[bytes, ...]
    valid_after: int
    valid_before: int
    critical_options: tuple[bytes, ...]
    #: The CA's public key, and the algorithm its signature names.
    ca_key: Key = field(repr=False)
    signature_algorithm: bytes
    #: The signed part of the blob (all but the signature), and the signature.
    signed: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def verify_signature(self) -> None:
        """
        Check that the CA signed the certificate, with an algorithm of its key
        type (SHA-1 for RSA is L{check_host_certificate}'s decision).

        @raise CertificateError: an unusable CA key type or a bad signature.
        """
        ca_type = self.ca_key.sshType()
        if ca_type not in CA_KEY_TYPES:
            raise CertificateError(f"a {ca_type.decode()} CA cannot sign host certificates here")
        if self.signature_algorithm not in _CA_SIGNATURES.get(self.ca_key.type(), (ca_type,)):
            raise CertificateError("bad signature: not a signature of the CA's key type")
        try:
            valid = self.ca_key.verify(self.signature, self.signed)
        except Exception:  # noqa: BLE001 - a malformed signature makes the backends raise nearly anything
            valid = False
        if not valid:
            raise CertificateError("bad signature: the CA's signature does not verify")


def parse_certificate(blob: bytes, host_key_algorithm: bytes) -> HostCertificate:
    """
    Decode an OpenSSH certificate (its signature is checked by
    L{HostCertificate.verify_signature}).

    @param host_key_algorithm: the agreed host-key algorithm: the blob must
        be a certificate of that kind (else an Ed25519 certificate could
        stand in for an agreed RSA one, and Conch checks no signature
        algorithm name for Ed25519).
    @raise CertificateError: malformed, or of an unknown type or another
        type than agreed.
    """
    reader = _Reader(blob)
    key_type = reader.string()
    plain_type = _CERTIFIED_TYPE.get(key_type)
    if plain_type is None:
        raise CertificateError(f"not a certificate of a supported type: '{peer_text(key_type, 64)}'")
    if _certificate_type(host_key_algorithm) != key_type:
        raise CertificateError(f"a {key_type.decode()} certificate, but {host_key_algorithm.decode()} was agreed on")
    reader.string()  # nonce: only makes the signed data unpredictable
    start = reader.offset
    if plain_type == b"ssh-rsa":
        reader.string()  # e
        reader.string()  # n
    elif plain_type == b"ssh-ed25519":
        reader.string()  # pk
    else:
        if reader.string() != plain_type.rpartition(b"-")[2]:
            raise CertificateError("malformed certificate: the curve does not match the key type")
        reader.string()  # Q
    key = _public_key(NS(plain_type) + blob[start : reader.offset], "certified key")
    serial = reader.uint64()
    cert_type = reader.uint32()
    key_id = reader.string()
    principals = _strings(reader.string())
    if len(principals) > _MAX_PRINCIPALS:
        raise CertificateError(f"malformed certificate: more than {_MAX_PRINCIPALS} principals")
    valid_after = reader.uint64()
    valid_before = reader.uint64()
    critical = _strings(reader.string())
    if len(critical) % 2:
        raise CertificateError("malformed certificate: bad critical options")
    reader.string()  # extensions: none is defined for host certificates, and unknown ones are ignored
    reader.string()  # reserved
    ca_key = _public_key(reader.string(), "CA key")
    signed = blob[: reader.offset]
    signature = reader.string()
    if not reader.done:
        raise CertificateError("malformed certificate: data after the signature")
    sig_reader = _Reader(signature)
    algorithm = sig_reader.string()
    sig_reader.string()
    if not sig_reader.done:
        raise CertificateError("malformed certificate: data after the signature")
    return HostCertificate(
        key_type=key_type,
        key=key,
        serial=serial,
        cert_type=cert_type,
        key_id=key_id,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=tuple(critical[::2]),
        ca_key=ca_key,
        signature_algorithm=algorithm,
        signed=signed,
        signature=signature,
    )


def _timestamp(seconds: int) -> str:
    if seconds >= FOREVER:
        return "forever"
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (seconds since 1970)"


def _listed(items: tuple[bytes, ...], limit: int = 5) -> str:
    shown = ", ".join(f"'{peer_text(item, 64)}'" for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_host_certificate(cert: HostCertificate, name: str, now: float, allow_sha1: bool = False) -> None:
    """
    Check C{cert} as OpenSSH's client checks a host certificate
    (C{sshkey_cert_check_host}): a host certificate, valid at C{now}
    (valid_after <= now < valid_before), naming C{name} among its principals
    (an empty list names every host, as in OpenSSH), with no critical option
    (none is defined for host certificates), signed with an algorithm we
    accept.  Whether its CA is trusted is checked by the caller.

    @param name: the proxy node's host as configured, lower-cased (OpenSSH
        checks the host name it was given, or the address; never the port).
    @param now: POSIX time.
    @raise CertificateError: with the reason.
    """
    if cert.cert_type != HOST_CERTIFICATE:
        kind = "a user certificate" if cert.cert_type == USER_CERTIFICATE else f"certificate type {cert.cert_type}"
        raise CertificateError(f"{kind}, not a host certificate")
    if now < cert.valid_after:
        raise CertificateError(f"not yet valid (valid from {_timestamp(cert.valid_after)})")
    if now >= cert.valid_before:
        raise CertificateError(f"expired (valid until {_timestamp(cert.valid_before)})")
    if cert.principals and name.encode("utf-8") not in cert.principals:
        raise CertificateError(f"wrong principal: {name} is not among {_listed(cert.principals)}")
    if cert.critical_options:
        raise CertificateError(f"unsupported critical option {_listed(cert.critical_options)}")
    if cert.signature_algorithm == _SHA1_SIGNATURE and not allow_sha1:
        raise CertificateError("signed by the CA with ssh-rsa (SHA-1): set allow_sha1_signatures = true to accept it")
