"""
C{twistd gateway}: command-line options and C{makeService}.

Everything that can be wrong with the configuration is found in
L{Options.postOptions}, before any service exists, and reported as one line
naming the file, the key and the reason, with exit status 1: nothing starts
half-way.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gateway.app.clusters import IGatewayReactor
from gateway.app.service import GatewayService
from gateway.config import (
    DEFAULT_CONTROL_LISTEN,
    ClusterConfig,
    ConfigError,
    GatewayConfig,
    ListenConfig,
    check_jump_cycles,
    check_name,
    load_config,
)
from gateway.control.bodies import validate_body
from gateway.control.http import control_site, control_token
from gateway.control.registry import GatewayControl
from gateway.store.base import Store
from gateway.store.file import FileStore
from gateway.store.sealing import Sealer, read_sealing_key
from gateway.store.statefile import StateFile, StoreError

if TYPE_CHECKING:
    from gateway.app.fleet import EtcdSettings

log = Logger()


def _seal_now(store: StateFile, bodies: dict[str, dict]) -> None:
    """
    Rewrite a plaintext store read with a key, sealed: waiting for the next
    API change would leave its secrets readable on disk for as long as
    nobody changes a cluster.  Called only for a store that loaded and
    validated whole (a bad one is kept as it is for the operator).
    """
    try:
        store.save(bodies)
    except StoreError as e:
        log.warn("cannot seal the state file's plaintext secrets yet (at the next change then): {error}", error=str(e))
    else:
        log.info("the state file {path} held plaintext secrets: sealed now", path=store.path)


class Options(usage.Options):
    synopsis = "[--config FILE] [--socks ENDPOINT] [--http ENDPOINT] [--control ENDPOINT] [--name NAME] [--demo]"
    longdesc = (
        "Keep one SSH connection per cluster to its proxy node and expose "
        "SOCKS5 and HTTP proxy listeners that reach the clusters' internal "
        "addresses.  See docs/configuration.md."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["socks", None, None, 'SOCKS listener endpoint, overriding [listen] socks ("" disables).'],
        ["http", None, None, 'HTTP proxy listener endpoint, overriding [listen] http ("" disables).'],
        ["control", None, None, 'Control API endpoint, overriding [listen] control ("" disables).'],
        ["state-file", None, None, "Where API-registered clusters are kept, overriding [gateway] state_file."],
        ["name", None, None, "This gateway's name, overriding [gateway] name (one per worker sharing a file)."],
    ]
    optFlags = [
        ["demo", None, "Also run an in-process demo cluster named 'demo' (no root, no network)."],
    ]

    def postOptions(self) -> None:
        if not self["config"] and not self["demo"]:
            raise usage.UsageError("give --config FILE, or --demo to try the gateway")
        try:
            self.gateway_config = self._load()
            self.control_token = self._control_token()
            self.api_clusters = self._load_api_clusters()
        except (ConfigError, StoreError) as e:
            sys.exit(f"gateway: {e}")

    def _control_token(self) -> str | None:
        config = self.gateway_config
        try:
            token = control_token(config.settings.control_token_file)
        except ValueError as e:
            raise ConfigError(config.source, "gateway.control_token_file", str(e)) from None
        # Whether the control listener needs it is known once it listens (its
        # bound address): see ListenerService.
        return token

    def _load_api_clusters(self) -> dict[str, tuple[dict, ClusterConfig]]:
        """Clusters registered through the API before the last stop (for etcd: the local cache's)."""
        config = self.gateway_config
        self.store_rejected: dict[str, str] = {}
        self.etcd: EtcdSettings | None = None
        if config.store.backend == "etcd":
            # Imported only for a fleet: treq and the HTTP client are no part of a lone gateway.
            from gateway.app.fleet import etcd_settings

            self.etcd = etcd_settings(config)
            state = StateFile(self.etcd.cache_file, self._sealer())
        elif config.listen.control:
            state = StateFile(config.settings.state_file, self._sealer())
        else:
            self.state = None
            return {}
        self.state = state
        bodies = state.load()
        if state.sealer is None and state.plaintext_secrets:
            log.warn(
                "the state file {path} holds private keys and tokens in plaintext: "
                "set [store] secret_key_file to seal them (docs/configuration.md)",
                path=state.path,
            )
        self.store_bodies = bodies
        loaded = self._checked(bodies, state.path, strict=self.etcd is None)
        if state.sealer is not None and state.plaintext_secrets:
            _seal_now(state, bodies)
        return loaded

    def _checked(self, bodies: dict[str, dict], source: str, strict: bool) -> dict[str, tuple[dict, ClusterConfig]]:
        """
        C{bodies} validated as the API validates them.  C{strict} (the state
        file): the first error stops the start-up.  Otherwise (etcd's cache,
        which holds what the fleet registered): a body refused here is
        logged and left out, as it would be when it arrived from etcd.
        """
        config = self.gateway_config
        known = {alias: c.name for c in config.clusters.values() for alias in c.names()}
        for name, body in bodies.items():
            for alias in [name, *body.get("aliases", [])]:
                known.setdefault(alias, name)
        loaded = {}
        for name, body in bodies.items():
            try:
                if name in config.clusters or (self["demo"] and name == "demo"):
                    raise ConfigError(source, f"clusters.{name}", "also defined in the configuration file")
                try:
                    cluster = validate_body(name, body, source, known_clusters=known, settings=config.settings)
                except ConfigError as e:
                    raise ConfigError(source, f"clusters.{name}.{e.key}", e.reason) from None
            except ConfigError as e:
                if strict:
                    raise
                log.error(
                    "cluster {cluster} of the local cache is not served here: {error}", cluster=name, error=str(e)
                )
                self.store_rejected[name] = f"{e.key}: {e.reason}"
                continue
            loaded[name] = (body, cluster)
        # Bodies stored before API registrations were checked for cycles.
        check_jump_cycles({**config.clusters, **{name: c for name, (_, c) in loaded.items()}}, source)
        return loaded

    def _sealer(self) -> Sealer | None:
        path = self.gateway_config.store.secret_key_file
        if path is None:
            return None
        try:
            return Sealer(read_sealing_key(path))
        except ValueError as e:
            raise ConfigError(self.gateway_config.source, "store.secret_key_file", str(e)) from None

    def _load(self) -> GatewayConfig:
        if self["config"]:
            config = load_config(self["config"])
        else:
            config = GatewayConfig(listen=ListenConfig(), clusters={}, source="(demo)")
        listen = config.listen
        for kind in ("socks", "http", "control"):
            if self[kind] is not None:
                listen = replace(listen, **{kind: (self[kind],) if self[kind] else ()})
        if self["demo"] and self["control"] is None and not listen.control:
            listen = replace(listen, control=(DEFAULT_CONTROL_LISTEN,))  # so gateway-ctl works on the demo
        state_file = self["state-file"]
        if state_file is None and self["demo"] and not self["config"]:
            # The demo's proxy node and keys live only as long as the process:
            # so do the clusters registered against it.
            state_dir = tempfile.mkdtemp(prefix="gateway-demo-state-")
            atexit.register(shutil.rmtree, state_dir, True)
            state_file = os.path.join(state_dir, "clusters.json")
        if state_file:
            config = replace(config, settings=replace(config.settings, state_file=state_file))
        if self["name"] is not None:
            name = check_name(self["name"], config.source, "--name", "gateway name")
            config = replace(config, settings=replace(config.settings, name=name))
        from twisted.internet import reactor

        for kind in ("socks", "http", "control"):
            for description in getattr(listen, kind):
                try:
                    serverFromString(reactor, description)
                except Exception as e:  # the parser raises many kinds
                    raise ConfigError(config.source, f"listen.{kind}", f"bad endpoint {description!r}: {e}") from None
        if self["demo"] and "demo" in config.clusters:
            raise ConfigError(config.source, "clusters.demo", "--demo adds a cluster of that name")
        return replace(config, listen=listen)


def makeService(options: Options, reactor: IGatewayReactor | None = None) -> IService:
    """The service tree of parsed C{options}; C{reactor} defaults to the global one."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IGatewayReactor, global_reactor)
    config = options.gateway_config
    service = GatewayService(config, reactor)
    for _, cluster in options.api_clusters.values():
        service.add_cluster(cluster, options.state.path if options.state else "(api)")
    if options["demo"]:
        from gateway.app.demo import DemoService

        DemoService(service, reactor).setServiceParent(service)
    store = _store(options, reactor, service)
    if store is not None:
        config_names = set(config.clusters) | ({"demo"} if options["demo"] else set())
        control = GatewayControl(service, store, config_names)
        for description in config.listen.control:
            site = control_site(control, options.control_token, config.settings)
            service.add_listener("control", description, site, local_only=options.control_token is None)
    return service


def _store(options: Options, reactor: IGatewayReactor, service: GatewayService) -> Store | None:
    """The API clusters' store: the state file's, or etcd's (a service of its own); None without a control API."""
    state = options.state
    if state is None:
        return None
    bodies = options.store_bodies
    if options.etcd is None:
        return FileStore(state, bodies)
    from gateway.app.fleet import etcd_store

    return etcd_store(options.etcd, reactor, options.gateway_config, state, bodies, options.store_rejected, service)
