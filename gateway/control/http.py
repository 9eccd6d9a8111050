"""
The control REST API: JSON over HTTP in front of a L{ClusterControl}.

Routes::

    GET    /v1/clusters          list with a summary of each cluster's status
    GET    /v1/clusters/NAME     settings and status of one cluster
    PUT    /v1/clusters/NAME     create (201) or replace (200) an API cluster
    DELETE /v1/clusters/NAME     forget an API cluster (204)
    GET    /v1/health            the gateway's health
    GET    /metrics              Prometheus text exposition

Every JSON answer is compact with sorted keys and ends with a newline; errors
are C{{"error": REASON, "field": KEY-OR-NULL}} (C{{"error": "internal error"}}
for a 500).  With a token, every request needs C{Authorization: Bearer TOKEN}.

The listener has limits of its own (C{[gateway] control_*}): a cap on
connections, a deadline for each request head and an idle time-out for its
body; the token (and, without one, the Host header) is checked as soon as the
head is complete, so a refused client's body is never read.

Request bodies (which carry private keys) are never logged nor echoed.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from gateway.config import NAME_RULE, GatewaySettings, is_valid_name
from gateway.config.secrets import read_secret_file
from gateway.control import strictjson
from gateway.control.contract import ClusterControl, ClusterView, ControlError
from gateway.control.loopback import is_loopback_host
from gateway.proxy.frontend import ClientLimit

__all__ = [
    "MAX_BODY_BYTES",
    "TOKEN_ENV",
    "control_site",
    "control_token",
]

log = Logger()

MAX_BODY_BYTES = 1024 * 1024
"""Largest request body accepted (1 MiB); larger ones are answered 413."""

TOKEN_ENV = "GATEWAY_CONTROL_TOKEN"
"""Environment variable holding the bearer token when no token file is set."""

MAX_TOKEN_FILE_BYTES = 64 * 1024

IDLE_TIMEOUT = 60.0
"""Seconds an idle client connection is kept open."""

JSON_TYPE = b"application/json"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
WWW_AUTHENTICATE = b'Bearer realm="gateway"'

_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it must fit an HTTP header
#: Host header names that always mean this host (RFC 6761, and Debian's
#: /etc/hosts name of ::1): no DNS server, so no rebinding attacker, decides them.
_LOOPBACK_HOST_NAMES = {"localhost", "localhost.", "ip6-localhost"}
_HOST_PORT_RE = re.compile(r"[0-9]{0,5}")  # RFC 3986: port = *DIGIT
_MUTATING = {b"PUT", b"DELETE", b"POST", b"PATCH"}


# --- token -------------------------------------------------------------------------


def control_token(path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """
    The bearer token the control API requires: the content of the file
    C{path} (surrounding white space removed) when given, else the
    environment variable C{GATEWAY_CONTROL_TOKEN}; None when neither is set.

    Like OpenSSH with private keys, a token file with any group/other
    permission bit is refused.  Every problem raises L{ValueError} with a
    message that names the file (never the token).
    """
    if path is not None:
        text = _read_token_file(path)
        where = f"control token file {path!r}"
    elif TOKEN_ENV in environ:
        text = environ[TOKEN_ENV]
        where = f"environment variable {TOKEN_ENV}"
    else:
        return None
    token = text.strip()
    if not token:
        raise ValueError(f"{where} is empty")
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"{where}: the token must be printable ASCII without white space")
    return token


def _read_token_file(path: str) -> str:
    data = read_secret_file(path, "control token file", MAX_TOKEN_FILE_BYTES, regular_only=True)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"control token file {path!r}: the token must be printable ASCII") from None


# --- HTTP ------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Set):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(value: object) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)
    return text.encode("ascii") + b"\n"


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: bytes | None = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, status: int, value: object, *headers: tuple[bytes, bytes]) -> _Response:
        return cls(status, _json_bytes(value), JSON_TYPE, headers)

    @classmethod
    def error(cls, status: int, reason: str, field: str | None = None, *headers: tuple[bytes, bytes]) -> _Response:
        return cls.json(status, {"error": reason, "field": field}, *headers)


_INTERNAL_ERROR = _Response.json(http.INTERNAL_SERVER_ERROR, {"error": "internal error"})


class _BadRequest(Exception):
    """Answer 400 with this reason and field."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason, field)
        self.reason = reason
        self.field = field


def _authorized(request: http.Request, token: bytes | None) -> bool:
    if token is None:
        return True
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        return False
    scheme, _, credentials = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(credentials.strip(), token)


def _local_host_header(request: http.Request) -> bool:
    """
    True when the Host header is absent (unix socket clients) or names
    loopback: a loopback address (C{127.0.0.0/8}, C{[::1]}) or one of
    L{_LOOPBACK_HOST_NAMES}, with an optional port.  Anything else is a name that
    DNS (so a rebinding attacker) decides, like C{127.0.0.1.nip.io}.
    """
    values = request.requestHeaders.getRawHeaders(b"host")
    if not values:
        return True
    if len(values) != 1:
        return False
    try:
        text = values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        return False
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
        if ":" not in host:  # only IPv6 addresses go in brackets
            return False
    else:
        host, _, port = text.partition(":")
    if not _HOST_PORT_RE.fullmatch(port):
        return False
    return host.lower() in _LOOPBACK_HOST_NAMES or is_loopback_host(host)


def _refusal(request: http.Request, token: bytes | None) -> _Response | None:
    """
    The answer for a client that may not use the API, from the head alone:
    403 for a foreign Host header when there is no token, 401 for a missing
    or wrong token.  None when the request may go on.
    """
    if token is None and not _local_host_header(request):
        # Without a token only this host may talk to us; a browser page
        # using DNS rebinding would send its own host name.
        return _Response.error(http.FORBIDDEN, "the Host header must name this host (localhost)")
    if not _authorized(request, token):
        return _Response.error(
            http.UNAUTHORIZED,
            "missing or invalid bearer token",
            None,
            (b"www-authenticate", WWW_AUTHENTICATE),
        )
    return None


class _ControlRequest(server.Request):
    """
    A request that keeps at most L{MAX_BODY_BYTES} of body in memory.

    A body announced larger than that (C{Content-Length}), or any body from
    a client that L{_refusal} refuses, is not read at all: the request is
    answered at once and the connection closed after the answer.  A chunked
    body that turns out too large is read to its end but not kept.
    """

    too_large = False
    skipped_body = False
    _received = 0
    #: Made in gotLength, before any body byte (Twisted's own type is an optional IO).
    content: io.BytesIO

    def __init__(self, channel: Any, *args: Any, **kw: Any) -> None:
        kw["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kw)

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        if length is not None and length > MAX_BODY_BYTES:
            self.too_large = True
            self._skip_body()
        elif length != 0 and _refusal(self, _channel_of(self).site.control_token) is not None:
            self._skip_body()

    def _skip_body(self) -> None:
        channel = self.channel
        # HTTPChannel dispatches the request right after gotLength when the
        # length is 0; the body that follows is then never parsed, and the
        # connection is closed once this request is answered.
        channel.length = 0
        channel.persistent = False
        self.skipped_body = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue"
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > MAX_BODY_BYTES:
            self.too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)


def _channel_of(request: http.Request) -> _ControlChannel:
    """The control channel a request came on (Twisted types it as any channel)."""
    channel = request.channel
    assert isinstance(channel, _ControlChannel)
    return channel


class _ControlChannel(http.HTTPChannel):
    """
    HTTP/1.1 with deadlines: a request head must be complete within
    C{site.head_timeout} seconds of the connection (or of the first byte of a
    keep-alive request), and a body may go C{site.body_timeout} seconds
    without a byte.  Twisted's own C{timeOut} is reset by every byte, so a
    client sending one byte every few seconds would hold its slot forever.
    A client past a deadline is disconnected.  Each connection holds one of
    C{site.clients}' slots until it is gone.
    """

    site: _ControlSite
    _deadline: IDelayedCall | None = None
    #: Between a request's last byte and its answer (no deadline runs then).
    _answering = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm("head", self.site.head_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._answering:
            self._arm("head", self.site.head_timeout)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()  # the request's gotLength may skip the body
        self._disarm()
        if self.length != 0:
            self._arm("body", self.site.body_timeout)

    def rawDataReceived(self, data: bytes) -> None:
        if self._deadline is not None:  # only the body's deadline runs in raw mode
            self._deadline.reset(self.site.body_timeout)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        self._answering = False  # before the next pipelined request is parsed
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)
        self.site.clients.release()

    def _arm(self, stage: str, seconds: float) -> None:
        self._disarm()
        self._deadline = self.site.reactor.callLater(seconds, self._timed_out, stage, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timed_out(self, stage: str, seconds: float) -> None:
        self._deadline = None
        transport = cast(ITCPTransport, self.transport)
        log.info(
            "control API client {client} sent no complete request {stage} in {timeout:g} s",
            client=str(transport.getPeer()),
            stage=stage,
            timeout=seconds,
            outcome=f"{stage}-timeout",
        )
        transport.abortConnection()


class _ControlSite(server.Site):
    displayTracebacks = False
    noisy = False
    # HTTP/1.1 only: no HTTP/2 negotiation.  (Twisted's stubs type this as a
    # factory of its private HTTP/2-capable wrapper; any HTTPChannel works.)
    protocol = _ControlChannel  # type: ignore[assignment]

    def __init__(self, resource: _ControlResource, settings: GatewaySettings, reactor: IReactorTime | None) -> None:
        super().__init__(resource, requestFactory=_ControlRequest, timeout=IDLE_TIMEOUT, reactor=reactor)
        self.control_token = resource.token
        self.head_timeout = settings.control_head_timeout
        self.body_timeout = settings.control_body_timeout
        #: The control listener's own count: API clients cannot use up the
        #: proxies' slots, nor the proxies theirs.
        self.clients = ClientLimit(settings.control_max_clients, "control_max_clients")

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel, or None (the connection is closed at once) beyond the cap."""
        if not self.clients.admit():
            return None
        return super().buildProtocol(addr)

    def log(self, request: http.Request) -> None:
        """No access log: mutating requests are logged by the resource."""


@dataclass
class _Call:
    """What is known of a request, for its log line."""

    method: str
    path: str
    cluster: str | None = None


def _path_for_log(path: bytes) -> str:
    text = path.decode("ascii", "backslashreplace")
    return text if len(text) <= 200 else text[:200] + "..."


class _ControlResource(Resource):
    isLeaf = True

    def __init__(self, control: ClusterControl, token: str | None) -> None:
        super().__init__()
        self.control = control
        self.token = None if token is None else token.encode("utf-8")

    def render(self, request: server.Request) -> int:
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))  # errback: client gone
        d = Deferred.fromCoroutine(self._respond(request, finished))
        d.addErrback(lambda f: log.failure("control API: cannot answer", failure=f))
        return server.NOT_DONE_YET

    async def _respond(self, request: server.Request, finished: list[bool]) -> None:
        call = _Call(request.method.decode("ascii", "backslashreplace"), _path_for_log(request.path))
        try:
            response = await self._dispatch(request, call)
        except ControlError as e:
            response = self._control_error(e, call)
        except _BadRequest as e:
            response = _Response.error(http.BAD_REQUEST, e.reason, e.field)
        except Exception:
            log.failure(
                "control API: {method} {path}: unexpected error",
                method=call.method,
                path=call.path,
                cluster=call.cluster,
            )
            response = _INTERNAL_ERROR
        disconnected = bool(finished) or getattr(request, "_disconnected", False)
        if not disconnected:
            self._write(request, response)
        if request.method in _MUTATING:
            log.info(
                "control API: {method} {path} -> {status}" + (" (client gone)" if disconnected else ""),
                method=call.method,
                path=call.path,
                status=response.status,
                cluster=call.cluster,
                client=str(request.getClientAddress()),
                disconnected=disconnected,
            )

    @staticmethod
    def _write(request: server.Request, response: _Response) -> None:
        request.setResponseCode(response.status)
        if response.content_type is not None:
            request.setHeader(b"content-type", response.content_type)
        request.setHeader(b"cache-control", b"no-store")
        for name, value in response.headers:
            request.setHeader(name, value)
        if response.body:
            request.setHeader(b"content-length", b"%d" % len(response.body))
            request.write(response.body)
        request.finish()

    @staticmethod
    def _control_error(error: ControlError, call: _Call) -> _Response:
        status = error.status
        if not isinstance(status, int) or not 400 <= status <= 599:
            log.error(
                "control API: {method} {path}: ControlError with invalid status {status!r}",
                method=call.method,
                path=call.path,
                status=status,
            )
            return _INTERNAL_ERROR
        field = error.field if error.field is None else str(error.field)
        return _Response.error(status, str(error.reason), field)

    # -- routing -------------------------------------------------------------------

    async def _dispatch(self, request: server.Request, call: _Call) -> _Response:
        refusal = _refusal(request, self.token)
        if refusal is not None:
            return refusal
        if getattr(request, "too_large", False):
            return _Response.error(http.REQUEST_ENTITY_TOO_LARGE, f"request body larger than {MAX_BODY_BYTES} bytes")

        handlers: dict[bytes, Callable[[], Any]]
        segments = request.path.split(b"/")
        match segments:
            case [b"", b"v1", b"clusters"]:
                handlers = {b"GET": self._list}
            case [b"", b"v1", b"clusters", raw_name]:
                handlers = {
                    b"GET": lambda: self._show(name()),
                    b"PUT": lambda: self._put(name(), request),
                    b"DELETE": lambda: self._delete(name()),
                }
            case [b"", b"v1", b"health"]:
                handlers = {b"GET": self._health}
            case [b"", b"metrics"]:
                handlers = {b"GET": self._metrics}
            case _:
                return _Response.error(http.NOT_FOUND, "no such resource")

        def name() -> str:
            call.cluster = _cluster_name(raw_name)
            return call.cluster

        handler = handlers.get(request.method)
        if handler is None:
            allowed = b", ".join(method for method in (b"GET", b"PUT", b"DELETE") if method in handlers)
            return _Response.error(
                http.NOT_ALLOWED,
                f"method not allowed (allowed: {allowed.decode('ascii')})",
                None,
                (b"allow", allowed),
            )
        return await handler()

    # -- handlers ------------------------------------------------------------------

    async def _list(self) -> _Response:
        views = await maybeDeferred(self.control.list_clusters)
        clusters = []
        for view in views:
            status = view.status
            clusters.append(
                {
                    "name": view.name,
                    "source": view.source,
                    "state": status.get("state"),
                    "proxy": status.get("proxy"),
                    "open_streams": status.get("open_streams"),
                    "last_error": status.get("last_error"),
                }
            )
        return _Response.json(http.OK, {"clusters": clusters})

    async def _show(self, name: str) -> _Response:
        view: ClusterView = await maybeDeferred(self.control.get_cluster, name)
        return _Response.json(
            http.OK,
            {"name": view.name, "source": view.source, "settings": view.settings, "status": view.status},
        )

    async def _put(self, name: str, request: server.Request) -> _Response:
        assert isinstance(request.content, io.BytesIO)  # made by _ControlRequest.gotLength
        body = _json_object(request.content.getvalue())
        created = bool(await maybeDeferred(self.control.put_cluster, name, body))
        if created:
            return _Response.json(
                http.CREATED, {"name": name, "created": True}, (b"location", b"/v1/clusters/" + name.encode("ascii"))
            )
        return _Response.json(http.OK, {"name": name, "created": False})

    async def _delete(self, name: str) -> _Response:
        await maybeDeferred(self.control.delete_cluster, name)
        return _Response(http.NO_CONTENT, b"", None)

    async def _health(self) -> _Response:
        return _Response.json(http.OK, await maybeDeferred(self.control.health))

    async def _metrics(self) -> _Response:
        text = await maybeDeferred(self.control.metrics)
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, bytes):
            raise TypeError(f"metrics() returned {type(text).__name__}, not bytes")
        return _Response(http.OK, text, METRICS_TYPE)


def _cluster_name(raw: bytes) -> str:
    try:
        name = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        name = ""
    if not is_valid_name(name):
        raise _BadRequest(f"invalid cluster name: {NAME_RULE}", "name")
    return name


def _json_object(data: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object; never echo it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRequest(f"request body is not valid UTF-8 (byte {e.start})")
    try:
        value = strictjson.loads(text)
    except json.JSONDecodeError as e:
        raise _BadRequest(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})")
    except RecursionError:
        raise _BadRequest("invalid JSON: nested too deeply")
    except strictjson.DuplicateKeyError as e:
        raise _BadRequest(f"invalid JSON: duplicate key {e.key!r} in a JSON object")
    except strictjson.ConstantError as e:
        raise _BadRequest(f"invalid JSON: {e.name} is not valid JSON")
    if not isinstance(value, dict):
        raise _BadRequest("request body must be a JSON object")
    return value


def control_site(
    control: ClusterControl,
    token: str | None,
    settings: GatewaySettings | None = None,
    reactor: IReactorTime | None = None,
) -> server.Site:
    """
    The control API as a L{twisted.web.server.Site} over C{control}; with a
    C{token}, every request needs C{Authorization: Bearer TOKEN}.

    @param settings: the C{[gateway]} table, for the listener's limits
        (C{control_max_clients}, C{control_head_timeout},
        C{control_body_timeout}); its defaults when None.
    @param reactor: the clock of the time-outs (the global reactor when None).
    """
    if token is not None and not token:
        raise ValueError("the control token is empty")
    return _ControlSite(_ControlResource(control, token), settings or GatewaySettings(), reactor)
