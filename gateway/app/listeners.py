"""
Per-cluster listeners: a cluster's own SOCKS and HTTP proxy ports
(C{socks}/C{http} in its table), which serve it alone and ask no
credentials.

They are what browsers and every other client without proxy credentials
need when tenant networks overlap.  A listener that asks no credentials is a
trust decision, so one whose bound address is reachable beyond this host
(not loopback, not a unix socket with a path) is refused unless the cluster
sets C{remote_listeners = true}: the bound address decides, as for the
control API, not the endpoint string.

They come and go with their cluster.  A change is prepared before it is
applied (L{ClusterListeners.prepare}): the new ports are bound first, so a
port already in use refuses the API request (400 naming the key) with
nothing changed, and a listener whose endpoint string stays the same keeps
its port and its clients across a replacement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.app.clusters import IGatewayReactor
from gateway.config import ClusterConfig
from gateway.control.loopback import is_local_address
from gateway.proxy.frontend import ClientLimit, FrontendFactory
from gateway.proxy.http.protocol import HttpProxyFactory
from gateway.proxy.opener import StreamOpener, peer_origin
from gateway.proxy.socks.protocol import SocksFactory

log = Logger()

KINDS = ("socks", "http")
_FACTORIES = {"socks": SocksFactory, "http": HttpProxyFactory}

#: One listener: its kind ("socks", "http") and endpoint string.
ListenerKey = tuple[str, str]


class ListenError(Exception):
    """
    A per-cluster listener could not be opened: C{key} is the cluster key
    (C{socks}, or C{http[1]} for the second of several), C{reason} says why.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason


@dataclass
class _Listener:
    port: IListeningPort
    factory: FrontendFactory


@dataclass
class ListenerChange:
    """
    A cluster's listeners as its new configuration wants them: the new ports
    are bound already; L{commit} closes those no longer wanted, L{rollback}
    the new ones instead.
    """

    owner: ClusterListeners
    name: str
    kept: dict[ListenerKey, _Listener]
    opened: dict[ListenerKey, _Listener]
    closing: dict[ListenerKey, _Listener] = field(default_factory=dict)

    def commit(self) -> Deferred[None]:
        self.owner._listeners[self.name] = {**self.kept, **self.opened}
        self.owner.version += 1
        for key in self.opened:
            self.owner._log_listening(self.name, key, self.opened[key].port)
        return _stop(self.closing.values())

    def rollback(self) -> Deferred[None]:
        return _stop(self.opened.values())


def _stop(listeners: Iterable[_Listener]) -> Deferred[None]:
    """
    Close C{listeners}, and drain their connections: a port that closes
    keeps the connections it accepted, and an idle kept-alive one would go
    on using a listener that is gone (and that asks no credentials).

    Never fails: a port that will not close can only be reported, so it is
    logged here, once, and none of the callers (a commit, a rollback, a
    removal, start-up) has an error to lose or to report again.
    """
    stopping = []
    for listener in listeners:
        listener.factory.drain()
        stopping.append(maybeDeferred(listener.port.stopListening).addErrback(_not_closed, listener))
    return gatherResults(stopping).addCallback(lambda _: None)


def _not_closed(failure: Failure, listener: _Listener) -> None:
    log.failure(
        "listener of cluster {cluster} on {address} did not close",
        failure,
        cluster=listener.factory.cluster,
        address=peer_origin(listener.port.getHost())[0],
        outcome="close-failed",
    )


def _listener_keys(config: ClusterConfig) -> dict[ListenerKey, str]:
    """Each listener the cluster wants, with its key as errors name it."""
    keys: dict[ListenerKey, str] = {}
    for kind in KINDS:
        descriptions: tuple[str, ...] = getattr(config, kind)
        for i, description in enumerate(descriptions):
            keys[(kind, description)] = kind if len(descriptions) == 1 else f"{kind}[{i}]"
    return keys


class ClusterListeners(Service):
    """Every cluster's own listeners; a child of the gateway's service tree."""

    def __init__(self, reactor: IGatewayReactor, opener: StreamOpener, clients: ClientLimit) -> None:
        self._reactor = reactor
        self._opener = opener
        self._clients = clients
        #: The open listeners of each cluster.
        self._listeners: dict[str, dict[ListenerKey, _Listener]] = {}
        #: Clusters whose listeners open at start-up, with where they were configured.
        self._pending: dict[str, tuple[ClusterConfig, str]] = {}
        #: Counts the changes of the open listeners (what the PAC file caches by).
        self.version = 0

    # -- what the gateway asks -------------------------------------------------

    def want(self, config: ClusterConfig, source: str) -> None:
        """
        Give cluster C{config.name} the listeners C{config} names: at
        start-up if not running yet (a failure stops start-up), else now (a
        failure is logged: the API prepares its changes instead, see
        L{prepare}).
        """
        if not self.running:
            self._pending[config.name] = (config, source)
            return
        # Not addCallbacks: an error in commit itself must reach the log too.
        self.prepare(config).addCallback(lambda change: change.commit()).addErrback(
            lambda failure: self._log_refused(config.name, source, failure)
        )

    def prepare(self, config: ClusterConfig) -> Deferred[ListenerChange]:
        """
        Bind the listeners C{config} adds; fails with L{ListenError} once
        the ports it opened have closed again, leaving everything as it was.
        """
        opened: dict[ListenerKey, _Listener] = {}
        try:
            return succeed(self._bind(config, opened))
        except ListenError as e:
            error = e
        refused: Deferred[ListenerChange] = Deferred()
        _stop(opened.values()).addBoth(lambda _: refused.errback(error))
        return refused

    def close(self, name: str) -> Deferred[None]:
        """Close cluster C{name}'s listeners (it was removed)."""
        self._pending.pop(name, None)
        self.version += 1
        return _stop(self._listeners.pop(name, {}).values())

    def addresses(self, name: str, kind: str) -> list[IAddress]:
        """Where cluster C{name}'s listeners of C{kind} are bound, in the order configured."""
        return [listener.port.getHost() for (k, _), listener in self._listeners.get(name, {}).items() if k == kind]

    def bound(self, name: str) -> dict[str, list[str]]:
        """C{{"socks": ["127.0.0.1:10801"], "http": [...]}}: for the status output."""
        return {kind: [peer_origin(a)[0] for a in self.addresses(name, kind)] for kind in KINDS}

    def drain(self) -> None:
        """The gateway stops: tell the listeners' connections (see L{FrontendFactory.drain})."""
        for listeners in self._listeners.values():
            for listener in listeners.values():
                listener.factory.drain()

    # -- lifecycle -----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Open the configured clusters' listeners: one that cannot listen stops start-up."""
        super().privilegedStartService()
        pending, self._pending = self._pending, {}
        for config, source in pending.values():
            # Not through prepare: its refusal waits for ports to close, a
            # reactor turn that start-up does not have.
            opened: dict[ListenerKey, _Listener] = {}
            try:
                self._bind(config, opened).commit()
            except ListenError as e:
                _stop(opened.values())
                self._log_refused(config.name, source, Failure(e))
                raise SystemExit(1) from None

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listeners = [listener for cluster in self._listeners.values() for listener in cluster.values()]
        self._listeners = {}
        return _stop(listeners)

    # -- helpers ------------------------------------------------------------------

    def _bind(self, config: ClusterConfig, opened: dict[ListenerKey, _Listener]) -> ListenerChange:
        """
        The change to C{config}'s listeners, the new ones bound (and put in
        C{opened} as they are, for the caller to close on L{ListenError}).
        A listener kept across a replacement is checked against the new
        configuration too: turning C{remote_listeners} off must close a
        listener reachable beyond this host, not keep it.
        """
        current = self._listeners.get(config.name, {})
        wanted = _listener_keys(config)
        for listener_key, key in wanted.items():
            listener = current.get(listener_key)
            if listener is None:
                listener = opened[listener_key] = self._listen(config, listener_key, key)
            address = listener.port.getHost()
            if not config.remote_listeners and not is_local_address(address):
                raise ListenError(
                    key,
                    f"{listener_key[1]!r} listens on {peer_origin(address)[0]}, reachable beyond this host, and asks "
                    "no credentials: listen on loopback or a unix socket, or set remote_listeners = true",
                )
        kept = {k: v for k, v in current.items() if k in wanted}
        closing = {k: v for k, v in current.items() if k not in wanted}
        return ListenerChange(self, config.name, kept, opened, closing)

    def _listen(self, config: ClusterConfig, listener_key: ListenerKey, key: str) -> _Listener:
        kind, description = listener_key
        factory = _FACTORIES[kind](self._opener, self._reactor, self._clients, config.name)
        listening: list[IListeningPort | Failure] = []
        try:
            serverFromString(self._reactor, description).listen(factory).addBoth(listening.append)
        except Exception as e:  # noqa: BLE001 - endpoint parsers raise anything
            raise ListenError(key, f"bad endpoint {description!r}: {e}") from None
        if not listening:
            # Every stream endpoint Twisted has listens at once; one that does not cannot be checked in time.
            raise ListenError(key, f"{description!r} did not listen at once")
        result = listening[0]
        if isinstance(result, Failure):
            error = result.value
            why = error.socketError.strerror if isinstance(error, CannotListenError) and error.socketError else error
            raise ListenError(key, f"cannot listen on {description!r}: {why}")
        return _Listener(result, factory)

    def _log_listening(self, name: str, listener_key: ListenerKey, port: IListeningPort) -> None:
        kind, description = listener_key
        log.info(
            "{kind} listener of cluster {cluster} on {address}",
            kind=kind,
            cluster=name,
            description=description,
            address=peer_origin(port.getHost())[0],
            outcome="listening",
        )

    def _log_refused(self, name: str, source: str, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, ListenError):
            log.failure("listeners of cluster {cluster}", failure, cluster=name)
            return
        log.critical(
            "{source}: clusters.{cluster}.{key}: {reason}",
            source=source,
            cluster=name,
            key=error.key,
            reason=error.reason,
            outcome="listen-refused",
        )
