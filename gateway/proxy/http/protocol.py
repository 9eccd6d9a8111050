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
idempotent and has no body, as browsers do.  The absolute-form side (the
tunnel, the response, the retry, the body and response deadlines) is
L{gateway.proxy.http.upstream}; this module is the connection around it.

Errors are answered with the status of L{gateway.proxy.http.machine.status_for} and a
short text body, and logged; the client never sees a traceback.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import sockets
from gateway.proxy.frontend import ClientLimit, FrontendFactory, FrontendProtocol
from gateway.proxy.http.events import RequestBody, RequestEnd, RequestError, RequestHead
from gateway.proxy.http.local import answer_local
from gateway.proxy.http.machine import RequestParser, error_response
from gateway.proxy.http.upstream import Forwarder, refusal_status
from gateway.proxy.opener import StreamOpener, StreamRequest
from gateway.ssh.channel import TunnelChannel

log = Logger()

#: Buffered client bytes above which the client is paused until we catch up.
MAX_BUFFERED = 256 * 1024


class HttpProxyProtocol(FrontendProtocol):
    """
    One HTTP proxy client connection: its requests parsed and dispatched,
    CONNECT and local requests answered here, absolute-form ones handed to
    its L{Forwarder}, and the deadlines before and between requests.
    """

    kind = "HTTP"

    def __init__(self, gateway: StreamOpener, clock: IReactorTime, cluster: str | None = None) -> None:
        super().__init__(gateway, clock, cluster)
        self._parser = RequestParser()
        self._version = "HTTP/1.1"
        #: The credentials of the request being answered.
        self._credentials: tuple[str, str] | None = None
        #: Made with the connection, whose transport and client it uses.
        self._forwarder: Forwarder
        #: Bytes of a request arrived since the last exchange ended.
        self._head_begun = False
        #: The request being parsed was answered by the listener itself (the PAC file).
        self._answered_locally = False

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._forwarder = Forwarder(
            self._gateway,
            self.transport,
            self._client,
            self._arm_timer,
            self._stop_timer,
            self._fail,
            self._next_request,
            lambda channel: self._start_splice(channel, self._parser.take_upgrade_leftover()),
        )

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.client_data(data)
            return
        self._head_begun = True
        self._handle(self._parser.receive_data(data))
        if self._parser.buffered > MAX_BUFFERED and not self._gone:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self._splice is None and self._forwarder.busy:
            # Answer a complete request (then close); free an incomplete one's tunnel now.
            self._eof_pending = self._forwarder.client_eof()
            return
        if self._splice is None and not self._opening:
            # Between requests: a kept-alive tunnel goes first (see Forwarder.drop).
            self._forwarder.drop()
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._forwarder.client_lost()

    def drain(self) -> None:
        # An idle kept-alive connection (browsers, request sessions and agent
        # pools keep them) closes now; one in an exchange ends after it.
        if self._forwarder.busy:
            self._forwarder.close_after()
        else:
            self._forwarder.drop()
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
                    self._forwarder.forward(event, self._stream_request(event, "http"))
            elif isinstance(event, RequestBody):
                self._forwarder.body(event.data)
            elif isinstance(event, RequestEnd):
                if self._answered_locally:
                    self._answered_locally = False
                    self._next_request()
                else:
                    self._forwarder.request_end()
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
        self._forwarder.drop()
        self.transport.write(error_response(status, detail, version=self._version))
        self.transport.loseConnection()

    def _answer_local(self, head: RequestHead) -> None:
        """A request for the listener itself (L{gateway.proxy.http.local}): answered at once."""
        answer = answer_local(head, self._gateway.pac, head.keep_alive, self._client, self._cluster)
        if answer.keep_alive:
            self.transport.write(answer.data)
            self._answered_locally = True  # the next request once this one's (empty) body is parsed
        else:
            self._forwarder.drop()
            self.transport.write(answer.data)
            self.transport.loseConnection()

    def _next_request(self) -> None:
        """The connection stays for another request: wait for it, or parse what came already."""
        self._head_begun = False
        self._arm_timer(self._gateway.settings.keepalive_timeout, self._idle_timed_out)
        self.transport.resumeProducing()
        self._handle(self._parser.next_request())

    def _idle_timed_out(self, seconds: float) -> None:
        if self._head_begun:
            self._timed_out(seconds)  # a request head begun and never finished
        else:
            self._forwarder.drop()
            self.transport.loseConnection()  # an idle kept-alive connection

    # CONNECT

    def _connect(self, head: RequestHead) -> None:
        self._forwarder.drop()  # after keep-alive requests, the connection becomes a tunnel
        self._opening = True
        self.transport.pauseProducing()
        opening = self._gateway.open_stream(self._stream_request(head, "http-connect"))
        opening.addCallbacks(self._connected, self._refused)

    def _connected(self, channel: TunnelChannel) -> None:
        if self._gone:
            channel.close()
            return
        sockets.write(self.transport, b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._start_splice(channel, self._parser.take_leftover())

    def _refused(self, failure: Failure) -> None:
        self._opening = False
        if not self._gone:
            self._fail(*refusal_status(failure, self._credentials))


def HttpProxyFactory(
    gateway: StreamOpener, clock: IReactorTime, clients: ClientLimit | None = None, cluster: str | None = None
) -> FrontendFactory:
    """The factory of an HTTP proxy listener (of C{cluster} alone, if given)."""
    return FrontendFactory(HttpProxyProtocol, gateway, clock, clients, cluster)
