"""
Sans-IO HTTP/1.x proxy machines: bytes in, events (L{gateway.proxy.http.events}) out.

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
Decisions depend only on the bytes seen so far, so any split of the input
yields the same events (once adjacent body events are joined).  The framing
pieces and their limits are L{gateway.proxy.http.framing}'s; request targets
and credentials are L{gateway.proxy.http.targets}'.

Upgrade (RFC 9110 7.8) is passed on for HTTP/1.1 requests whose Connection
lists it: L{gateway.proxy.http.events.RequestHead.upgrade} and L{ResponseParser}'s C{upgrade} say so, a
101 from the upstream switches both parsers off and hands over the bytes after
it (L{ResponseParser.take_leftover}, L{RequestParser.take_upgrade_leftover});
a 101 nobody asked for is an upstream error.

An origin-form request for one of L{LOCAL_PATHS} (C{GET /proxy.pac}) is
addressed to the proxy itself, not forwarded: its head says C{local} and
L{gateway.proxy.http.local} answers it.  Other origin-form targets are errors.

Choices the RFCs leave open (framing's own are in its module):

  - C{Proxy-Connection} counts like Connection for a request's C{keep_alive};
    old clients send it to proxies.
  - The C{Host} header keeps the client's spelling; the destination is the
    target's host as L{gateway.proxy.http.targets} reads it.
  - Error details never echo a request line or header line: URLs and headers
    carry tokens, and details are logged.  Other client or upstream bytes
    appear only as L{gateway.errors.shown} renders them.
"""

from __future__ import annotations

import abc
import enum
import re
from http import HTTPStatus

from gateway.errors import Reason, StreamError, shown
from gateway.proxy.http.events import (
    RequestBody,
    RequestEnd,
    RequestError,
    RequestEvent,
    RequestHead,
    ResponseBody,
    ResponseEnd,
    ResponseError,
    ResponseEvent,
    ResponseHead,
)
from gateway.proxy.http.framing import (
    _MALFORMED_REQUEST_LINE,
    _REQUEST_START,
    _TOKEN,
    Headers,
    _Chunked,
    _Fixed,
    _head_bytes,
    _HeadReader,
    _Malformed,
    _message_body,
    _persistent,
    _single,
    _tokens,
    _UntilClose,
    _upgrade,
)
from gateway.proxy.http.targets import _credentials, _parse_absolute, _parse_authority

_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^\x00-\x20\x7f]+) (HTTP/[0-9]\.[0-9])")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([1-5][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_VERSIONS = ("HTTP/1.0", "HTTP/1.1")

#: The PAC file's path: an origin-form request for it is addressed to the proxy itself.
PAC_PATH = "/proxy.pac"
#: The origin-form paths the listener answers (L{gateway.proxy.http.local}); any
#: other origin-form target is not a proxy request (400).
LOCAL_PATHS = frozenset({PAC_PATH})


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
        local = not is_connect and target.partition("?")[0] in LOCAL_PATHS
        if is_connect:
            host, port = _parse_authority(target, None)
        else:
            if local:
                host, port = "", 0
            else:
                url = _parse_absolute(target)
                host, port = url.host, url.port
            _single(headers, "host")  # RFC 9112 3.2: several Host lines are an error
            self._body = _message_body(headers, version, request=True)
            if version == "HTTP/1.1" and "upgrade" in options and not local:  # RFC 9110 7.8: HTTP/1.1 only
                upgrade = _upgrade(headers)
        credentials = _credentials(headers)
        keep_alive = _persistent(version, options | set(_tokens(headers, "proxy-connection")))
        self._upgrading = upgrade is not None
        self._state = _State.TUNNEL if is_connect else _State.BODY
        return RequestHead(
            method, target, version, headers, host, port, is_connect, credentials, keep_alive, upgrade, local
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


def error_response(
    status: int, detail: str, *, version: str = "HTTP/1.1", realm: str = "gateway", allow: str | None = None
) -> bytes:
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
    if allow is not None:  # a 405 says what is allowed (RFC 9110 15.5.6)
        lines.append(f"Allow: {allow}")
    if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'Proxy-Authenticate: Basic realm="{quoted}"')
    return _head_bytes(lines) + body
