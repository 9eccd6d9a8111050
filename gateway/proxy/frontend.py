"""
What the SOCKS and HTTP listeners have in common: a time limit on the client's
handshake, the client's address for logs and for the direct-tcpip
originator, the splice once the tunnel is open, and a factory per listener.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.errors import Reason, StreamError
from gateway.proxy.opener import StreamOpener, peer_origin
from gateway.proxy.splice import IClientTransport, Splice
from gateway.sockets import set_no_delay
from gateway.ssh.channel import TunnelChannel

log = Logger()

DEFAULT_MAX_CLIENTS = 4096


def stream_error(failure: Failure) -> StreamError:
    """The L{StreamError} in C{failure}, or a general one for anything else."""
    if isinstance(failure.value, StreamError):
        return failure.value
    return StreamError(Reason.GENERAL, failure.getErrorMessage())


@implementer(IHalfCloseableProtocol)
class FrontendProtocol(Protocol):
    """
    Base of the listeners' protocols.

    Every stage of a client connection before its splice has a deadline, so a
    silent or dribbling client cannot hold a connection slot: one timer,
    re-armed by the subclass for each stage (C{handshake_timeout} for the
    handshake, then whatever the stage needs).  An established splice has
    none: SSH sessions through a tunnel legitimately idle for hours.
    """

    kind = "client"
    #: Set by C{makeConnection}: a listener's protocols only ever get a
    #: client connection, and use it only from C{connectionMade} on.
    transport: IClientTransport

    def __init__(self, gateway: StreamOpener, clock: IReactorTime, cluster: str | None = None) -> None:
        self._gateway = gateway
        self._clock = clock
        #: The cluster of a per-cluster listener (which asks no credentials), or None.
        self._cluster = cluster
        self._splice: Splice | None = None
        self._timer: IDelayedCall | None = None
        self._gone = False
        #: A stream is being opened for the client's request.
        self._opening = False
        #: The client's EOF came while its stream was being opened.
        self._eof_pending = False
        self._client = "?"
        self._origin = ("127.0.0.1", 0)

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self._client, self._origin = peer_origin(self.transport.getPeer())
        self._arm_timer(self._gateway.settings.handshake_timeout)

    def _arm_timer(self, seconds: float, expired: Callable[[float], None] | None = None) -> None:
        """Call C{expired(seconds)} (by default: the handshake time-out) unless re-armed or stopped first."""
        self._stop_timer()
        if seconds > 0:
            self._timer = self._clock.callLater(seconds, self._expire, expired or self._timed_out, seconds)

    def _expire(self, expired: Callable[[float], None], seconds: float) -> None:
        self._timer = None
        expired(seconds)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshake_failed(self) -> None:
        """Count a malformed or abandoned handshake (metrics)."""
        self._gateway.handshake_errors[self.kind.lower()] += 1

    def _timed_out(self, seconds: float) -> None:
        self.handshake_failed()
        log.info(
            "{kind} client {client} sent no complete request in {timeout:g} s",
            kind=self.kind,
            client=self._client,
            timeout=seconds,
            outcome="handshake-timeout",
        )
        self.transport.abortConnection()

    def _start_splice(self, channel: TunnelChannel, early_data: bytes) -> None:
        """Become a byte pump between the client and C{channel}."""
        self._opening = False
        self._splice = Splice(self.transport, channel)
        if early_data:
            self._splice.client_data(early_data)
        if self._eof_pending:
            self._splice.client_eof()
        else:
            # Whoever paused the client before (a CONNECT's open, early data
            # past the limit, a parser's buffer): reading resumes now.  A
            # client that was not paused costs no system call here.
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        if self._splice is not None:
            self._splice.client_eof()
        elif self._opening:
            # A client may send its request (and payload) and half-close
            # before the stream is open: the EOF goes through once it is.
            self._eof_pending = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def drain(self) -> None:
        """
        The gateway is shutting down: a client still in its handshake is
        closed; an established splice runs on (within the drain time-out).
        """
        if self._splice is None and not self._opening:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._stop_timer()
        if self._splice is not None:
            self._splice.client_lost()
        self.factory.clients.release()
        self.factory.protocols.discard(self)


class ClientLimit:
    """
    Counts accepted client connections across the listeners that share it.

    Beyond C{limit} new connections are closed at once: the gateway keeps
    serving the clients it has instead of running out of file descriptors.
    C{setting} names the key that sets the limit, for the log.
    """

    def __init__(self, limit: int, setting: str = "max_clients") -> None:
        self.limit = limit
        self.setting = setting
        self.count = 0
        self._refusing = False

    def admit(self) -> bool:
        if self.count >= self.limit:
            if not self._refusing:
                self._refusing = True
                log.warn(
                    "client limit reached ({limit} connections, {setting}): refusing new clients",
                    limit=self.limit,
                    setting=self.setting,
                    outcome="overloaded",
                )
            return False
        self.count += 1
        return True

    def release(self) -> None:
        self.count -= 1
        if self._refusing and self.count < self.limit:
            self._refusing = False
            log.info(
                "accepting new clients again ({count} connected, {setting})", count=self.count, setting=self.setting
            )


class FrontendFactory(Factory):
    """Builds one front-end protocol per client connection of a listener."""

    noisy = False

    def __init__(
        self,
        protocol: Callable[[StreamOpener, IReactorTime, str | None], FrontendProtocol],
        gateway: StreamOpener,
        clock: IReactorTime,
        clients: ClientLimit | None = None,
        cluster: str | None = None,
    ) -> None:
        self._protocol = protocol
        self._gateway = gateway
        self._clock = clock
        #: The cluster this listener serves alone (C{socks}/C{http} in its table), or None: all.
        self.cluster = cluster
        self.clients = clients or ClientLimit(DEFAULT_MAX_CLIENTS)
        #: The connections of this listener, to tell them of a drain.
        self.protocols: set[FrontendProtocol] = set()

    def buildProtocol(self, addr: object) -> FrontendProtocol | None:
        if not self.clients.admit():
            return None
        protocol = self._protocol(self._gateway, self._clock, self.cluster)
        protocol.factory = self
        self.protocols.add(protocol)
        return protocol

    def drain(self) -> None:
        """The gateway is shutting down: each connection finishes what it must, then closes."""
        for protocol in list(self.protocols):
            protocol.drain()
