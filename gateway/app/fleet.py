"""
A gateway of a fleet: the C{[store] backend = "etcd"} settings read at
start-up (files checked, secrets read, before anything starts) and the
store service built from them.  See L{gateway.store.etcd.store}.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.logger import Logger

from gateway.app.clusters import IGatewayReactor
from gateway.config import ConfigError, GatewayConfig
from gateway.config.secrets import SecretFileError, read_secret_file
from gateway.store.base import Body
from gateway.store.etcd.client import EtcdClient, TlsFiles, tls_policy
from gateway.store.etcd.members import FleetMember
from gateway.store.etcd.store import EtcdStore
from gateway.store.statefile import StateFile

__all__ = ["EtcdSettings", "etcd_settings", "etcd_store"]

log = Logger()

#: The cache's file name when [store] cache_file is not set: next to [gateway] state_file.
CACHE_NAME = "etcd-cache.json"


@dataclass(frozen=True)
class EtcdSettings:
    cache_file: str
    #: An C{IPolicyForHTTPS} for https endpoints (None: plain http).
    tls: Any
    password: str | None

    def __repr__(self) -> str:  # the password stays out of every log and traceback
        return f"EtcdSettings(cache_file={self.cache_file!r})"


def etcd_settings(config: GatewayConfig) -> EtcdSettings:
    """The etcd backend's settings; ConfigError naming the key for a file that cannot be used."""
    store = config.store
    password = None
    if store.password_file is not None:
        try:
            text = read_secret_file(store.password_file, "password file").decode("utf-8")
        except (SecretFileError, UnicodeDecodeError) as e:
            reason = str(e) if isinstance(e, SecretFileError) else "the password file is not UTF-8 text"
            raise ConfigError(config.source, "store.password_file", reason) from None
        password = text.rstrip("\r\n")
    tls = None
    if any(url.startswith("https:") for url in store.endpoints):
        try:
            tls = tls_policy(TlsFiles(store.ca_file, store.cert_file, store.key_file))
        except ValueError as e:
            raise ConfigError(config.source, e.args[0], e.args[1]) from None
    elif store.ca_file or store.cert_file:
        raise ConfigError(config.source, "store.endpoints", "TLS files are set but no endpoint is https://")
    cache = store.cache_file or os.path.join(os.path.dirname(os.path.abspath(config.settings.state_file)), CACHE_NAME)
    return EtcdSettings(cache_file=cache, tls=tls, password=password)


def _fatal(reactor: IGatewayReactor, reason: str) -> None:
    """Stop a gateway that cannot serve the fleet's registry, with exit status 1 (after a clean shutdown)."""
    log.critical("gateway: {reason}: refusing to start", reason=reason)
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    reactor.stop()
    sys.stderr.flush()


def etcd_store(
    settings: EtcdSettings,
    reactor: IGatewayReactor,
    config: GatewayConfig,
    cache: StateFile,
    bodies: Mapping[str, Body],
    rejected: Mapping[str, str],
    parent: IServiceCollection,
) -> EtcdStore:
    """The etcd store, a child service of C{parent} (it starts before the listeners: added first)."""
    store = config.store
    client = EtcdClient(
        reactor,
        store.endpoints,
        timeout=store.timeout,
        tls=settings.tls,
        user=store.user,
        password=settings.password,
    )
    etcd = EtcdStore(
        client,
        reactor,
        prefix=store.prefix,
        gateway=config.settings.name,
        sealer=cache.sealer,
        cache=cache,
        bodies=bodies if cache.revision is not None or bodies else None,
        probe_interval=store.probe_interval,
        on_fatal=lambda reason: _fatal(reactor, reason),
    )
    etcd.rejected.update(rejected)
    etcd.setServiceParent(parent)
    FleetMember(client, reactor, store.prefix, config.settings.name, _version()).setServiceParent(parent)
    return etcd


def _version() -> str:
    try:
        return importlib.metadata.version("cluster-tunnel-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
