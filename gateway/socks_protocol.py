"""
The SOCKS listener: a thin Twisted adapter around L{gateway.socks.SocksServer}.

Until the request is complete the protocol only feeds bytes to the machine
and writes what it says to.  Then it pauses the client, asks the gateway for
a tunnel, answers success only once the channel is open (so a client never
sends into a stream that will fail), and becomes a L{Splice}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.errors import Reason, StreamError
from gateway.relay import Splice
from gateway.socks import ConnectRequest, Rejected, Send, SocksServer
from gateway.ssh.channel import TunnelChannel
from gateway.streams import Gateway, StreamRequest, peer_origin

log = Logger()


@implementer(IHalfCloseableProtocol)
class SocksProtocol(Protocol):
    """One SOCKS4/4a/5 client connection."""

    def __init__(self, gateway: Gateway, clock: IReactorTime) -> None:
        self._gateway = gateway
        self._clock = clock
        self._machine = SocksServer(authenticate=gateway.authenticate)
        self._splice: Splice | None = None
        self._timer: IDelayedCall | None = None
        self._gone = False
        self._client = "?"
        self._origin = ("127.0.0.1", 0)

    def connectionMade(self) -> None:
        self._client, self._origin = peer_origin(self.transport.getPeer())
        self._timer = self._clock.callLater(
            self._gateway.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._timer = None
        log.info(
            "SOCKS client {client} did not finish its handshake in {timeout:g} s",
            client=self._client,
            timeout=self._gateway.handshake_timeout,
            outcome="handshake-timeout",
        )
        self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.client_data(data)
            return
        for event in self._machine.receive_data(data):
            if isinstance(event, Send):
                self.transport.write(event.data)
            elif isinstance(event, Rejected):
                self._stop_timer()
                log.info(
                    "SOCKS handshake from {client} rejected: {detail}",
                    client=self._client,
                    outcome="rejected",
                    reason=event.reason.value,
                    detail=event.detail,
                )
                self.transport.loseConnection()
            elif isinstance(event, ConnectRequest):
                self._stop_timer()
                self._connect(event)

    def _connect(self, request: ConnectRequest) -> None:
        self.transport.pauseProducing()
        opening = self._gateway.open_stream(
            StreamRequest(
                host=request.host,
                port=request.port,
                frontend=f"socks{request.version}",
                client=self._client,
                username=request.username,
                password=request.password,
                origin=self._origin,
            )
        )
        opening.addCallbacks(self._opened, self._refused)

    def _opened(self, channel: TunnelChannel) -> None:
        if self._gone:
            channel.close()
            return
        self.transport.write(self._machine.accept())
        self._splice = Splice(self.transport, channel)
        leftover = self._machine.leftover
        if leftover:
            self._splice.client_data(leftover)
        self.transport.resumeProducing()

    def _refused(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, StreamError):
            error = StreamError(Reason.GENERAL, failure.getErrorMessage())
        if not self._gone:
            self.transport.write(self._machine.reject(error.reason))
            self.transport.loseConnection()

    # IHalfCloseableProtocol

    def readConnectionLost(self) -> None:
        if self._splice is not None:
            self._splice.client_eof()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self._gone = True
        self._stop_timer()
        if self._splice is not None:
            self._splice.client_lost()


class SocksFactory(Factory):
    """Builds L{SocksProtocol}s for one listener."""

    noisy = False

    def __init__(self, gateway: Gateway, clock: IReactorTime) -> None:
        self._gateway = gateway
        self._clock = clock

    def buildProtocol(self, addr: object) -> SocksProtocol:
        protocol = SocksProtocol(self._gateway, self._clock)
        protocol.factory = self
        return protocol
