"""
The HTTP proxy listener: a Twisted adapter around the sans-IO machines of
L{gateway.httpproxy}.

Two modes share one client connection:

 - C{CONNECT host:port}: after a C{200}, the connection becomes a L{Splice}
   of raw bytes, exactly like SOCKS.
 - absolute-form (C{GET http://10.0.0.5:8080/x HTTP/1.1}, what C{requests}
   sends for C{http://} URLs): the request is rewritten to origin-form and
   sent over a tunnel to that host; the response is parsed only for its
   framing, so the client connection can be kept alive and the tunnel reused
   for the next request to the same destination with the same credentials.
   A request to another destination closes the old tunnel and opens a new
   one, so one client connection can visit several hosts.

Errors are answered with the status of L{gateway.httpproxy.status_for} and a
short text body, and logged; the client never sees a traceback.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.errors import StreamError
from gateway.frontend import ClientLimit, FrontendFactory, FrontendProtocol, stream_error
from gateway.httpproxy import (
    RequestBody,
    RequestEnd,
    RequestError,
    RequestHead,
    RequestParser,
    ResponseBody,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    ResponseParser,
    error_response,
    status_for,
)
from gateway.ssh.channel import TunnelChannel
from gateway.streams import Gateway, StreamRequest

log = Logger()

#: How long a kept-alive client connection may sit idle between requests.
KEEPALIVE_IDLE = 60.0
#: Buffered client bytes above which the client is paused until we catch up.
MAX_BUFFERED = 256 * 1024


class _Upstream:
    """An open tunnel used for absolute-form requests, and what it is for."""

    def __init__(self, key: tuple, channel: TunnelChannel) -> None:
        self.key = key
        self.channel = channel


class HttpProxyProtocol(FrontendProtocol):
    """One HTTP proxy client connection."""

    kind = "HTTP"

    def __init__(self, gateway: Gateway, clock: IReactorTime) -> None:
        super().__init__(gateway, clock)
        self._parser = RequestParser()
        # The absolute-form exchange in progress.
        self._head: RequestHead | None = None
        self._upstream: _Upstream | None = None
        self._opening = False
        self._pending: list[bytes] = []
        self._response: ResponseParser | None = None
        self._response_started = False
        self._request_done = False
        self._response_done = False
        self._client_keep_alive = True

    # -- connection --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.client_data(data)
            return
        self._handle(self._parser.receive_data(data))
        if self._parser.buffered > MAX_BUFFERED and not self._gone:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self._splice is not None:
            self._splice.client_eof()
        elif self._head is None:
            self.transport.loseConnection()
        # else: let the exchange in progress finish, then close (keep-alive off)
        else:
            self._client_keep_alive = False

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._drop_upstream()

    # -- requests ------------------------------------------------------------

    def _handle(self, events: list) -> None:
        for event in events:
            if self._gone:
                return
            if isinstance(event, RequestHead):
                self._stop_timer()
                if event.is_connect:
                    self._connect(event)
                else:
                    self._forward(event)
            elif isinstance(event, RequestBody):
                self._send_upstream(event.data)
            elif isinstance(event, RequestEnd):
                self._request_done = True
                self._maybe_next()
            elif isinstance(event, RequestError):
                self.handshake_failed()
                log.info(
                    "bad HTTP request from {client}: {detail}",
                    client=self._client,
                    outcome="rejected",
                    status=event.status,
                    detail=event.detail,
                )
                self._fail(event.status, event.detail)

    def _stream_request(self, head: RequestHead, frontend: str) -> StreamRequest:
        username, password = head.credentials or (None, None)
        return StreamRequest(
            host=head.host,
            port=head.port,
            frontend=frontend,
            client=self._client,
            username=username,
            password=password,
            origin=self._origin,
        )

    def _fail(self, status: int, detail: str) -> None:
        version = self._head.version if self._head is not None else "HTTP/1.1"
        self.transport.write(error_response(status, detail, version=version))
        self.transport.loseConnection()
        self._drop_upstream()

    def _refused(self, failure: Failure) -> None:
        if not self._gone:
            error = stream_error(failure)
            self._fail(status_for(error), error.detail)

    # CONNECT

    def _connect(self, head: RequestHead) -> None:
        self._drop_upstream()  # after keep-alive requests, the connection becomes a tunnel
        self._response = None
        self._head = head
        self.transport.pauseProducing()
        opening = self._gateway.open_stream(self._stream_request(head, "http-connect"))
        opening.addCallbacks(self._connected, self._refused)

    def _connected(self, channel: TunnelChannel) -> None:
        if self._gone:
            channel.close()
            return
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._start_splice(channel, self._parser.take_leftover())

    # absolute-form

    def _forward(self, head: RequestHead) -> None:
        self._head = head
        self._request_done = self._response_done = False
        self._response_started = False
        self._client_keep_alive = self._client_keep_alive and head.keep_alive
        self._response = ResponseParser(head.method)
        key = (head.host, head.port, head.credentials)
        if self._upstream is not None and self._upstream.key == key:
            # Reuse the tunnel only while the route still leads to the same
            # cluster connection (tokens and clusters change at runtime).
            try:
                _, cluster = self._gateway.route(self._stream_request(head, "http"))
            except StreamError as e:
                self._fail(status_for(e), e.detail)
                return
            if cluster is self._upstream.channel.cluster:
                self._upstream.channel.send(head.upstream_head())
                return
        self._drop_upstream()
        self._opening = True
        self._pending = [head.upstream_head()]
        self.transport.pauseProducing()
        opening = self._gateway.open_stream(self._stream_request(head, "http"))
        opening.addCallbacks(lambda channel: self._upstream_open(key, channel), self._refused)

    def _upstream_open(self, key: tuple, channel: TunnelChannel) -> None:
        self._opening = False
        if self._gone:
            channel.close()
            return
        self._upstream = _Upstream(key, channel)
        channel.attach(self)
        self.transport.registerProducer(channel, True)
        pending, self._pending = self._pending, []
        for data in pending:
            channel.send(data)
        self.transport.resumeProducing()

    def _send_upstream(self, data: bytes) -> None:
        if self._opening:
            self._pending.append(data)
        elif self._upstream is not None:
            self._upstream.channel.send(data)
        # else: the upstream already answered and went away; drop the rest

    def _drop_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.channel.attach(None)
            if not self._gone:
                self.transport.unregisterProducer()
                # The upstream may have paused the client (full window); the
                # rest of a request body is now read and dropped instead.
                self.transport.resumeProducing()
            upstream.channel.close()

    def _maybe_next(self) -> None:
        """Start on the next request once both halves of this one are done."""
        if not (self._request_done and self._response_done):
            return
        if not self._client_keep_alive:
            self.transport.loseConnection()
            self._drop_upstream()
            return
        self._head = None
        self._response = None
        self._arm_timer(KEEPALIVE_IDLE)
        self.transport.resumeProducing()
        self._handle(self._parser.next_request())

    # -- responses (TunnelPeer of the upstream channel) -----------------------

    def _handle_response(self, events: list) -> None:
        for event in events:
            if isinstance(event, ResponseHead):
                if not event.interim:
                    self._response_started = True
                    if self._response.close_delimited:
                        self._client_keep_alive = False
                data = event.client_head(keep_alive=self._client_keep_alive)
                self.transport.write(data)
            elif isinstance(event, ResponseBody):
                self.transport.write(event.data)
            elif isinstance(event, ResponseEnd):
                if not event.reusable:
                    self._drop_upstream()
                self._response_done = True
                self._maybe_next()
                return
            elif isinstance(event, ResponseError):
                self._upstream_broken(f"bad response from upstream: {event.detail}")
                return

    def _upstream_broken(self, detail: str) -> None:
        if self._response_started:
            log.info(
                "upstream response to {client} cut short: {detail}",
                client=self._client,
                detail=detail,
            )
            # Reset: a client must not take a truncated response for a whole one.
            self.transport.abortConnection()
            self._drop_upstream()
        else:
            self._fail(502, detail)

    def tunnel_data(self, data: bytes) -> None:
        if self._response is None:
            # Bytes from an idle upstream: it is not speaking HTTP to us.
            self._drop_upstream()
            return
        self._handle_response(self._response.receive_data(data))

    def tunnel_eof(self) -> None:
        if self._response is None or self._response_done:
            # An idle kept-alive upstream closed (its keep-alive time-out):
            # it cannot carry the next request.
            self._drop_upstream()
            return
        self._handle_response(self._response.eof_received())

    def tunnel_closed(self) -> None:
        if self._upstream is None:
            return
        channel = self._upstream.channel
        self._upstream = None
        if not self._gone:
            self.transport.unregisterProducer()
        if self._response is not None and not self._response_done:
            self._handle_response(self._response.eof_received())
            if not self._response_done and not self._gone:
                self._upstream_broken(channel.close_reason or "upstream closed the connection")

    def tunnel_pause_writing(self) -> None:
        self.transport.pauseProducing()

    def tunnel_resume_writing(self) -> None:
        self.transport.resumeProducing()


def HttpProxyFactory(gateway: Gateway, clock: IReactorTime, clients: ClientLimit | None = None) -> FrontendFactory:
    """The factory of an HTTP proxy listener."""
    return FrontendFactory(HttpProxyProtocol, gateway, clock, clients)
