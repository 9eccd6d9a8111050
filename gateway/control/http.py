"""
The control REST API: JSON over HTTP in front of a L{ClusterControl}.

Routes::

    GET    /v1/clusters          list with a summary of each cluster's status
    GET    /v1/clusters/NAME     settings and status of one cluster
    PUT    /v1/clusters/NAME     create (201) or replace (200) an API cluster
    DELETE /v1/clusters/NAME     forget an API cluster (204)
    GET    /v1/health            the gateway's health
    GET    /v1/health/live       200 while the process answers (no token); also HEAD
    GET    /v1/health/ready      200 when it should get clients, else 503 (no token); also HEAD
    GET    /metrics              Prometheus text exposition
    GET    /v1/proxy.pac         the PAC file (?cluster=NAME: one cluster's view); also HEAD

Every JSON answer is compact with sorted keys and ends with a newline; errors
are C{{"error": REASON, "field": KEY-OR-NULL}} (C{{"error": "internal error"}}
for a 500).  With a token, every request needs C{Authorization: Bearer TOKEN},
except a read of the PAC file (browsers fetch it without credentials) and of
the live and ready answers (load balancers' checks often cannot send one):
L{gateway.control.listener.PUBLIC_PATHS}.

The listener (L{gateway.control.listener}) has limits of its own (C{[gateway]
control_*}): a cap on connections, a deadline for each request head and an
idle time-out for its body; the token (and, without one, the Host header) is
checked as soon as the head is complete, so a refused client's body is never
read.

Request bodies (which carry private keys) are never logged nor echoed.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from gateway.config import NAME_RULE, GatewaySettings, is_valid_name
from gateway.config.secrets import read_secret_file
from gateway.control import strictjson
from gateway.control.contract import ClusterControl, ClusterView, ControlError
from gateway.control.listener import IDLE_TIMEOUT, MAX_BODY_BYTES, ControlSite, refusal
from gateway.control.responses import INTERNAL_ERROR, Response
from gateway.proxy.pac import PAC_CONTENT_TYPE, PacRefused, fetch_pac

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_BODY_BYTES",
    "TOKEN_ENV",
    "control_site",
    "control_token",
]

log = Logger()

TOKEN_ENV = "GATEWAY_CONTROL_TOKEN"
"""Environment variable holding the bearer token when no token file is set."""

MAX_TOKEN_FILE_BYTES = 64 * 1024

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it must fit an HTTP header
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


# --- the REST resource ------------------------------------------------------------------


class _BadRequest(Exception):
    """Answer 400 with this reason and field."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason, field)
        self.reason = reason
        self.field = field


@dataclass
class _Call:
    """What is known of a request, for its log line."""

    method: str
    path: str
    cluster: str | None = None
    #: Why the request was refused (a reason never holds a secret: see ControlError).
    refusal: str | None = None


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
            call.refusal = f"{e.field}: {e.reason}" if e.field else str(e.reason)
            response = self._control_error(e, call)
        except _BadRequest as e:
            call.refusal = e.reason
            response = Response.error(http.BAD_REQUEST, e.reason, e.field)
        except Exception:
            log.failure(
                "control API: {method} {path}: unexpected error",
                method=call.method,
                path=call.path,
                cluster=call.cluster,
            )
            response = INTERNAL_ERROR
        disconnected = bool(finished) or getattr(request, "_disconnected", False)
        if not disconnected:
            self._write(request, response)
        if request.method in _MUTATING:
            log.info(
                "control API: {method} {path} -> {status}"
                + (": {refusal}" if call.refusal else "")
                + (" (client gone)" if disconnected else ""),
                method=call.method,
                path=call.path,
                status=response.status,
                refusal=call.refusal,
                cluster=call.cluster,
                client=str(request.getClientAddress()),
                disconnected=disconnected,
            )

    @staticmethod
    def _write(request: server.Request, response: Response) -> None:
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
    def _control_error(error: ControlError, call: _Call) -> Response:
        status = error.status
        if not isinstance(status, int) or not 400 <= status <= 599:
            log.error(
                "control API: {method} {path}: ControlError with invalid status {status!r}",
                method=call.method,
                path=call.path,
                status=status,
            )
            return INTERNAL_ERROR
        field = error.field if error.field is None else str(error.field)
        return Response.error(status, str(error.reason), field)

    # -- routing -------------------------------------------------------------------

    async def _dispatch(self, request: server.Request, call: _Call) -> Response:
        refused = refusal(request, self.token)
        if refused is not None:
            return refused
        if getattr(request, "too_large", False):
            return Response.error(http.REQUEST_ENTITY_TOO_LARGE, f"request body larger than {MAX_BODY_BYTES} bytes")

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
            case [b"", b"v1", b"health", b"live"]:
                handlers = dict.fromkeys((b"GET", b"HEAD"), self._live)
            case [b"", b"v1", b"health", b"ready"]:
                handlers = dict.fromkeys((b"GET", b"HEAD"), self._ready)
            case [b"", b"metrics"]:
                handlers = {b"GET": self._metrics}
            case [b"", b"v1", b"proxy.pac"]:
                handlers = {b"GET": lambda: self._proxy_pac(request), b"HEAD": lambda: self._proxy_pac(request)}
            case _:
                return Response.error(http.NOT_FOUND, "no such resource")

        def name() -> str:
            call.cluster = _cluster_name(raw_name)
            return call.cluster

        handler = handlers.get(request.method)
        if handler is None:
            allowed = b", ".join(method for method in (b"GET", b"HEAD", b"PUT", b"DELETE") if method in handlers)
            return Response.error(
                http.NOT_ALLOWED,
                f"method not allowed (allowed: {allowed.decode('ascii')})",
                None,
                (b"allow", allowed),
            )
        return await handler()

    # -- handlers ------------------------------------------------------------------

    async def _list(self) -> Response:
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
        return Response.json(http.OK, {"clusters": clusters})

    async def _show(self, name: str) -> Response:
        view: ClusterView = await maybeDeferred(self.control.get_cluster, name)
        return Response.json(
            http.OK,
            {"name": view.name, "source": view.source, "settings": view.settings, "status": view.status},
        )

    async def _put(self, name: str, request: server.Request) -> Response:
        assert isinstance(request.content, io.BytesIO)  # made by the listener's request (gotLength)
        body = _json_object(request.content.getvalue())
        created = bool(await maybeDeferred(self.control.put_cluster, name, body))
        if created:
            return Response.json(
                http.CREATED, {"name": name, "created": True}, (b"location", b"/v1/clusters/" + name.encode("ascii"))
            )
        return Response.json(http.OK, {"name": name, "created": False})

    async def _delete(self, name: str) -> Response:
        await maybeDeferred(self.control.delete_cluster, name)
        return Response(http.NO_CONTENT, b"", None)

    async def _health(self) -> Response:
        return Response.json(http.OK, await maybeDeferred(self.control.health))

    async def _live(self) -> Response:
        health = await maybeDeferred(self.control.health)
        return Response.json(http.OK, {"gateway": health["gateway"], "live": True})

    async def _ready(self) -> Response:
        """200 or 503 for a load balancer; why not ready is in the token-protected C{/v1/health}."""
        health = await maybeDeferred(self.control.health)
        ready = bool(health["ready"])
        return Response.json(
            http.OK if ready else http.SERVICE_UNAVAILABLE, {"gateway": health["gateway"], "ready": ready}
        )

    async def _metrics(self) -> Response:
        text = await maybeDeferred(self.control.metrics)
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, bytes):
            raise TypeError(f"metrics() returned {type(text).__name__}, not bytes")
        return Response(http.OK, text, METRICS_TYPE)

    async def _proxy_pac(self, request: server.Request) -> Response:
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        query = request.uri.partition(b"?")[2].decode("latin-1")
        try:
            body = fetch_pac(self.control.proxy_pac, query, host)
        except PacRefused as e:
            return Response.error(e.status, e.reason)
        return Response(http.OK, body, PAC_CONTENT_TYPE, ((b"cache-control", b"no-cache"),))


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
    resource = _ControlResource(control, token)
    return ControlSite(resource, resource.token, settings or GatewaySettings(), reactor)
