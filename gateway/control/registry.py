"""
The gateway's side of the control API: L{GatewayControl} implements
L{gateway.control.contract.ClusterControl} on a running L{GatewayService}.

Two sources of clusters live side by side: the TOML file (read-only here: the
API answers 409 for them, so the two never fight) and the API, whose request
bodies are kept in a store (L{gateway.store}: the state file, or etcd shared
with other gateways) and loaded again at start-up.  Every change is validated
with the same code as the TOML loader before anything is touched, then kept,
then applied -- one after another under the store's lock, so the registry and
the store never disagree.  With etcd, the changes other gateways make arrive
through the same lock and the same checks (L{GatewayControl._apply_remote}).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.error import TimeoutError
from twisted.logger import Logger

from gateway.app.listeners import ListenerChange, ListenError
from gateway.app.service import GatewayService
from gateway.cluster.connection import ClusterConnection
from gateway.config import ClusterConfig, ConfigError, jump_cycle
from gateway.config.schema import safe_settings
from gateway.control.bodies import validate_body
from gateway.control.contract import ClusterView, ControlError
from gateway.control.metrics import metrics_text
from gateway.proxy.opener import peer_origin
from gateway.store.base import Store, StoreConflict, StoreUnavailable

log = Logger()

#: How often a change is tried again after another gateway changed the registry meanwhile.
CONFLICT_ATTEMPTS = 8
#: Seconds a change waits for the other gateway's change to reach this one.
CATCH_UP_TIMEOUT = 5.0


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def proxies_status(cluster: ClusterConnection) -> list[dict[str, Any]]:
    """Each proxy candidate's last failure since it last let the gateway in, and when it is tried next."""
    due = cluster.pacer.next_attempts()
    rows: list[dict[str, Any]] = []
    for proxy, gate in cluster.pacer.gates.items():
        failure = gate.last_failure
        rows.append(
            {
                "proxy": str(proxy),
                "last_failure": None
                if failure is None
                else {
                    "kind": failure.kind.value,
                    "error": failure.error,
                    "at": _iso(failure.at),
                    "next_attempt_in": round(due[proxy], 1) if proxy in due else None,
                },
            }
        )
    return rows


def cluster_status(cluster: ClusterConnection) -> dict[str, Any]:
    stats = cluster.stats
    up = cluster.state == "up"
    return {
        "state": cluster.state,
        "proxy": str(cluster.proxy) if cluster.proxy else None,
        "connected_since": _iso(stats.connected_since) if up else None,
        "links_up": sum(1 for link in cluster.links if link.connection is not None),
        "open_streams": cluster.open_streams,
        "streams_opened": stats.streams_opened,
        "streams_failed": dict(stats.streams_failed),
        "bytes_up": stats.bytes_up,
        "bytes_down": stats.bytes_down,
        "reconnects": stats.reconnects,
        "mode": "exec" if cluster.exec_mode else "direct-tcpip",
        "last_error": cluster.last_error,
        "proxies": proxies_status(cluster),
    }


class GatewayControl:
    """
    L{ClusterControl} on a running gateway, keeping API clusters in C{store}
    (None: in memory only), and applying to the gateway the changes other
    gateways make to a shared store.
    """

    def __init__(self, service: GatewayService, store: Store | None, config_names: set[str]) -> None:
        self._service = service
        self._store = store
        self._lock = store.lock if store is not None else DeferredLock()
        self._config_names = set(config_names)
        if store is not None:
            store.attach(self._apply_remote)

    def _view(self, cluster: ClusterConnection) -> ClusterView:
        source = "config" if cluster.name in self._config_names else "api"
        status = {**cluster_status(cluster), "listeners": self._service.listeners.bound(cluster.name)}
        return ClusterView(cluster.name, source, safe_settings(cluster.config), status)

    def list_clusters(self) -> list[ClusterView]:
        return [self._view(self._service.clusters[name]) for name in sorted(self._service.clusters)]

    def get_cluster(self, name: str) -> ClusterView:
        cluster = self._service.clusters.get(name)
        if cluster is None:
            raise ControlError(404, f"no cluster named {name!r}")
        return self._view(cluster)

    def _known_names(self, excluding: str) -> dict[str, str]:
        known: dict[str, str] = {}
        for cluster in self._service.clusters.values():
            if cluster.name != excluding:
                for alias in cluster.config.names():
                    known[alias] = cluster.name
        return known

    def _check(self, name: str, body: Mapping[str, Any]) -> ClusterConfig:
        """C{body} as cluster C{name}'s configuration, checked against the registry as it is; or ControlError."""
        known = self._known_names(excluding=name)
        try:
            # [gateway] says what API bodies may do beyond inline keys.
            config = validate_body(name, body, known_clusters=known, settings=self._service.settings)
        except ConfigError as e:
            raise ControlError(400, e.reason, e.key or None) from None
        configs = {cluster.name: cluster.config for cluster in self._service.clusters.values()}
        configs[name] = config
        cycle = jump_cycle(configs, name)
        if cycle is not None:
            raise ControlError(400, f"jump cycle {cycle}", "jump")
        for alias in config.aliases:
            if alias in known:
                raise ControlError(409, f"alias {alias!r} is already used by cluster {known[alias]!r}", "aliases")
        if name in known:
            raise ControlError(409, f"{name!r} is already an alias of cluster {known[name]!r}")
        return config

    async def _prepare(self, config: ClusterConfig) -> ListenerChange:
        """The cluster's new ports, bound: a port in use is refused before anything changes."""
        try:
            return await self._service.listeners.prepare(config)
        except ListenError as error:
            raise ControlError(400, error.reason, error.key) from None

    def put_cluster(self, name: str, body: Mapping[str, Any]) -> Deferred[bool]:
        if name in self._config_names:
            return fail(ControlError(409, f"cluster {name!r} is defined in the configuration file"))
        return Deferred.fromCoroutine(self._change(name, dict(body)))

    def delete_cluster(self, name: str) -> Deferred[None]:
        if name in self._config_names:
            return fail(ControlError(409, f"cluster {name!r} is defined in the configuration file"))
        return Deferred.fromCoroutine(self._change(name, None)).addCallback(lambda _: None)

    async def _change(self, name: str, body: dict[str, Any] | None) -> bool:
        """
        Check, keep, apply; under the store's lock.  When another gateway
        changed the registry meanwhile (a conflict), wait until that change
        is applied here, and check again: the body may now be refused.
        """
        for _ in range(CONFLICT_ATTEMPTS):
            await self._lock.acquire()
            try:
                return await self._change_locked(name, body)
            except StoreConflict as conflict:
                newest = conflict.newest
            finally:
                self._lock.release()
            assert self._store is not None  # only a store has conflicts
            waiting = self._store.caught_up(newest)
            try:
                await waiting.addTimeout(CATCH_UP_TIMEOUT, self._service.clock)
            except TimeoutError:
                raise ControlError(
                    503,
                    f"the registry changed elsewhere and this gateway has not caught up within {CATCH_UP_TIMEOUT:g} s",
                ) from None
        raise ControlError(503, f"the registry changed elsewhere {CONFLICT_ATTEMPTS} times while writing: try again")

    async def _change_locked(self, name: str, body: dict[str, Any] | None) -> bool:
        if body is None:
            # A cluster of the registry this gateway does not serve (its port
            # taken on this host, say) is deleted here as through any other.
            stored = self._store is not None and name in self._store.bodies
            if name not in self._service.clusters and not stored:
                raise ControlError(404, f"no cluster named {name!r}")
            await self._keep(name, None)
            log.info("cluster {cluster} removed through the control API", cluster=name)
            if name in self._service.clusters:
                await self._service.remove_cluster(name)
            return False
        config = self._check(name, body)
        created = name not in self._service.clusters
        listeners = await self._prepare(config)
        previous = self._store.bodies.get(name) if self._store is not None else None
        try:
            await self._keep(name, body)
        except BaseException:
            # Closed before going on: a retry after a conflict binds the same ports again.
            await listeners.rollback()
            raise
        try:
            self._install(config, created, listeners)
        except Exception:
            # The new ports first: a store that cannot be written back must
            # not also leave them listening for ever.
            listeners.rollback()
            await self._keep(name, previous)  # keep the store saying what runs
            raise
        log.info(
            "cluster {cluster} {action} through the control API",
            cluster=name,
            action="registered" if created else "replaced",
        )
        return created

    def _install(self, config: ClusterConfig, created: bool, listeners: ListenerChange) -> None:
        if created:
            self._service.add_cluster(config, listeners=listeners)
        else:
            self._service.replace_cluster(config, listeners=listeners)

    async def _keep(self, name: str, body: Mapping[str, Any] | None) -> None:
        if self._store is None:
            return
        try:
            if body is None:
                await self._store.delete(name)
            else:
                await self._store.put(name, body)
        except StoreUnavailable as e:
            raise ControlError(503, str(e)) from None

    def _apply_remote(self, name: str, body: Mapping[str, Any] | None) -> Deferred[str | None]:
        """The store's sink (see L{gateway.store.base.Sink}): a change another gateway made."""
        return Deferred.fromCoroutine(self._apply_remote_locked(name, body))

    async def _apply_remote_locked(self, name: str, body: Mapping[str, Any] | None) -> str | None:
        if body is None:
            if name in self._service.clusters and name not in self._config_names:
                await self._service.remove_cluster(name)
                log.info("cluster {cluster} removed through the shared store", cluster=name)
            return None
        if name in self._config_names:
            refused: str | None = "a cluster of that name is defined in this gateway's configuration file"
        else:
            refused = await self._install_remote(name, body)
        if refused is not None:
            log.error(
                "cluster {cluster} in the shared store is not served here: {reason}", cluster=name, reason=refused
            )
        return refused

    async def _install_remote(self, name: str, body: Mapping[str, Any]) -> str | None:
        """Serve C{body} as cluster C{name}, checked as a PUT here would be; why not, when it is refused."""
        current = self._service.clusters.get(name)
        try:
            config = self._check(name, body)
            if current is not None and current.config == config:
                return None
            self._install(config, current is None, await self._prepare(config))
        except ControlError as e:
            if name in self._service.clusters:
                await self._service.remove_cluster(name)
            return f"{e.field}: {e.reason}" if e.field else e.reason
        log.info(
            "cluster {cluster} {action} through the shared store",
            cluster=name,
            action="registered" if current is None else "replaced",
        )
        return None

    def health(self) -> Mapping[str, Any]:
        service = self._service
        clusters = service.clusters.values()
        up = sum(1 for c in clusters if c.state == "up")
        not_ready = service.not_ready() + (self._store.not_ready() if self._store else [])
        return {
            "status": "ok" if not not_ready else "not-ready",
            "gateway": service.settings.name,
            "live": True,
            "ready": not not_ready,
            "not_ready": not_ready,
            "listeners": {
                kind: [peer_origin(address)[0] for address in service.listening_addresses(kind)]
                for kind in ("socks", "http")
            },
            "store": self._store.status() if self._store else {"backend": None, "state": "synced", "synced": True},
            "clusters": {"up": up, "down": len(clusters) - up},
        }

    def metrics(self) -> bytes:
        store = self._store
        return metrics_text(
            self._service.gateway, lambda: list(self._service.clusters.values()), store.status if store else None
        )

    def proxy_pac(self, host: str | None, cluster: str | None) -> bytes | None:
        pac = self._service.gateway.pac
        return None if pac is None else pac.pac_file(host, cluster)
