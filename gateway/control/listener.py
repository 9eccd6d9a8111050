"""
The control API's listener: HTTP/1.1 (twisted.web) with limits of its own.

A cap on connections (C{[gateway] control_max_clients}), a deadline for each
request head and an idle time-out for its body; the token (and, without one,
the Host header) is checked as soon as the head is complete, so a refused
client's body is never read.  What the requests mean is
L{gateway.control.http}'s business.
"""

from __future__ import annotations

import hmac
import io
import re
from typing import Any, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from gateway.config import GatewaySettings
from gateway.control.loopback import is_loopback_host
from gateway.control.responses import Response
from gateway.proxy.frontend import ClientLimit

__all__ = ["IDLE_TIMEOUT", "MAX_BODY_BYTES", "PUBLIC_PATHS", "ControlSite", "refusal"]

log = Logger()

MAX_BODY_BYTES = 1024 * 1024
"""Largest request body accepted (1 MiB); larger ones are answered 413."""

IDLE_TIMEOUT = 60.0
"""Seconds an idle client connection is kept open."""

WWW_AUTHENTICATE = b'Bearer realm="gateway"'

#: Host header names that always mean this host (RFC 6761, and Debian's
#: /etc/hosts name of ::1): no DNS server, so no rebinding attacker, decides them.
_LOOPBACK_HOST_NAMES = {"localhost", "localhost.", "ip6-localhost"}
_HOST_PORT_RE = re.compile(r"[0-9]{0,5}")  # RFC 3986: port = *DIGIT


# --- the guard: who may use the API, from the request head alone -------------------


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


#: The routes anyone may read.  Browsers fetch a PAC file without
#: credentials, and from whatever host name they were given; it holds no
#: secret (cluster names, networks, hostnames, listener addresses), and the
#: proxy listeners serve the same file to any client.  Load balancers'
#: health checks (HAProxy, keepalived) often cannot send a token; the
#: live and ready answers say only the gateway's name and a yes or no.
PUBLIC_PATHS = frozenset({b"/v1/proxy.pac", b"/v1/health/live", b"/v1/health/ready"})


def _public(request: http.Request) -> bool:
    # Known once the request line is (not yet in gotLength: a body sent with
    # a public read is then skipped as a refused client's would be).
    return request.path in PUBLIC_PATHS and request.method in (b"GET", b"HEAD")


def refusal(request: http.Request, token: bytes | None) -> Response | None:
    """
    The answer for a client that may not use the API, from the head alone:
    403 for a foreign Host header when there is no token, 401 for a missing
    or wrong token.  None when the request may go on, and always for a
    read of one of L{PUBLIC_PATHS}.
    """
    if _public(request):
        return None
    if token is None and not _local_host_header(request):
        # Without a token only this host may talk to us; a browser page
        # using DNS rebinding would send its own host name.
        return Response.error(http.FORBIDDEN, "the Host header must name this host (localhost)")
    if not _authorized(request, token):
        return Response.error(
            http.UNAUTHORIZED,
            "missing or invalid bearer token",
            None,
            (b"www-authenticate", WWW_AUTHENTICATE),
        )
    return None


# --- the listener ---------------------------------------------------------------------


class _ControlRequest(server.Request):
    """
    A request that keeps at most L{MAX_BODY_BYTES} of body in memory.

    A body announced larger than that (C{Content-Length}), or any body from
    a client that L{refusal} refuses, is not read at all: the request is
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
        elif length != 0 and refusal(self, _channel_of(self).site.control_token) is not None:
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

    site: ControlSite
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


class ControlSite(server.Site):
    """
    The site of the control listener: C{resource} behind the connection
    cap and deadlines of C{settings}, refusing early what C{token} refuses.
    """

    displayTracebacks = False
    noisy = False
    # HTTP/1.1 only: no HTTP/2 negotiation.  (Twisted's stubs type this as a
    # factory of its private HTTP/2-capable wrapper; any HTTPChannel works.)
    protocol = _ControlChannel  # type: ignore[assignment]

    def __init__(
        self, resource: Resource, token: bytes | None, settings: GatewaySettings, reactor: IReactorTime | None
    ) -> None:
        super().__init__(resource, requestFactory=_ControlRequest, timeout=IDLE_TIMEOUT, reactor=reactor)
        self.control_token = token
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
