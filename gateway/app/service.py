"""
The gateway as a service tree.

L{GatewayService} is a plain C{MultiService}: a L{ClusterRegistry} holding
the cluster connections, then one L{ListenerService} per endpoint string
(SOCKS, HTTP, control).  Clusters can be added and removed while it runs.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IReactorCore, IReactorTime
from twisted.logger import Logger

from gateway.app.clusters import ClusterRegistry, IGatewayReactor
from gateway.app.listeners import ClusterListeners, ListenerChange
from gateway.app.pac import GatewayPac
from gateway.cluster.connection import ClusterConnection
from gateway.config import ClusterConfig, GatewayConfig
from gateway.control.loopback import is_local_address
from gateway.proxy.frontend import ClientLimit
from gateway.proxy.http.protocol import HttpProxyFactory
from gateway.proxy.opener import peer_origin
from gateway.proxy.socks.protocol import SocksFactory

log = Logger()


class ListenerService(StreamServerEndpointService):
    """
    A listener that stops start-up when it cannot listen.

    A gateway that silently runs without its SOCKS port is worse than one
    that refuses to start, so listening errors are raised, not just logged.
    With C{local_only} (a control API without a token), a listener whose
    bound address is reachable beyond this host stops start-up too: the bound
    address, not the endpoint string, says where it listens (C{localhost},
    C{systemd:}, ...).
    """

    _raiseSynchronously = True

    def __init__(
        self, reactor: IReactorCore, kind: str, description: str, factory: IProtocolFactory, local_only: bool = False
    ) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self.kind = kind
        self.description = description
        self.local_only = local_only
        self.port: IListeningPort | None = None
        #: True once the bound address refused this listener (see C{local_only}).
        self.refused = False

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:
            # OSError: adopting a descriptor handed over by socket activation that is no listening socket.
            error = e.socketError if isinstance(e, CannotListenError) else e
            why = (error.strerror if error else None) or str(e)
            log.critical(
                "cannot listen for {kind} on {description}: {why}",
                kind=self.kind,
                description=self.description,
                why=why,
            )
            raise SystemExit(1) from None
        assert self._waitingForPort is not None  # set by privilegedStartService
        self._waitingForPort.addCallback(self._listening)
        if self.refused:
            # Stream endpoints listen at once, so this is still start-up.
            raise SystemExit(1)

    def _listening(self, port: IListeningPort) -> IListeningPort | None:
        address = port.getHost()
        if self.local_only and not is_local_address(address):
            log.critical(
                "listen.{kind}: {description!r} listens on {address}, reachable beyond this host: "
                "set [gateway] control_token_file or GATEWAY_CONTROL_TOKEN (or listen on loopback or a unix socket)",
                kind=self.kind,
                description=self.description,
                address=peer_origin(address)[0],
            )
            # Never serve without a token beyond this host, even for a moment.
            self.refused = True
            port.stopListening()
            return None
        self.port = port
        log.info(
            "{kind} listener on {description}",
            kind=self.kind,
            description=self.description,
        )
        return port


class GatewayService(MultiService):
    """
    The gateway's service tree: a L{ClusterRegistry}, then one listener
    service per endpoint string (SOCKS, HTTP; C{makeService} adds the demo and
    the control listeners).  A plain C{MultiService}, which stops its
    children last-first: the listeners stop accepting, then the registry
    drains the streams in its own C{stopService}.
    """

    def __init__(self, config: GatewayConfig, reactor: IGatewayReactor) -> None:
        super().__init__()
        self._reactor = reactor
        #: For time-outs of the control plane's waits.
        self.clock: IReactorTime = reactor
        self.settings = config.settings
        self.registry = ClusterRegistry(config.settings, reactor)
        self.registry.setServiceParent(self)
        #: The routed connection of each cluster, by cluster name.
        self.clusters = self.registry.clusters
        self.gateway = self.registry.opener
        clients = ClientLimit(config.settings.max_clients)
        #: Each cluster's own listeners (C{socks}/C{http} in its table).
        self.listeners = ClusterListeners(reactor, self.gateway, clients)
        self.listeners.setServiceParent(self)
        self.registry.frontends.append(self.listeners)
        self.gateway.pac = GatewayPac(self)
        for cluster in config.clusters.values():
            self.add_cluster(cluster, config.source)
        factories = [
            SocksFactory(self.gateway, reactor, clients),
            HttpProxyFactory(self.gateway, reactor, clients),
        ]
        self.registry.frontends.extend(factories)
        for kind, descriptions, factory in zip(
            ("socks", "http"), (config.listen.socks, config.listen.http), factories, strict=True
        ):
            for description in descriptions:
                self.add_listener(kind, description, factory)

    def add_listener(self, kind: str, description: str, factory: IProtocolFactory, local_only: bool = False) -> None:
        """Listen on endpoint string C{description} with C{factory} (see L{ListenerService})."""
        ListenerService(self._reactor, kind, description, factory, local_only).setServiceParent(self)

    def listening_addresses(self, kind: str) -> list[IAddress]:
        """Where the shared listeners of C{kind} are bound, in the order configured."""
        return [
            child.port.getHost()
            for child in self
            if isinstance(child, ListenerService) and child.kind == kind and child.port is not None
        ]

    def listening_address(self, kind: str) -> str | None:
        """C{host:port} of the first TCP listener of C{kind}, for messages."""
        for address in self.listening_addresses(kind):
            if isinstance(address, (IPv4Address, IPv6Address)):
                return f"{address.host}:{address.port}"
        return None

    def add_cluster(
        self, config: ClusterConfig, source: str = "(api)", listeners: ListenerChange | None = None
    ) -> ClusterConnection:
        """
        See L{ClusterRegistry.add}; and open the cluster's own listeners:
        C{listeners} if the caller prepared them (the API, which must refuse
        a port in use before anything changes), else as
        L{ClusterListeners.want} does, failures naming C{source}.
        """
        connection = self.registry.add(config)
        self._listen_for(config, source, listeners)
        return connection

    def replace_cluster(
        self, config: ClusterConfig, source: str = "(api)", listeners: ListenerChange | None = None
    ) -> ClusterConnection:
        """See L{ClusterRegistry.replace} and L{add_cluster}."""
        connection = self.registry.replace(config)
        self._listen_for(config, source, listeners)
        return connection

    def _listen_for(self, config: ClusterConfig, source: str, listeners: ListenerChange | None) -> None:
        if listeners is None:
            self.listeners.want(config, source)
        else:
            listeners.commit()

    def remove_cluster(self, name: str) -> Deferred:
        """See L{ClusterRegistry.remove}; its listeners close too."""
        # consumeErrors: the caller gets a failure once, not also the garbage collector.
        return gatherResults([self.listeners.close(name), self.registry.remove(name)], consumeErrors=True)

    def open_streams(self) -> int:
        return self.registry.open_streams()

    def not_ready(self) -> list[str]:
        """
        Why a load balancer should not send clients here now (empty: ready):
        not running (starting, or stopping: the control listener closes
        first on a stop, so a health check then fails to connect), or a
        listener not bound.
        Clusters that are down do not count: every gateway of a fleet
        reaches the same proxy nodes, so taking one out of rotation for them
        would only move the same failures elsewhere (the counts are in the
        health answer for whoever decides otherwise).
        """
        if not self.running:
            return ["not running"]
        return [
            f"{child.kind} listener {child.description!r} is not listening"
            for child in self
            if isinstance(child, ListenerService) and child.port is None
        ]

    def startService(self) -> None:
        super().startService()
        log.info("gateway {gateway} started", gateway=self.settings.name)
