"""
The gateway as a service tree.

L{GatewayService} is a C{MultiService} whose children are one
L{ClusterConnection} per cluster and one listener service per endpoint string
(SOCKS and HTTP).  Clusters can be added and removed while it runs; the
router is rebuilt from the current set so routing always matches what is
connected.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gateway.cluster import ClusterConnection
from gateway.config import ClusterConfig, GatewayConfig
from gateway.http_protocol import HttpProxyFactory
from gateway.routing import Router
from gateway.socks_protocol import SocksFactory
from gateway.streams import Gateway

log = Logger()


class ListenerService(StreamServerEndpointService):
    """
    A listener that stops start-up when it cannot listen.

    A gateway that silently runs without its SOCKS port is worse than one
    that refuses to start, so listening errors are raised, not just logged.
    """

    _raiseSynchronously = True

    def __init__(
        self, reactor: IReactorCore, kind: str, description: str, factory: Factory
    ) -> None:
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
    """Listeners plus one connection per cluster."""

    def __init__(self, config: GatewayConfig, reactor) -> None:
        super().__init__()
        self._reactor = reactor
        self.clusters: dict[str, ClusterConnection] = {}
        self.gateway = Gateway(Router(()), self.clusters)
        for cluster in config.clusters.values():
            self.add_cluster(cluster)
        for kind, descriptions, factory in (
            ("socks", config.listen.socks, SocksFactory(self.gateway, reactor)),
            ("http", config.listen.http, HttpProxyFactory(self.gateway, reactor)),
        ):
            for description in descriptions:
                ListenerService(reactor, kind, description, factory).setServiceParent(self)

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

    def add_cluster(self, config: ClusterConfig) -> ClusterConnection:
        """Start keeping a connection to C{config}'s proxy node and route to it."""
        connection = ClusterConnection(config, self._reactor)
        connection.setServiceParent(self)
        self.clusters[config.name] = connection
        self._reroute()
        return connection

    def remove_cluster(self, name: str):
        """Stop routing to cluster C{name} and close its connection."""
        connection = self.clusters.pop(name)
        self._reroute()
        return connection.disownServiceParent()
