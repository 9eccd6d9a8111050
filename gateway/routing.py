"""
Which cluster carries a stream, and whether it may.

Pure logic (no Twisted, no I/O): the SOCKS and HTTP front ends call
L{Router.route} with the destination and the proxy credentials they got, and
either receive a L{Route} or a L{StreamError} whose reason they translate.

The rules, in order:

  0. A port outside 1..65535 or a malformed host is C{BAD_REQUEST}.
  1. A username names the cluster (by name or alias).  Unknown name:
     C{AUTH_FAILED}.  (Empty credentials never get here: the front ends
     report them as none; a SOCKS4 user id that names no cluster and carries
     no token is none too, see L{gateway.proxy.socks.machine}.)  If the cluster has a token, the password must equal it
     (C{AUTH_REQUIRED} when missing, C{AUTH_FAILED} when wrong; compared in
     constant time).  A cluster without a token ignores the password.
  2. Without a username, an IP destination picks the one cluster whose
     networks contain it, a host name the one cluster whose C{hostnames}
     patterns match it: several is C{AMBIGUOUS}, none is C{NO_ROUTE}, and a
     cluster with a token is C{AUTH_REQUIRED}.
  3. The destination must lie inside the chosen cluster's networks (IP) or
     match its hostnames patterns (name), else C{NOT_ALLOWED}.

Overlapping networks between clusters are normal: they only make rule 2
ambiguous, which credentials resolve.

A client that has not proved a token learns nothing about clusters from an
error's C{detail}: not which exist (an unknown name and a wrong token read
the same), not which of them match, not their networks.  The log gets the
full story in C{log_detail}, with usernames shown by L{show_username} only.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from gateway.config import is_valid_name
from gateway.errors import Reason, StreamError, shown

if TYPE_CHECKING:
    from gateway.config import ClusterConfig

__all__ = ["Route", "Router", "canonical_host", "normalise_host", "show_username"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
#: How many networks / patterns a NOT_ALLOWED detail lists before "...".
_LIST_LIMIT = 8
#: What a client that has not proved a token hears when credentials fail.
_CREDENTIALS_REFUSED = "proxy credentials not accepted"


@dataclass(frozen=True)
class Route:
    """
    Open the stream to C{host}:C{port} through C{cluster}'s proxy node.

    C{host} is L{canonical_host}'s text: what the proxy node is asked to
    connect to, so it can resolve C{API.Example.} as C{api.example}.
    """

    cluster: ClusterConfig
    host: str
    port: int


def show_username(username: str) -> str:
    """
    A proxy username as logs may show it: only its cluster part (before the
    first ":", where clients that mean SOCKS4's C{cluster:token} put a
    token), and only if that has the shape of a cluster name; otherwise just
    its size, since it may be a token typed into the wrong field.
    """
    cluster, colon, _ = username.partition(":")
    if is_valid_name(cluster):
        return f"username {repr(cluster + ':...' if colon else cluster)}"
    return f"a username of {len(username.encode('utf-8', 'surrogatepass'))} bytes"


def _listing(items: Iterable[object]) -> str:
    texts = [str(i) for i in items]
    if not texts:
        return "none"
    if len(texts) > _LIST_LIMIT:
        return ", ".join(texts[:_LIST_LIMIT]) + f", ... ({len(texts) - _LIST_LIMIT} more)"
    return ", ".join(texts)


@functools.lru_cache(maxsize=4096)
def normalise_host(host: str) -> IPAddress | str:
    """
    Parse a destination host.

    Cached: clients ask for the same few destinations again and again, and
    parsing an address with C{ipaddress} is a noticeable part of a short
    stream's CPU.  Refusals raise, and are not cached.

    @return: an IP address (IPv4-mapped IPv6 addresses as IPv4, C{[v6]}
        brackets accepted) or the lower-cased host name without trailing dot,
        for matching.
    @raise StreamError: C{BAD_REQUEST} if C{host} is neither, or an IPv6
        address with a zone id (C{fe80::1%eth0}): a zone names an interface
        of whoever reads it, and must not reach the proxy node.
    """
    if not isinstance(host, str) or not host:
        raise StreamError(Reason.BAD_REQUEST, "empty destination host")
    text = host
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if bracketed or ":" in text:
            raise StreamError(
                Reason.BAD_REQUEST,
                f"{shown(host)} is not a valid IPv6 address or host name",
            ) from None
    else:
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id is not None:
                raise StreamError(Reason.BAD_REQUEST, f"{shown(host)}: IPv6 zone ids are not accepted")
            if address.ipv4_mapped:
                return address.ipv4_mapped
        elif bracketed:
            raise StreamError(Reason.BAD_REQUEST, f"{shown(host)}: only IPv6 addresses go in brackets")
        return address
    name = text.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise StreamError(Reason.BAD_REQUEST, f"{shown(host)} is not a valid host name")
    # Resolvers read "10.1", "0x0a000001" or "167772161" as IPv4 addresses;
    # such a "name" must not slip past the networks check.
    if name.rsplit(".", 1)[-1].isdigit() or _inet_aton_accepts(name):
        raise StreamError(
            Reason.BAD_REQUEST,
            f"{shown(host)} looks like a numeric address: write IPv4 addresses as a.b.c.d",
        )
    return name.lower()


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """
    The one text of a destination host that is matched, logged and sent to
    the proxy node: an IP address's canonical form, or the host name in lower
    case without its trailing dot.  Both front ends call it while parsing
    (cached like L{normalise_host}: it is on every request's path).

    @raise StreamError: C{BAD_REQUEST}, as L{normalise_host}.
    """
    return str(normalise_host(host))


def _inet_aton_accepts(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


def _tokens_equal(password: str, token: str) -> bool:
    # Constant time; surrogatepass so that no str can make encoding fail.
    return hmac.compare_digest(password.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


def _in_networks(address: IPAddress, cluster: ClusterConfig) -> bool:
    return any(net.version == address.version and address in net for net in cluster.networks)


def _matches_hostnames(name: str, cluster: ClusterConfig) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in cluster.hostnames)


def _allowed(dest: IPAddress | str, cluster: ClusterConfig) -> bool:
    if isinstance(dest, str):
        return _matches_hostnames(dest, cluster)
    return _in_networks(dest, cluster)


class Router:
    """Chooses the cluster for a stream and checks that it may carry it."""

    def __init__(self, clusters: Iterable[ClusterConfig]) -> None:
        self._clusters: tuple[ClusterConfig, ...] = tuple(clusters)
        self._by_name: dict[str, ClusterConfig] = {}
        for cluster in self._clusters:
            for name in cluster.names():
                other = self._by_name.get(name)
                if other is not None:
                    raise ValueError(f"name {name!r} is used by clusters {other.name!r} and {cluster.name!r}")
                self._by_name[name] = cluster

    @property
    def clusters(self) -> tuple[ClusterConfig, ...]:
        """The clusters, in the order given."""
        return self._clusters

    def lookup(self, name: str) -> ClusterConfig | None:
        """The cluster called C{name} (its name or an alias), if any."""
        return self._by_name.get(name)

    def authenticate(self, username: str, password: str | None) -> bool:
        """
        Check SOCKS5 / HTTP proxy credentials: C{username} names a cluster,
        and the password equals that cluster's token if it has one.
        """
        cluster = self.lookup(username)
        if cluster is None:
            return False
        if cluster.token is None:
            return True
        if password is None:
            return False
        return _tokens_equal(password, cluster.token)

    def route(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
    ) -> Route:
        """
        Choose the cluster for a stream to C{host}:C{port}.

        @raise StreamError: with C{BAD_REQUEST}, C{AUTH_REQUIRED},
            C{AUTH_FAILED}, C{NO_ROUTE}, C{AMBIGUOUS} or C{NOT_ALLOWED}.
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise StreamError(Reason.BAD_REQUEST, f"port {port!r} is not between 1 and 65535")
        dest = normalise_host(host)
        canonical = str(dest)  # the route's host and the errors' (canonical_host)

        if username is not None:
            cluster = self._by_credentials(username, password)
        else:
            cluster = self._by_destination(dest, canonical)
        self._check_allowed(cluster, dest, canonical)
        return Route(cluster=cluster, host=canonical, port=port)

    def _by_credentials(self, username: str, password: str | None) -> ClusterConfig:
        """The cluster the credentials name, its token checked."""
        cluster = self.lookup(username)
        if cluster is None:
            raise StreamError(
                Reason.AUTH_FAILED,
                _CREDENTIALS_REFUSED,
                log_detail=f"{show_username(username)} names no cluster",
            )
        if cluster.token is not None:
            if password is None:
                raise StreamError(
                    Reason.AUTH_REQUIRED,
                    "proxy credentials required: the cluster name and its token",
                    log_detail=f"cluster {cluster.name!r} needs its token as the proxy password",
                )
            if not _tokens_equal(password, cluster.token):
                raise StreamError(
                    Reason.AUTH_FAILED,
                    _CREDENTIALS_REFUSED,
                    log_detail=f"wrong password for cluster {cluster.name!r}",
                )
        return cluster

    def _by_destination(self, dest: IPAddress | str, canonical: str) -> ClusterConfig:
        """Without credentials: the one cluster whose networks (or hostnames) hold C{dest}, if it has no token."""
        if isinstance(dest, str):
            matches = [c for c in self._clusters if _matches_hostnames(dest, c)]
            where = "hostnames"
        else:
            matches = [c for c in self._clusters if _in_networks(dest, c)]
            where = "networks"
        if not matches:
            raise StreamError(Reason.NO_ROUTE, f"{canonical} is in no cluster's {where}")
        if len(matches) > 1:
            names = ", ".join(sorted(c.name for c in matches))
            verb = "is in the networks of" if where == "networks" else "matches the hostnames of"
            raise StreamError(
                Reason.AMBIGUOUS,
                f"{canonical} is in several clusters' {where}: name one with proxy credentials",
                log_detail=f"{canonical} {verb} clusters {names}: name one with proxy credentials",
            )
        cluster = matches[0]
        if cluster.token is not None:
            raise StreamError(
                Reason.AUTH_REQUIRED,
                f"{canonical} needs proxy credentials: the cluster name and its token",
                log_detail=f"cluster {cluster.name!r} needs credentials",
            )
        return cluster

    @staticmethod
    def _check_allowed(cluster: ClusterConfig, dest: IPAddress | str, canonical: str) -> None:
        """The destination must lie inside the chosen cluster's networks or hostnames: no open relay."""
        if _allowed(dest, cluster):
            return
        where = f"cluster {cluster.name!r}"
        if isinstance(dest, str):
            detail = f"{canonical} does not match {where} hostnames ({_listing(cluster.hostnames)})"
        else:
            detail = f"{canonical} is outside {where} networks ({_listing(cluster.networks)})"
        # Only a client that proved the token may read the cluster's policy.
        public = detail if cluster.token is not None else f"{canonical} is not allowed through {where}"
        raise StreamError(Reason.NOT_ALLOWED, public, log_detail=detail)
