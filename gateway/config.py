"""
The gateway's configuration: a TOML file turned into validated, immutable
settings.

L{load_config} reads a file, L{parse_config} validates an already-decoded
mapping, and L{parse_cluster} validates one cluster's table (it is also what
validates a cluster given to the REST API).  Every problem is reported as a
L{ConfigError} naming the file, the key (C{clusters.a.networks[1]}) and the
reason.  Secrets (private keys, passphrases, tokens) never appear in an error
message or in the C{repr} of the resulting objects.

See C{docs/configuration.md} for the reference of every key.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

from twisted.conch.ssh import keys

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
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
    "ProxyAddress",
    "check_jump_cycles",
    "is_valid_name",
    "jump_cycle",
    "load_config",
    "parse_cluster",
    "parse_config",
    "parse_proxy_address",
    "parse_size",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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
DEFAULT_EXEC_COMMAND = "nc {host} {port}"
#: Placeholders of exec_command and proxy_command.
PLACEHOLDERS = ("host", "port")
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
#: Key, token and passphrase files larger than this are refused (a typo such
#: as /dev/zero must not hang the start).
MAX_FILE_BYTES = 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_PATTERN_RE = re.compile(r"[a-z0-9._*?\[\]!-]+")
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")

_TOP_KEYS = ("clusters", "defaults", "gateway", "listen")
_LISTEN_KEYS = ("control", "http", "socks")
_GATEWAY_KEYS = (
    "api_file_paths",
    "api_jump",
    "api_proxy_command",
    "body_timeout",
    "control_body_timeout",
    "control_head_timeout",
    "control_max_clients",
    "control_token_file",
    "drain_timeout",
    "handshake_timeout",
    "keepalive_timeout",
    "max_clients",
    "response_timeout",
    "state_file",
)
_CLUSTER_KEYS = (
    "aliases",
    "allow_sha1_signatures",
    "connect_timeout",
    "connections",
    "exec_command",
    "host_keys",
    "hostnames",
    "insecure_accept_any_host_key",
    "jump",
    "keepalive_count_max",
    "keepalive_interval",
    "key",
    "key_file",
    "known_hosts",
    "max_streams",
    "mode",
    "networks",
    "open_timeout",
    "passphrase",
    "passphrase_file",
    "proxies",
    "proxy_command",
    "rekey_bytes",
    "rekey_interval",
    "token",
    "token_file",
    "user",
    "window_size",
)
#: Cluster keys that may be given in C{[defaults]}.  The others describe one
#: cluster (its names, its proxy node, its networks, its host keys, its token,
#: the connection it jumps through) and sharing them would be a mistake.
DEFAULTABLE_KEYS = (
    "allow_sha1_signatures",
    "connect_timeout",
    "connections",
    "exec_command",
    "insecure_accept_any_host_key",
    "keepalive_count_max",
    "keepalive_interval",
    "key",
    "key_file",
    "known_hosts",
    "max_streams",
    "mode",
    "open_timeout",
    "passphrase",
    "passphrase_file",
    "proxy_command",
    "rekey_bytes",
    "rekey_interval",
    "user",
    "window_size",
)
_KEY_GROUP = frozenset({"key", "key_file", "passphrase", "passphrase_file"})
_PASSPHRASE_GROUP = frozenset({"passphrase", "passphrase_file"})
_HOST_KEY_GROUP = frozenset({"known_hosts", "host_keys", "insecure_accept_any_host_key"})
#: Which C{[defaults]} keys a key set in a cluster displaces, besides itself:
#: a cluster's C{key} replaces the defaults' C{key_file} (and its passphrase)
#: instead of clashing with it, its C{host_keys} replace C{known_hosts}, ...
_DISPLACES = {
    "key": _KEY_GROUP,
    "key_file": _KEY_GROUP,
    "passphrase": _PASSPHRASE_GROUP,
    "passphrase_file": _PASSPHRASE_GROUP,
    "known_hosts": _HOST_KEY_GROUP,
    "host_keys": _HOST_KEY_GROUP,
    # a cluster that jumps through another connection does not use the
    # defaults' proxy_command (the two are mutually exclusive)
    "jump": frozenset({"proxy_command"}),
}


def _displaced(data: Mapping[str, Any]) -> set[str]:
    """The C{[defaults]} keys that the cluster table C{data} overrides."""
    result: set[str] = set()
    for k, v in data.items():
        result.add(k)
        result |= _DISPLACES.get(k, frozenset())
        if k == "insecure_accept_any_host_key" and v is True:
            result |= _HOST_KEY_GROUP
    return result


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
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


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
    token: str | None = field(default=None, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    window_size: int = DEFAULT_WINDOW_SIZE
    #: Seconds between C{keepalive@openssh.com} probes; 0 disables them.
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    #: Unanswered probes before the connection is declared dead.
    keepalive_count_max: int = DEFAULT_KEEPALIVE_COUNT_MAX
    #: How streams are opened: "auto", "direct-tcpip" or "exec".
    mode: str = "auto"
    #: Command run on the proxy node in exec mode; a C{str.format} template
    #: with exactly the placeholders C{{host}} and C{{port}}.
    exec_command: str = DEFAULT_EXEC_COMMAND
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
    #: Connections the control listener accepts at once (its own count).
    control_max_clients: int = DEFAULT_CONTROL_MAX_CLIENTS
    #: Seconds a control API client has to send a whole request head.
    control_head_timeout: float = DEFAULT_CONTROL_HEAD_TIMEOUT
    #: Seconds a control API request body may go without a byte.
    control_body_timeout: float = DEFAULT_CONTROL_BODY_TIMEOUT


@dataclass(frozen=True)
class GatewayConfig:
    """The whole validated configuration."""

    listen: ListenConfig
    clusters: Mapping[str, ClusterConfig]
    source: str
    settings: GatewaySettings = field(default_factory=GatewaySettings)


# --- helpers -----------------------------------------------------------------


def _key_part(name: str) -> str:
    """Quote C{name} the way TOML would need it in a dotted key."""
    if _BARE_KEY_RE.fullmatch(name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{_key_part(name)}" if prefix else _key_part(name)


def _show(value: str, limit: int = 80) -> str:
    """repr() of a (non-secret) user string, shortened."""
    if len(value) > limit:
        return repr(value[:limit]) + "..."
    return repr(value)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (datetime, date, time)):
        return "date/time"
    return type(value).__name__


class _Values:
    """
    The effective settings of one cluster: each key's value and the dotted key
    it came from (C{clusters.a.user} or C{defaults.user}).
    """

    def __init__(self, source: str, base_dir: str | None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.items: dict[str, tuple[Any, str]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def value(self, name: str) -> Any:
        return self.items[name][0]

    def key(self, name: str) -> str:
        return self.items[name][1]

    def error(self, name_or_key: str, reason: str) -> ConfigError:
        key = self.items[name_or_key][1] if name_or_key in self.items else name_or_key
        return ConfigError(self.source, key, reason)

    def path(self, name: str) -> str:
        """The string value of C{name} as a file path, resolved."""
        return _resolve(self.string(name), self.base_dir)

    def string(self, name: str, *, nonempty: bool = True) -> str:
        value = self.value(name)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_type_name(value)}")
        if nonempty and not value:
            raise self.error(name, "must not be empty")
        return value

    def boolean(self, name: str) -> bool:
        value = self.value(name)
        if not isinstance(value, bool):
            raise self.error(name, f"expected a boolean (true or false), got {_type_name(value)}")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.value(name)
        if not isinstance(value, (list, tuple)):
            raise self.error(name, f"expected an array of strings, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(
                    self.source,
                    f"{self.key(name)}[{i}]",
                    f"expected a string, got {_type_name(item)}",
                )
        return list(value)


def _resolve(path: str, base_dir: str | None) -> str:
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


def _read(values: _Values, name: str, what: str, size: int) -> bytes:
    """Read up to C{size} bytes of the file named by C{name}'s value."""
    path = values.path(name)
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise values.error(name, f"cannot read {what} {path!r}: {reason}") from None


def _read_secret_file(values: _Values, name: str, what: str) -> bytes:
    """
    Read a file holding a secret (key, passphrase, token).

    Like OpenSSH with private keys, refuse a file that other users can read:
    the secret is already exposed, and carrying on would hide that.
    """
    try:
        mode = os.stat(values.path(name)).st_mode
    except OSError:
        mode = 0  # _read reports the missing/unreadable file with its reason
    if stat.S_ISREG(mode) and mode & 0o077:
        raise values.error(
            name,
            f"{what} {values.path(name)!r} is accessible by other users "
            f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it",
        )
    data = _read(values, name, what, MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise values.error(name, f"{what} {values.path(name)!r} is larger than {MAX_FILE_BYTES} bytes")
    return data


# --- proxy addresses -----------------------------------------------------------


def _valid_hostname(host: str) -> bool:
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL_RE.fullmatch(label) for label in name.split("."))


def parse_proxy_address(text: str) -> ProxyAddress:
    """
    Parse C{"host"}, C{"host:port"}, C{"[v6]:port"}, C{"[v6]"} or a bare IPv6
    address (port 22 unless given).

    @raise ValueError: with a reason that may be shown to the operator.
    """
    port_text: str | None = None
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]*)\](?::(.*))?", text)
        if m is None:
            raise ValueError(f"{_show(text)} is not a valid address (expected host, host:port or [ipv6]:port)")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(host)} in brackets is not an IPv6 address") from None
    elif text.count(":") >= 2:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"{_show(text)} is not a valid address (write IPv6 addresses with a port as [address]:port)"
            ) from None
        host = text
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not _valid_hostname(host):
            raise ValueError(f"{_show(host)} is not a valid host name or address")
    port = DEFAULT_PROXY_PORT
    if port_text is not None:
        if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port {_show(port_text)} is not a number between 1 and 65535")
        port = int(port_text)
    return ProxyAddress(host, port)


# --- private keys ----------------------------------------------------------------

# _ANY: malformed key data makes the parsers raise nearly anything (struct.error,
# IndexError, ValueError, ...), and some of those messages quote the data, so
# every failure is caught and replaced by a reason of our own, "from None".

_KeyCache = dict[tuple[bytes, bytes | None], keys.Key]


class _KeyLoadError(Exception):
    """Loading failed; C{which} is "key" (the key source) or "passphrase"."""

    def __init__(self, which: str, reason: str) -> None:
        super().__init__(which, reason)
        self.which = which
        self.reason = reason


def _load_private_key(data: bytes, passphrase: bytes | None) -> keys.Key:
    """
    Load a private key (OpenSSH, PEM or PKCS#8), decrypting it with
    C{passphrase} when it is encrypted.  Never puts key data in its errors.
    """
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"-----BEGIN PRIVATE KEY-----" in data:
        key = _load_pkcs8(data, passphrase)
    else:
        try:
            key = keys.Key.fromString(data)
        except keys.EncryptedKeyError:
            if passphrase is None:
                raise _KeyLoadError("key", "key is encrypted: set passphrase") from None
            try:
                key = keys.Key.fromString(data, passphrase=passphrase)
            except Exception:  # noqa: BLE001 - see _ANY
                raise _KeyLoadError("passphrase", "wrong passphrase (cannot decrypt the key)") from None
        except Exception:  # noqa: BLE001 - see _ANY
            raise _KeyLoadError("key", "not a valid private key (expected an OpenSSH or PEM private key)") from None
    try:
        public = key.isPublic()
        key.type()
    except Exception:  # noqa: BLE001 - see _ANY
        raise _KeyLoadError("key", "unsupported key type") from None
    if public:
        raise _KeyLoadError("key", "this is a public key: a private key is needed")
    return key


def _load_pkcs8(data: bytes, passphrase: bytes | None) -> keys.Key:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and passphrase is None:
        raise _KeyLoadError("key", "key is encrypted: set passphrase")
    try:
        obj = load_pem_private_key(data, passphrase if encrypted else None)
    except Exception:  # noqa: BLE001 - see _ANY
        if encrypted:
            raise _KeyLoadError("passphrase", "wrong passphrase (cannot decrypt the key)") from None
        raise _KeyLoadError("key", "not a valid private key (malformed PKCS#8 data)") from None
    try:
        return keys.Key(obj)
    except Exception:  # noqa: BLE001 - see _ANY
        raise _KeyLoadError("key", "unsupported key type") from None


def _private_key(values: _Values, cache: _KeyCache | None) -> keys.Key | None:
    """The private key from C{key_file} / C{key} (+ passphrase), or None if unset."""
    if "key_file" in values and "key" in values:
        raise values.error("key", "key and key_file are mutually exclusive: set only one")
    if "passphrase" in values and "passphrase_file" in values:
        raise values.error("passphrase_file", "passphrase and passphrase_file are mutually exclusive: set only one")
    passphrase: bytes | None = None
    if "passphrase" in values:
        passphrase = values.string("passphrase").encode("utf-8")
    elif "passphrase_file" in values:
        raw = _read_secret_file(values, "passphrase_file", "passphrase file")
        passphrase = raw.rstrip(b"\r\n")
        if not passphrase:
            raise values.error("passphrase_file", f"passphrase file {values.path('passphrase_file')!r} is empty")
    if "key_file" in values:
        source_name = "key_file"
        data = _read_secret_file(values, "key_file", "key file")
    elif "key" in values:
        source_name = "key"
        data = values.string("key").encode("utf-8")
    else:
        if passphrase is not None:
            which = "passphrase" if "passphrase" in values else "passphrase_file"
            raise values.error(which, "passphrase given but no key_file or key")
        return None
    cache_key = (data, passphrase)
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    try:
        key = _load_private_key(data, passphrase)
    except _KeyLoadError as e:
        if e.which == "passphrase":
            which = "passphrase" if "passphrase" in values else "passphrase_file"
            raise values.error(which, e.reason) from None
        where = f"key file {values.path('key_file')!r}: " if source_name == "key_file" else ""
        raise values.error(source_name, where + e.reason) from None
    if cache is not None:
        cache[cache_key] = key
    return key


# --- host keys -------------------------------------------------------------------


def _host_key_line(line: str) -> keys.Key:
    """Parse C{"TYPE BASE64 [COMMENT]"}; raise ValueError with a reason."""
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("expected 'TYPE BASE64 [COMMENT]' (e.g. 'ssh-ed25519 AAAA...')")
    key_type, blob = fields[0], fields[1]
    if not re.fullmatch(r"[A-Za-z0-9@._-]+", key_type):
        raise ValueError("expected 'TYPE BASE64 [COMMENT]' (e.g. 'ssh-ed25519 AAAA...')")
    try:
        key = keys.Key.fromString(f"{key_type} {blob}".encode("ascii"), type="public_openssh")
        actual = key.sshType().decode("ascii")
    except Exception:  # noqa: BLE001 - see _ANY
        raise ValueError(f"not a valid {key_type} public key (bad base64 or key data)") from None
    if actual != key_type:
        raise ValueError(f"key type {key_type!r} does not match the key data ({actual!r})")
    return key


def _host_key_source(values: _Values) -> tuple[str | None, tuple[keys.Key, ...], bool, bool]:
    """(known_hosts, host_keys, insecure, any source given)"""
    insecure = values.boolean("insecure_accept_any_host_key") if "insecure_accept_any_host_key" in values else False
    if "known_hosts" in values and "host_keys" in values:
        raise values.error("host_keys", "known_hosts and host_keys are mutually exclusive: set only one")
    if insecure and ("known_hosts" in values or "host_keys" in values):
        other = "known_hosts" if "known_hosts" in values else "host_keys"
        raise values.error(
            "insecure_accept_any_host_key", f"insecure_accept_any_host_key = true cannot be combined with {other}"
        )
    known_hosts: str | None = None
    host_keys: list[keys.Key] = []
    if "known_hosts" in values:
        known_hosts = values.path("known_hosts")
        # Only check that it can be read: it is read again at each connect.
        _read(values, "known_hosts", "known_hosts file", 1)
    if "host_keys" in values:
        lines = values.strings("host_keys")
        if not lines:
            raise values.error("host_keys", "must list at least one key")
        for i, line in enumerate(lines):
            try:
                host_keys.append(_host_key_line(line))
            except ValueError as e:
                raise ConfigError(values.source, f"{values.key('host_keys')}[{i}]", str(e)) from None
    given = known_hosts is not None or bool(host_keys) or insecure
    return known_hosts, tuple(host_keys), insecure, given


# --- simple values -------------------------------------------------------------------


def _seconds(values: _Values, name: str, *, zero: str | None = None, minimum: float = 0.0) -> float:
    """
    A duration in seconds: a finite number > 0 (and >= C{minimum}), or 0 too
    if C{zero} says what 0 means.
    """
    value = values.value(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise values.error(name, f"expected a number of seconds, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if zero is not None and number == 0:
        return 0.0
    if not math.isfinite(number) or number <= 0 or number < minimum:
        if zero is None:
            raise values.error(name, f"must be a positive number of seconds, got {value}")
        if minimum:
            raise values.error(name, f"must be 0 ({zero}) or at least {minimum:g} seconds, got {value}")
        raise values.error(name, f"must be 0 ({zero}) or a positive number of seconds, got {value}")
    return number


def _integer(values: _Values, name: str, low: int, high: int) -> int:
    value = values.value(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise values.error(name, f"expected an integer, got {_type_name(value)}")
    if not low <= value <= high:
        raise values.error(name, f"must be between {low} and {high}, got {value}")
    return value


def _timeout(values: _Values) -> float:
    return _seconds(values, "connect_timeout")


def _window_size(values: _Values) -> int:
    value = values.value("window_size")
    if isinstance(value, bool) or not isinstance(value, int):
        raise values.error("window_size", f"expected an integer (bytes), got {_type_name(value)}")
    if not MIN_WINDOW_SIZE <= value <= MAX_WINDOW_SIZE:
        raise values.error(
            "window_size", f"must be between {MIN_WINDOW_SIZE} (32 KiB) and {MAX_WINDOW_SIZE} (64 MiB), got {value}"
        )
    return value


def _valid_user(user: str) -> bool:
    return bool(user) and not any(c.isspace() or not c.isprintable() or c in "@:" for c in user)


def _user(values: _Values) -> str:
    user = values.string("user")
    if not _valid_user(user):
        raise values.error("user", f"{_show(user)} is not a valid user name")
    return user


def parse_size(text: str) -> int:
    """
    Parse a size in bytes written like OpenSSH's RekeyLimit: digits with an
    optional suffix K, M, G or T (powers of 1024, either case): C{"512M"}.

    @raise ValueError: with a reason that may be shown to the operator.
    """
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{_show(text)} is not a size: write a whole number of bytes with an optional suffix "
            'K, M, G or T (powers of 1024), e.g. "512M"'
        )
    digits = m.group(1).lstrip("0") or "0"
    if len(digits) > 20:  # far beyond any limit; spares int() a huge string
        return MAX_REKEY_BYTES * 1024
    return int(digits) * _SIZE_UNITS[m.group(2).upper()]


def _rekey_bytes(values: _Values, name: str) -> int:
    value = values.value(name)
    if isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError as e:
            raise values.error(name, str(e)) from None
        shown = f"{_show(value)} ({size} bytes)"
    elif isinstance(value, bool) or not isinstance(value, int):
        raise values.error(name, f'expected an integer (bytes) or a size string such as "1G", got {_type_name(value)}')
    else:
        size, shown = value, str(value)
    if not MIN_REKEY_BYTES <= size <= MAX_REKEY_BYTES:
        raise values.error(
            name, f"must be between {MIN_REKEY_BYTES} (1M) and {MAX_REKEY_BYTES} (1T) bytes, got {shown}"
        )
    return size


def _mode(values: _Values, name: str) -> str:
    mode = values.string(name, nonempty=False)
    if mode not in MODES:
        raise values.error(name, f"unknown mode {_show(mode)} (expected one of: {', '.join(MODES)})")
    return mode


def _check_template(values: _Values, name: str, text: str, required: tuple[str, ...]) -> str:
    """
    Check a command template: C{{host}} and C{{port}} are the only
    placeholders, C{{{} and C{}}} literal braces; C{required} must be used.
    What passes is safe for C{text.format(host=..., port=...)}.
    """
    hint = "only {host} and {port} are replaced; write {{ and }} for literal braces"
    found: set[str] = set()
    i = 0
    while i < len(text):
        c = text[i]
        if c in "{}" and text[i + 1 : i + 2] == c:
            i += 2
        elif c == "}":
            raise values.error(name, f"unmatched '}}' at character {i + 1} of {_show(text)} ({hint})")
        elif c == "{":
            ends = [j for j in (text.find("{", i + 1), text.find("}", i + 1)) if j != -1]
            end = min(ends, default=-1)
            if end == -1 or text[end] == "{":
                raise values.error(name, f"unmatched '{{' at character {i + 1} of {_show(text)} ({hint})")
            placeholder = text[i + 1 : end]
            if placeholder not in PLACEHOLDERS:
                raise values.error(name, f"unknown placeholder {_show('{' + placeholder + '}')} ({hint})")
            found.add(placeholder)
            i = end + 1
        else:
            i += 1
    for placeholder in required:
        if placeholder not in found:
            raise values.error(name, f"{_show(text)} lacks the {{{placeholder}}} placeholder")
    return text


def _exec_command(values: _Values, name: str) -> str:
    text = values.string(name)
    if not text.strip():
        raise values.error(name, "must not be empty")
    return _check_template(values, name, text, PLACEHOLDERS)


def _proxy_command(values: _Values, name: str) -> str | None:
    text = values.string(name, nonempty=False)
    if not text.strip():
        raise values.error(name, 'must not be empty (write "none" for no proxy command)')
    if text == "none":
        return None
    return _check_template(values, name, text, ())


def _jump(
    values: _Values, name: str, aliases: list[str], known_clusters: Mapping[str, str] | None
) -> tuple[str | None, ProxyAddress | None, str | None]:
    """(jump_cluster, jump_address, jump_user) of the C{jump} value."""
    text = values.string("jump")
    if text == name or text in aliases:
        raise values.error("jump", f"cluster {name!r} cannot jump through itself")
    if known_clusters is not None:
        target = known_clusters.get(text)
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
    elif not _valid_user(user):
        raise values.error("jump", f"{_show(user)} in {_show(text)} is not a valid user name")
    try:
        address = parse_proxy_address(host)
    except ValueError as e:
        raise values.error(
            "jump", f"{_show(text)} is neither a cluster name or alias nor a [user@]host[:port] address: {e}"
        ) from None
    return None, address, user


#: The cluster keys that are one value each, checked on their own (also in
#: C{[defaults]}): key -> parser, whose result is the ClusterConfig field.
_SETTINGS: dict[str, Callable[[_Values, str], Any]] = {
    "connect_timeout": lambda v, n: _timeout(v),
    "window_size": lambda v, n: _window_size(v),
    "keepalive_interval": lambda v, n: _seconds(v, n, zero="no keepalive"),
    "keepalive_count_max": lambda v, n: _integer(v, n, 1, MAX_KEEPALIVE_COUNT_MAX),
    "mode": _mode,
    "exec_command": _exec_command,
    "proxy_command": _proxy_command,
    "connections": lambda v, n: _integer(v, n, 1, MAX_CONNECTIONS),
    "max_streams": lambda v, n: _integer(v, n, 1, MAX_MAX_STREAMS),
    "open_timeout": lambda v, n: _seconds(v, n),
    "rekey_bytes": _rekey_bytes,
    "rekey_interval": lambda v, n: _seconds(v, n, zero="rekey by bytes only", minimum=MIN_REKEY_INTERVAL),
    "allow_sha1_signatures": lambda v, n: v.boolean(n),
}


def _parse_network(text: str) -> Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{_show(text)} is not a valid network ({e})") from None
        raise ValueError(f"{_show(text)} has host bits set (did you mean {loose}?)") from None
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
        raise ValueError(f"{_show(text)} is an IPv4-mapped IPv6 network: write it as an IPv4 network")
    return net


def _parse_pattern(text: str) -> str:
    pattern = text.lower().removesuffix(".")
    if not pattern or not _PATTERN_RE.fullmatch(pattern):
        raise ValueError(
            f"{_show(text)} is not a valid host name pattern (letters, digits, '.', '-', '_' and the globs * ? [...])"
        )
    try:
        ipaddress.ip_address(pattern)
    except ValueError:
        return pattern
    raise ValueError(f"{_show(text)} is an IP address: list addresses in networks (e.g. {pattern}/32)")


#: What is wrong with a name that L{is_valid_name} refuses.
NAME_RULE = "use 1 to 64 characters of A-Z a-z 0-9 . _ - (not . or ..)"


def is_valid_name(name: str) -> bool:
    """
    Whether C{name} may name a cluster or an alias (in the file, in an API
    body and in the API's URL path).  C{.} and C{..} are refused: they are
    path segments, not names, in the API's URLs.
    """
    return bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


def _check_name(name: object, source: str, key: str, what: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(source, key, f"expected a string, got {_type_name(name)}")
    if not is_valid_name(name):
        raise ConfigError(source, key, f"{what} {_show(name)} is invalid: {NAME_RULE}")
    return name


def _check_token(token: str, values: _Values, name: str) -> str:
    if not token:
        raise values.error(name, "the token must not be empty (remove it to disable authentication)")
    if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise values.error(name, f"the token is longer than {MAX_TOKEN_BYTES} bytes (the SOCKS5 password limit)")
    return token


def _token(values: _Values) -> str | None:
    if "token" in values and "token_file" in values:
        raise values.error("token_file", "token and token_file are mutually exclusive: set only one")
    if "token" in values:
        return _check_token(values.string("token", nonempty=False), values, "token")
    if "token_file" in values:
        raw = _read_secret_file(values, "token_file", "token file")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise values.error("token_file", f"token file {values.path('token_file')!r} is not UTF-8 text") from None
        if not text:
            raise values.error("token_file", f"token file {values.path('token_file')!r} is empty")
        return _check_token(text, values, "token_file")
    return None


def _unknown(source: str, key: str, name: str, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        return ConfigError(source, key, f"unknown key (did you mean {close[0]}?)")
    return ConfigError(source, key, f"unknown key (expected one of: {', '.join(allowed)})")


def _table(value: object, source: str, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(source, key, f"expected a table, got {_type_name(value)}")
    return value


# --- clusters ----------------------------------------------------------------------------


def _check_defaults(defaults: Mapping[str, Any], source: str, base_dir: str | None, cache: _KeyCache | None) -> None:
    """Validate C{[defaults]} on its own, so mistakes show even with no cluster."""
    for k in defaults:
        if k not in _CLUSTER_KEYS:
            raise _unknown(source, _join("defaults", k), k, DEFAULTABLE_KEYS)
        if k not in DEFAULTABLE_KEYS:
            raise ConfigError(source, _join("defaults", k), f"{k} cannot be set in [defaults]: set it in each cluster")
    values = _Values(source, base_dir)
    for k, v in defaults.items():
        values.items[k] = (v, _join("defaults", k))
    if "user" in values:
        _user(values)
    for k, parse in _SETTINGS.items():
        if k in values:
            parse(values, k)
    _host_key_source(values)
    _private_key(values, cache)


def parse_cluster(
    name: str,
    data: Mapping[str, Any],
    source: str,
    key_prefix: str,
    base_dir: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    *,
    key_cache: _KeyCache | None = None,
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
    _check_name(name, source, key_prefix, "cluster name")
    data = _table(data, source, key_prefix)
    for k in data:
        if k not in _CLUSTER_KEYS:
            raise _unknown(source, _join(key_prefix, k), k, _CLUSTER_KEYS)
    values = _Values(source, base_dir)
    if defaults:
        for k in defaults:
            if k not in DEFAULTABLE_KEYS:
                raise ConfigError(
                    source, _join("defaults", k), f"{k} cannot be set in [defaults]: set it in each cluster"
                )
        displaced = _displaced(data)
        for k, v in defaults.items():
            if k not in displaced:
                values.items[k] = (v, _join("defaults", k))
    for k, v in data.items():
        values.items[k] = (v, _join(key_prefix, k))

    aliases: list[str] = []
    if "aliases" in values:
        for i, alias in enumerate(values.strings("aliases")):
            key = f"{values.key('aliases')}[{i}]"
            _check_name(alias, source, key, "alias")
            if alias == name or alias in aliases:
                raise ConfigError(source, key, f"alias {alias!r} is listed twice (or is the cluster's own name)")
            aliases.append(alias)

    if "proxies" not in values:
        raise values.error(_join(key_prefix, "proxies"), "missing: list the proxy node's address(es)")
    proxies: list[ProxyAddress] = []
    texts = values.strings("proxies")
    if not texts:
        raise values.error("proxies", "must list at least one address")
    for i, text in enumerate(texts):
        key = f"{values.key('proxies')}[{i}]"
        try:
            proxy = parse_proxy_address(text)
        except ValueError as e:
            raise ConfigError(source, key, str(e)) from None
        if proxy in proxies:
            raise ConfigError(source, key, f"{proxy} is listed twice")
        proxies.append(proxy)

    if "user" not in values:
        raise values.error(_join(key_prefix, "user"), "missing: set user here or in [defaults]")
    user = _user(values)

    private_key = _private_key(values, key_cache)
    if private_key is None:
        raise values.error(
            _join(key_prefix, "key_file"), "missing private key: set key_file or key here or in [defaults]"
        )

    known_hosts, host_keys, insecure, given = _host_key_source(values)
    if not given:
        raise values.error(
            _join(key_prefix, "known_hosts"),
            "missing host key source: set known_hosts or host_keys (or insecure_accept_any_host_key = true)",
        )

    networks: list[Network] = []
    if "networks" in values:
        for i, text in enumerate(values.strings("networks")):
            try:
                networks.append(_parse_network(text))
            except ValueError as e:
                raise ConfigError(source, f"{values.key('networks')}[{i}]", str(e)) from None

    hostnames: list[str] = []
    if "hostnames" in values:
        for i, text in enumerate(values.strings("hostnames")):
            try:
                pattern = _parse_pattern(text)
            except ValueError as e:
                raise ConfigError(source, f"{values.key('hostnames')}[{i}]", str(e)) from None
            if pattern not in hostnames:
                hostnames.append(pattern)

    if not networks and not hostnames:
        raise values.error(_join(key_prefix, "networks"), "at least one network is needed (unless hostnames is set)")

    token = _token(values)
    settings = {k: parse(values, k) for k, parse in _SETTINGS.items() if k in values}

    jump: str | None = None
    jump_cluster: str | None = None
    jump_address: ProxyAddress | None = None
    jump_user: str | None = None
    if "jump" in values:
        jump = values.string("jump")
        if settings.get("proxy_command") is not None:
            raise values.error("jump", "proxy_command and jump are mutually exclusive: set only one")
        jump_cluster, jump_address, jump_user = _jump(values, name, aliases, known_clusters)

    return ClusterConfig(
        name=name,
        aliases=tuple(aliases),
        proxies=tuple(proxies),
        user=user,
        private_key=private_key,
        known_hosts=known_hosts,
        host_keys=host_keys,
        insecure_accept_any_host_key=insecure,
        networks=tuple(networks),
        hostnames=tuple(hostnames),
        token=token,
        jump=jump,
        jump_cluster=jump_cluster,
        jump_address=jump_address,
        jump_user=jump_user,
        **settings,
    )


# --- listen ----------------------------------------------------------------------------


class _NoReactor:
    """Stands in for the reactor while endpoint strings are only parsed."""


def _check_endpoint(description: str) -> str | None:
    """A reason why C{description} is not a server endpoint, or None."""
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(_NoReactor(), description)
    except Exception as e:  # noqa: BLE001 - plugins raise anything
        return f"{e.__class__.__name__}: {e}"
    return None


def _parse_listen(data: Mapping[str, Any], source: str) -> ListenConfig:
    for k in data:
        if k not in _LISTEN_KEYS:
            raise _unknown(source, _join("listen", k), k, _LISTEN_KEYS)
    result: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    defaults = {
        "socks": (DEFAULT_SOCKS_LISTEN,),
        "http": (DEFAULT_HTTP_LISTEN,),
        "control": (),
    }
    for k in ("socks", "http", "control"):
        key = _join("listen", k)
        if k not in data:
            result[k] = defaults[k]
            continue
        value = data[k]
        if isinstance(value, str):
            items = [value] if value else []
            keys_ = [key] * len(items)
        elif isinstance(value, (list, tuple)):
            items = list(value)
            keys_ = [f"{key}[{i}]" for i in range(len(items))]
        else:
            raise ConfigError(source, key, f"expected a string or an array of strings, got {_type_name(value)}")
        for item, item_key in zip(items, keys_, strict=True):
            if not isinstance(item, str):
                raise ConfigError(source, item_key, f"expected a string, got {_type_name(item)}")
            if not item:
                raise ConfigError(source, item_key, 'empty endpoint (use [] or "" to disable the listener)')
            problem = _check_endpoint(item)
            if problem is not None:
                raise ConfigError(source, item_key, f"{_show(item)} is not a valid server endpoint ({problem})")
            if item in seen:
                raise ConfigError(source, item_key, f"{_show(item)} is already used by {seen[item]}")
            seen[item] = item_key
        result[k] = tuple(items)
    if len(result["control"]) > 1:
        raise ConfigError(source, _join("listen", "control"), "give at most one control endpoint")
    return ListenConfig(socks=result["socks"], http=result["http"], control=result["control"])


# --- gateway ---------------------------------------------------------------------------


def _parse_gateway(data: Mapping[str, Any], source: str, base_dir: str | None = None) -> GatewaySettings:
    for k in data:
        if k not in _GATEWAY_KEYS:
            raise _unknown(source, _join("gateway", k), k, _GATEWAY_KEYS)
    values = _Values(source, base_dir)
    for k, v in data.items():
        values.items[k] = (v, _join("gateway", k))
    settings: dict[str, Any] = {}
    for name in ("handshake_timeout", "body_timeout", "keepalive_timeout"):
        if name in values:
            settings[name] = _seconds(values, name)
    if "response_timeout" in values:
        settings["response_timeout"] = _seconds(values, "response_timeout", zero="no limit")
    if "max_clients" in values:
        settings["max_clients"] = _integer(values, "max_clients", 1, MAX_MAX_CLIENTS)
    if "drain_timeout" in values:
        settings["drain_timeout"] = _seconds(values, "drain_timeout", zero="close streams at once")
    if "state_file" in values:
        settings["state_file"] = values.path("state_file")
    if "control_token_file" in values:
        settings["control_token_file"] = values.path("control_token_file")
    for k in ("api_proxy_command", "api_file_paths", "api_jump"):
        if k in values:
            settings[k] = values.boolean(k)
    if "control_max_clients" in values:
        settings["control_max_clients"] = _integer(values, "control_max_clients", 1, MAX_MAX_CLIENTS)
    for k in ("control_head_timeout", "control_body_timeout"):
        if k in values:
            settings[k] = _seconds(values, k)
    return GatewaySettings(**settings)


def _known_clusters(tables: Mapping[str, Any]) -> dict[str, str]:
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
            raise ConfigError(source, _join(_join("clusters", start), "jump"), f"jump cycle {cycle}")


# --- whole files ------------------------------------------------------------------------


def parse_config(data: Mapping[str, Any], source: str, base_dir: str | None = None) -> GatewayConfig:
    """
    Validate a decoded configuration.

    @param source: named in errors (usually the file name).
    @param base_dir: relative key_file / known_hosts / token_file /
        passphrase_file paths are relative to it (the config file's directory).
    @raise ConfigError: if anything is wrong.
    """
    data = _table(data, source, "(file)")
    for k in data:
        if k not in _TOP_KEYS:
            raise _unknown(source, _key_part(k), k, _TOP_KEYS)
    listen = _parse_listen(_table(data.get("listen", {}), source, "listen"), source)
    settings = _parse_gateway(_table(data.get("gateway", {}), source, "gateway"), source, base_dir)
    cache: _KeyCache = {}
    defaults = _table(data.get("defaults", {}), source, "defaults")
    _check_defaults(defaults, source, base_dir, cache)
    tables = _table(data.get("clusters", {}), source, "clusters")
    clusters: dict[str, ClusterConfig] = {}
    owners: dict[str, str] = {}
    known = _known_clusters(tables)
    for name, body in tables.items():
        prefix = _join("clusters", name)
        cluster = parse_cluster(name, body, source, prefix, base_dir, defaults, key_cache=cache, known_clusters=known)
        for i, n in enumerate(cluster.names()):
            if n in owners:
                key = prefix if i == 0 else f"{_join(prefix, 'aliases')}[{i - 1}]"
                what = "cluster name" if i == 0 else "alias"
                raise ConfigError(source, key, f"{what} {n!r} is already used by cluster {owners[n]!r}")
            owners[n] = name
        clusters[name] = cluster
    check_jump_cycles(clusters, source)
    return GatewayConfig(listen=listen, clusters=types.MappingProxyType(clusters), source=source, settings=settings)


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
