"""
The gateway's configuration: a TOML file turned into validated, immutable
settings.

L{load_config} reads a file, L{parse_config} validates an already-decoded
mapping, and L{parse_cluster} validates one cluster's table (it is also what
validates a cluster given to the REST API).  Every problem is reported as a
L{ConfigError} naming the file, the key (C{clusters.a.networks[1]}) and the
reason.  Secrets (private keys, passphrases, tokens) never appear in an error
message or in the C{repr} of the resulting objects.

The package, one concern a module:

 - L{model}: the frozen settings objects and every default and limit;
 - L{schema}: the one key table (what each key is, who may set it, how
   status shows it);
 - L{values}, L{names}, L{keys}: the readers of values, of names and
   addresses, of private and host keys; L{secrets}: secret files;
 - L{cluster}: one cluster's table; L{loader}: the whole file.

See C{docs/configuration.md} for the reference of every key.
"""

from gateway.config.cluster import check_jump_cycles, jump_cycle, parse_cluster
from gateway.config.loader import load_config, parse_config
from gateway.config.model import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONTROL_LISTEN,
    DEFAULT_EXEC_COMMAND,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_REKEY_BYTES,
    DEFAULT_SOCKS_LISTEN,
    DEFAULT_WINDOW_SIZE,
    ClusterConfig,
    ConfigError,
    GatewayConfig,
    GatewaySettings,
    ListenConfig,
    ProxyAddress,
    StoreConfig,
)
from gateway.config.names import NAME_RULE, check_name, is_valid_name, parse_proxy_address
from gateway.config.values import parse_size

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_CONTROL_LISTEN",
    "DEFAULT_EXEC_COMMAND",
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_REKEY_BYTES",
    "DEFAULT_SOCKS_LISTEN",
    "DEFAULT_WINDOW_SIZE",
    "NAME_RULE",
    "ClusterConfig",
    "ConfigError",
    "GatewayConfig",
    "GatewaySettings",
    "ListenConfig",
    "StoreConfig",
    "ProxyAddress",
    "check_jump_cycles",
    "check_name",
    "is_valid_name",
    "jump_cycle",
    "load_config",
    "parse_cluster",
    "parse_config",
    "parse_proxy_address",
    "parse_size",
]
