"""
The HTTP proxy listener: a Twisted adapter around the sans-IO machines of
L{gateway.proxy.http.machine}.

Two modes share one client connection:

 - C{CONNECT host:port}: after a C{200}, the connection becomes a L{Splice}
   of raw bytes, exactly like SOCKS.
 - absolute-form (C{GET http://10.0.0.5:8080/x HTTP/1.1}, what C{requests}
   sends for C{http://} URLs): the request is rewritten to origin-form and
   sent over a tunnel to that host; the response is parsed only for its
   framing, so the client connection can be kept alive and the tunnel reused
   for the next request to the same destination with the same credentials.
   A request to another destination closes the old tunnel and opens a new
   one, so one client connection can visit several hosts.  A request that
   asks to upgrade (WebSocket) and gets C{101} turns the connection into a
   splice with that tunnel.

An origin-form C{GET /proxy.pac} is for the listener itself: answered by
L{gateway.proxy.http.local} without a tunnel, and the connection goes on.

Every stage of an exchange has a deadline (L{gateway.config.GatewaySettings}):
the request head (C{handshake_timeout}, then C{keepalive_timeout} between
requests), the request body (C{body_timeout}, idle between bytes), the
response head (C{response_timeout}).  A client that closes before its request
is complete frees its tunnel and its slot at once.  A request sent on a
reused tunnel that the origin closes before answering (its keep-alive
time-out raced the request) is sent once more on a new tunnel when it is
idempotent and has no body, as browsers do.

Errors are answered with the status of L{gateway.proxy.http.machine.status_for} and a
short text body, and logged; the client never sees a traceback.
"""

from __future__ import annotations

from http import HTTPStatus

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.errors import Reason, StreamError
from gateway.proxy.frontend import ClientLimit, FrontendFactory, FrontendProtocol, stream_error
from gateway.proxy.http.events import (
    RequestBody,
    RequestEnd,
    RequestError,
    RequestHead,
    ResponseBody,
    ResponseEnd,
    ResponseError,
    ResponseHead,
)
from gateway.proxy.http.exchange import Exchange, Upstream, UpstreamKey
from gateway.proxy.http.local import answer_local
from gateway.proxy.http.machine import RequestParser, ResponseParser, error_response, status_for
from gateway.proxy.opener import StreamOpener, StreamRequest
from gateway.ssh.channel import TunnelChannel

log = Logger()

#: Buffered client bytes above which the client is paused until we catch up.
MAX_BUFFERED = 256 * 1024


class HttpProxyProtocol(FrontendProtocol):
    """One HTTP proxy client connection."""

    kind = "HTTP"

    def __init__(self, gateway: StreamOpener, clock: IReactorTime, cluster: str | None = None) -> None:
        super().__init__(gateway, clock, cluster)
        self._parser = RequestParser()
        self._version = "HTTP/1.1"
        #: The credentials of the request being answered.
        self._credentials: tuple[str, str] | None = None
        self._exchange: Exchange | None = None
        self._upstream: Upstream | None = None
        self._pending: list[bytes] = []
        self._client_keep_alive = True
        #: Bytes of a request arrived since the last exchange ended.
        self._head_begun = False
        #: The upstream's window is full: the client is paused, and no body
        #: deadline runs (a destination that reads slowly is not the client's fault).
        self._upstream_full = False
        #: The request being parsed was answered by the listener itself (the PAC file).
        self._answered_locally = False

    # -- connection --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.client_data(data)
            return
        self._head_begun = True
        self._handle(self._parser.receive_data(data))
        if self._parser.buffered > MAX_BUFFERED and not self._gone:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        exchange = self._exchange
        if exchange is None and self._splice is None and not self._opening:
            # Between requests: a kept-alive tunnel goes first (see _drop_upstream).
            self._drop_upstream()
            super().readConnectionLost()
        elif exchange is None or self._splice is not None:
            super().readConnectionLost()
        elif not exchange.request_done:
            # The request can never be completed: free its tunnel and the
            # slot now, not whenever (if ever) the destination answers.
            log.info(
                "HTTP client {client} closed before its request to {destination} was complete",
                client=self._client,
                destination=exchange.destination,
                outcome="client-gone",
            )
            self._drop_upstream()
            self.transport.loseConnection()
        else:
            # Answer this request (a client may half-close after it), then close.
            self._client_keep_alive = False
            self._eof_pending = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._drop_upstream()

    def drain(self) -> None:
        # An idle kept-alive connection (browsers, request sessions and agent
        # pools keep them) closes now; one in an exchange ends after it.
        self._client_keep_alive = False
        if self._exchange is None:
            self._drop_upstream()
            super().drain()

    # -- requests ------------------------------------------------------------

    def _handle(self, events: list) -> None:
        for event in events:
            if self._gone or self._splice is not None:
                return
            if isinstance(event, RequestHead):
                self._stop_timer()
                self._version = event.version
                self._credentials = event.credentials
                if event.local:
                    self._answer_local(event)
                elif event.is_connect:
                    self._connect(event)
                else:
                    self._forward(event)
            elif isinstance(event, RequestBody):
                if self._exchange is not None:
                    self._exchange.replay = None
                self._send_upstream(event.data)
                self._await_body()
            elif isinstance(event, RequestEnd):
                if self._answered_locally:
                    self._answered_locally = False
                    self._next_request()
                else:
                    self._request_done()
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
            cluster=self._cluster,
        )

    def _fail(self, status: int, detail: str) -> None:
        self._drop_upstream()
        self.transport.write(error_response(status, detail, version=self._version))
        self.transport.loseConnection()

    def _refused(self, failure: Failure) -> None:
        self._opening = False
        if not self._gone:
            error = stream_error(failure)
            status = status_for(error)
            if error.reason is Reason.AMBIGUOUS and self._credentials is None:
                # Credentials are what resolves it, and browsers, Java, ncat
                # and curl --proxy-anyauth offer theirs only when challenged.
                status = HTTPStatus.PROXY_AUTHENTICATION_REQUIRED
            self._fail(status, error.detail)

    def _answer_local(self, head: RequestHead) -> None:
        """A request for the listener itself (L{gateway.proxy.http.local}): answered at once."""
        self._client_keep_alive = self._client_keep_alive and head.keep_alive
        answer = answer_local(head, self._gateway.pac, self._client_keep_alive, self._client, self._cluster)
        if answer.keep_alive:
            self.transport.write(answer.data)
            self._answered_locally = True  # the next request once this one's (empty) body is parsed
        else:
            self._drop_upstream()
            self.transport.write(answer.data)
            self.transport.loseConnection()

    # CONNECT

    def _connect(self, head: RequestHead) -> None:
        self._drop_upstream()  # after keep-alive requests, the connection becomes a tunnel
        self._exchange = None
        self._opening = True
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
        data = head.upstream_head(self._gateway.destination_host(head.host))
        exchange = self._exchange = Exchange(head, data)
        self._client_keep_alive = self._client_keep_alive and head.keep_alive
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
                exchange.reused = True
                self._upstream.channel.send(data)
                self._await_body()
                return
        self._drop_upstream()
        self._open_upstream(key, data)

    def _open_upstream(self, key: UpstreamKey, data: bytes) -> None:
        assert self._exchange is not None
        self._opening = True
        self._pending = [data]
        self.transport.pauseProducing()
        opening = self._gateway.open_stream(self._stream_request(self._exchange.head, "http"))
        opening.addCallbacks(lambda channel: self._upstream_open(key, channel), self._refused)

    def _upstream_open(self, key: UpstreamKey, channel: TunnelChannel) -> None:
        self._opening = False
        if self._gone:
            channel.close()
            return
        self._upstream = Upstream(key, channel)
        channel.attach(self)
        self.transport.registerProducer(channel, True)
        pending, self._pending = self._pending, []
        for data in pending:
            channel.send(data)  # may fill the window: tunnel_pause_writing
        if not self._upstream_full:
            self.transport.resumeProducing()
            self._await_body()

    def _send_upstream(self, data: bytes) -> None:
        if self._opening:
            self._pending.append(data)
        elif self._upstream is not None:
            self._upstream.channel.send(data)
        # else: the upstream already answered and went away; drop the rest

    def _drop_upstream(self) -> None:
        """
        Let go of the upstream tunnel.  Before any close of the client
        connection: a transport whose (paused) producer is still registered
        resumes it when its buffer drains, instead of finishing the close.
        A tunnel whose exchange is finished closes after what it queued; one
        whose exchange is cut short (or whose client is gone) drops what it
        queued and closes at once, since a destination that stopped reading
        would otherwise hold the channel open for ever.
        """
        upstream, self._upstream = self._upstream, None
        self._upstream_full = False
        if upstream is not None:
            upstream.channel.attach(None)
            if not self._gone:
                self.transport.unregisterProducer()
                # The upstream may have paused the client (full window); the
                # rest of a request body is now read and dropped instead.
                self.transport.resumeProducing()
            exchange = self._exchange
            if self._gone or (exchange is not None and not (exchange.request_done and exchange.response_done)):
                upstream.channel.abort()
            else:
                upstream.channel.close()

    def _request_done(self) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.request_done = True
        if exchange.answered:
            self._stop_timer()
        else:
            self._arm_timer(self._gateway.settings.response_timeout, self._response_timed_out)
        self._maybe_next()

    def _maybe_next(self) -> None:
        """Start on the next request once both halves of this one are done."""
        exchange = self._exchange
        if exchange is None or not (exchange.request_done and exchange.response_done):
            return
        if not self._client_keep_alive:
            self._drop_upstream()
            self.transport.loseConnection()
            return
        self._next_request()

    def _next_request(self) -> None:
        """The connection stays for another request: wait for it, or parse what came already."""
        self._exchange = None
        self._head_begun = False
        self._arm_timer(self._gateway.settings.keepalive_timeout, self._idle_timed_out)
        self.transport.resumeProducing()
        self._handle(self._parser.next_request())

    # -- deadlines -----------------------------------------------------------

    def _await_body(self) -> None:
        """The request body is still to come: it must keep arriving."""
        exchange = self._exchange
        if exchange is not None and not exchange.request_done and not self._opening and not self._upstream_full:
            self._arm_timer(self._gateway.settings.body_timeout, self._body_timed_out)

    def _give_up(self, status: int, seconds: float, what: str, outcome: str) -> None:
        """A stage's deadline passed: answer C{status} if nothing was answered yet."""
        exchange = self._exchange
        log.info(
            "HTTP client {client}: {what} in {timeout:g} s (request to {destination})",
            client=self._client,
            what=what,
            timeout=seconds,
            destination=exchange.destination if exchange is not None else None,
            outcome=outcome,
        )
        if exchange is not None and exchange.answered:
            self._drop_upstream()
            self.transport.abortConnection()
        else:
            self._fail(status, f"{what} in {seconds:g} s")

    def _body_timed_out(self, seconds: float) -> None:
        self._give_up(408, seconds, "the request body stalled", "body-timeout")

    def _response_timed_out(self, seconds: float) -> None:
        self._give_up(504, seconds, "the upstream sent no response", "response-timeout")

    def _idle_timed_out(self, seconds: float) -> None:
        if self._head_begun:
            self._timed_out(seconds)  # a request head begun and never finished
        else:
            self._drop_upstream()
            self.transport.loseConnection()  # an idle kept-alive connection

    # -- responses (TunnelPeer of the upstream channel) -----------------------

    def _handle_response(self, events: list) -> None:
        exchange = self._exchange
        assert exchange is not None
        for event in events:
            if isinstance(event, ResponseHead):
                if event.status == 101:  # only ever for a request that asked
                    self._switch_protocols(exchange, event)
                    return
                if not event.interim:
                    exchange.answered = True
                    if exchange.response.close_delimited:
                        self._client_keep_alive = False
                    if exchange.request_done:
                        self._stop_timer()
                self.transport.write(event.client_head(keep_alive=self._client_keep_alive))
            elif isinstance(event, ResponseBody):
                self.transport.write(event.data)
            elif isinstance(event, ResponseEnd):
                if not event.reusable:
                    self._drop_upstream()
                exchange.response_done = True
                self._maybe_next()
                return
            elif isinstance(event, ResponseError):
                self._upstream_broken(f"bad response from upstream: {event.detail}")
                return

    def _switch_protocols(self, exchange: Exchange, head: ResponseHead) -> None:
        """C{101}: from now on the client connection is a splice with the tunnel."""
        upstream = self._upstream
        if upstream is None or not exchange.request_done:
            self._upstream_broken("upstream switched protocols before the request was complete")
            return
        self._upstream = self._exchange = None
        self._stop_timer()
        self.transport.unregisterProducer()
        self.transport.write(head.client_head(keep_alive=False) + exchange.response.take_leftover())
        self._start_splice(upstream.channel, self._parser.take_upgrade_leftover())

    def _upstream_broken(self, detail: str) -> None:
        exchange = self._exchange
        log.info(
            "upstream response to {client} from {destination} {how}: {detail}",
            client=self._client,
            destination=exchange.destination if exchange is not None else None,
            how="cut short" if exchange is not None and exchange.answered else "failed (502)",
            detail=detail,
            outcome="upstream-error",
        )
        if exchange is not None and exchange.answered:
            self._drop_upstream()
            if exchange.response.close_delimited:
                # Reset: the close would read as the end of a whole response.
                self.transport.abortConnection()
            else:
                # Its Content-Length or chunked framing tells the client the
                # response is cut short; a reset would drop what arrived.
                self.transport.loseConnection()
        else:
            self._fail(502, detail)

    def _retry(self) -> bool:
        """
        The upstream went away before answering: send the request again on
        a new tunnel if it went over a reused one (the origin's keep-alive
        time-out raced it) and may be repeated.  Once per request.
        """
        exchange = self._exchange
        if (
            exchange is None
            or not exchange.reused
            or exchange.heard
            or exchange.replay is None
            or not exchange.request_done
            or self._upstream is None
        ):
            return False
        log.info(
            "upstream {destination} closed a reused tunnel before answering {client}; "
            "sending the request again on a new one",
            destination=exchange.destination,
            client=self._client,
            outcome="retry",
        )
        key = self._upstream.key
        exchange.reused = False
        exchange.response = ResponseParser(exchange.head.method, upgrade=exchange.head.upgrade is not None)
        self._drop_upstream()
        self._open_upstream(key, exchange.replay)
        return True

    def tunnel_data(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes from an idle upstream: it is not speaking HTTP to us.
            self._drop_upstream()
            return
        exchange.heard = True
        self._handle_response(exchange.response.receive_data(data))

    def tunnel_eof(self) -> None:
        exchange = self._exchange
        if exchange is None or exchange.response_done:
            # An idle kept-alive upstream closed (its keep-alive time-out):
            # it cannot carry the next request.
            self._drop_upstream()
        elif not self._retry():
            self._handle_response(exchange.response.eof_received())

    def tunnel_closed(self) -> None:
        if self._upstream is None:
            return
        exchange = self._exchange
        if exchange is not None and not exchange.response_done and self._retry():
            return
        channel = self._upstream.channel
        self._upstream = None
        if not self._gone:
            self.transport.unregisterProducer()
        if exchange is not None and not exchange.response_done and not self._gone:
            # Closed with the response unfinished and no EOF (which would have
            # ended a close-delimited body): the stream was cut.
            self._upstream_broken(channel.close_reason or "upstream closed the connection")

    def tunnel_pause_writing(self) -> None:
        self._upstream_full = True
        self.transport.pauseProducing()
        if self._exchange is not None and not self._exchange.request_done:
            self._stop_timer()  # a full window is not the client's fault

    def tunnel_resume_writing(self) -> None:
        self._upstream_full = False
        self.transport.resumeProducing()
        self._await_body()


def HttpProxyFactory(
    gateway: StreamOpener, clock: IReactorTime, clients: ClientLimit | None = None, cluster: str | None = None
) -> FrontendFactory:
    """The factory of an HTTP proxy listener (of C{cluster} alone, if given)."""
    return FrontendFactory(HttpProxyProtocol, gateway, clock, clients, cluster)
