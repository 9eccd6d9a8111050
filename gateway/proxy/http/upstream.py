"""
The absolute-form side of an HTTP proxy connection: the requests forwarded
over a tunnel and the responses relayed back (L{Forwarder}).

The adapter (L{gateway.proxy.http.protocol}) owns the client connection: it
parses requests, answers CONNECT and local ones, and runs the deadlines
between requests.  An absolute-form request it hands here, with its body,
and it hears back only when the exchange is over (L{Forwarder.done}) or the
connection became a splice (L{Forwarder.upgraded}).  Everything in between
-- which tunnel carries the request, its window, the response's framing,
the retry of a request that raced an origin's keep-alive time-out, the body
and response deadlines -- is decided here, with the state it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import sockets
from gateway.errors import Reason, StreamError
from gateway.proxy.frontend import stream_error
from gateway.proxy.http.events import RequestHead, ResponseBody, ResponseEnd, ResponseError, ResponseHead
from gateway.proxy.http.exchange import Exchange, Upstream, UpstreamKey
from gateway.proxy.http.machine import ResponseParser, status_for
from gateway.proxy.opener import StreamOpener, StreamRequest
from gateway.proxy.splice import IClientTransport
from gateway.ssh.channel import TunnelChannel

#: The listener's events keep the one namespace they had before the adapter
#: was split: operators filter the HTTP listener's log on it.
log = Logger(namespace="gateway.proxy.http.protocol")

#: Called with a delay and what to call when it passes: the client
#: connection's one deadline timer, re-armed for each stage.
ArmTimer = Callable[[float, Callable[[float], None]], None]


def refusal_status(failure: Failure, credentials: tuple[str, str] | None) -> tuple[int, str]:
    """The status and detail that answer a stream the gateway would not open."""
    error = stream_error(failure)
    status = status_for(error)
    if error.reason is Reason.AMBIGUOUS and credentials is None:
        # Credentials are what resolves it, and browsers, Java, ncat
        # and curl --proxy-anyauth offer theirs only when challenged.
        status = HTTPStatus.PROXY_AUTHENTICATION_REQUIRED
    return status, error.detail


class Forwarder:
    """
    The absolute-form exchanges of one client connection, one at a time,
    and the tunnel they travel: kept for the next request to the same
    destination with the same credentials, replaced for another.  It is the
    L{TunnelPeer<gateway.ssh.channel.TunnelPeer>} of that tunnel's channel.

    What it needs of the connection are the transport, its deadline timer,
    and three ends: C{fail} (answer an error and close), C{next_request}
    (the exchange is over and the connection stays) and C{upgraded} (a
    C{101}: the connection becomes a splice with the channel given).
    """

    def __init__(
        self,
        gateway: StreamOpener,
        transport: IClientTransport,
        client: str,
        arm_timer: ArmTimer,
        stop_timer: Callable[[], None],
        fail: Callable[[int, str], None],
        next_request: Callable[[], None],
        upgraded: Callable[[TunnelChannel], None],
    ) -> None:
        self._gateway = gateway
        self._transport = transport
        self._client = client
        self._arm_timer = arm_timer
        self._stop_timer = stop_timer
        self._fail = fail
        self._next_request = next_request
        self._upgraded = upgraded
        self._exchange: Exchange | None = None
        self._upstream: Upstream | None = None
        #: A tunnel is being opened; what to send once it is.
        self._opening = False
        self._pending: list[bytes] = []
        #: The upstream's window is full: the client is paused, and no body
        #: deadline runs (a destination that reads slowly is not the client's fault).
        self._upstream_full = False
        self._gone = False

    @property
    def busy(self) -> bool:
        """An exchange is under way (from its request head to its response's end)."""
        return self._exchange is not None

    # -- the request (from the adapter) ---------------------------------------

    def forward(self, head: RequestHead, request: StreamRequest) -> None:
        """Send C{head} (for C{request}) upstream: on the kept tunnel if it still fits, else on a new one."""
        data = head.upstream_head(self._gateway.destination_host(head.host))
        exchange = self._exchange = Exchange(head, data, request)
        key = (head.host, head.port, head.credentials)
        if self._upstream is not None and self._upstream.key == key:
            # Reuse the tunnel only while the route still leads to the same
            # cluster connection (tokens and clusters change at runtime).
            try:
                _, cluster = self._gateway.route(request)
            except StreamError as e:
                self._fail(status_for(e), e.detail)
                return
            if cluster is self._upstream.channel.cluster:
                exchange.reused = True
                self._upstream.channel.send(data)
                self._await_body()
                return
        self.drop()
        self._open_upstream(key, data)

    def body(self, data: bytes) -> None:
        if self._exchange is not None:
            self._exchange.replay = None
        if self._opening:
            self._pending.append(data)
        elif self._upstream is not None:
            self._upstream.channel.send(data)
        # else: the upstream already answered and went away; drop the rest
        self._await_body()

    def request_end(self) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.request_done = True
        if exchange.answered:
            self._stop_timer()
        else:
            self._arm_timer(self._gateway.settings.response_timeout, self._response_timed_out)
        self._maybe_next()

    def close_after(self) -> None:
        """The client connection closes once this exchange is over (a drain)."""
        if self._exchange is not None:
            self._exchange.keep_alive = False

    def client_eof(self) -> bool:
        """
        The client half-closed during this exchange.  True: the request is
        complete and is answered before the connection closes (a client
        may half-close after it).  False: it can never be completed, so its
        tunnel and the slot are freed now, not whenever (if ever) the
        destination answers.
        """
        exchange = self._exchange
        assert exchange is not None
        if exchange.request_done:
            exchange.keep_alive = False
            return True
        log.info(
            "HTTP client {client} closed before its request to {destination} was complete",
            client=self._client,
            destination=exchange.destination,
            outcome="client-gone",
        )
        self.drop()
        self._transport.loseConnection()
        return False

    def client_lost(self) -> None:
        self._gone = True
        self.drop()

    def _open_upstream(self, key: UpstreamKey, data: bytes) -> None:
        assert self._exchange is not None
        self._opening = True
        self._pending = [data]
        self._transport.pauseProducing()
        opening = self._gateway.open_stream(self._exchange.request)
        opening.addCallbacks(lambda channel: self._upstream_open(key, channel), self._refused)

    def _upstream_open(self, key: UpstreamKey, channel: TunnelChannel) -> None:
        self._opening = False
        if self._gone:
            channel.close()
            return
        self._upstream = Upstream(key, channel)
        channel.attach(self)
        self._transport.registerProducer(channel, True)
        pending, self._pending = self._pending, []
        for data in pending:
            channel.send(data)  # may fill the window: tunnel_pause_writing
        if not self._upstream_full:
            self._transport.resumeProducing()
            self._await_body()

    def _refused(self, failure: Failure) -> None:
        self._opening = False
        if not self._gone:
            assert self._exchange is not None
            self._fail(*refusal_status(failure, self._exchange.head.credentials))

    def drop(self) -> None:
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
                self._transport.unregisterProducer()
                # The upstream may have paused the client (full window); the
                # rest of a request body is now read and dropped instead.
                self._transport.resumeProducing()
            exchange = self._exchange
            if self._gone or (exchange is not None and not (exchange.request_done and exchange.response_done)):
                upstream.channel.abort()
            else:
                upstream.channel.close()

    def _maybe_next(self) -> None:
        """Start on the next request once both halves of this one are done."""
        exchange = self._exchange
        if exchange is None or not (exchange.request_done and exchange.response_done):
            return
        if not exchange.keep_alive:
            self.drop()
            self._transport.loseConnection()
            return
        self._exchange = None
        self._next_request()

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
            self.drop()
            self._transport.abortConnection()
        else:
            self._fail(status, f"{what} in {seconds:g} s")

    def _body_timed_out(self, seconds: float) -> None:
        self._give_up(408, seconds, "the request body stalled", "body-timeout")

    def _response_timed_out(self, seconds: float) -> None:
        self._give_up(504, seconds, "the upstream sent no response", "response-timeout")

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
                        exchange.keep_alive = False
                    if exchange.request_done:
                        self._stop_timer()
                sockets.write(self._transport, event.client_head(keep_alive=exchange.keep_alive))
            elif isinstance(event, ResponseBody):
                sockets.write(self._transport, event.data)
            elif isinstance(event, ResponseEnd):
                if not event.reusable:
                    self.drop()
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
        self._transport.unregisterProducer()
        self._transport.write(head.client_head(keep_alive=False) + exchange.response.take_leftover())
        self._upgraded(upstream.channel)

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
            self.drop()
            if exchange.response.close_delimited:
                # Reset: the close would read as the end of a whole response.
                self._transport.abortConnection()
            else:
                # Its Content-Length or chunked framing tells the client the
                # response is cut short; a reset would drop what arrived.
                self._transport.loseConnection()
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
        self.drop()
        self._open_upstream(key, exchange.replay)
        return True

    def tunnel_data(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes from an idle upstream: it is not speaking HTTP to us.
            self.drop()
            return
        exchange.heard = True
        self._handle_response(exchange.response.receive_data(data))

    def tunnel_eof(self) -> None:
        exchange = self._exchange
        if exchange is None or exchange.response_done:
            # An idle kept-alive upstream closed (its keep-alive time-out):
            # it cannot carry the next request.
            self.drop()
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
            self._transport.unregisterProducer()
        if exchange is not None and not exchange.response_done and not self._gone:
            # Closed with the response unfinished and no EOF (which would have
            # ended a close-delimited body): the stream was cut.
            self._upstream_broken(channel.close_reason or "upstream closed the connection")

    def tunnel_pause_writing(self) -> None:
        self._upstream_full = True
        self._transport.pauseProducing()
        if self._exchange is not None and not self._exchange.request_done:
            self._stop_timer()  # a full window is not the client's fault

    def tunnel_resume_writing(self) -> None:
        self._upstream_full = False
        self._transport.resumeProducing()
        self._await_body()
