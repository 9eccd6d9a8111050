"""
From a parsed proxy request to an open tunnel: routing, the cluster's
connection, and one log event per stream.

Both front ends (SOCKS and HTTP) hand a L{StreamRequest} to
L{StreamOpener.open_stream} and get back an open L{TunnelChannel} or a
L{StreamError}; neither knows about clusters or SSH.  Every stream ends in
exactly one structured log event -- C{refused} with the reason, or C{closed}
with bytes each way and the duration -- so an operator can follow any
client's traffic by cluster and destination.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.addresses import host_port
from gateway.cluster.connection import ClusterConnection
from gateway.config import GatewaySettings
from gateway.destinations import IPAddress
from gateway.errors import Reason, StreamError
from gateway.proxy.pac import PacSource
from gateway.routing import Route, Router
from gateway.ssh.channel import TunnelChannel

log = Logger()

#: The format of the per-stream event: its text is rendered once, with an
#: f-string, into the C{summary} field.  Rendering a format over the fields
#: in the log observer (C{string.Formatter}, in Python) cost ~50 us a stream,
#: a tenth of the gateway's CPU per short connection.  The fields stay in
#: the event for structured observers (JSON, filters).
STREAM_EVENT = "{summary}"


@dataclass(frozen=True, slots=True)  # slots: every open stream keeps its request (for its log event)
class StreamRequest:
    """A client's request for a tunnel, as the front end parsed it."""

    host: str
    port: int
    frontend: str  # "socks5", "socks4", "http-connect", "http"
    client: str  # the client's address, for logs
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    origin: tuple[str, int] = ("127.0.0.1", 0)
    #: The cluster of the per-cluster listener the request came in on, if any.
    cluster: str | None = None


def peer_origin(address: IAddress) -> tuple[str, tuple[str, int]]:
    """A client address as log text and as the direct-tcpip originator."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"{host}:{port}", (host, port)
    name = getattr(address, "name", None)
    text = f"unix:{name.decode() if isinstance(name, bytes) else name or '?'}"
    return text, ("127.0.0.1", 0)


class StreamOpener:
    """Routes stream requests to cluster connections."""

    def __init__(
        self,
        router: Router,
        clusters: Mapping[str, ClusterConnection],
        settings: GatewaySettings | None = None,
    ) -> None:
        self.router = router
        self.clusters = clusters
        #: The client-side deadlines (handshake, body, response, keep-alive).
        self.settings = settings or GatewaySettings()
        #: Refusals before any cluster was chosen (no route, auth, ...), by reason.
        self.unrouted_failures: Counter[str] = Counter()
        #: Malformed or timed-out client handshakes, by front end.
        self.handshake_errors: Counter[str] = Counter()
        #: What serves the PAC file (C{GET /proxy.pac} on the HTTP listener,
        #: C{/v1/proxy.pac} on the control API); None: 404 there.
        self.pac: PacSource | None = None

    def authenticate(self, username: str, password: str, cluster: str | None = None) -> bool:
        """Check SOCKS5 username/password: a cluster name and its token (see L{Router.authenticate})."""
        return self.router.authenticate(username, password, cluster)

    def is_cluster(self, name: str) -> bool:
        """Whether C{name} is a cluster's name or alias (a SOCKS4 user id may be neither)."""
        return self.router.lookup(name) is not None

    def destination_host(self, host: str) -> str:
        """The host an origin must see for C{host} (see L{Router.destination_host})."""
        return self.router.destination_host(host)

    def route(self, request: StreamRequest) -> tuple[Route, ClusterConnection]:
        """The route and running cluster for C{request}; L{StreamError} if none."""
        route = self.router.route(request.host, request.port, request.username, request.password, request.cluster)
        cluster = self.clusters.get(route.cluster.name)
        if cluster is None:
            raise StreamError(Reason.UNAVAILABLE, f"cluster {route.cluster.name!r} is not running")
        return route, cluster

    def open_stream(self, request: StreamRequest) -> Deferred[TunnelChannel]:
        """Open a tunnel for C{request}, or fail with L{StreamError}."""
        destination = host_port(request.host, request.port)
        try:
            route, cluster = self.route(request)
        except StreamError as e:
            self._refused(request, None, destination, e)
            return fail(e)

        destination = host_port(route.host, route.port)  # the real one, of a qualified name too

        def opened(channel: TunnelChannel) -> TunnelChannel:
            cluster.stats.streams_opened += 1
            channel.cluster = cluster
            shown = destination if channel.host == route.host else f"{destination} ({channel.host})"
            channel.closed_hooks.append(_StreamEnd(self, request, cluster.name, shown, channel))
            return channel

        def failed(failure: Failure) -> Failure:
            error = failure.value
            if not isinstance(error, StreamError):
                log.failure(
                    "unexpected error opening {destination}",
                    failure,
                    destination=destination,
                )
                error = StreamError(Reason.GENERAL, "internal error")
                failure = Failure(error)
            self._refused(request, cluster.name, destination, error)
            return failure

        if route.resolve:
            opening = self._resolve(route, cluster).addCallback(
                lambda address: cluster.open_stream(str(address), route.port, request.origin)
            )
        else:
            opening = cluster.open_stream(route.host, route.port, request.origin)
        return opening.addCallback(opened).addErrback(failed)

    def _resolve(self, route: Route, cluster: ClusterConnection) -> Deferred[IPAddress]:
        """The checked address of a route to a name that its proxy node must resolve."""

        def unresolved(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, StreamError) and error.reason is Reason.PROHIBITED:
                # The proxy node will not run the resolver: the name stays
                # what it is without it, outside the cluster's hostnames.
                raise StreamError(
                    Reason.NOT_ALLOWED,
                    f"{route.host} matches no hostnames pattern of cluster {route.cluster.name!r}, and the proxy "
                    "node does not resolve names for the gateway",
                    log_detail=error.log_detail,
                )
            return failure

        resolving = cluster.resolve(route.host).addErrback(unresolved)
        return resolving.addCallback(lambda addresses: self.router.check_resolved(route, addresses))

    def _refused(
        self,
        request: StreamRequest,
        cluster: str | None,
        destination: str,
        error: StreamError,
    ) -> None:
        running = self.clusters.get(cluster) if cluster else None
        failures = running.stats.streams_failed if running is not None else self.unrouted_failures
        failures[error.reason.value] += 1
        log.info(
            STREAM_EVENT,
            summary=f"stream to {destination}{f' via {cluster}' if cluster else ''} refused: {error.reason.value}",
            cluster=cluster,
            destination=destination,
            client=request.client,
            frontend=request.frontend,
            outcome="refused",
            reason=error.reason.value,
            detail=error.log_detail,
        )

    def _closed(
        self,
        request: StreamRequest,
        cluster: str,
        destination: str,
        channel: TunnelChannel,
    ) -> None:
        running = self.clusters.get(cluster)
        if running is not None:
            running.stats.bytes_up += channel.bytes_up
            running.stats.bytes_down += channel.bytes_down
        outcome = "closed" if channel.close_reason is None else "failed"
        duration = time.monotonic() - channel.started
        log.info(
            STREAM_EVENT,
            summary=(
                f"stream to {destination} via {cluster} {outcome}: {channel.bytes_up} bytes up, "
                f"{channel.bytes_down} down, {duration:.3f} s"
                + (f" ({channel.close_reason})" if channel.close_reason else "")
            ),
            cluster=cluster,
            destination=destination,
            client=request.client,
            frontend=request.frontend,
            outcome=outcome,
            reason=channel.close_reason,
            bytes_up=channel.bytes_up,
            bytes_down=channel.bytes_down,
            duration=duration,
        )


class _StreamEnd:
    """
    What an open stream's end must do: count its bytes and log its event
    (L{StreamOpener._closed}).  A slotted object rather than a closure: every
    open stream keeps one, and a closure with its five cells costs about
    three times the memory.
    """

    __slots__ = ("_opener", "_request", "_cluster", "_destination", "_channel")

    def __init__(
        self, opener: StreamOpener, request: StreamRequest, cluster: str, destination: str, channel: TunnelChannel
    ) -> None:
        self._opener = opener
        self._request = request
        self._cluster = cluster
        self._destination = destination
        self._channel = channel

    def __call__(self) -> None:
        self._opener._closed(self._request, self._cluster, self._destination, self._channel)
