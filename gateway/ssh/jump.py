"""
A jump host: an SSH connection carried in a C{direct-tcpip} channel
(L{TunnelChannel}) of another SSH connection.

L{ChannelEndpoint} is an C{IStreamClientEndpoint}, so a cluster's
L{Connector} hands the SSH client factory to it exactly as it would to a TCP
endpoint; L{ChannelTransport} is the C{ITransport} the inner connection sees
over the channel, with the channel's flow control and half-close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import host_port
from gateway.ssh.channel import TunnelChannel, clock_or_reactor

log = Logger()


@implementer(IAddress)
@dataclass(frozen=True)
class ChannelAddress:
    """The destination of a C{direct-tcpip} channel: C{host:port via channel}."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{host_port(self.host, self.port)} via channel"


@implementer(ITransport, IPushProducer, IConsumer)
class ChannelTransport:
    """
    An C{ITransport} over a L{TunnelChannel}, attached to it as its
    L{TunnelPeer}: what the channel delivers goes to C{protocol}.
    """

    def __init__(
        self,
        channel: TunnelChannel,
        protocol: IProtocol,
        host: str,
        port: int,
        clock: IReactorTime | None = None,
    ) -> None:
        self.channel = channel
        self.protocol = protocol
        self._address = ChannelAddress(host, port)
        self._clock = clock_or_reactor(clock)
        self.connected = True
        self.disconnecting = False
        self._write_closed = False
        self._eof_received = False
        self._lost = False
        #: Streaming (C{_streaming}): an C{IPushProducer}, as C{IConsumer} has it.
        self._producer: IPushProducer | IPullProducer | None = None
        self._streaming = True
        self._writing_paused = False
        self._pull_scheduled = False

    # -- ITransport -------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._lost or self._write_closed or not data:
            return
        self.channel.send(data)
        if self._producer is not None and not self._streaming:
            self._schedule_pull()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """EOF after the data written so far, then close the channel."""
        if self.disconnecting or self._lost:
            return
        self.disconnecting = True
        self._write_closed = True
        self.channel.send_eof()
        self.channel.close()

    def loseWriteConnection(self) -> None:
        """Half-close: send EOF, keep receiving."""
        if self._write_closed or self._lost:
            return
        self._write_closed = True
        self.channel.send_eof()

    def abortConnection(self) -> None:
        """Close the channel now, dropping unsent data."""
        if self._lost:
            return
        self.disconnecting = True
        self._write_closed = True
        self.channel.attach(None)
        self.channel.abort()
        self._clock.callLater(0, self._connection_lost, Failure(error.ConnectionAborted()))

    def getPeer(self) -> ChannelAddress:
        return self._address

    def getHost(self) -> ChannelAddress:
        return self._address

    # -- IConsumer (data toward the channel) --------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"producer {self._producer!r} already registered")
        if self._lost:
            producer.stopProducing()
            return
        # IConsumer's contract: a streaming producer is an IPushProducer, any
        # other an IPullProducer; both can be resumed.
        self._producer = cast("IPushProducer | IPullProducer", producer)
        self._streaming = bool(streaming)
        if not self._streaming:
            self._schedule_pull()
        elif self._writing_paused:
            cast(IPushProducer, producer).pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def _schedule_pull(self) -> None:
        if not self._pull_scheduled:
            self._pull_scheduled = True
            self._clock.callLater(0, self._pull)

    def _pull(self) -> None:
        self._pull_scheduled = False
        producer = self._producer
        if producer is not None and not self._streaming and not self._writing_paused and not self._lost:
            producer.resumeProducing()

    # -- IPushProducer (data from the channel) -------------------------------

    def pauseProducing(self) -> None:
        """Stop granting window: the peer stops sending."""
        self.channel.pauseProducing()

    def resumeProducing(self) -> None:
        self.channel.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- TunnelPeer ------------------------------------------------------------

    def tunnel_data(self, data: bytes) -> None:
        if not self._lost and not self.disconnecting:
            self.protocol.dataReceived(data)

    def tunnel_eof(self) -> None:
        self._eof_received = True
        if self._lost or self.disconnecting:
            return
        half_closeable = IHalfCloseableProtocol(self.protocol, None)
        if half_closeable is not None:
            half_closeable.readConnectionLost()
        else:
            self.loseConnection()

    def tunnel_closed(self) -> None:
        if self.disconnecting or self._eof_received:
            why: BaseException = error.ConnectionDone()
        else:
            why = error.ConnectionLost(f"channel to {self._address} closed without EOF")
        self._connection_lost(Failure(why))

    def tunnel_pause_writing(self) -> None:
        self._writing_paused = True
        if self._producer is not None and self._streaming:
            cast(IPushProducer, self._producer).pauseProducing()

    def tunnel_resume_writing(self) -> None:
        self._writing_paused = False
        if self._producer is not None:
            if self._streaming:
                self._producer.resumeProducing()
            else:
                self._schedule_pull()

    def _connection_lost(self, why: Failure) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self.disconnecting = True
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(why)


@implementer(IStreamClientEndpoint)
class ChannelEndpoint:
    """
    Connects over a C{direct-tcpip} channel of another SSH connection (a jump
    host): C{open_channel(host, port)} opens the channel, e.g.
    C{lambda h, p: cluster.open_stream(h, p, origin)}.

    C{connect} fails with the opener's error (a L{gateway.errors.StreamError}).
    Cancelled before the channel opens, it closes the channel once it does.
    """

    def __init__(
        self,
        open_channel: Callable[[str, int], Deferred[TunnelChannel]],
        host: str,
        port: int,
        clock: IReactorTime | None = None,
    ) -> None:
        self._open_channel = open_channel
        self.host = host
        self.port = port
        self._clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        cancelled = False

        def cancel(_: Deferred) -> None:
            nonlocal cancelled
            cancelled = True

        result: Deferred[IProtocol] = Deferred(cancel)
        try:
            opening = self._open_channel(self.host, self.port)
        except Exception:
            return fail()

        def opened(channel: TunnelChannel) -> None:
            if cancelled or result.called:
                channel.close()
                return
            try:
                protocol = protocolFactory.buildProtocol(ChannelAddress(self.host, self.port))
                if protocol is None:
                    raise error.ConnectionRefusedError("the factory refused the connection")
                transport = ChannelTransport(channel, protocol, self.host, self.port, self._clock)
                channel.attach(transport)
                protocol.makeConnection(transport)
            except Exception:
                channel.attach(None)
                channel.close()
                result.errback()
                return
            result.callback(protocol)

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)
            elif not failure.check(CancelledError):
                log.debug(
                    "channel to {host}:{port} failed after cancel: {f}",
                    host=self.host,
                    port=self.port,
                    f=failure.getErrorMessage(),
                )

        opening.addCallbacks(opened, failed)
        return result
