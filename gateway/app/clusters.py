"""
The cluster connections of a running gateway, as one service.

L{ClusterRegistry} owns every L{ClusterConnection}: the routed one of each
cluster, the hidden hop of each C{jump = "user@host:port"} cluster, and the
old connection of a replaced cluster while its streams finish.  It is their
service collection, but not a C{MultiService}: those key children by
C{Service.name}, and while a replaced cluster drains, two connections of the
same cluster are alive at once.  Routing goes through L{clusters}, rebuilt on
every change so the router always matches what is connected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Protocol

from twisted.application.service import IService, IServiceCollection, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IProtocol, IReactorCore
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gateway.cluster.connection import ClusterConnection
from gateway.cluster.connectors import Connector, IConnectingReactor, tcp_connector
from gateway.config import ClusterConfig, GatewaySettings, ProxyAddress
from gateway.errors import Reason, StreamError
from gateway.proxy.opener import StreamOpener
from gateway.routing import Router
from gateway.ssh.jump import ChannelEndpoint
from gateway.ssh.proxycommand import IProcessReactor, command_endpoint

log = Logger()


class Drainable(Protocol):
    """A front end that lets go of its idle clients when the gateway stops."""

    def drain(self) -> None: ...


class IGatewayReactor(IConnectingReactor, IProcessReactor, IReactorCore):
    """
    What the application needs of its reactor: to listen and to connect, to
    run proxy commands, and the clock.  Twisted's reactors provide each of
    these interfaces but declare no combination; this one is for the type
    checker only.
    """


@implementer(IServiceCollection)
class ClusterRegistry(Service):
    """Adds, replaces and removes clusters; drains their streams when stopped."""

    def __init__(self, settings: GatewaySettings, reactor: IGatewayReactor) -> None:
        self._reactor = reactor
        self.settings = settings
        #: The routed connection of each cluster, by cluster name.
        self.clusters: dict[str, ClusterConnection] = {}
        #: Hidden clusters for C{jump = "user@host:port"} hops, by cluster name.
        self._hops: dict[str, ClusterConnection] = {}
        #: Every live connection: routed, hops, and replaced ones still draining.
        self._connections: list[ClusterConnection] = []
        self.opener = StreamOpener(Router(()), self.clusters, settings)
        #: Front ends told to drain before the streams are waited for.
        self.frontends: list[Drainable] = []
        self._stop_waiters: list[Deferred[None]] = []
        self._stopping = False

    # -- IServiceCollection: how a connection retires itself -----------------

    def __iter__(self) -> Iterator[IService]:
        return iter(list(self._connections))

    def getServiceNamed(self, name: str) -> IService:
        """The routed connection of cluster C{name} (the only one by that name that routes)."""
        return self.clusters[name]

    def addService(self, service: IService) -> None:
        assert isinstance(service, ClusterConnection), "the registry holds cluster connections only"
        self._connections.append(service)
        if self.running:
            service.startService()

    def removeService(self, service: IService) -> Deferred[None] | None:
        assert isinstance(service, ClusterConnection), "the registry holds cluster connections only"
        self._connections.remove(service)
        return service.stopService() if self.running else None

    # -- clusters ---------------------------------------------------------------

    def add(self, config: ClusterConfig) -> ClusterConnection:
        """Start keeping connections to C{config}'s proxy nodes and route to it."""
        connection = ClusterConnection(config, self._reactor, self._connector(config))
        connection.setServiceParent(self)
        self.clusters[config.name] = connection
        self._reroute()
        return connection

    def replace(self, config: ClusterConfig) -> ClusterConnection:
        """
        Route cluster C{config.name} to new connections built from C{config};
        the old connection keeps its open streams until they end, then stops.
        """
        old = self.clusters.pop(config.name)
        old_hop = self._hops.pop(config.name, None)
        connection = self.add(config)
        retired = old.retire()
        if old_hop is not None:
            retired.addBoth(lambda _: old_hop.disownServiceParent())
        return connection

    def remove(self, name: str) -> Deferred:
        """Stop routing to cluster C{name} and close its connections."""
        connection = self.clusters.pop(name)
        self._reroute()
        stopping = [maybeDeferred(connection.disownServiceParent)]
        hop = self._hops.pop(name, None)
        if hop is not None:
            stopping.append(maybeDeferred(hop.disownServiceParent))
        return gatherResults(stopping, consumeErrors=True)

    def open_streams(self) -> int:
        return sum(c.open_streams for c in self.clusters.values())

    def _reroute(self) -> None:
        self.opener.router = Router((c.config for c in self.clusters.values()), self.settings.cluster_domain)

    def _connector(self, config: ClusterConfig) -> Connector:
        """How this cluster reaches its proxy node: TCP, a command, or another SSH connection."""
        if config.proxy_command:
            template = config.proxy_command
            return lambda proxy, factory: command_endpoint(self._reactor, template, proxy.host, proxy.port).connect(
                factory
            )
        jump_cluster = config.jump_cluster
        if jump_cluster:
            return self._channel_connector(lambda: self.clusters.get(jump_cluster), config)
        if config.jump_address:
            hop = replace(
                config,
                name=f"{config.name}~jump",
                aliases=(),
                proxies=(config.jump_address,),
                user=config.jump_user or config.user,
                jump=None,
                jump_address=None,
                jump_user=None,
                connections=1,
                token=None,
            )
            hop_connection = ClusterConnection(hop, self._reactor)
            hop_connection.setServiceParent(self)
            self._hops[config.name] = hop_connection
            return self._channel_connector(lambda: hop_connection, config)
        return tcp_connector(self._reactor, config.connect_timeout)

    def _channel_connector(self, carrier: Callable[[], ClusterConnection | None], config: ClusterConfig) -> Connector:
        def connect(proxy: ProxyAddress, factory: Factory) -> Deferred[IProtocol]:
            via = carrier()
            if via is None:
                return fail(StreamError(Reason.UNAVAILABLE, f"jump cluster {config.jump_cluster!r} is not configured"))
            return ChannelEndpoint(
                lambda host, port: via.open_stream(host, port, ("127.0.0.1", 0), carrier=True), proxy.host, proxy.port
            ).connect(factory)

        return connect

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for connection in list(self._connections):
            connection.startService()

    def stopService(self) -> Deferred[None]:
        """
        Let open streams finish for up to C{drain_timeout}, then close the SSH
        connections cleanly.  The listeners stop accepting on their own (they
        are this service's siblings, stopped first).
        """
        super().stopService()
        self._stopping = True
        for frontend in self.frontends:
            frontend.drain()
        stopped = self._drain()
        stopped.addCallback(
            lambda _: gatherResults([maybeDeferred(c.stopService) for c in reversed(self._connections)])
        )
        stopped.addCallback(lambda _: None)
        return stopped.addBoth(self._stopped)

    def when_stopped(self) -> Deferred[None]:
        """
        Fires once the current (or, while running, the next) stop has drained
        and closed every connection: what the demo's proxy node waits for, so demo streams
        drain like real ones.
        """
        if not (self.running or self._stopping):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        return waiter

    def _stopped(self, result: object) -> object:
        self._stopping = False
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return result

    def _drain(self) -> Deferred[None]:
        open_streams = self.open_streams()
        timeout = self.settings.drain_timeout
        if open_streams == 0 or timeout <= 0:
            return succeed(None)
        log.info("draining {streams} open streams for up to {timeout:g} s", streams=open_streams, timeout=timeout)
        deadline = self._reactor.seconds() + timeout
        drained: Deferred[None] = Deferred()

        def check() -> None:
            left = self.open_streams()
            if left == 0 or self._reactor.seconds() >= deadline:
                poll.stop()
                if left:
                    log.info("drain time-out: closing {streams} streams", streams=left)
                    for cluster in self.clusters.values():
                        cluster.cut_streams("cut at the drain time-out")
                drained.callback(None)

        poll = LoopingCall(check)
        poll.clock = self._reactor
        poll.start(0.1, now=False)
        return drained
