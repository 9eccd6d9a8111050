"""
Names and addresses: cluster names and aliases, user names, proxy node
addresses, networks and host name patterns.

Each parser raises L{ValueError} (or L{ConfigError}) with a reason that may
be shown to the operator: these values are not secret.
"""

from __future__ import annotations

import ipaddress
import re

from gateway.config.model import DEFAULT_PROXY_PORT, ConfigError, Network, ProxyAddress
from gateway.config.values import Values, show, type_name

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_PATTERN_RE = re.compile(r"[a-z0-9._*?\[\]!-]+")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

#: What is wrong with a name that L{is_valid_name} refuses.
NAME_RULE = "use 1 to 64 characters of A-Z a-z 0-9 . _ - (not . or ..)"


def is_valid_name(name: str) -> bool:
    """
    Whether C{name} may name a cluster or an alias (in the file, in an API
    body and in the API's URL path).  C{.} and C{..} are refused: they are
    path segments, not names, in the API's URLs.
    """
    return bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


def check_name(name: object, source: str, key: str, what: str) -> str:
    """C{name}, which must be a valid cluster name or alias (C{what})."""
    if not isinstance(name, str):
        raise ConfigError(source, key, f"expected a string, got {type_name(name)}")
    if not is_valid_name(name):
        raise ConfigError(source, key, f"{what} {show(name)} is invalid: {NAME_RULE}")
    return name


def read_gateway_name(values: Values, name: str) -> str:
    """C{[gateway] name}: written like a cluster name (it labels metrics and log lines)."""
    return check_name(values.value(name), values.source, values.key(name), "gateway name")


def valid_user(user: str) -> bool:
    """Whether C{user} can be an SSH user name (and sit before an C{@})."""
    return bool(user) and not any(c.isspace() or not c.isprintable() or c in "@:" for c in user)


def read_user(values: Values, name: str) -> str:
    user = values.string(name)
    if not valid_user(user):
        raise values.error(name, f"{show(user)} is not a valid user name")
    return user


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
            raise ValueError(f"{show(text)} is not a valid address (expected host, host:port or [ipv6]:port)")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{show(host)} in brackets is not an IPv6 address") from None
    elif text.count(":") >= 2:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"{show(text)} is not a valid address (write IPv6 addresses with a port as [address]:port)"
            ) from None
        host = text
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not _valid_hostname(host):
            raise ValueError(f"{show(host)} is not a valid host name or address")
    port = DEFAULT_PROXY_PORT
    if port_text is not None:
        if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port {show(port_text)} is not a number between 1 and 65535")
        port = int(port_text)
    return ProxyAddress(host, port)


def parse_network(text: str) -> Network:
    """Parse a network (C{10.0.0.0/8}); host bits and IPv4-mapped networks are refused."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{show(text)} is not a valid network ({e})") from None
        raise ValueError(f"{show(text)} has host bits set (did you mean {loose}?)") from None
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
        raise ValueError(f"{show(text)} is an IPv4-mapped IPv6 network: write it as an IPv4 network")
    return net


def parse_pattern(text: str) -> str:
    """Parse a host name glob (C{*.internal}), lower-cased, without a final dot."""
    pattern = text.lower().removesuffix(".")
    if not pattern or not _PATTERN_RE.fullmatch(pattern):
        raise ValueError(
            f"{show(text)} is not a valid host name pattern (letters, digits, '.', '-', '_' and the globs * ? [...])"
        )
    try:
        ipaddress.ip_address(pattern)
    except ValueError:
        return pattern
    raise ValueError(f"{show(text)} is an IP address: list addresses in networks (e.g. {pattern}/32)")
