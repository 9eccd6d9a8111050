"""
One cluster's table -> L{ClusterConfig}, in small steps driven by the key
table (L{gateway.config.schema}): which keys exist, which C{[defaults]} may
set and what a cluster's own keys displace, and the reader of each key that
stands on its own.  The steps here read the keys that only make sense
together (names, proxies, keys, routes, token, jump).

The same code validates a cluster from the TOML file and one from the
control API (L{gateway.control.bodies.validate_body}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.conch.ssh import keys

from gateway.config.keys import KeyCache, host_key_source, private_key, read_secret
from gateway.config.model import MAX_TOKEN_BYTES, ClusterConfig, ConfigError, Network, ProxyAddress
from gateway.config.names import (
    check_name,
    is_valid_name,
    parse_network,
    parse_pattern,
    parse_proxy_address,
    read_user,
    valid_user,
)
from gateway.config.schema import CLUSTER_KEYS, DEFAULTABLE_KEYS, displaced, read_settings
from gateway.config.values import Values, join, show, table, unknown

__all__ = ["check_defaults", "check_jump_cycles", "jump_cycle", "known_clusters", "parse_cluster"]


def _not_defaultable(source: str, k: str) -> ConfigError:
    return ConfigError(source, join("defaults", k), f"{k} cannot be set in [defaults]: set it in each cluster")


def check_defaults(defaults: Mapping[str, Any], source: str, base_dir: str | None, cache: KeyCache | None) -> None:
    """Validate C{[defaults]} on its own, so mistakes show even with no cluster."""
    for k in defaults:
        if k not in CLUSTER_KEYS:
            raise unknown(source, join("defaults", k), k, DEFAULTABLE_KEYS)
        if k not in DEFAULTABLE_KEYS:
            raise _not_defaultable(source, k)
    values = Values(source, base_dir)
    values.add(defaults, "defaults")
    if "user" in values:
        read_user(values, "user")
    read_settings(values)
    host_key_source(values)
    private_key(values, cache)


def _effective_values(
    data: Mapping[str, Any],
    source: str,
    key_prefix: str,
    base_dir: str | None,
    defaults: Mapping[str, Any] | None,
) -> Values:
    """The cluster's own keys over the C{[defaults]} it does not displace."""
    data = table(data, source, key_prefix)
    for k in data:
        if k not in CLUSTER_KEYS:
            raise unknown(source, join(key_prefix, k), k, CLUSTER_KEYS)
    values = Values(source, base_dir)
    if defaults:
        for k in defaults:
            if k not in DEFAULTABLE_KEYS:
                raise _not_defaultable(source, k)
        overridden = displaced(data)
        values.add({k: v for k, v in defaults.items() if k not in overridden}, "defaults")
    values.add(data, key_prefix)
    return values


def _aliases(values: Values, name: str) -> list[str]:
    aliases: list[str] = []
    if "aliases" in values:
        for i, alias in enumerate(values.strings("aliases")):
            key = f"{values.key('aliases')}[{i}]"
            check_name(alias, values.source, key, "alias")
            if alias == name or alias in aliases:
                raise ConfigError(values.source, key, f"alias {alias!r} is listed twice (or is the cluster's own name)")
            aliases.append(alias)
    return aliases


def _proxies(values: Values, key_prefix: str) -> tuple[ProxyAddress, ...]:
    if "proxies" not in values:
        raise values.error(join(key_prefix, "proxies"), "missing: list the proxy node's address(es)")
    proxies: list[ProxyAddress] = []
    texts = values.strings("proxies")
    if not texts:
        raise values.error("proxies", "must list at least one address")
    for i, text in enumerate(texts):
        key = f"{values.key('proxies')}[{i}]"
        try:
            proxy = parse_proxy_address(text)
        except ValueError as e:
            raise ConfigError(values.source, key, str(e)) from None
        if proxy in proxies:
            raise ConfigError(values.source, key, f"{proxy} is listed twice")
        proxies.append(proxy)
    return tuple(proxies)


def _credentials(values: Values, key_prefix: str, cache: KeyCache | None) -> dict[str, Any]:
    """The fields saying who the gateway is to the proxy node and who the node must be."""
    if "user" not in values:
        raise values.error(join(key_prefix, "user"), "missing: set user here or in [defaults]")
    user = read_user(values, "user")
    key: keys.Key | None = private_key(values, cache)
    if key is None:
        raise values.error(
            join(key_prefix, "key_file"), "missing private key: set key_file or key here or in [defaults]"
        )
    source = host_key_source(values)
    if not source.given:
        raise values.error(
            join(key_prefix, "known_hosts"),
            "missing host key source: set known_hosts, host_keys or host_ca_keys"
            " (or insecure_accept_any_host_key = true)",
        )
    return {
        "user": user,
        "private_key": key,
        "known_hosts": source.known_hosts,
        "host_keys": source.host_keys,
        "host_ca_keys": source.host_ca_keys,
        "insecure_accept_any_host_key": source.insecure,
    }


def _routes(values: Values, key_prefix: str) -> tuple[tuple[Network, ...], tuple[str, ...]]:
    """(networks, hostnames): what the cluster routes to."""
    networks: list[Network] = []
    if "networks" in values:
        for i, text in enumerate(values.strings("networks")):
            try:
                networks.append(parse_network(text))
            except ValueError as e:
                raise ConfigError(values.source, f"{values.key('networks')}[{i}]", str(e)) from None
    hostnames: list[str] = []
    if "hostnames" in values:
        for i, text in enumerate(values.strings("hostnames")):
            try:
                pattern = parse_pattern(text)
            except ValueError as e:
                raise ConfigError(values.source, f"{values.key('hostnames')}[{i}]", str(e)) from None
            if pattern not in hostnames:
                hostnames.append(pattern)
    if not networks and not hostnames:
        raise values.error(join(key_prefix, "networks"), "at least one network is needed (unless hostnames is set)")
    return tuple(networks), tuple(hostnames)


def _check_token(token: str, values: Values, name: str) -> str:
    if not token:
        raise values.error(name, "the token must not be empty (remove it to disable authentication)")
    if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise values.error(name, f"the token is longer than {MAX_TOKEN_BYTES} bytes (the SOCKS5 password limit)")
    return token


def _token(values: Values) -> str | None:
    if "token" in values and "token_file" in values:
        raise values.error("token_file", "token and token_file are mutually exclusive: set only one")
    if "token" in values:
        return _check_token(values.string("token", nonempty=False), values, "token")
    if "token_file" in values:
        raw = read_secret(values, "token_file", "token file")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise values.error("token_file", f"token file {values.path('token_file')!r} is not UTF-8 text") from None
        if not text:
            raise values.error("token_file", f"token file {values.path('token_file')!r} is empty")
        return _check_token(text, values, "token_file")
    return None


def _jump_target(
    values: Values, name: str, aliases: list[str], known: Mapping[str, str] | None
) -> tuple[str | None, ProxyAddress | None, str | None]:
    """(jump_cluster, jump_address, jump_user) of the C{jump} value."""
    text = values.string("jump")
    if text == name or text in aliases:
        raise values.error("jump", f"cluster {name!r} cannot jump through itself")
    if known is not None:
        target = known.get(text)
        if target == name:
            raise values.error("jump", f"cluster {name!r} cannot jump through itself")
        if target is not None:
            return target, None, None
    elif "@" not in text and ":" not in text and is_valid_name(text):
        return text, None, None  # a cluster name, for the caller to check
    user: str | None
    user, at, host = text.rpartition("@")
    if not at:
        user = None
    elif not valid_user(user):
        raise values.error("jump", f"{show(user)} in {show(text)} is not a valid user name")
    try:
        address = parse_proxy_address(host)
    except ValueError as e:
        raise values.error(
            "jump", f"{show(text)} is neither a cluster name or alias nor a [user@]host[:port] address: {e}"
        ) from None
    return None, address, user


def _jump(
    values: Values, name: str, aliases: list[str], settings: Mapping[str, Any], known: Mapping[str, str] | None
) -> dict[str, Any]:
    """The jump fields (none when C{jump} is not set)."""
    if "jump" not in values:
        return {}
    jump = values.string("jump")
    if settings.get("proxy_command") is not None:
        raise values.error("jump", "proxy_command and jump are mutually exclusive: set only one")
    jump_cluster, jump_address, jump_user = _jump_target(values, name, aliases, known)
    return {"jump": jump, "jump_cluster": jump_cluster, "jump_address": jump_address, "jump_user": jump_user}


def parse_cluster(
    name: str,
    data: Mapping[str, Any],
    source: str,
    key_prefix: str,
    base_dir: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    *,
    key_cache: KeyCache | None = None,
    known_clusters: Mapping[str, str] | None = None,
) -> ClusterConfig:
    """
    Validate one cluster's table.

    @param name: the cluster's name (validated here).
    @param data: the cluster's keys.
    @param source: where the data came from (file name, "API"), for errors.
    @param key_prefix: dotted key of the table, e.g. C{clusters.a}, for errors.
    @param base_dir: what relative file paths are relative to.
    @param defaults: the C{[defaults]} table, if any (keys come out as
        C{defaults.KEY} in errors).
    @param key_cache: internal: shares loaded keys between clusters.
    @param known_clusters: the other clusters' names and aliases, each
        mapped to its cluster's name: a C{jump} value found here is a cluster
        reference (C{jump_cluster} is the canonical name), any other value must
        be an address.  When None, a C{jump} value that looks like a cluster
        name (no C{@} or C{:}) is taken as a cluster reference as written, for
        the caller to check.
    @raise ConfigError: if anything is wrong.
    """
    check_name(name, source, key_prefix, "cluster name")
    values = _effective_values(data, source, key_prefix, base_dir, defaults)
    aliases = _aliases(values, name)
    proxies = _proxies(values, key_prefix)
    credentials = _credentials(values, key_prefix, key_cache)
    networks, hostnames = _routes(values, key_prefix)
    token = _token(values)
    settings = read_settings(values)
    jump = _jump(values, name, aliases, settings, known_clusters)
    return ClusterConfig(
        name=name,
        aliases=tuple(aliases),
        proxies=proxies,
        networks=networks,
        hostnames=hostnames,
        token=token,
        **credentials,
        **settings,
        **jump,
    )


def known_clusters(tables: Mapping[str, Any]) -> dict[str, str]:
    """
    Name or alias -> cluster name, from the raw cluster tables (what is not
    valid there is reported when the cluster itself is parsed).
    """
    known: dict[str, str] = {}
    for name, body in tables.items():
        known.setdefault(name, name)
        aliases = body.get("aliases") if isinstance(body, Mapping) else None
        if isinstance(aliases, (list, tuple)):
            for alias in aliases:
                if isinstance(alias, str):
                    known.setdefault(alias, name)
    return known


def jump_cycle(clusters: Mapping[str, ClusterConfig], start: str) -> str | None:
    """
    The jump cycle through cluster C{start} (C{"a -> b -> a"}), or None.
    A jump to a cluster missing from C{clusters} ends the walk.
    """
    path = [start]
    target = clusters[start].jump_cluster
    while target is not None and target not in path and target in clusters:
        path.append(target)
        target = clusters[target].jump_cluster
    return " -> ".join([*path, start]) if target == start else None


def check_jump_cycles(clusters: Mapping[str, ClusterConfig], source: str) -> None:
    """Refuse clusters that (indirectly) jump through themselves."""
    for start in clusters:
        cycle = jump_cycle(clusters, start)
        if cycle is not None:
            raise ConfigError(source, join(join("clusters", start), "jump"), f"jump cycle {cycle}")
