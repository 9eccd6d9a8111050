"""
The one key table: every key a cluster table and the C{[gateway]} table may
hold, with what the loader, the control API and the status output need to
know about it.

For a cluster key (L{ClusterKey}) the row says

 - how its value is read (L{ClusterKey.reader}; keys that only make sense
   together, such as C{key} and C{passphrase}, are read by a step of
   L{gateway.config.cluster.parse_cluster} instead);
 - whether C{[defaults]} may set it, and which C{[defaults]} keys it
   displaces when a cluster sets it (a cluster's C{key} replaces the
   defaults' C{key_file} instead of clashing with it);
 - what an API body may not do with it unless a C{[gateway]} setting allows
   it (L{ApiRule});
 - whether the status output (L{safe_settings}) shows it, and how.

The TOML loader, L{gateway.control.bodies.validate_body} and the control API's
cluster view all read this table, so a new key is one row (plus its field in
L{gateway.config.model}).  The rows are in the order the status output
shows them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from gateway.config.algorithms import ALGORITHM_KEYS, read_algorithms
from gateway.config.model import (
    MAX_CONNECTIONS,
    MAX_KEEPALIVE_COUNT_MAX,
    MAX_MAX_CLIENTS,
    MAX_MAX_STREAMS,
    MIN_REKEY_INTERVAL,
    ClusterConfig,
    GatewaySettings,
)
from gateway.config.names import read_gateway_name
from gateway.config.values import (
    Reader,
    Values,
    read_boolean,
    read_domain,
    read_endpoints,
    read_exec_command,
    read_integer,
    read_mode,
    read_path,
    read_proxy_command,
    read_rekey_bytes,
    read_resolver_command,
    read_seconds,
    read_window_size,
    show,
)
from gateway.ssh.hostkeys import fingerprint

__all__ = [
    "CLUSTER_KEYS",
    "CLUSTER_SCHEMA",
    "DEFAULTABLE_KEYS",
    "GATEWAY_KEYS",
    "GATEWAY_SCHEMA",
    "ApiRule",
    "ClusterKey",
    "GatewayKey",
    "api_body_refusal",
    "api_config_refusal",
    "displaced",
    "read_settings",
    "safe_settings",
]

#: How the status output shows a key of a cluster's configuration.
Render = Callable[[ClusterConfig], Any]


# --- what the API may not do --------------------------------------------------------


class ApiRule:
    """
    What an API body may not do with a key unless the C{[gateway]} setting
    L{setting} allows it: what would let an API client act with the gateway's
    own rights.  Each check returns the reason to refuse, or None.
    """

    #: The L{GatewaySettings} flag that lifts the rule.
    setting = ""

    def body_refusal(self, value: Any, allowed: bool) -> str | None:
        """Checked on the body's value, before the body is validated."""
        return None

    def config_refusal(self, config: ClusterConfig, allowed: bool) -> str | None:
        """Checked on the validated cluster."""
        return None


@dataclass(frozen=True)
class HostFile(ApiRule):
    """
    The key names a file on the gateway's host.  An API client must not make
    the gateway use (or probe) a file that only the gateway's user can read,
    so it must send the content inline (as L{inline}); when allowed, the path
    must be absolute: there is no configuration file for a relative path to be
    relative to, and the gateway's working directory may differ after a restart.
    """

    inline: str
    setting = "api_file_paths"

    def body_refusal(self, value: Any, allowed: bool) -> str | None:
        if not allowed:
            return (
                f"API bodies may not name files on the gateway's host: send the content inline as {self.inline} "
                "(gateway-ctl does) or set [gateway] api_file_paths = true"
            )
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            return f"{show(value)} is not an absolute path (a file on the gateway's host must be absolute)"
        return None


class LocalCommand(ApiRule):
    """The key is a command the gateway runs locally."""

    setting = "api_proxy_command"

    def body_refusal(self, value: Any, allowed: bool) -> str | None:
        if allowed:
            return None
        return (
            "proxy_command runs a command on the gateway host and is off for API clusters "
            "(set [gateway] api_proxy_command = true to allow it)"
        )


class ClusterJump(ApiRule):
    """The key may name another cluster, whose proxy node would connect for this one."""

    setting = "api_jump"

    def config_refusal(self, config: ClusterConfig, allowed: bool) -> str | None:
        if config.jump_cluster is None or allowed:
            return None
        return (
            f"jump through cluster {config.jump_cluster!r} is off for API clusters: its proxy node would connect "
            "on this cluster's behalf (set [gateway] api_jump = true to allow it, or jump to an address)"
        )


#: What an API body may give as a per-cluster listener without api_file_paths:
#: TCP with a port and optionally an interface and backlog.
_TCP_ENDPOINT = re.compile(r"(?:tcp6?:)?(?:port=)?[0-9]{1,5}(?::(?:interface|backlog)=(?:[^:\\]|\\:)*)*")
#: The endpoint types that listen on a port of the gateway's host.
_PORT_TYPES = frozenset({"tcp", "tcp6", "ssl"})


def _endpoint_port(description: str) -> int | None:
    """
    The port a C{tcp:}, C{tcp6:} or C{ssl:} endpoint string listens on, or
    None (another type, no port, malformed: the reader says what is wrong).
    Read with Twisted's own tokenizer (escapes, C{port=} anywhere), so this
    check cannot read a port other than the one that is bound.
    """
    from twisted.internet.endpoints import _parse

    try:
        args, kwargs = _parse(description)
    except Exception:  # noqa: BLE001 - whatever it is, the endpoint reader refuses it
        return None
    if len(args) < 1 or args[0] not in _PORT_TYPES:
        return None
    port = kwargs.get("port", args[1] if len(args) > 1 else None)
    return int(port) if isinstance(port, str) and port.isascii() and port.isdigit() else None


class ApiListener(ApiRule):
    """
    The key opens a listener on the gateway's host.  An API client may ask
    for TCP ports (1024 and up, or 0 for any free one); other endpoint types
    name files (C{unix:}, C{ssl:}'s keys) or descriptors (C{systemd:}) of
    the gateway's host, so they need C{[gateway] api_file_paths}.  That
    setting is about files: a privileged port stays the host's even then.
    """

    setting = "api_file_paths"

    def body_refusal(self, value: Any, allowed: bool) -> str | None:
        for item in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if not isinstance(item, str) or not item:
                continue  # the reader says what is wrong with it
            if not allowed and _TCP_ENDPOINT.fullmatch(item) is None:
                return (
                    f"API clusters may listen on tcp: endpoints only, not {show(item)} "
                    "(set [gateway] api_file_paths = true for unix:, ssl: and others)"
                )
            port = _endpoint_port(item)
            if port is not None and 0 < port < 1024:
                return f"API clusters may not listen on privileged port {port} ({show(item)}): use 1024 or higher"
        return None


class RemoteListeners(ApiRule):
    """The key exposes listeners that ask no credentials beyond this host: the operator's decision."""

    setting = "api_remote_listeners"

    def body_refusal(self, value: Any, allowed: bool) -> str | None:
        if value is not True or allowed:
            return None
        return (
            "remote_listeners opens listeners without credentials beyond this host and is off for API clusters "
            "(set [gateway] api_remote_listeners = true to allow it)"
        )


# --- status renderings --------------------------------------------------------------


def _as_strings(name: str) -> Render:
    return lambda config: [str(item) for item in getattr(config, name)]


def _key_summary(config: ClusterConfig) -> dict[str, str]:
    key = config.private_key
    return {"type": key.sshType().decode(), "fingerprint": fingerprint(key.public())}


def _key_lines(name: str) -> Render:
    return lambda config: [k.toString("OPENSSH").decode() for k in getattr(config, name)]


def _token_set(config: ClusterConfig) -> bool:
    return config.token is not None


# --- the cluster keys ---------------------------------------------------------------


@dataclass(frozen=True)
class ClusterKey:
    """One key of a cluster table."""

    name: str
    #: Reads the value into the ClusterConfig field C{name}; None: the key is
    #: read by a step of L{gateway.config.cluster.parse_cluster}, with the
    #: keys it works with.
    reader: Reader | None = None
    #: Whether C{[defaults]} may set it.  The others describe one cluster (its
    #: names, its proxy node, its networks, its host keys, its token, the
    #: connection it jumps through) and sharing them would be a mistake.
    defaultable: bool = True
    #: The C{[defaults]} keys a cluster setting this key displaces, besides itself.
    displaces: frozenset[str] = frozenset()
    #: ... and those it displaces when its value is C{true}.
    displaces_if_true: frozenset[str] = frozenset()
    #: What an API body may not do with it; None: anything a file may.
    api: ApiRule | None = None
    #: Whether the status output shows it (secrets and file paths to them are not).
    shown: bool = True
    #: The status output's name for it; None: C{name}.
    shown_as: str | None = None
    #: How the status output shows it; None: the field C{name} as it is.
    render: Render | None = None

    def status(self, config: ClusterConfig) -> tuple[str, Any]:
        """(name, value) of this key in the status output."""
        value = self.render(config) if self.render is not None else getattr(config, self.name)
        return self.shown_as or self.name, value


_KEY_GROUP = frozenset({"key", "key_file", "passphrase", "passphrase_file"})
_PASSPHRASE_GROUP = frozenset({"passphrase", "passphrase_file"})
_HOST_KEY_GROUP = frozenset({"known_hosts", "host_keys", "insecure_accept_any_host_key"})

CLUSTER_SCHEMA: tuple[ClusterKey, ...] = (
    ClusterKey("aliases", defaultable=False, render=lambda c: list(c.aliases)),
    ClusterKey("proxies", defaultable=False, render=_as_strings("proxies")),
    ClusterKey("user"),
    ClusterKey("key", displaces=_KEY_GROUP, render=_key_summary),
    ClusterKey("key_file", displaces=_KEY_GROUP, api=HostFile("key"), shown=False),
    ClusterKey("known_hosts", displaces=_HOST_KEY_GROUP, api=HostFile("host_keys")),
    ClusterKey("host_keys", defaultable=False, displaces=_HOST_KEY_GROUP, render=_key_lines("host_keys")),
    # a site's CA is shared through [defaults] and adds to known_hosts or
    # host_keys; only the insecure opt-out and it exclude each other
    ClusterKey(
        "host_ca_keys", displaces=frozenset({"insecure_accept_any_host_key"}), render=_key_lines("host_ca_keys")
    ),
    ClusterKey("insecure_accept_any_host_key", displaces_if_true=_HOST_KEY_GROUP | {"host_ca_keys"}),
    ClusterKey("passphrase", displaces=_PASSPHRASE_GROUP, shown=False),
    ClusterKey("passphrase_file", displaces=_PASSPHRASE_GROUP, api=HostFile("passphrase"), shown=False),
    ClusterKey("networks", defaultable=False, render=_as_strings("networks")),
    ClusterKey("hostnames", defaultable=False, render=lambda c: list(c.hostnames)),
    ClusterKey("token", defaultable=False, shown_as="token_set", render=_token_set),
    ClusterKey("token_file", defaultable=False, api=HostFile("token"), shown=False),
    ClusterKey("connect_timeout", read_seconds),
    ClusterKey("open_timeout", read_seconds),
    ClusterKey("window_size", read_window_size),
    ClusterKey("keepalive_interval", partial(read_seconds, zero="no keepalive")),
    ClusterKey("keepalive_count_max", partial(read_integer, low=1, high=MAX_KEEPALIVE_COUNT_MAX)),
    ClusterKey("mode", read_mode),
    ClusterKey("exec_command", read_exec_command),
    ClusterKey("resolver_command", read_resolver_command),
    ClusterKey("resolve_ttl", partial(read_seconds, zero="no caching")),
    ClusterKey("proxy_command", read_proxy_command, api=LocalCommand()),
    # a cluster that jumps through another connection does not use the
    # defaults' proxy_command (the two are mutually exclusive)
    ClusterKey("jump", defaultable=False, displaces=frozenset({"proxy_command"}), api=ClusterJump()),
    ClusterKey("connections", partial(read_integer, low=1, high=MAX_CONNECTIONS)),
    ClusterKey("max_streams", partial(read_integer, low=1, high=MAX_MAX_STREAMS)),
    ClusterKey("rekey_bytes", read_rekey_bytes),
    ClusterKey("rekey_interval", partial(read_seconds, zero="rekey by bytes only", minimum=MIN_REKEY_INTERVAL)),
    ClusterKey("allow_sha1_signatures", read_boolean),
    *(ClusterKey(key, read_algorithms, render=_as_strings(key)) for key in ALGORITHM_KEYS),
    # a listener is one cluster's own port: never shared through [defaults]
    ClusterKey("socks", read_endpoints, defaultable=False, api=ApiListener(), render=lambda c: list(c.socks)),
    ClusterKey("http", read_endpoints, defaultable=False, api=ApiListener(), render=lambda c: list(c.http)),
    ClusterKey("remote_listeners", read_boolean, defaultable=False, api=RemoteListeners()),
)

_BY_NAME = {row.name: row for row in CLUSTER_SCHEMA}
#: Every cluster key, sorted (as error messages list them).
CLUSTER_KEYS = tuple(sorted(_BY_NAME))
#: The cluster keys that may be given in C{[defaults]}, sorted.
DEFAULTABLE_KEYS = tuple(sorted(row.name for row in CLUSTER_SCHEMA if row.defaultable))


def displaced(data: Mapping[str, Any]) -> set[str]:
    """The C{[defaults]} keys that the cluster table C{data} (of known keys) overrides."""
    result: set[str] = set()
    for k, v in data.items():
        row = _BY_NAME[k]
        result.add(k)
        result |= row.displaces
        if v is True:
            result |= row.displaces_if_true
    return result


def read_settings(values: Values) -> dict[str, Any]:
    """The fields of the keys read on their own (those with a reader) that C{values} sets."""
    return {row.name: row.reader(values, row.name) for row in CLUSTER_SCHEMA if row.reader and row.name in values}


def safe_settings(config: ClusterConfig) -> dict[str, Any]:
    """A cluster's settings for display: no private key, passphrase or token."""
    return dict(row.status(config) for row in CLUSTER_SCHEMA if row.shown)


def api_body_refusal(body: Mapping[str, Any], settings: GatewaySettings) -> tuple[str, str] | None:
    """(key, reason) of the first key of an API C{body} refused as it is sent, or None."""
    for row in CLUSTER_SCHEMA:
        if row.api is not None and row.name in body:
            reason = row.api.body_refusal(body[row.name], getattr(settings, row.api.setting))
            if reason is not None:
                return row.name, reason
    return None


def api_config_refusal(config: ClusterConfig, settings: GatewaySettings) -> tuple[str, str] | None:
    """(key, reason) of the first key of a validated API cluster that is refused, or None."""
    for row in CLUSTER_SCHEMA:
        if row.api is not None:
            reason = row.api.config_refusal(config, getattr(settings, row.api.setting))
            if reason is not None:
                return row.name, reason
    return None


# --- the [gateway] keys --------------------------------------------------------------


@dataclass(frozen=True)
class GatewayKey:
    """One key of the C{[gateway]} table: its reader gives the GatewaySettings field C{name}."""

    name: str
    reader: Reader


GATEWAY_SCHEMA: tuple[GatewayKey, ...] = (
    GatewayKey("handshake_timeout", read_seconds),
    GatewayKey("body_timeout", read_seconds),
    GatewayKey("keepalive_timeout", read_seconds),
    GatewayKey("response_timeout", partial(read_seconds, zero="no limit")),
    GatewayKey("max_clients", partial(read_integer, low=1, high=MAX_MAX_CLIENTS)),
    GatewayKey("drain_timeout", partial(read_seconds, zero="close streams at once")),
    GatewayKey("state_file", read_path),
    GatewayKey("control_token_file", read_path),
    GatewayKey("api_proxy_command", read_boolean),
    GatewayKey("api_file_paths", read_boolean),
    GatewayKey("api_jump", read_boolean),
    GatewayKey("api_remote_listeners", read_boolean),
    GatewayKey("control_max_clients", partial(read_integer, low=1, high=MAX_MAX_CLIENTS)),
    GatewayKey("control_head_timeout", read_seconds),
    GatewayKey("control_body_timeout", read_seconds),
    GatewayKey("cluster_domain", read_domain),
    GatewayKey("name", read_gateway_name),
)
#: Every C{[gateway]} key, sorted (as error messages list them).
GATEWAY_KEYS = tuple(sorted(row.name for row in GATEWAY_SCHEMA))
