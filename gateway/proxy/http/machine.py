"""
Sans-IO HTTP/1.x proxy machines: bytes in, events out.

L{RequestParser} reads a client of the HTTP proxy listener, L{ResponseParser}
an upstream server's answer through the tunnel.  Neither knows sockets or
Twisted: the adapter feeds bytes and acts on events, so every byte-level edge
case is testable without a reactor.

Messages are not re-encoded.  Bodies pass through with their framing
(Content-Length or chunked) unchanged; the parsers only check framing to find
where a message ends.  Only heads are rewritten: hop-by-hop headers dropped,
absolute-form turned into origin-form.  So the HTTP version is passed on as
received: an HTTP/1.0 client must get the response (no chunked coding) its
request asked for, which a proxy claiming HTTP/1.1 upstream could not promise.

Both parsers share one engine, L{_Parser}: a head (start line, fields up to an
empty line), a body reader, an end event; or one error event, then nothing.
Decisions depend only on the bytes seen so far, and a limit check on a partial
line predicts exactly what the complete line will give, so any split of the
input yields the same events (once adjacent body events are joined).  Limits,
counting line endings: start line 8 KiB, header or trailer section 64 KiB and
100 fields, at most 4 empty lines before a start line (RFC 9112 2.2 asks to
skip "at least one"; a stream of nothing but CRLF must not cost a parse step
per two bytes for ever), a chunk size of at most 15 hex digits (below 2^60
bytes: a bigger one overflows the 64-bit counters of parsers further on, which
would then disagree with us on where the chunk ends).

Framing fields are validated exactly as forwarded, never after a looser
clean-up: only spaces and tabs are optional whitespace (C{str.strip} would also
eat C{\\xa0} and C{\\x85}, and the raw value would go on).  Content-Length
is one field with one decimal value (a list such as C{3, 3}, which RFC 9110 8.6
lets a recipient reject, is refused); a transfer coding is a token, and
chunked is applied at most once.  Trailer fields are forwarded except the
ones a trailer must not carry or a proxy must not pass on: hop-by-hop and
proxy-credential fields, the fields the message's Connection names, and
framing and routing fields (Content-Length, Transfer-Encoding, Host).

Upgrade (RFC 9110 7.8) is passed on for HTTP/1.1 requests whose Connection
lists it: L{RequestHead.upgrade} and L{ResponseParser}'s C{upgrade} say so, a
101 from the upstream switches both parsers off and hands over the bytes after
it (L{ResponseParser.take_leftover}, L{RequestParser.take_upgrade_leftover});
a 101 nobody asked for is an upstream error.

Choices the RFCs leave open:

  - Transfer-Encoding with Content-Length is refused (400, or an upstream
    error) rather than "chunked wins": the RFC would force a close anyway, and
    refusing cannot turn into request smuggling.  Transfer-Encoding in an
    HTTP/1.0 request is refused too (RFC 9112 6.1).
  - Bare LF ends head lines (RFC 9112 2.2) but not chunked framing lines: those
    are forwarded raw, and a stricter upstream must see the same boundaries.
  - Obsolete line folding is refused (RFC 9112 5.2).
  - A Connection option cannot remove Host, Content-Length or
    Transfer-Encoding: that would desynchronise framing with the upstream.
  - C{Proxy-Connection} counts like Connection for a request's C{keep_alive};
    old clients send it to proxies.
  - A destination host becomes L{canonical_host}'s text (names in lower case
    without a trailing dot, IP literals canonical, zone ids refused), as in
    L{gateway.proxy.socks.machine}: that is what the router matches and the proxy node is
    asked for.  The C{Host} header keeps the client's spelling.
  - Basic credentials must be UTF-8; an empty user name (C{Basic Og==}) is no
    credentials.
  - Error details never echo a request line or header line: URLs and headers
    carry tokens, and details are logged.  Other client or upstream bytes
    appear only as L{gateway.errors.shown} renders them.
"""

from __future__ import annotations

import abc
import base64
import enum
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import NamedTuple

from gateway.errors import Reason, StreamError, shown
from gateway.routing import canonical_host

#: The status an HTTP client sees for each failure.
HTTP_STATUS: dict[Reason, int] = {
    **dict.fromkeys([Reason.BAD_REQUEST, Reason.UNSUPPORTED_ADDRESS], 400),
    **dict.fromkeys([Reason.AUTH_REQUIRED, Reason.AUTH_FAILED], 407),
    **dict.fromkeys([Reason.NO_ROUTE, Reason.AMBIGUOUS, Reason.NOT_ALLOWED], 403),
    **dict.fromkeys([Reason.PROHIBITED, Reason.REFUSED, Reason.GENERAL], 502),
    **dict.fromkeys([Reason.HOST_UNREACHABLE, Reason.NETWORK_UNREACHABLE], 502),
    **dict.fromkeys([Reason.TIMEOUT, Reason.UNAVAILABLE], 504),
    Reason.OVERLOADED: 503,
    Reason.UNSUPPORTED_COMMAND: 501,
}

MAX_START_LINE = 8 * 1024
MAX_HEADER_SECTION = 64 * 1024
MAX_FIELDS = 100
MAX_EMPTY_LINES = 4
MAX_CHUNK_SIZE_DIGITS = 15
_START_LINE_TOO_LONG = (414, f"start line longer than {MAX_START_LINE} bytes")
_SECTION_TOO_LONG = (431, f"header section longer than {MAX_HEADER_SECTION} bytes")

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate"}
    | {"te", "trailer", "upgrade"}
)
#: Headers that a Connection option must not remove: framing depends on them.
_PROTECTED = frozenset({"host", "content-length", "transfer-encoding"})

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: The bytes a request's first line can begin with: a method's (a token), or an empty line's.
_REQUEST_START = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
_MALFORMED_REQUEST_LINE = "malformed request line"
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_FIELD_NAME = re.compile(_TOKEN)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^\x00-\x20\x7f]+) (HTTP/[0-9]\.[0-9])")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([1-5][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,%d})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?" % MAX_CHUNK_SIZE_DIGITS)
_ABSOLUTE_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]+")
_PORT = re.compile(r"[0-9]{1,5}")
_LENGTH = re.compile(r"[0-9]{1,18}")
_CODING = re.compile(_TOKEN.decode())
#: An Upgrade value: protocol[/version] items (RFC 9110 7.8), comma-separated.
_UPGRADE = re.compile(r"{0}(?:/{0})?(?:[ \t]*,[ \t]*{0}(?:/{0})?)*".format(_TOKEN.decode()))
_VERSIONS = ("HTTP/1.0", "HTTP/1.1")

Headers = tuple[tuple[str, str], ...]


class _Malformed(Exception):
    """Internal: the input breaks the protocol; becomes an error event."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


# -- events -------------------------------------------------------------------


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

    def upstream_head(self) -> bytes:
        """
        The head to send through the tunnel: origin-form, end-to-end headers,
        C{Host} from the URL first (RFC 9112 3.2, 3.2.2) and C{Connection:
        keep-alive} so the upstream keeps the tunnel for the next request --
        or, for an upgrade, C{Upgrade} and C{Connection: Upgrade}: both are
        hop-by-hop, so a proxy that asks for the switch must say so itself.
        """
        if self.is_connect:
            raise ValueError("a CONNECT request is tunnelled, not forwarded")
        url = _parse_absolute(self.target)
        path = url.rest or ("*" if self.method == "OPTIONS" else "/")
        if path.startswith("?"):
            path = "/" + path
        lines = [f"{self.method} {path} {self.version}", f"Host: {url.authority}"]
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


# -- lines, fields and heads -------------------------------------------------


def _take_line(buffer: bytearray, limit: int, too_long: tuple[int, str], *, strict: bool = False) -> bytes | None:
    """
    Remove one line from the front of C{buffer} and return it without its
    ending, or C{None} if it is incomplete.  C{limit} counts the ending too, so
    an incomplete line that already reaches it is an error right away.
    """
    end = buffer.find(b"\n", 0, limit)
    if end < 0:
        if len(buffer) >= limit:
            raise _Malformed(*too_long)
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    if line.endswith(b"\r"):
        return line[:-1]
    if strict:
        raise _Malformed(400, "chunked framing line not ended by CRLF")
    return line


def _parse_field(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise _Malformed(400, "obsolete line folding in header section")
    name, colon, value = line.partition(b":")
    value = value.strip(b" \t")
    if not colon:  # the line is not echoed: it may hold a credential
        raise _Malformed(400, "header line without a colon")
    if not _FIELD_NAME.fullmatch(name):
        raise _Malformed(400, f"invalid header name {shown(name)}")
    if not _FIELD_VALUE.fullmatch(value):
        raise _Malformed(400, f"control character in header {name.decode('ascii')}")
    return name.decode("ascii"), value.decode("latin-1")


class _FieldSection:
    """Field lines up to an empty line (headers or trailers), within the limits."""

    def __init__(self, *, strict: bool, dropped: frozenset[str] = frozenset()) -> None:
        self.fields: list[tuple[str, str]] = []
        self._strict = strict
        self._dropped = dropped
        self._size = 0

    def read(self, buffer: bytearray, out: bytearray | None = None) -> bool:
        """
        Consume complete lines; C{True} once the empty line was read.  Trailers
        pass C{out}: their lines are strict, so each one whose field is not
        C{dropped} is forwarded as line+CRLF, and so is the empty line.
        """
        while True:
            before = len(buffer)
            line = _take_line(buffer, MAX_HEADER_SECTION - self._size, _SECTION_TOO_LONG, strict=self._strict)
            if line is None:
                return False
            self._size += before - len(buffer)
            if line:
                if len(self.fields) == MAX_FIELDS:
                    raise _Malformed(431, f"more than {MAX_FIELDS} header fields")
                self.fields.append(_parse_field(line))
            if out is not None and (not line or self.fields[-1][0].lower() not in self._dropped):
                out += line + b"\r\n"
            if not line:
                return True


class _HeadReader:
    """A start line (after a few stray empty lines, RFC 9112 2.2) and its header section."""

    def __init__(self, start_bytes: frozenset[int] | None = None) -> None:
        self._start_line: bytes | None = None
        self._fields = _FieldSection(strict=False)
        self._empty_lines = 0
        self._start_bytes = start_bytes

    def read(self, buffer: bytearray) -> tuple[bytes, Headers] | None:
        while self._start_line is None:
            if self._start_bytes is not None and buffer and buffer[0] not in self._start_bytes:
                # No start line can begin so (a SOCKS greeting, TLS sent to a
                # plain listener): say so now, not when a line end comes --
                # such a client waits for our answer, not the other way round.
                # Checked before anything else, so any split decides alike.
                raise _Malformed(400, _MALFORMED_REQUEST_LINE)
            line = _take_line(buffer, MAX_START_LINE, _START_LINE_TOO_LONG)
            if line is None:
                return None
            if line:
                self._start_line = line
            elif self._empty_lines == MAX_EMPTY_LINES:
                raise _Malformed(400, f"more than {MAX_EMPTY_LINES} empty lines before the start line")
            else:
                self._empty_lines += 1
        if not self._fields.read(buffer):
            return None
        return self._start_line, tuple(self._fields.fields)


def _values(headers: Headers, name: str) -> list[str]:
    return [value for field, value in headers if field.lower() == name]


def _single(headers: Headers, name: str) -> str | None:
    """The value of a header that must not be repeated (ambiguity invites smuggling)."""
    values = _values(headers, name)
    if len(values) > 1:
        raise _Malformed(400, f"repeated {name} header")
    return values[0] if values else None


def _items(headers: Headers, name: str) -> list[str]:
    """
    The elements of a comma-separated list header, in order, without empty
    ones.  Only spaces and tabs are whitespace here (RFC 9110 5.6.1):
    C{str.strip()} would also remove C{\\xa0} and C{\\x85}, which an
    upstream reading the raw value would not.
    """
    return [item.strip(" \t") for value in _values(headers, name) for item in value.split(",") if item.strip(" \t")]


def _tokens(headers: Headers, name: str) -> list[str]:
    """The lower-cased elements of a comma-separated list header, in order."""
    return [item.lower() for item in _items(headers, name)]


def _end_to_end(headers: Headers) -> list[tuple[str, str]]:
    dropped = _HOP_BY_HOP | (set(_tokens(headers, "connection")) - _PROTECTED)
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def _upgrade_lines(upgrade: str) -> list[str]:
    return [f"Upgrade: {upgrade}", "Connection: Upgrade"]


def _upgrade(headers: Headers) -> str | None:
    """The Upgrade value (its fields joined), checked, or C{None} if there is none."""
    values = _values(headers, "upgrade")
    if not values:
        return None
    value = ", ".join(values)
    if not _UPGRADE.fullmatch(value):
        raise _Malformed(400, f"malformed Upgrade header {shown(value)}")
    return value


def _persistent(version: str, options: set[str]) -> bool:
    """RFC 9112 9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive"."""
    return "close" not in options and (version == "HTTP/1.1" or "keep-alive" in options)


def _head_bytes(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- bodies -------------------------------------------------------------------


class _Fixed:
    """A Content-Length body (length 0 for messages without a body)."""

    def __init__(self, length: int) -> None:
        self._remaining = length

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def read(self, buffer: bytearray, out: bytearray) -> None:
        size = min(self._remaining, len(buffer))
        out += buffer[:size]
        del buffer[:size]
        self._remaining -= size


class _UntilClose:
    """A body that runs until the upstream closes (RFC 9112 6.3, rule 8)."""

    done = False

    def read(self, buffer: bytearray, out: bytearray) -> None:
        out += buffer
        buffer.clear()


class _ChunkState(enum.Enum):
    SIZE = "size"  # expecting a chunk-size line
    DATA = "data"  # inside chunk data
    DATA_END = "data-end"  # expecting the CRLF after chunk data
    TRAILERS = "trailers"  # after the last chunk: trailer fields up to an empty line


class _Chunked:
    """
    Chunked framing (RFC 9112 7.1), checked as it passes and forwarded
    unchanged, but for the C{dropped} trailer fields.
    """

    def __init__(self, dropped: frozenset[str]) -> None:
        self._state = _ChunkState.SIZE
        self._remaining = 0
        self._trailers = _FieldSection(strict=True, dropped=dropped)
        self.done = False

    def read(self, buffer: bytearray, out: bytearray) -> None:
        """Consume framing and data; only bytes found valid go to C{out}."""
        while not self.done:
            if self._state is _ChunkState.SIZE:
                line = _take_line(buffer, MAX_START_LINE, (400, "chunk size line too long"), strict=True)
                if line is None:
                    return
                match = _CHUNK_LINE.fullmatch(line)
                if not match:
                    raise _Malformed(400, "malformed chunk size line")
                out += line + b"\r\n"
                self._remaining = int(match[1], 16)
                self._state = _ChunkState.DATA if self._remaining else _ChunkState.TRAILERS
            elif self._state is _ChunkState.DATA:
                if not buffer:
                    return
                size = min(self._remaining, len(buffer))
                out += buffer[:size]
                del buffer[:size]
                self._remaining -= size
                if not self._remaining:
                    self._state = _ChunkState.DATA_END
            elif self._state is _ChunkState.DATA_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise _Malformed(400, "chunk data not followed by CRLF")
                out += b"\r\n"
                del buffer[:2]
                self._state = _ChunkState.SIZE
            elif not self._trailers.read(buffer, out):
                return
            else:
                self.done = True


def _content_length(headers: Headers) -> int | None:
    """
    One field, one decimal value: a repeated field or a list (even of
    identical lengths, which RFC 9110 8.6 lets a recipient reject) is
    refused, since the value goes on as it came and must be the one checked.
    """
    value = _single(headers, "content-length")
    if value is None:
        return None
    if not _LENGTH.fullmatch(value):
        raise _Malformed(400, f"invalid Content-Length {shown(value)}")
    return int(value)


def _trailers_dropped(headers: Headers) -> frozenset[str]:
    """The trailer fields not forwarded (see the module docstring)."""
    return _HOP_BY_HOP | _PROTECTED | set(_tokens(headers, "connection"))


def _message_body(headers: Headers, version: str, *, request: bool) -> _Fixed | _Chunked | _UntilClose:
    """How the body is delimited (RFC 9112 6.3), for messages that may have one."""
    length = _content_length(headers)
    if not _values(headers, "transfer-encoding"):
        if length is not None:
            return _Fixed(length)
        return _Fixed(0) if request else _UntilClose()
    if length is not None:
        raise _Malformed(400, "both Transfer-Encoding and Content-Length: ambiguous framing")
    codings = _tokens(headers, "transfer-encoding")
    for coding in codings:
        if not _CODING.fullmatch(coding):
            raise _Malformed(400, f"invalid transfer coding {shown(coding)}")
    if codings.count("chunked") > 1:
        raise _Malformed(400, "chunked applied more than once")
    if version == "HTTP/1.1" and codings[-1:] == ["chunked"]:
        return _Chunked(_trailers_dropped(headers))
    if request:
        raise _Malformed(400, "a request body needs HTTP/1.1 and chunked as the final transfer coding")
    return _UntilClose()


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


# -- parsers ------------------------------------------------------------------


class _State(enum.Enum):
    HEAD = "head"  # reading a message head
    BODY = "body"  # passing a body through
    DONE = "done"  # the message ended; nothing is parsed until the owner says so
    TUNNEL = "tunnel"  # after a CONNECT head or a 101: the rest is another protocol's
    CLOSED = "closed"  # after an error, EOF or taking the leftover: input is ignored


class _Parser(abc.ABC):
    """The engine both parsers share: head, body, end; or one error, then nothing."""

    #: The bytes a start line may begin with; None: any (found out at its end).
    _start_bytes: frozenset[int] | None = None

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = _State.HEAD
        self._head = _HeadReader(self._start_bytes)
        self._body: _Fixed | _Chunked | _UntilClose = _Fixed(0)

    @abc.abstractmethod
    def _on_head(self, start_line: bytes, headers: Headers) -> RequestHead | ResponseHead:
        """Check a head, set C{_state} (and C{_body} for BODY), return its event."""

    @abc.abstractmethod
    def _end_event(self) -> RequestEnd | ResponseEnd: ...

    @abc.abstractmethod
    def _body_event(self, data: bytes) -> RequestBody | ResponseBody: ...

    @abc.abstractmethod
    def _error_event(self, error: _Malformed) -> RequestError | ResponseError: ...

    def _fail(self, error: _Malformed) -> RequestError | ResponseError:
        self._state = _State.CLOSED
        self._buffer.clear()
        return self._error_event(error)

    def _parse(self) -> list:
        events: list = []
        body = bytearray()
        try:
            while self._state in (_State.HEAD, _State.BODY):
                if self._state is _State.HEAD:
                    head = self._head.read(self._buffer)
                    if head is None:
                        break
                    self._head = _HeadReader(self._start_bytes)
                    events.append(self._on_head(*head))
                else:
                    self._body.read(self._buffer, body)
                    if not self._body.done:
                        break
                    self._flush(body, events)
                    events.append(self._end_event())
                    self._state = _State.DONE
        except _Malformed as error:
            self._flush(body, events)
            events.append(self._fail(error))
        self._flush(body, events)
        return events

    def _flush(self, body: bytearray, events: list) -> None:
        if body:
            events.append(self._body_event(bytes(body)))
            body.clear()

    @property
    def buffered(self) -> int:
        """Bytes held unparsed, so the adapter can pause a reader that sends too much."""
        return len(self._buffer)

    def _take_buffer(self, allowed: bool, what: str) -> bytes:
        """The bytes held so far, if C{allowed}; the parser is finished."""
        if not allowed:
            raise RuntimeError(f"{what}() in state {self._state.value}")
        leftover = bytes(self._buffer)
        self._buffer.clear()
        self._state = _State.CLOSED
        return leftover


class RequestParser(_Parser):
    """
    Requests from a proxy client.  After L{RequestEnd} the parser holds further
    input (pipelined requests) until L{next_request}: the adapter finishes one
    exchange before it looks at the next.  After a CONNECT L{RequestHead} the
    rest is tunnel payload, collected by L{take_leftover}; after an upgrade
    request that the upstream answered with 101, by L{take_upgrade_leftover}.
    """

    _start_bytes = _REQUEST_START

    def __init__(self) -> None:
        super().__init__()
        self._upgrading = False  # the last head asked for an upgrade

    def receive_data(self, data: bytes) -> list[RequestEvent]:
        if self._state is _State.CLOSED:
            return []
        self._buffer += data
        return self._parse()

    def next_request(self) -> list[RequestEvent]:
        """The previous exchange is over: parse what was held back."""
        if self._state is not _State.DONE:
            raise RuntimeError(f"next_request() in state {self._state.value}, not after RequestEnd")
        self._state = _State.HEAD
        return self._parse()

    def take_leftover(self) -> bytes:
        """After a CONNECT head: the client payload received so far; the parser is finished."""
        return self._take_buffer(self._state is _State.TUNNEL, "take_leftover")

    def take_upgrade_leftover(self) -> bytes:
        """
        After the L{RequestEnd} of an upgrade request, once the upstream
        switched protocols: what the client sent after the request (the new
        protocol's first bytes); the parser is finished.
        """
        return self._take_buffer(self._state is _State.DONE and self._upgrading, "take_upgrade_leftover")

    def _on_head(self, start_line: bytes, headers: Headers) -> RequestHead:
        match = _REQUEST_LINE.fullmatch(start_line)
        if not match:
            raise _Malformed(400, _MALFORMED_REQUEST_LINE)  # not echoed: URLs carry tokens
        method, target, version = (group.decode("latin-1") for group in match.groups())
        if version not in _VERSIONS:
            raise _Malformed(505, f"unsupported HTTP version {version}")
        is_connect = method == "CONNECT"
        options = set(_tokens(headers, "connection"))
        upgrade = None
        if is_connect:
            host, port = _parse_authority(target, None)
        else:
            url = _parse_absolute(target)
            host, port = url.host, url.port
            _single(headers, "host")  # RFC 9112 3.2: several Host lines are an error
            self._body = _message_body(headers, version, request=True)
            if version == "HTTP/1.1" and "upgrade" in options:  # RFC 9110 7.8: HTTP/1.1 only
                upgrade = _upgrade(headers)
        credentials = _credentials(headers)
        keep_alive = _persistent(version, options | set(_tokens(headers, "proxy-connection")))
        self._upgrading = upgrade is not None
        self._state = _State.TUNNEL if is_connect else _State.BODY
        return RequestHead(
            method, target, version, headers, host, port, is_connect, credentials, keep_alive, upgrade
        )

    def _end_event(self) -> RequestEnd:
        return RequestEnd()

    def _body_event(self, data: bytes) -> RequestBody:
        return RequestBody(data)

    def _error_event(self, error: _Malformed) -> RequestError:
        return RequestError(error.status, error.detail)


class ResponseParser(_Parser):
    """
    One upstream response (and any interim 1xx before it) to a request made
    with C{request_method}.  Data after the response is an error: the gateway
    never pipelines upstream, so the tunnel must not be reused.

    C{upgrade} says the request asked to switch protocols.  Then a 101 is
    the final head, after which the parser parses nothing: the bytes after
    it belong to the new protocol, for L{take_leftover}.  Any other final
    response is an ordinary one.  A 101 to a request that did not ask for it
    is an upstream error: relaying it would hand the client a protocol it
    never agreed to.
    """

    def __init__(self, request_method: str, upgrade: bool = False) -> None:
        super().__init__()
        self._request_method = request_method
        self._upgrade = upgrade
        self._reusable = False
        self.close_delimited = False

    def receive_data(self, data: bytes) -> list[ResponseEvent]:
        if self._state is _State.CLOSED:
            return []
        self._buffer += data
        events = self._parse()
        if self._state is _State.DONE and self._buffer:
            events.append(self._fail(_Malformed(502, "upstream sent data after the response")))
        return events

    def take_leftover(self) -> bytes:
        """After a 101 head: the new protocol's bytes received so far; the parser is finished."""
        return self._take_buffer(self._state is _State.TUNNEL, "take_leftover")

    def eof_received(self) -> list[ResponseEvent]:
        """
        The upstream closed: the end of a close-delimited body, or of nothing.
        After a 101 it is the new protocol's business: L{take_leftover} still
        has the bytes before it.
        """
        if self._state is _State.TUNNEL:
            return []
        state, self._state = self._state, _State.CLOSED
        if state is _State.BODY and self.close_delimited:
            return [ResponseEnd(reusable=False)]
        if state in (_State.HEAD, _State.BODY):
            return [ResponseError("upstream closed the connection before the response was complete")]
        return []

    def _on_head(self, start_line: bytes, headers: Headers) -> ResponseHead:
        match = _STATUS_LINE.fullmatch(start_line)
        if not match:
            raise _Malformed(502, f"malformed status line {shown(start_line)}")
        version = match[1].decode("ascii")
        status = int(match[2])
        if version not in _VERSIONS:
            raise _Malformed(502, f"unsupported HTTP version {version}")
        interim = 100 <= status < 200 and status != 101
        reason = (match[3] or b"").decode("latin-1")
        if interim:
            return ResponseHead(status, reason, version, headers, interim)  # the final response follows
        if status == 101:
            if not self._upgrade:
                raise _Malformed(502, "switched protocols without an upgrade request")
            upgrade = _upgrade(headers)
            if upgrade is None:
                raise _Malformed(502, "101 Switching Protocols without an Upgrade header")
            self._state = _State.TUNNEL  # whatever follows is the new protocol's
            return ResponseHead(status, reason, version, headers, upgrade=upgrade)
        head = ResponseHead(status, reason, version, headers)
        if self._request_method == "HEAD" or status in (204, 304):
            self._body = _Fixed(0)
        else:
            self._body = _message_body(headers, version, request=False)
        self.close_delimited = isinstance(self._body, _UntilClose)
        self._reusable = not self.close_delimited and _persistent(version, {*_tokens(headers, "connection")})
        self._state = _State.BODY
        return head

    def _end_event(self) -> ResponseEnd:
        return ResponseEnd(self._reusable)

    def _body_event(self, data: bytes) -> ResponseBody:
        return ResponseBody(data)

    def _error_event(self, error: _Malformed) -> ResponseError:
        return ResponseError(f"upstream: {error.detail}")


# -- error replies ------------------------------------------------------------


def status_for(error: StreamError) -> int:
    """The HTTP status that tells a client about C{error}."""
    return HTTP_STATUS[error.reason]


def error_response(status: int, detail: str, *, version: str = "HTTP/1.1", realm: str = "gateway") -> bytes:
    """
    A complete response the gateway answers itself: short text body, explicit
    length, and C{Connection: close}, since after an error the client's
    connection state (half-read body, pipelined requests) is not worth saving.
    """
    body = f"{detail}\n".encode()
    lines = [
        f"{version} {status} {HTTPStatus(status).phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'Proxy-Authenticate: Basic realm="{quoted}"')
    return _head_bytes(lines) + body
