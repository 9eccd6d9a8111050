"""
Host-key verification for the proxy nodes.

Conch leaves verification to the application.  This module decides whether the
key a proxy node offers is the one we expect, from either an OpenSSH
C{known_hosts} file (hashed entries and C{[host]:port} for non-22 ports
included) or keys pinned in the configuration.  It also tells the transport
which host-key algorithms to prefer, so that a server with several host keys
shows us the one we actually hold (Conch would otherwise prefer ECDSA/RSA and
fail against a known_hosts file that only has the Ed25519 key).
"""

from __future__ import annotations

import re
from binascii import Error as DecodeError
from collections.abc import Iterable, Sequence

from twisted.conch.client.knownhosts import HashedEntry, PlainEntry
from twisted.conch.error import InvalidEntry
from twisted.conch.ssh.keys import BadKeyError, FingerprintFormats, Key

from gateway.ssh._conch import entry_host_patterns

#: Host-key algorithm names per key type (others have one, their own);
#: RSA keys with SHA-2 first (C{ssh-rsa} is offered only on opt-in).
_ALGORITHMS_FOR_TYPE = {
    "RSA": (b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"),
}


#: A known_hosts line Conch can read (C{@cert-authority} lines are skipped).
KnownHostsEntry = HashedEntry | PlainEntry


def read_known_hosts(path: str) -> tuple[list[KnownHostsEntry], list[KnownHostsEntry]]:
    """
    The entries of an OpenSSH known_hosts file, and its C{@revoked} entries.

    Conch's parser skips marker lines; a revoked key must refuse, not be
    ignored.  C{@cert-authority} lines are not supported (skipped).
    """
    entries: list[KnownHostsEntry] = []
    revoked: list[KnownHostsEntry] = []
    with open(path, "rb") as f:
        for line in f:
            marker = None
            if line.startswith(b"@"):
                marker, _, line = line.partition(b" ")
            if marker not in (None, b"@revoked"):
                continue
            entry: KnownHostsEntry
            try:
                if line.startswith(HashedEntry.MAGIC):
                    entry = HashedEntry.fromString(line)
                else:
                    entry = PlainEntry.fromString(line)
            except (DecodeError, InvalidEntry, BadKeyError, ValueError):
                continue
            (revoked if marker else entries).append(entry)
    return entries, revoked


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


class HostKeyPolicy:
    """
    What host keys a cluster accepts.

    Exactly one of C{known_hosts} (a path, re-read at every connection so an
    operator's edits apply without a restart) and C{pinned} is used, unless
    C{accept_any} is set, which is the explicit, logged opt-out.
    """

    def __init__(
        self,
        known_hosts: str | None = None,
        pinned: Sequence[Key] = (),
        accept_any: bool = False,
    ) -> None:
        self._known_hosts = known_hosts
        self._pinned = tuple(pinned)
        self.accept_any = accept_any

    def _expected_keys(self, host: str, port: int) -> list[Key]:
        if self._known_hosts is None:
            return list(self._pinned)
        entries, _ = read_known_hosts(self._known_hosts)
        name = known_hosts_name(host, port)
        return [entry.publicKey for entry in entries if host_matches(entry, name)]

    def preferred_algorithms(self, host: str, port: int, supported: Iterable[bytes]) -> list[bytes]:
        """
        Reorder C{supported} so the algorithms of keys we hold come first.

        The server picks the first algorithm of our list that it supports; if
        that is a key type we have no record of, verification fails even
        though we know another of its keys.
        """
        supported = list(supported)
        try:
            expected = self._expected_keys(host, port)
        except OSError:
            return supported
        first: list[bytes] = []
        for key in expected:
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
        shown = f"{offered.sshType().decode()} {fingerprint(offered)}"
        if self._known_hosts is not None:
            try:
                entries, revoked = read_known_hosts(self._known_hosts)
            except OSError as e:
                raise HostKeyError(f"cannot read {self._known_hosts}: {e.strerror}") from None
            if any(entry.matchesKey(offered) and host_matches(entry, name) for entry in revoked):
                raise HostKeyError(f"host key of {name} is marked @revoked in {self._known_hosts}: {shown}")
            listed = [entry for entry in entries if host_matches(entry, name)]
            if any(entry.matchesKey(offered) for entry in listed):
                return
            if any(entry.keyType == offered.sshType() for entry in listed):
                raise HostKeyError(f"host key for {name} does not match {self._known_hosts}: offered {shown}")
            raise HostKeyError(f"no host key for {name} in {self._known_hosts}: offered {shown}")
        if any(offered == pinned for pinned in self._pinned):
            return
        raise HostKeyError(
            f"host key for {name} is not one of the pinned host_keys: "
            f"offered {offered.sshType().decode()} {fingerprint(offered)}"
        )
