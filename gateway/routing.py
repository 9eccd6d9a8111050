"""
Which cluster carries a stream, and whether it may.

Pure logic (no Twisted, no I/O): the SOCKS and HTTP front ends call
L{Router.route} with the destination and the proxy credentials they got, and
either receive a L{Route} or a L{StreamError} whose reason they translate.

The rules, in order:

  0. A port outside 1..65535 or a malformed host is C{BAD_REQUEST}.
  1. A cluster-qualified name C{HOST.CLUSTER.<domain>}
     (L{gateway.destinations.split_qualified}) names its cluster (name or
     alias, in any case) and its real destination C{HOST}: none is
     C{NO_ROUTE}.  The cluster still needs consent as in 2 or 3: the
     listener's (it must be the listener's cluster), the credentials' (they
     must name it), or no token (else C{AUTH_REQUIRED}).
  2. A per-cluster listener (C{socks}/C{http} in a cluster table) serves
     its cluster only and asks no credentials; a username sent there must
     name that cluster (C{AUTH_FAILED}), and its password is not checked.
  3. A username names the cluster (by name or alias).  Unknown name:
     C{AUTH_FAILED}.  (Empty credentials never get here: the front ends
     report them as none; a SOCKS4 user id that names no cluster and carries
     no token is none too, see L{gateway.proxy.socks.machine}.)  If the
     cluster has a token, the password must equal it (C{AUTH_REQUIRED} when
     missing, C{AUTH_FAILED} when wrong; compared in constant time).  A
     cluster without a token ignores the password.
  4. Otherwise an IP destination picks the one cluster whose networks
     contain it, a host name the one cluster whose C{hostnames} patterns
     match it: several is C{AMBIGUOUS}, none is C{NO_ROUTE}, and a cluster
     with a token is C{AUTH_REQUIRED}.
  5. The destination must lie inside the chosen cluster's networks (IP) or
     match its hostnames patterns (name), else C{NOT_ALLOWED}.

Overlapping networks between clusters are normal: they only make rule 4
ambiguous, which qualified names, per-cluster listeners and credentials
resolve.

A client that has not proved a token learns nothing about a cluster's
policy from an error's C{detail}: not its networks, not its patterns, not
which clusters a destination matches, and a wrong token reads like an
unknown name.  Cluster names themselves are not secret (they are in
qualified names, PAC files and browser histories): a qualified name that
names no cluster says so.  The log gets the full story in C{log_detail},
with usernames shown by L{show_username} only.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from gateway.config import is_valid_name
from gateway.destinations import DEFAULT_CLUSTER_DOMAIN, IPAddress, QualifiedName, normalise_host, split_qualified
from gateway.errors import Reason, StreamError

if TYPE_CHECKING:
    from gateway.config import ClusterConfig

__all__ = ["Route", "Router", "show_username"]

#: How many networks / patterns a NOT_ALLOWED detail lists before "...".
_LIST_LIMIT = 8
#: What a client that has not proved a token hears when credentials fail.
_CREDENTIALS_REFUSED = "proxy credentials not accepted"
#: Routes a router remembers (see L{Router.route}); all are forgotten when it is full.
_ROUTE_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Route:
    """
    Open the stream to C{host}:C{port} through C{cluster}'s proxy node.

    C{host} is L{gateway.destinations.canonical_host}'s text: what the proxy node is asked to
    connect to, so it can resolve C{API.Example.} as C{api.example}.
    """

    cluster: ClusterConfig
    host: str
    port: int
    #: C{host} is a name that matches none of the cluster's C{hostnames}:
    #: it must be resolved on the proxy node, and every address checked
    #: (L{Router.check_resolved}) before the channel opens to one of them.
    resolve: bool = False


def show_username(username: str, is_cluster: Callable[[str], bool] | None = None) -> str:
    """
    A proxy username as logs may show it: only its cluster part (before the
    first ":", where clients that mean SOCKS4's C{cluster:token} put a
    token), and only if that has the shape of a cluster name and (given
    C{is_cluster}) names one; otherwise just its size, since it may be a
    token typed into the wrong field -- and random tokens have that shape.
    """
    cluster, colon, _ = username.partition(":")
    if is_valid_name(cluster) and (is_cluster is None or is_cluster(cluster)):
        return f"username {repr(cluster + ':...' if colon else cluster)}"
    return f"a username of {len(username.encode('utf-8', 'surrogatepass'))} bytes"


def _listing(items: Iterable[object]) -> str:
    texts = [str(i) for i in items]
    if not texts:
        return "none"
    if len(texts) > _LIST_LIMIT:
        return ", ".join(texts[:_LIST_LIMIT]) + f", ... ({len(texts) - _LIST_LIMIT} more)"
    return ", ".join(texts)


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

    def __init__(self, clusters: Iterable[ClusterConfig], domain: str = DEFAULT_CLUSTER_DOMAIN) -> None:
        self._clusters: tuple[ClusterConfig, ...] = tuple(clusters)
        #: The suffix of cluster-qualified names (C{[gateway] cluster_domain}).
        self.domain = domain
        self._by_name: dict[str, ClusterConfig] = {}
        #: Names and aliases in lower case, as host names arrive; None where
        #: two clusters' names differ only in case (no qualified name reaches them).
        self._by_label: dict[str, ClusterConfig | None] = {}
        for cluster in self._clusters:
            for name in cluster.names():
                other = self._by_name.get(name)
                if other is not None:
                    raise ValueError(f"name {name!r} is used by clusters {other.name!r} and {cluster.name!r}")
                self._by_name[name] = cluster
                label = name.lower()
                known = self._by_label.get(label, cluster)
                self._by_label[label] = cluster if known is cluster else None
        #: Routes already chosen, by the whole request: a router is rebuilt
        #: whenever the clusters change, and a route depends on nothing else,
        #: so a client asking again (every short stream) skips the rules.
        #: Refusals raise and are not kept, so no wrong password is.
        self._routes: dict[tuple[str, int, str | None, str | None, str | None], Route] = {}

    @property
    def clusters(self) -> tuple[ClusterConfig, ...]:
        """The clusters, in the order given."""
        return self._clusters

    def lookup(self, name: str) -> ClusterConfig | None:
        """The cluster called C{name} (its name or an alias), if any."""
        return self._by_name.get(name)

    def authenticate(self, username: str, password: str | None, cluster: str | None = None) -> bool:
        """
        Check SOCKS5 / HTTP proxy credentials: C{username} names a cluster,
        and the password equals that cluster's token if it has one.  On the
        listener of C{cluster} (which asks no credentials), a username must
        name that cluster, and the password is not checked.
        """
        named = self.lookup(username)
        if named is None:
            return False
        if cluster is not None:
            return named is self.lookup(cluster)
        if named.token is None:
            return True
        if password is None:
            return False
        return _tokens_equal(password, named.token)

    def route(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        cluster: str | None = None,
    ) -> Route:
        """
        Choose the cluster for a stream to C{host}:C{port}; C{cluster} is the
        cluster of the listener the request came in on, if it serves one.

        @raise StreamError: with C{BAD_REQUEST}, C{AUTH_REQUIRED},
            C{AUTH_FAILED}, C{NO_ROUTE}, C{AMBIGUOUS}, C{NOT_ALLOWED} or
            C{UNAVAILABLE} (the listener's cluster is gone).
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise StreamError(Reason.BAD_REQUEST, f"port {port!r} is not between 1 and 65535")
        key = (host, port, username, password, cluster)
        route = self._routes.get(key)
        if route is None:
            route = self._route(host, port, username, password, cluster)
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _route(self, host: str, port: int, username: str | None, password: str | None, cluster: str | None) -> Route:
        """L{route} without its cache."""
        dest = normalise_host(host)
        readings = split_qualified(dest, self.domain) if isinstance(dest, str) else []
        listener = self._listener_cluster(cluster, username) if cluster is not None else None
        if readings:
            chosen, dest = self._by_qualified_name(readings, str(dest))
            self._check_qualified(chosen, listener, username, password)
        elif listener is not None:
            chosen = listener
        elif username is not None:
            chosen = self._by_credentials(username, password)
        else:
            chosen = self._by_destination(dest, str(dest))
        canonical = str(dest)  # the route's host and the errors' (canonical_host)
        named = bool(readings) or listener is not None or username is not None
        if named and isinstance(dest, str) and chosen.resolver_command and not _matches_hostnames(dest, chosen):
            # The client named the cluster, so the name is its proxy node's to
            # resolve: the addresses decide (the opener asks, then check_resolved).
            return Route(cluster=chosen, host=canonical, port=port, resolve=True)
        self._check_allowed(chosen, dest, canonical)
        return Route(cluster=chosen, host=canonical, port=port)

    @staticmethod
    def check_resolved(route: Route, addresses: Sequence[IPAddress]) -> IPAddress:
        """
        The address to open a resolved route's channel to: the first, once
        every address lies inside the cluster's networks -- a name with one
        address outside them is refused whole, so no answer order or second
        lookup (DNS rebinding) can lead the stream out.

        @raise StreamError: C{NOT_ALLOWED}.
        """
        cluster = route.cluster
        outside = [a for a in addresses if not _in_networks(a, cluster)]
        if not addresses or outside:
            where = f"cluster {cluster.name!r}"
            detail = (
                f"{route.host} resolves to {_listing(outside or ['nothing'])}, outside {where} networks "
                f"({_listing(cluster.networks)})"
            )
            public = detail if cluster.token is not None else f"{route.host} is not allowed through {where}"
            raise StreamError(Reason.NOT_ALLOWED, public, log_detail=detail)
        return addresses[0]

    def destination_host(self, host: str) -> str:
        """
        The real destination of C{host} (canonical): C{HOST}'s for a
        cluster-qualified name, else C{host} itself -- what the origin must
        see in C{Host}.  A name that routes nowhere is returned as it is (its
        route fails anyway).
        """
        try:
            dest = normalise_host(host)
            readings = split_qualified(dest, self.domain) if isinstance(dest, str) else []
            if not readings:
                return str(dest)
            return str(self._by_qualified_name(readings, str(dest))[1])
        except StreamError:
            return host

    def _show_username(self, username: str) -> str:
        return show_username(username, lambda name: self.lookup(name) is not None)

    def _listener_cluster(self, name: str, username: str | None) -> ClusterConfig:
        """The cluster of a per-cluster listener; credentials, if sent, must name it."""
        cluster = self._by_name.get(name)
        if cluster is None or cluster.name != name:  # not an alias taken since the cluster went
            raise StreamError(Reason.UNAVAILABLE, f"cluster {name!r} of this listener is not configured")
        if username is not None and self.lookup(username) is not cluster:
            raise StreamError(
                Reason.AUTH_FAILED,
                f"this listener serves cluster {name!r} only",
                log_detail=f"{self._show_username(username)} does not name cluster {name!r}, the listener's",
            )
        return cluster

    def _by_qualified_name(self, readings: Sequence[QualifiedName], name: str) -> tuple[ClusterConfig, IPAddress | str]:
        """The cluster and destination of C{HOST.CLUSTER.<domain>}."""
        matches = [(self._by_label.get(r.cluster), r) for r in readings if r.cluster in self._by_label]
        if not matches:
            raise StreamError(Reason.NO_ROUTE, f"{name} names no cluster")
        if len(matches) > 1 or matches[0][0] is None:
            raise StreamError(
                Reason.AMBIGUOUS,
                f"{name} may name several clusters",
                log_detail=f"{name} reads as clusters {', '.join(repr(r.cluster) for _, r in matches)} "
                "(names that differ only in case or dots): use another alias",
            )
        cluster, reading = matches[0]
        assert cluster is not None
        return cluster, reading.destination()

    def _check_qualified(
        self, chosen: ClusterConfig, listener: ClusterConfig | None, username: str | None, password: str | None
    ) -> None:
        """A qualified name's cluster still needs the listener's or the credentials' consent, or no token."""
        if listener is not None:
            if chosen is not listener:
                raise StreamError(Reason.NOT_ALLOWED, f"this listener serves cluster {listener.name!r} only")
        elif username is not None:
            if self._by_credentials(username, password) is not chosen:
                raise StreamError(
                    Reason.AUTH_FAILED,
                    _CREDENTIALS_REFUSED,
                    log_detail=f"{self._show_username(username)} does not name cluster {chosen.name!r}, "
                    "which the destination names",
                )
        elif chosen.token is not None:
            raise StreamError(
                Reason.AUTH_REQUIRED,
                "proxy credentials required: the cluster name and its token",
                log_detail=f"cluster {chosen.name!r} needs credentials",
            )

    def _by_credentials(self, username: str, password: str | None) -> ClusterConfig:
        """The cluster the credentials name, its token checked."""
        cluster = self.lookup(username)
        if cluster is None:
            raise StreamError(
                Reason.AUTH_FAILED,
                _CREDENTIALS_REFUSED,
                log_detail=f"{self._show_username(username)} names no cluster",
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
