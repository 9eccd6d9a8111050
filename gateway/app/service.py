"""
The gateway as a service tree.

L{GatewayService} is a C{MultiService} whose children are one
L{ClusterConnection} per cluster and one listener service per endpoint string
(SOCKS and HTTP).  Clusters can be added and removed while it runs; the
router is rebuilt from the current set so routing always matches what is
connected.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.cluster.connection import ClusterConnection
from gateway.cluster.connectors import Connector, tcp_connector
from gateway.config import ClusterConfig, GatewayConfig
from gateway.errors import Reason, StreamError
from gateway.proxy.frontend import ClientLimit
from gateway.proxy.http.protocol import HttpProxyFactory
from gateway.proxy.opener import StreamOpener
from gateway.proxy.socks.protocol import SocksFactory
from gateway.routing import Router
from gateway.ssh.jump import ChannelEndpoint
from gateway.ssh.proxycommand import command_endpoint

log = Logger()


class ListenerService(StreamServerEndpointService):
    """
    A listener that stops start-up when it cannot listen.

    A gateway that silently runs without its SOCKS port is worse than one
    that refuses to start, so listening errors are raised, not just logged.
    """

    _raiseSynchronously = True

    def __init__(self, reactor: IReactorCore, kind: str, description: str, factory: Factory) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self.kind = kind
        self.description = description
        self.port = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            why = e.socketError.strerror if e.socketError else str(e)
            log.critical(
                "cannot listen for {kind} on {description}: {why}",
                kind=self.kind,
                description=self.description,
                why=why,
            )
            raise SystemExit(1) from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        log.info(
            "{kind} listener on {description}",
            kind=self.kind,
            description=self.description,
        )
        return port


class GatewayService(MultiService):
    """Listeners plus the connections of every cluster."""

    def __init__(self, config: GatewayConfig, reactor) -> None:
        super().__init__()
        self._reactor = reactor
        self.settings = config.settings
        self.clusters: dict[str, ClusterConnection] = {}
        #: Hidden clusters for C{jump = "user@host:port"} hops, by cluster name.
        self._hops: dict[str, ClusterConnection] = {}
        self.gateway = StreamOpener(Router(()), self.clusters, config.settings)
        for cluster in config.clusters.values():
            self.add_cluster(cluster)
        clients = ClientLimit(config.settings.max_clients)
        self._factories = [
            SocksFactory(self.gateway, reactor, clients),
            HttpProxyFactory(self.gateway, reactor, clients),
        ]
        for kind, descriptions, factory in zip(
            ("socks", "http"), (config.listen.socks, config.listen.http), self._factories, strict=True
        ):
            for description in descriptions:
                self.add_listener(kind, description, factory)

    def add_listener(self, kind: str, description: str, factory: Factory) -> None:
        """Listen on endpoint string C{description} with C{factory}."""
        ListenerService(self._reactor, kind, description, factory).setServiceParent(self)

    def addService(self, service) -> None:
        # Cluster connections are found through self.clusters, not by service
        # name: while a replaced cluster's old connection drains, two
        # connections of the same cluster are children at once.
        if isinstance(service, ClusterConnection):
            self.services.append(service)
            if self.running:
                service.privilegedStartService()
                service.startService()
            return
        super().addService(service)

    def removeService(self, service):
        if isinstance(service, ClusterConnection):
            self.services.remove(service)
            return service.stopService() if self.running else None
        return super().removeService(service)

    def listening_address(self, kind: str) -> str | None:
        """C{host:port} of the first TCP listener of C{kind}, for messages."""
        for child in self:
            if isinstance(child, ListenerService) and child.kind == kind:
                address = child.port.getHost() if child.port is not None else None
                if hasattr(address, "port"):
                    return f"{address.host}:{address.port}"
        return None

    def _reroute(self) -> None:
        self.gateway.router = Router(c.config for c in self.clusters.values())

    def _connector(self, config: ClusterConfig) -> Connector:
        """How this cluster reaches its proxy node: TCP, a command, or another SSH connection."""
        if config.proxy_command:
            template = config.proxy_command
            return lambda proxy, factory: command_endpoint(self._reactor, template, proxy.host, proxy.port).connect(
                factory
            )
        if config.jump_cluster:
            return self._channel_connector(lambda: self.clusters.get(config.jump_cluster), config)
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

    def _channel_connector(self, carrier, config: ClusterConfig) -> Connector:
        def connect(proxy, factory):
            via = carrier()
            if via is None:
                return fail(StreamError(Reason.UNAVAILABLE, f"jump cluster {config.jump_cluster!r} is not configured"))
            return ChannelEndpoint(
                lambda host, port: via.open_stream(host, port, ("127.0.0.1", 0), carrier=True), proxy.host, proxy.port
            ).connect(factory)

        return connect

    def add_cluster(self, config: ClusterConfig) -> ClusterConnection:
        """Start keeping connections to C{config}'s proxy nodes and route to it."""
        connection = ClusterConnection(config, self._reactor, self._connector(config))
        connection.setServiceParent(self)
        self.clusters[config.name] = connection
        self._reroute()
        return connection

    def replace_cluster(self, config: ClusterConfig) -> ClusterConnection:
        """
        Route cluster C{config.name} to new connections built from C{config};
        the old connection keeps its open streams until they end, then stops.
        """
        old = self.clusters.pop(config.name)
        old_hop = self._hops.pop(config.name, None)
        connection = self.add_cluster(config)
        retired = old.retire()
        if old_hop is not None:
            retired.addBoth(lambda _: old_hop.disownServiceParent())
        return connection

    def remove_cluster(self, name: str) -> Deferred:
        """Stop routing to cluster C{name} and close its connections."""
        connection = self.clusters.pop(name)
        self._reroute()
        stopping = [maybeDeferred(connection.disownServiceParent)]
        hop = self._hops.pop(name, None)
        if hop is not None:
            stopping.append(maybeDeferred(hop.disownServiceParent))
        return gatherResults(stopping)

    def open_streams(self) -> int:
        return sum(c.open_streams for c in self.clusters.values())

    def stopService(self) -> Deferred:
        """
        Stop accepting, let open streams finish for up to C{drain_timeout},
        then close the SSH connections cleanly.
        """
        Service.stopService(self)
        listeners = [child for child in self if isinstance(child, ListenerService)]
        others = [child for child in reversed(list(self)) if not isinstance(child, ListenerService)]
        stopped = gatherResults([maybeDeferred(listener.stopService) for listener in listeners])
        stopped.addCallback(lambda _: [factory.drain() for factory in self._factories])
        stopped.addCallback(lambda _: self._drain())
        stopped.addCallback(lambda _: gatherResults([maybeDeferred(child.stopService) for child in others]))
        return stopped.addCallback(lambda _: None)

    def _drain(self) -> Deferred:
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
