"""
Request targets and proxy credentials: where an HTTP proxy request goes, and
as whom.  Sans-IO, like the rest of L{gateway.proxy.http}.

A destination host becomes L{canonical_host}'s text (names in lower case
without a trailing dot, IP literals canonical, zone ids refused), as in
L{gateway.proxy.socks.machine}: that is what the router matches and the proxy
node is asked for.  Basic credentials must be UTF-8; an empty user name
(C{Basic Og==}) is no credentials.  Error details never echo the target or a
credential: URLs carry tokens, and details are logged.
"""

from __future__ import annotations

import base64
import re
from typing import NamedTuple

from gateway.destinations import canonical_host
from gateway.errors import StreamError, shown
from gateway.proxy.http.framing import Headers, _Malformed, _single

_ABSOLUTE_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]+")
_PORT = re.compile(r"[0-9]{1,5}")

# -- request targets and credentials -------------------------------------------


class _AbsoluteURL(NamedTuple):
    authority: str
    host: str
    port: int
    rest: str  # path and query as sent: "", "/..." or "?..."


def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """
    C{host[:port]} or C{[v6]:port}, the host as L{canonical_host} writes it;
    C{default_port} None means the port is required.
    """
    if "@" in authority:
        raise _Malformed(400, "user information in the request target is not accepted")
    if authority.startswith("["):
        inner, bracket, rest = authority[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            raise _Malformed(400, f"malformed authority {shown(authority)}")
        host, port = f"[{inner}]", rest[1:]
    else:
        host, _, port = authority.partition(":")
        if not _REG_NAME.fullmatch(host):
            raise _Malformed(400, f"malformed host in {shown(authority)}")
    try:
        host = canonical_host(host)
    except StreamError as e:
        raise _Malformed(400, e.detail) from None
    if not port and default_port is not None:
        return host, default_port
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _Malformed(400, f"missing or invalid port in {shown(authority)}")
    return host, int(port)


def _parse_absolute(target: str) -> _AbsoluteURL:
    """
    An absolute-form target (RFC 9112 3.2.2); only http:// is proxied this way,
    and ws://, which names the same resource (RFC 6455 3) and is what aiohttp
    sends for a WebSocket handshake through a proxy.
    """
    if target.startswith("/") or target == "*":
        raise _Malformed(400, "this is a proxy: use an absolute URL or CONNECT")
    match = _ABSOLUTE_URL.fullmatch(target)
    if not match:
        raise _Malformed(400, "malformed request target")
    scheme, authority, rest = match.groups()
    if scheme.lower() in ("https", "wss"):
        raise _Malformed(400, f"{scheme.lower()}:// URLs are not proxied this way: use CONNECT")
    if scheme.lower() not in ("http", "ws"):
        raise _Malformed(400, f"unsupported URL scheme {shown(scheme)}")
    if "#" in rest:
        raise _Malformed(400, "a request target must not contain a fragment")
    host, port = _parse_authority(authority, 80)
    return _AbsoluteURL(authority, host, port, rest)


def _credentials(headers: Headers) -> tuple[str, str] | None:
    """
    Basic credentials (RFC 7617) from Proxy-Authorization; other schemes are
    ignored, and so is an empty user name (C{Basic Og==}, what some clients
    send for "no credentials"): no cluster has an empty name.
    """
    value = _single(headers, "proxy-authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(token.strip(" \t"), validate=True).decode("utf-8").partition(":")
    except ValueError:  # bad base64 (binascii.Error), a non-ASCII token, or not UTF-8
        raise _Malformed(400, "malformed Basic credentials in Proxy-Authorization") from None
    if not colon:
        raise _Malformed(400, "Basic credentials without a colon in Proxy-Authorization")
    return (user, password) if user else None
