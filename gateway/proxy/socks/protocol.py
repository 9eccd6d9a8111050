"""
The SOCKS listener: a thin Twisted adapter around L{gateway.proxy.socks.machine.SocksMachine}.

Until the request is complete the protocol only feeds bytes to the machine
and writes what it says to.  Then it asks the gateway for a tunnel, answers
success only once the channel is open (so a client never sends into a stream
that will fail), and becomes a L{Splice}.  A client that sends ahead of the
reply (optimistic data) is paused once that exceeds L{EARLY_DATA_LIMIT};
most send nothing, and not pausing them saves two C{epoll_ctl} a stream.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import sockets
from gateway.proxy.frontend import ClientLimit, FrontendFactory, FrontendProtocol, stream_error
from gateway.proxy.opener import StreamOpener, StreamRequest
from gateway.proxy.socks.machine import ConnectRequest, Rejected, Send, SocksMachine
from gateway.ssh.channel import TunnelChannel

log = Logger()

#: Bytes a client may send after its request and before the reply, held
#: until the stream is open; past that it is paused (a TLS ClientHello fits).
EARLY_DATA_LIMIT = 16384


class SocksProtocol(FrontendProtocol):
    """One SOCKS4/4a/5 client connection."""

    kind = "SOCKS"

    def __init__(self, gateway: StreamOpener, clock: IReactorTime, cluster: str | None = None) -> None:
        super().__init__(gateway, clock, cluster)
        #: The handshake; dropped once the stream is open (an idle stream
        #: need not keep it: ~1 KB each with its callbacks).
        self._machine: SocksMachine | None = SocksMachine(
            authenticate=lambda username, password: gateway.authenticate(username, password, cluster),
            is_cluster=gateway.is_cluster,
        )

    def dataReceived(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.client_data(data)
            return
        machine = self._machine
        if machine is None:
            return  # nothing: after a refusal the connection is closing
        events = machine.receive_data(data)
        if self._opening and len(machine.leftover) > EARLY_DATA_LIMIT:
            self.transport.pauseProducing()
        for event in events:
            if isinstance(event, Send):
                sockets.write(self.transport, event.data)
            elif isinstance(event, Rejected):
                self._stop_timer()
                self.handshake_failed()
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
        self._opening = True
        if self._machine is not None and len(self._machine.leftover) > EARLY_DATA_LIMIT:
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
                cluster=self._cluster,
            )
        )
        opening.addCallbacks(self._opened, self._refused)

    def _opened(self, channel: TunnelChannel) -> None:
        if self._gone:
            channel.close()
            return
        machine, self._machine = self._machine, None
        assert machine is not None, "a stream opens only for the machine's request"
        sockets.write(self.transport, machine.accept())
        self._start_splice(channel, machine.leftover)

    def _refused(self, failure: Failure) -> None:
        self._opening = False
        machine, self._machine = self._machine, None
        if not self._gone and machine is not None:
            sockets.write(self.transport, machine.reject(stream_error(failure).reason))
            self.transport.loseConnection()


def SocksFactory(
    gateway: StreamOpener, clock: IReactorTime, clients: ClientLimit | None = None, cluster: str | None = None
) -> FrontendFactory:
    """The factory of a SOCKS listener (of C{cluster} alone, if given)."""
    return FrontendFactory(SocksProtocol, gateway, clock, clients, cluster)
