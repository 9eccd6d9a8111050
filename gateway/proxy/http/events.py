"""
The events of the HTTP/1.x proxy machines (L{gateway.proxy.http.machine}):
what a client's request and an upstream's response are made of, as plain
values the adapter acts on -- and the two heads' rewriting for the other
side (origin-form with the real C{Host} upstream, end-to-end headers and our
own C{Connection} toward the client).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.proxy.http.framing import Headers, _end_to_end, _head_bytes, _upgrade_lines
from gateway.proxy.http.targets import _parse_absolute


@dataclass(frozen=True)
class RequestHead:
    """A request head, checked; for CONNECT the tunnel request itself."""

    method: str
    target: str
    version: str
    headers: Headers
    host: str
    port: int
    is_connect: bool
    credentials: tuple[str, str] | None
    keep_alive: bool
    #: The Upgrade value of an HTTP/1.1 request whose Connection lists "upgrade".
    upgrade: str | None = None
    #: An origin-form request for one of L{LOCAL_PATHS}: addressed to the
    #: proxy itself (L{gateway.proxy.http.local}), with no host or port.
    local: bool = False

    def upstream_head(self, host: str | None = None) -> bytes:
        """
        The head to send through the tunnel: origin-form, end-to-end headers,
        C{Host} from the URL first (RFC 9112 3.2, 3.2.2) -- with C{host} for
        its host when given: the real destination of a cluster-qualified
        name, which the origin knows nothing of -- and C{Connection:
        keep-alive} so the upstream keeps the tunnel for the next request --
        or, for an upgrade, C{Upgrade} and C{Connection: Upgrade}: both are
        hop-by-hop, so a proxy that asks for the switch must say so itself.
        """
        if self.is_connect or self.local:
            raise ValueError("a CONNECT request is tunnelled, a local one answered, neither forwarded")
        url = _parse_absolute(self.target)
        path = url.rest or ("*" if self.method == "OPTIONS" else "/")
        if path.startswith("?"):
            path = "/" + path
        authority = url.authority
        if host is not None and host != url.host:
            authority = (f"[{host}]" if ":" in host else host) + (f":{url.port}" if url.port != 80 else "")
        lines = [f"{self.method} {path} {self.version}", f"Host: {authority}"]
        lines += [f"{name}: {value}" for name, value in _end_to_end(self.headers) if name.lower() != "host"]
        lines += _upgrade_lines(self.upgrade) if self.upgrade else ["Connection: keep-alive"]
        return _head_bytes(lines)


@dataclass(frozen=True)
class RequestBody:
    """Body bytes exactly as they must be forwarded upstream."""

    data: bytes


@dataclass(frozen=True)
class RequestEnd:
    """The request is complete; input is held until L{RequestParser.next_request}."""


@dataclass(frozen=True)
class RequestError:
    """The client broke the protocol; answer C{status} and close."""

    status: int
    detail: str


@dataclass(frozen=True)
class ResponseHead:
    """
    A response head; C{interim} for 1xx (except 101), which a final one
    follows.  A 101 has C{upgrade}: the protocol(s) its Upgrade names.
    """

    status: int
    reason: str
    version: str
    headers: Headers
    interim: bool = False
    upgrade: str | None = None

    def client_head(self, keep_alive: bool) -> bytes:
        """
        The head to send to the client, with end-to-end headers only.  Whether
        the client connection persists is ours to say, not the upstream's;
        interim heads say nothing since the final response decides, and a 101
        says what the connection becomes instead.
        """
        lines = [f"{self.version} {self.status} {self.reason}"]
        lines += [f"{name}: {value}" for name, value in _end_to_end(self.headers)]
        if self.upgrade:
            lines += _upgrade_lines(self.upgrade)
        elif not self.interim:
            lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        return _head_bytes(lines)


@dataclass(frozen=True)
class ResponseBody:
    """Body bytes exactly as received, framing unchanged."""

    data: bytes


@dataclass(frozen=True)
class ResponseEnd:
    """The response is complete; C{reusable} if the tunnel may carry another request."""

    reusable: bool


@dataclass(frozen=True)
class ResponseError:
    """The upstream broke the protocol: answer 502 if no head was sent yet, else close."""

    detail: str


RequestEvent = RequestHead | RequestBody | RequestEnd | RequestError
ResponseEvent = ResponseHead | ResponseBody | ResponseEnd | ResponseError
