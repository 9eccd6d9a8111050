"""
Host-key verification for the proxy nodes.

Conch leaves verification to the application.  This module decides whether the
key a proxy node offers is the one we expect, from either an OpenSSH
C{known_hosts} file (hashed entries and C{[host]:port} for non-22 ports
included) or keys pinned in the configuration.  It also tells the transport
which host-key algorithms to prefer, so that a server with several host keys
shows us the one we actually hold (Conch would otherwise prefer ECDSA/RSA and
fail against a known_hosts file that only has the Ed25519 key).

Host certificates (L{gateway.ssh.certs}) are accepted when a trusted CA signed
them: the cluster's C{host_ca_keys} or a known_hosts C{@cert-authority} line
for the host.  A known_hosts C{@revoked} key is refused wherever it shows up:
as the host key, as a certificate's key or as its CA.
"""

from __future__ import annotations

import re
from binascii import Error as DecodeError
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from twisted.conch.client.knownhosts import HashedEntry, PlainEntry
from twisted.conch.error import InvalidEntry
from twisted.conch.ssh.keys import BadKeyError, FingerprintFormats, Key

from gateway.errors import peer_text
from gateway.ssh._conch import entry_host_patterns
from gateway.ssh.certs import (
    CertificateError,
    HostCertificate,
    check_host_certificate,
    is_certificate_algorithm,
    parse_certificate,
)

#: Host-key algorithm names per key type (others have one, their own);
#: RSA keys with SHA-2 first (C{ssh-rsa} is offered only on opt-in).
_ALGORITHMS_FOR_TYPE = {
    "RSA": (b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"),
}


#: A known_hosts line Conch can read.
KnownHostsEntry = HashedEntry | PlainEntry

_MARKERS = {None: "entries", b"@revoked": "revoked", b"@cert-authority": "authorities"}


@dataclass
class KnownHosts:
    """The lines of a known_hosts file, by marker."""

    #: Plain lines: host keys.
    entries: list[KnownHostsEntry] = field(default_factory=list)
    #: C{@revoked} lines: keys refused wherever they appear (host key,
    #: certified key or CA); Conch's parser skips marker lines, but a revoked
    #: key must refuse, not be ignored.
    revoked: list[KnownHostsEntry] = field(default_factory=list)
    #: C{@cert-authority} lines: CAs trusted to sign host certificates.
    authorities: list[KnownHostsEntry] = field(default_factory=list)


def read_known_hosts(path: str) -> KnownHosts:
    """The lines of an OpenSSH known_hosts file that Conch can parse (others are skipped, as OpenSSH does)."""
    known = KnownHosts()
    with open(path, "rb") as f:
        for line in f:
            marker = None
            if line.startswith(b"@"):
                marker, _, line = line.partition(b" ")
                line = line.lstrip()
            if marker not in _MARKERS:
                continue
            entry: KnownHostsEntry
            try:
                if line.startswith(HashedEntry.MAGIC):
                    entry = HashedEntry.fromString(line)
                else:
                    entry = PlainEntry.fromString(line)
            except (DecodeError, InvalidEntry, BadKeyError, ValueError):
                continue
            getattr(known, _MARKERS[marker]).append(entry)
    return known


def _pattern(text: str) -> re.Pattern[str]:
    """OpenSSH host patterns: only C{*} and C{?} are special (C{[} is literal)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text))


def host_matches(entry: KnownHostsEntry, name: str) -> bool:
    """
    Whether a known_hosts entry names C{name}, with OpenSSH's patterns for
    plain entries (C{*}, C{?}, and C{!} negation), which Conch lacks.
    """
    if isinstance(entry, HashedEntry):
        return entry.matchesHost(name.encode())
    name = name.lower()
    matched = False
    for pattern in entry_host_patterns(entry):
        text = pattern.decode("utf-8", "replace").lower()
        negated = text.startswith("!")
        if _pattern(text[1:] if negated else text).fullmatch(name):
            if negated:
                return False
            matched = True
    return matched


class HostKeyError(Exception):
    """The offered host key is unknown or differs from the expected one."""


def fingerprint(key: Key) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it (C{SHA256:...})."""
    return "SHA256:" + key.fingerprint(FingerprintFormats.SHA256_BASE64).rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH uses for C{host:port} in known_hosts."""
    if port == 22:
        return host
    return f"[{host}]:{port}"


def algorithms_for(key: Key) -> tuple[bytes, ...]:
    """The host-key algorithm names under which C{key} can be negotiated."""
    return _ALGORITHMS_FOR_TYPE.get(key.type(), (key.sshType(),))


def key_text(key: Key) -> str:
    """A key as log lines show it: its type and SHA256 fingerprint."""
    return f"{key.sshType().decode()} {fingerprint(key)}"


def _names(host: str, port: int) -> list[str]:
    """
    The known_hosts names C{@cert-authority} lines are looked up under, in
    order: C{[host]:port}, then the bare host (OpenSSH retries without the
    port when no line names C{[host]:port}).
    """
    name = known_hosts_name(host, port)
    return [name] if name == host else [name, host]


@dataclass(frozen=True)
class CertifiedHostKey:
    """An accepted host certificate: the key that signs the key exchange, and what to log."""

    #: The certified (plain) public key.
    key: Key
    #: The certificate's key id, escaped for a log line.
    key_id: str
    serial: int
    #: The CA's key type and fingerprint (C{ssh-ed25519 SHA256:...}).
    ca: str
    #: Set when the certificate itself was refused but its key is a known
    #: plain host key (OpenSSH falls back to the plain key the same way): the
    #: reason, for a warning.
    refused: str | None = None

    def __str__(self) -> str:
        return f"key id '{self.key_id}', serial {self.serial}, CA {self.ca}"


class HostKeyPolicy:
    """
    What host keys a cluster accepts.

    Exactly one of C{known_hosts} (a path, re-read at every connection so an
    operator's edits apply without a restart) and C{pinned} is used, unless
    C{accept_any} is set, which is the explicit, logged opt-out.  Host
    certificates are accepted when signed by one of C{ca_keys} (the
    cluster's C{host_ca_keys}) or by a C{@cert-authority} of known_hosts;
    C{allow_sha1_signatures} lets an RSA CA sign them with SHA-1.
    """

    def __init__(
        self,
        known_hosts: str | None = None,
        pinned: Sequence[Key] = (),
        accept_any: bool = False,
        ca_keys: Sequence[Key] = (),
        allow_sha1_signatures: bool = False,
    ) -> None:
        self._known_hosts = known_hosts
        self._pinned = tuple(pinned)
        self.accept_any = accept_any
        self._ca_keys = tuple(ca_keys)
        self._allow_sha1 = allow_sha1_signatures

    def _read(self) -> KnownHosts:
        """The known_hosts lines (none without a file); OSError if it cannot be read."""
        if self._known_hosts is None:
            return KnownHosts()
        return read_known_hosts(self._known_hosts)

    def _read_or_refuse(self) -> KnownHosts:
        try:
            return self._read()
        except OSError as e:
            raise HostKeyError(f"cannot read {self._known_hosts}: {e.strerror}") from None

    def _expected_keys(self, host: str, port: int, known: KnownHosts) -> list[Key]:
        if self._known_hosts is None:
            return list(self._pinned)
        name = known_hosts_name(host, port)
        return [entry.publicKey for entry in known.entries if host_matches(entry, name)]

    def _authorities(self, host: str, port: int, known: KnownHosts) -> list[Key]:
        """The CAs trusted to sign host certificates of C{host:port}: C{host_ca_keys}, and known_hosts' for it."""
        for name in _names(host, port):
            listed = [entry.publicKey for entry in known.authorities if host_matches(entry, name)]
            if listed:
                return [*self._ca_keys, *listed]
        return list(self._ca_keys)

    def preferred_algorithms(self, host: str, port: int, supported: Iterable[bytes]) -> list[bytes]:
        """
        Reorder C{supported} so the algorithms of keys we hold come first.

        The server picks the first algorithm of our list that it supports; if
        that is a key type we have no record of, verification fails even
        though we know another of its keys.  Where a CA is trusted for the
        host, the certificate algorithms of C{supported} lead, so that a node
        with a certificate presents it (as OpenSSH orders them); elsewhere
        they keep their place, which should be after the plain ones.
        """
        supported = list(supported)
        try:
            known = self._read()
        except OSError:
            return supported
        first: list[bytes] = []
        if self._authorities(host, port, known):
            first = [a for a in supported if is_certificate_algorithm(a)]
        for key in self._expected_keys(host, port, known):
            for algorithm in algorithms_for(key):
                if algorithm in supported and algorithm not in first:
                    first.append(algorithm)
        return first + [a for a in supported if a not in first]

    def verify(self, host: str, port: int, offered: Key) -> None:
        """
        Return if C{offered} is acceptable for C{host:port}, else raise
        L{HostKeyError} with a message that shows the offered fingerprint.
        """
        if self.accept_any:
            return
        name = known_hosts_name(host, port)
        shown = key_text(offered)
        if self._known_hosts is not None:
            known = self._read_or_refuse()
            if any(entry.matchesKey(offered) and host_matches(entry, name) for entry in known.revoked):
                raise HostKeyError(f"host key of {name} is marked @revoked in {self._known_hosts}: {shown}")
            listed = [entry for entry in known.entries if host_matches(entry, name)]
            if any(entry.matchesKey(offered) for entry in listed):
                return
            if any(entry.keyType == offered.sshType() for entry in listed):
                raise HostKeyError(f"host key for {name} does not match {self._known_hosts}: offered {shown}")
            raise HostKeyError(f"no host key for {name} in {self._known_hosts}: offered {shown}")
        if any(offered == pinned for pinned in self._pinned):
            return
        if self._ca_keys and not self._pinned:
            raise HostKeyError(
                f"{name} offered a plain host key, but only certificates by host_ca_keys are trusted: {shown}"
            )
        raise HostKeyError(f"host key for {name} is not one of the pinned host_keys: offered {shown}")

    def verify_certificate(self, host: str, port: int, algorithm: bytes, blob: bytes, now: float) -> CertifiedHostKey:
        """
        Check the host certificate C{blob} that C{host:port} presented under
        the agreed host-key algorithm C{algorithm}, at POSIX time C{now}, as
        OpenSSH's client does: a good CA signature (even with C{accept_any}),
        a trusted CA, neither the CA nor the certified key C{@revoked}, then
        L{check_host_certificate} (type, validity, principals, critical
        options, SHA-1).  A certificate refused for any reason but a bad
        signature or a revoked key falls back, as in OpenSSH, to its key as a
        plain host key (L{verify}); the result says so in C{refused}.

        @raise HostKeyError: naming the certificate's key id and CA
            fingerprint and the reason.
        """
        name = known_hosts_name(host, port)
        try:
            cert = parse_certificate(blob, algorithm)
        except CertificateError as e:
            raise HostKeyError(f"unusable host certificate from {name}: {e}") from None
        accepted = CertifiedHostKey(cert.key, peer_text(cert.key_id), cert.serial, key_text(cert.ca_key))
        refused = f"host certificate of {name} ({accepted}) refused"
        try:
            cert.verify_signature()
        except CertificateError as e:
            raise HostKeyError(f"{refused}: {e}") from None
        if self.accept_any:
            return accepted
        known = self._read_or_refuse()
        revoked = self._revoked(cert, host, port, known)
        if revoked is not None:
            raise HostKeyError(f"{refused}: {revoked}")
        try:
            if cert.ca_key not in self._authorities(host, port, known):
                raise CertificateError(self._unknown_ca(name))
            check_host_certificate(cert, host.lower(), now, self._allow_sha1)
        except CertificateError as e:
            reason = f"{refused}: {e}"
            if self._known_hosts is None and not self._pinned:
                raise HostKeyError(reason) from None
            try:
                self.verify(host, port, cert.key)
            except HostKeyError as plain:
                raise HostKeyError(f"{reason}; nor is its key a known plain host key ({plain})") from None
            return replace(accepted, refused=reason)
        return accepted

    def _revoked(self, cert: HostCertificate, host: str, port: int, known: KnownHosts) -> str | None:
        """Why C{cert} is refused as C{@revoked} (its CA or its key), or None."""
        names = _names(host, port)
        for entry in known.revoked:
            if not any(host_matches(entry, name) for name in names):
                continue
            if entry.matchesKey(cert.ca_key):
                return f"its CA key is marked @revoked in {self._known_hosts}"
            if entry.matchesKey(cert.key):
                return f"its key ({key_text(cert.key)}) is marked @revoked in {self._known_hosts}"
        return None

    def _unknown_ca(self, name: str) -> str:
        trusted = ["host_ca_keys"] if self._ca_keys else []
        if self._known_hosts is not None:
            trusted.append(f"the @cert-authority lines for {name} in {self._known_hosts}")
        if not trusted:
            return "unknown CA: no CA is trusted (set host_ca_keys or add @cert-authority lines to known_hosts)"
        return "unknown CA: not in " + " or ".join(trusted)
