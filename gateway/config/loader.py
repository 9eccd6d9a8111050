"""
The configuration file: TOML -> L{GatewayConfig}.

L{load_config} reads and decodes the file, L{parse_config} validates the
decoded tables: C{[listen]}, C{[gateway]} (read through
L{gateway.config.schema.GATEWAY_SCHEMA}), C{[defaults]} and each
C{[clusters.NAME]} (L{gateway.config.cluster.parse_cluster}).
"""

from __future__ import annotations

import os
import tomllib
import types
from collections.abc import Mapping
from typing import Any

from gateway.config.cluster import check_defaults, check_jump_cycles, known_clusters, parse_cluster
from gateway.config.keys import KeyCache
from gateway.config.model import (
    DEFAULT_HTTP_LISTEN,
    DEFAULT_SOCKS_LISTEN,
    ClusterConfig,
    ConfigError,
    GatewayConfig,
    GatewaySettings,
    ListenConfig,
)
from gateway.config.schema import GATEWAY_KEYS, GATEWAY_SCHEMA
from gateway.config.store import parse_store
from gateway.config.values import Values, endpoint_items, join, key_part, show, table, unknown

__all__ = ["load_config", "parse_config"]

_TOP_KEYS = ("clusters", "defaults", "gateway", "listen", "store")
_LISTEN_KEYS = ("control", "http", "socks")
_LISTEN_DEFAULTS = {"socks": (DEFAULT_SOCKS_LISTEN,), "http": (DEFAULT_HTTP_LISTEN,), "control": ()}


def _parse_listen(data: Mapping[str, Any], source: str) -> ListenConfig:
    for k in data:
        if k not in _LISTEN_KEYS:
            raise unknown(source, join("listen", k), k, _LISTEN_KEYS)
    result: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for k in ("socks", "http", "control"):
        if k not in data:
            result[k] = _LISTEN_DEFAULTS[k]
            continue
        items = endpoint_items(data[k], join("listen", k), source)
        for item, item_key in items:
            if item in seen:
                raise ConfigError(source, item_key, f"{show(item)} is already used by {seen[item]}")
            seen[item] = item_key
        result[k] = tuple(item for item, _ in items)
    if len(result["control"]) > 1:
        raise ConfigError(source, join("listen", "control"), "give at most one control endpoint")
    return ListenConfig(socks=result["socks"], http=result["http"], control=result["control"])


def _parse_gateway(data: Mapping[str, Any], source: str, base_dir: str | None = None) -> GatewaySettings:
    for k in data:
        if k not in GATEWAY_KEYS:
            raise unknown(source, join("gateway", k), k, GATEWAY_KEYS)
    values = Values(source, base_dir)
    values.add(data, "gateway")
    return GatewaySettings(**{row.name: row.reader(values, row.name) for row in GATEWAY_SCHEMA if row.name in values})


def _parse_clusters(
    tables: Mapping[str, Any], defaults: Mapping[str, Any], source: str, base_dir: str | None, cache: KeyCache
) -> dict[str, ClusterConfig]:
    """Every C{[clusters.NAME]}; no name or alias may be used twice."""
    clusters: dict[str, ClusterConfig] = {}
    owners: dict[str, str] = {}
    known = known_clusters(tables)
    for name, body in tables.items():
        prefix = join("clusters", name)
        cluster = parse_cluster(name, body, source, prefix, base_dir, defaults, key_cache=cache, known_clusters=known)
        for i, n in enumerate(cluster.names()):
            if n in owners:
                key = prefix if i == 0 else f"{join(prefix, 'aliases')}[{i - 1}]"
                what = "cluster name" if i == 0 else "alias"
                raise ConfigError(source, key, f"{what} {n!r} is already used by cluster {owners[n]!r}")
            owners[n] = name
        clusters[name] = cluster
    check_jump_cycles(clusters, source)
    return clusters


def _check_listeners_unique(listen: ListenConfig, clusters: Mapping[str, ClusterConfig], source: str) -> None:
    """No endpoint string serves twice: in [listen] and in a cluster's C{socks}/C{http}, or in two clusters."""
    seen = {item: join("listen", k) for k in ("socks", "http", "control") for item in getattr(listen, k)}
    for name, cluster in clusters.items():
        for k in ("socks", "http"):
            key = join(join("clusters", name), k)
            for item in getattr(cluster, k):
                if item in seen:
                    raise ConfigError(source, key, f"{show(item)} is already used by {seen[item]}")
                seen[item] = key


def parse_config(data: Mapping[str, Any], source: str, base_dir: str | None = None) -> GatewayConfig:
    """
    Validate a decoded configuration.

    @param source: named in errors (usually the file name).
    @param base_dir: relative key_file / known_hosts / token_file /
        passphrase_file paths are relative to it (the config file's directory).
    @raise ConfigError: if anything is wrong.
    """
    data = table(data, source, "(file)")
    for k in data:
        if k not in _TOP_KEYS:
            raise unknown(source, key_part(k), k, _TOP_KEYS)
    listen = _parse_listen(table(data.get("listen", {}), source, "listen"), source)
    settings = _parse_gateway(table(data.get("gateway", {}), source, "gateway"), source, base_dir)
    cache: KeyCache = {}
    defaults = table(data.get("defaults", {}), source, "defaults")
    check_defaults(defaults, source, base_dir, cache)
    tables = table(data.get("clusters", {}), source, "clusters")
    clusters = _parse_clusters(tables, defaults, source, base_dir, cache)
    _check_listeners_unique(listen, clusters, source)
    store = parse_store(table(data.get("store", {}), source, "store"), source, base_dir)
    return GatewayConfig(
        listen=listen, clusters=types.MappingProxyType(clusters), source=source, settings=settings, store=store
    )


def load_config(path: str) -> GatewayConfig:
    """
    Read and validate the TOML file at C{path}.

    @raise ConfigError: if it cannot be read, is not TOML, or is invalid.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror or type(e).__name__}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "(file)", f"not UTF-8 text (byte offset {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(file)", f"not valid TOML: {e}") from None
    return parse_config(data, path, base_dir=os.path.dirname(os.path.abspath(path)))
