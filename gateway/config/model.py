"""
What a validated configuration is: the frozen settings objects and, in one
place, every default and every limit the readers enforce.

Nothing here validates: the readers (L{gateway.config.values},
L{gateway.config.names}, L{gateway.config.keys}) check input against these
limits, and L{gateway.config.schema} says which key is read by which reader.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.conch.ssh import keys

from gateway.addresses import host_port
from gateway.destinations import DEFAULT_CLUSTER_DOMAIN

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# --- defaults and limits ------------------------------------------------------------

DEFAULT_SOCKS_LISTEN = "tcp:1080:interface=127.0.0.1"
DEFAULT_HTTP_LISTEN = "tcp:3128:interface=127.0.0.1"
#: The usual control API endpoint (the demo's; off unless configured).
DEFAULT_CONTROL_LISTEN = "tcp:8765:interface=127.0.0.1"
#: Relative to the twistd working directory (--rundir).
DEFAULT_STATE_FILE = "gateway-clusters.json"
DEFAULT_PROXY_PORT = 22
DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_WINDOW_SIZE = 2 * 1024 * 1024
MIN_WINDOW_SIZE = 32 * 1024
MAX_WINDOW_SIZE = 64 * 1024 * 1024
DEFAULT_KEEPALIVE_INTERVAL = 10.0
DEFAULT_KEEPALIVE_COUNT_MAX = 3
MAX_KEEPALIVE_COUNT_MAX = 100
MODES = ("auto", "direct-tcpip", "exec")
DEFAULT_MODE = "auto"
DEFAULT_EXEC_COMMAND = "nc {host} {port}"
#: Placeholders of exec_command and proxy_command.
PLACEHOLDERS = ("host", "port")
DEFAULT_RESOLVER_COMMAND = "getent ahosts {host}"
#: The one placeholder of resolver_command (the name to resolve).
RESOLVER_PLACEHOLDERS = ("host",)
DEFAULT_RESOLVE_TTL = 60.0
DEFAULT_CONNECTIONS = 1
MAX_CONNECTIONS = 16
DEFAULT_MAX_STREAMS = 1024
MAX_MAX_STREAMS = 1_000_000
DEFAULT_OPEN_TIMEOUT = 15.0
DEFAULT_REKEY_BYTES = 1 << 30
MIN_REKEY_BYTES = 1 << 20
MAX_REKEY_BYTES = 1 << 40
DEFAULT_REKEY_INTERVAL = 3600.0
MIN_REKEY_INTERVAL = 60.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_RESPONSE_TIMEOUT = 120.0
DEFAULT_KEEPALIVE_TIMEOUT = 60.0
DEFAULT_MAX_CLIENTS = 4096
MAX_MAX_CLIENTS = 1_000_000
DEFAULT_DRAIN_TIMEOUT = 10.0
#: The control listener's own limits (a runaway or hostile API client must
#: not take the proxies' descriptors or hold its slots for long).
DEFAULT_CONTROL_MAX_CLIENTS = 64
DEFAULT_CONTROL_HEAD_TIMEOUT = 10.0
DEFAULT_CONTROL_BODY_TIMEOUT = 10.0
#: RFC 1929 (SOCKS5 username/password) carries at most 255 bytes of password.
MAX_TOKEN_BYTES = 255


def default_gateway_name() -> str:
    """
    This host's name, as a gateway name may be written (the first label,
    other characters as C{-}, at most 64): what a fleet's status, metrics
    and logs tell gateways apart by when C{[gateway] name} is not set.
    """
    label = socket.gethostname().split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", label)[:64].strip("-") or "gateway"


class ConfigError(Exception):
    """
    The configuration is invalid.

    C{str(error)} is C{"{source}: {key}: {reason}"}.  The reason never contains
    a private key, passphrase or token.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(source, key, reason)
        self.source = source
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}"


@dataclass(frozen=True)
class ProxyAddress:
    """Where a cluster's proxy node's sshd listens."""

    host: str
    port: int = DEFAULT_PROXY_PORT

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster: how to reach its proxy node and what it may route to."""

    name: str
    aliases: tuple[str, ...]
    proxies: tuple[ProxyAddress, ...]
    user: str
    private_key: keys.Key = field(repr=False)
    known_hosts: str | None
    host_keys: tuple[keys.Key, ...]
    insecure_accept_any_host_key: bool
    networks: tuple[Network, ...]
    hostnames: tuple[str, ...] = ()
    #: CAs trusted to sign the proxy nodes' host certificates.
    host_ca_keys: tuple[keys.Key, ...] = ()
    token: str | None = field(default=None, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    window_size: int = DEFAULT_WINDOW_SIZE
    #: Seconds between C{keepalive@openssh.com} probes; 0 disables them.
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    #: Unanswered probes before the connection is declared dead.
    keepalive_count_max: int = DEFAULT_KEEPALIVE_COUNT_MAX
    #: How streams are opened: "auto", "direct-tcpip" or "exec".
    mode: str = DEFAULT_MODE
    #: Command run on the proxy node in exec mode; a C{str.format} template
    #: with exactly the placeholders C{{host}} and C{{port}}.
    exec_command: str = DEFAULT_EXEC_COMMAND
    #: Command run on the proxy node to resolve a destination name that
    #: matches no C{hostnames} pattern (see L{gateway.cluster.resolver}); a
    #: template with exactly the placeholder C{{host}}; "": names are not
    #: resolved on the proxy node.
    resolver_command: str = DEFAULT_RESOLVER_COMMAND
    #: Seconds a name's resolved addresses are reused; 0: not cached.
    resolve_ttl: float = DEFAULT_RESOLVE_TTL
    #: Command run locally to reach the proxy node (OpenSSH's ProxyCommand);
    #: a template with the optional placeholders C{{host}} and C{{port}}.
    proxy_command: str | None = None
    #: The C{jump} value as written (cluster name or alias, or address).
    jump: str | None = None
    #: The canonical name of the cluster whose connection carries this one.
    jump_cluster: str | None = None
    #: The SSH server this cluster's connection jumps through.
    jump_address: ProxyAddress | None = None
    #: The user on C{jump_address}; None: the cluster's C{user}.
    jump_user: str | None = None
    connections: int = DEFAULT_CONNECTIONS
    max_streams: int = DEFAULT_MAX_STREAMS
    open_timeout: float = DEFAULT_OPEN_TIMEOUT
    rekey_bytes: int = DEFAULT_REKEY_BYTES
    #: Seconds between client-initiated rekeys; 0: by bytes only.
    rekey_interval: float = DEFAULT_REKEY_INTERVAL
    #: Accept and make SHA-1 RSA signatures (C{ssh-rsa}), for proxy nodes too
    #: old for rsa-sha2 (OpenSSH < 7.2).
    allow_sha1_signatures: bool = False
    #: The SSH algorithms offered to this cluster's proxy nodes, in order;
    #: empty: the gateway's defaults (docs/ssh-algorithms.md).
    kex_algorithms: tuple[str, ...] = ()
    ciphers: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    host_key_algorithms: tuple[str, ...] = ()
    #: Endpoint strings of this cluster's own SOCKS and HTTP proxy listeners,
    #: which serve it alone and ask no credentials.
    socks: tuple[str, ...] = ()
    http: tuple[str, ...] = ()
    #: Whether those listeners may be reachable beyond this host: a listener
    #: without credentials is a trust decision, so loopback and unix: only
    #: unless the cluster says so.
    remote_listeners: bool = False

    def names(self) -> tuple[str, ...]:
        """The cluster's name followed by its aliases."""
        return (self.name, *self.aliases)

    def __hash__(self) -> int:
        # keys.Key is unhashable; hash the identifying fields only (equal
        # configs still hash equal, as they share these fields).
        return hash((self.name, self.aliases, self.proxies, self.networks, self.hostnames))


@dataclass(frozen=True)
class ListenConfig:
    """Twisted server endpoint strings of the proxy listeners."""

    socks: tuple[str, ...] = (DEFAULT_SOCKS_LISTEN,)
    http: tuple[str, ...] = (DEFAULT_HTTP_LISTEN,)
    #: The control API (JSON over HTTP); off unless configured.
    control: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatewaySettings:
    """The C{[gateway]} table: limits of the gateway as a whole."""

    #: Seconds a client has to complete its SOCKS handshake or its first
    #: HTTP request head.
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    #: Seconds an HTTP request body may go without a byte arriving.
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    #: Seconds to wait for the upstream's response head once the request has
    #: been sent; 0: no limit (long polls).
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    #: Seconds a kept-alive HTTP client connection may idle between requests
    #: (the next request head must be complete by then).
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    #: Client connections accepted at once, across all listeners.
    max_clients: int = DEFAULT_MAX_CLIENTS
    #: On SIGTERM: seconds open streams may take to finish.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    #: Where clusters registered through the control API are kept (holds keys: 0600).
    state_file: str = DEFAULT_STATE_FILE
    #: File with the control API's bearer token (else env GATEWAY_CONTROL_TOKEN).
    control_token_file: str | None = None
    #: Whether clusters registered through the API may set proxy_command (a
    #: command the gateway runs locally): off, so the API cannot run commands.
    api_proxy_command: bool = False
    #: Whether API bodies may name files on the gateway's host (key_file,
    #: passphrase_file, known_hosts, token_file): off, so an API client cannot
    #: use a key (or probe a file) that only the gateway's user can read.
    api_file_paths: bool = False
    #: Whether API bodies may set jump to another cluster: off, so an API
    #: client cannot make another cluster's proxy node connect anywhere.
    api_jump: bool = False
    #: Whether API bodies may set remote_listeners: off, so an API client
    #: cannot open listeners without credentials beyond this host.
    api_remote_listeners: bool = False
    #: Connections the control listener accepts at once (its own count).
    control_max_clients: int = DEFAULT_CONTROL_MAX_CLIENTS
    #: Seconds a control API client has to send a whole request head.
    control_head_timeout: float = DEFAULT_CONTROL_HEAD_TIMEOUT
    #: Seconds a control API request body may go without a byte.
    control_body_timeout: float = DEFAULT_CONTROL_BODY_TIMEOUT
    #: The suffix of cluster-qualified names (C{HOST.CLUSTER.gw.internal}).
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    #: This gateway's identity in status, metrics and logs (one of a fleet).
    name: str = field(default_factory=default_gateway_name)


#: [store] timeout: seconds one etcd member has to answer a call before the next is asked.
DEFAULT_STORE_TIMEOUT = 2.0
#: [store] probe_interval: seconds between the checks that etcd answers and the watch keeps up.
DEFAULT_STORE_PROBE_INTERVAL = 1.0


@dataclass(frozen=True)
class StoreConfig:
    """The C{[store]} table: where API-registered clusters are kept, and how (L{gateway.config.store})."""

    #: "file" (the 0600 state file, [gateway] state_file) or "etcd".
    backend: str = "file"
    #: 32 bytes as 64 hex digits (0600): the store's keys, passphrases and
    #: tokens are sealed with it (AES-GCM); None: kept in plaintext.
    secret_key_file: str | None = None
    #: etcd's client URLs, tried in turn.
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    #: Every key of this gateway fleet's registry starts with it.
    prefix: str = "/gateway/"
    timeout: float = DEFAULT_STORE_TIMEOUT
    probe_interval: float = DEFAULT_STORE_PROBE_INTERVAL
    #: TLS: the CA of the members' certificates; a client certificate and its key.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: etcd authentication (both or neither); the password file is 0600.
    user: str | None = None
    password_file: str | None = None
    #: The local cache of the last registry seen (0600); None: next to [gateway] state_file.
    cache_file: str | None = None


@dataclass(frozen=True)
class GatewayConfig:
    """The whole validated configuration."""

    listen: ListenConfig
    clusters: Mapping[str, ClusterConfig]
    source: str
    settings: GatewaySettings = field(default_factory=GatewaySettings)
    store: StoreConfig = field(default_factory=StoreConfig)
