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

from collections.abc import Iterable, Sequence

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.error import HostKeyChanged
from twisted.conch.ssh.keys import FingerprintFormats, Key
from twisted.python.filepath import FilePath

#: Host-key algorithm names per key type; RSA keys are used with SHA-2 first.
_ALGORITHMS_FOR_TYPE = {
    "RSA": (b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"),
    "DSA": (b"ssh-dss",),
}


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
        name = known_hosts_name(host, port).encode("utf-8")
        known = KnownHostsFile.fromPath(FilePath(self._known_hosts))
        return [
            entry.publicKey
            for entry in known.iterentries()
            if getattr(entry, "publicKey", None) is not None
            and entry.matchesHost(name)
        ]

    def preferred_algorithms(
        self, host: str, port: int, supported: Iterable[bytes]
    ) -> list[bytes]:
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
        if self._known_hosts is not None:
            known = KnownHostsFile.fromPath(FilePath(self._known_hosts))
            try:
                if known.hasHostKey(name.encode("utf-8"), offered):
                    return
            except HostKeyChanged:
                raise HostKeyError(
                    f"host key for {name} does not match {self._known_hosts}: "
                    f"offered {offered.sshType().decode()} {fingerprint(offered)}"
                )
            raise HostKeyError(
                f"no host key for {name} in {self._known_hosts}: "
                f"offered {offered.sshType().decode()} {fingerprint(offered)}"
            )
        if any(offered == pinned for pinned in self._pinned):
            return
        raise HostKeyError(
            f"host key for {name} is not one of the pinned host_keys: "
            f"offered {offered.sshType().decode()} {fingerprint(offered)}"
        )
