"""
The gateway's side of the control API: L{GatewayControl} implements
L{gateway.control.contract.ClusterControl} on a running L{GatewayService}.

Two sources of clusters live side by side: the TOML file (read-only here: the
API answers 409 for them, so the two never fight) and the API, whose request
bodies are kept in the state file (L{gateway.store.statefile.StateFile}) and loaded
again at start-up.  Every change is validated with the same code as the TOML
loader before anything is touched, then applied, then saved -- all on the
reactor thread, one after another, so the registry and the file never
disagree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.app.listeners import ListenerChange, ListenError
from gateway.app.service import GatewayService
from gateway.cluster.connection import ClusterConnection
from gateway.config import ConfigError, jump_cycle
from gateway.config.schema import safe_settings
from gateway.control.bodies import validate_body
from gateway.control.contract import ClusterView, ControlError
from gateway.control.metrics import metrics_text
from gateway.proxy.opener import peer_origin
from gateway.store.statefile import StateFile

log = Logger()


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


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
    }


class GatewayControl:
    """L{ClusterControl} on a running gateway, persisting API clusters."""

    def __init__(
        self,
        service: GatewayService,
        store: StateFile | None,
        config_names: set[str],
        api_bodies: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._service = service
        self._store = store
        self._config_names = set(config_names)
        #: The request bodies of API-registered clusters, as persisted.
        self._bodies: dict[str, Mapping[str, Any]] = dict(api_bodies or {})

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

    def put_cluster(self, name: str, body: Mapping[str, Any]) -> Deferred[bool]:
        if name in self._config_names:
            return fail(ControlError(409, f"cluster {name!r} is defined in the configuration file"))
        known = self._known_names(excluding=name)
        try:
            # [gateway] says what API bodies may do beyond inline keys.
            config = validate_body(name, body, known_clusters=known, settings=self._service.settings)
        except ConfigError as e:
            return fail(ControlError(400, e.reason, e.key or None))
        configs = {cluster.name: cluster.config for cluster in self._service.clusters.values()}
        configs[name] = config
        cycle = jump_cycle(configs, name)
        if cycle is not None:
            return fail(ControlError(400, f"jump cycle {cycle}", "jump"))
        for alias in config.aliases:
            if alias in known:
                used = f"alias {alias!r} is already used by cluster {known[alias]!r}"
                return fail(ControlError(409, used, "aliases"))
        if name in known:
            return fail(ControlError(409, f"{name!r} is already an alias of cluster {known[name]!r}"))
        created = name not in self._service.clusters

        def apply(listeners: ListenerChange) -> bool:
            previous = dict(self._bodies)
            self._bodies[name] = dict(body)
            try:
                self._save()
            except Exception:
                self._bodies = previous
                listeners.rollback()
                raise
            try:
                if created:
                    self._service.add_cluster(config, listeners=listeners)
                else:
                    self._service.replace_cluster(config, listeners=listeners)
            except Exception:
                # The new ports first: a state file that cannot be written
                # back must not also leave them listening for ever.
                listeners.rollback()
                # Keep the file saying what runs.
                self._bodies = previous
                self._save()
                raise
            log.info(
                "cluster {cluster} {action} through the control API",
                cluster=name,
                action="registered" if created else "replaced",
            )
            return created

        def refused(failure: Failure) -> NoReturn:
            failure.trap(ListenError)
            error = failure.value
            assert isinstance(error, ListenError)
            raise ControlError(400, error.reason, error.key)

        # A port in use is refused before anything changes.
        return self._service.listeners.prepare(config).addCallbacks(apply, refused)

    def delete_cluster(self, name: str) -> Deferred[None]:
        if name in self._config_names:
            return fail(ControlError(409, f"cluster {name!r} is defined in the configuration file"))
        if name not in self._service.clusters:
            return fail(ControlError(404, f"no cluster named {name!r}"))
        self._bodies.pop(name, None)
        self._save()
        log.info("cluster {cluster} removed through the control API", cluster=name)
        return self._service.remove_cluster(name).addCallback(lambda _: None)

    def _save(self) -> None:
        if self._store is not None:
            self._store.save(self._bodies)

    def health(self) -> Mapping[str, Any]:
        service = self._service
        clusters = service.clusters.values()
        up = sum(1 for c in clusters if c.state == "up")
        not_ready = service.not_ready()
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
            "store": {"backend": "file", "path": self._store.path if self._store else None, "synced": True},
            "clusters": {"up": up, "down": len(clusters) - up},
        }

    def metrics(self) -> bytes:
        return metrics_text(self._service.gateway, lambda: list(self._service.clusters.values()))

    def proxy_pac(self, host: str | None, cluster: str | None) -> bytes | None:
        pac = self._service.gateway.pac
        return None if pac is None else pac.pac_file(host, cluster)
