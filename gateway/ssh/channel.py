"""
One tunnelled TCP stream: a C{direct-tcpip} channel with real flow control.

Conch's stock channel re-opens the receive window before the data has gone
anywhere, so a slow local reader makes the gateway buffer without bound; and
it sends EOF ahead of data still queued for the peer's window.  This channel
fixes both:

 - Receive: the channel is an C{IPushProducer} for whatever consumes its data.
   While paused it grants no window, so at most one window per stream is ever
   in flight toward the gateway.
 - Send: when the peer's window is full the channel tells its peer
   (C{tunnel_pause_writing}) so the local reader stops; it resumes, from the
   reactor and not re-entrantly, once the window opens again.
 - Half-close: EOF is forwarded only after queued data has been sent.

The local side is a L{TunnelPeer}: a client splice for SOCKS/CONNECT, or the
HTTP forwarding protocol that reads responses itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from twisted.conch.error import ConchError
from twisted.conch.ssh import channel, connection, forwarding
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.errors import Reason, StreamError

DEFAULT_WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32768


class TunnelPeer(Protocol):
    """What a channel delivers its stream to."""

    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> None: ...
    def tunnel_closed(self) -> None: ...
    def tunnel_pause_writing(self) -> None: ...
    def tunnel_resume_writing(self) -> None: ...


def quiet_logger(namespace: str) -> Logger:
    """
    A logger for Conch's own events that keeps only warnings and worse.

    Conch logs every channel open and close at info level; at thousands of
    streams that drowns the gateway's own one-event-per-stream log.
    """
    return Logger(
        namespace=namespace,
        observer=FilteringLogObserver(
            globalLogPublisher, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
        ),
    )


def open_failure_reason(code: int, description: str) -> Reason:
    """
    Map an SSH channel-open failure to our vocabulary.

    OpenSSH answers 1 (administratively prohibited) when forwarding is off or
    PermitOpen denies, and 2 (connect failed) with the strerror or resolver
    text for everything that went wrong reaching the destination.
    """
    if code == connection.OPEN_ADMINISTRATIVELY_PROHIBITED:
        return Reason.PROHIBITED
    text = description.lower()
    if "refused" in text:
        return Reason.REFUSED
    if "network is unreachable" in text:
        return Reason.NETWORK_UNREACHABLE
    if "timed out" in text:
        return Reason.TIMEOUT
    if code == connection.OPEN_CONNECT_FAILED:
        return Reason.HOST_UNREACHABLE
    return Reason.GENERAL


class OrderedEOFChannel(channel.SSHChannel):
    """
    A channel whose EOF follows the data queued before it.

    Conch's C{SSHConnection.sendEOF} goes out at once, even while earlier
    data still waits in the channel's buffer for the peer's window; the peer
    would then see data after EOF (a protocol violation) or lose it.
    """

    _eof_pending = False
    _log = quiet_logger("gateway.ssh.channel")

    def send_eof(self) -> None:
        """Send EOF once everything written so far has been sent."""
        if self.buf:
            self._eof_pending = True
        elif not self.localClosed:
            self.conn.sendEOF(self)

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        if self._eof_pending and not self.buf:
            self._eof_pending = False
            self.send_eof()


@implementer(IPushProducer)
class TunnelChannel(OrderedEOFChannel):
    """A C{direct-tcpip} channel carrying one client stream."""

    name = b"direct-tcpip"

    def __init__(
        self,
        host: str,
        port: int,
        origin: tuple[str, int] = ("127.0.0.1", 0),
        window_size: int = DEFAULT_WINDOW,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(localWindow=window_size, localMaxPacket=MAX_PACKET)
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.host = host
        self.port = port
        self.origin = origin
        self.opened: Deferred[TunnelChannel] = Deferred()
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.monotonic()
        self._peer: TunnelPeer | None = None
        self._paused = False
        self._closed = False
        #: Called once when the channel has closed (stream accounting).
        self.closed_hooks: list[Callable[[], None]] = []

    # -- opening ---------------------------------------------------------

    def open_request_data(self) -> bytes:
        """The type-specific part of the CHANNEL_OPEN request."""
        return forwarding.packOpen_direct_tcpip(
            (self.host, self.port), (self.origin[0], self.origin[1])
        )

    def channelOpen(self, specificData: bytes) -> None:
        self.opened.callback(self)

    def openFailed(self, reason: Failure | BaseException) -> None:
        if isinstance(reason, Failure):
            reason = reason.value
        if isinstance(reason, ConchError):
            code = reason.data if isinstance(reason.data, int) else 0
            text = (
                reason.value.decode("utf-8", "replace")
                if isinstance(reason.value, bytes)
                else str(reason.value)
            )
            error = StreamError(
                open_failure_reason(code, text),
                f"proxy node could not open {self.destination}: {text or 'no reason given'}",
            )
        else:
            error = StreamError(
                Reason.UNAVAILABLE,
                f"SSH connection lost while opening {self.destination}",
            )
        self._closed = True
        self.opened.errback(error)

    @property
    def destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- local side ------------------------------------------------------

    def attach(self, peer: TunnelPeer | None) -> None:
        """Deliver the stream to C{peer} from now on (None: discard it)."""
        self._peer = peer

    def send(self, data: bytes) -> None:
        """Send client bytes toward the destination."""
        self.bytes_up += len(data)
        self.write(data)

    def close(self) -> None:
        """Close the stream (after queued data is sent)."""
        if not self._closed and not self.localClosed:
            self.loseConnection()

    # -- flow control toward us (IPushProducer) -----------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._grant_window()

    def stopProducing(self) -> None:
        self.close()

    def _grant_window(self) -> None:
        consumed = self.localWindowSize - self.localWindowLeft
        if consumed >= self.localWindowSize // 2 and not self.localClosed:
            self.conn.adjustWindow(self, consumed)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_down += len(data)
        if self._peer is not None:
            self._peer.tunnel_data(data)
        if not self._paused:
            self._grant_window()

    def eofReceived(self) -> None:
        if self._peer is not None:
            self._peer.tunnel_eof()

    # -- flow control toward the destination -------------------------------

    def stopWriting(self) -> None:
        if self._peer is not None:
            self._peer.tunnel_pause_writing()

    def startWriting(self) -> None:
        # Called by addWindowBytes *before* the queued buffer is flushed:
        # resume the reader from the reactor, after the flush.
        self._clock.callLater(0, self._resume_writer)

    def _resume_writer(self) -> None:
        if self._peer is not None and self.areWriting and not self._closed:
            self._peer.tunnel_resume_writing()

    # -- end -------------------------------------------------------------

    def closed(self) -> None:
        self._closed = True
        for hook in self.closed_hooks:
            hook()
        if self._peer is not None:
            peer, self._peer = self._peer, None
            peer.tunnel_closed()
