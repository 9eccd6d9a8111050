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

The same stream carried over a command's stdin/stdout (exec mode) is
L{gateway.ssh.exec_channel.ExecTunnelChannel}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from twisted.conch.error import ConchError
from twisted.conch.ssh import channel, connection, forwarding
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.addresses import host_port
from gateway.errors import Reason, StreamError, peer_text
from gateway.ssh._conch import quiet_conch_logs

DEFAULT_WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32768

#: What a channel's C{opened} is once the open was settled (opened,
#: refused or timed out): the channel's own Deferred has fired and is let go.
SETTLED: Deferred[Any] = succeed(None)


class TunnelPeer(Protocol):
    """What a channel delivers its stream to."""

    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> None: ...
    def tunnel_closed(self) -> None: ...
    def tunnel_pause_writing(self) -> None: ...
    def tunnel_resume_writing(self) -> None: ...


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


def open_failure(reason: Failure | BaseException, what: str) -> StreamError:
    """
    Why opening a channel for C{what} (a destination, "a session for getent")
    failed: the proxy node's answer (a C{ConchError} with its code and text),
    or the SSH connection lost meanwhile.
    """
    why = reason.value if isinstance(reason, Failure) else reason
    if isinstance(why, ConchError):
        code = why.data if isinstance(why.data, int) else 0
        raw = why.value if isinstance(why.value, bytes) else str(why.value).encode()
        text = peer_text(raw)  # the proxy node's words: escaped and cut
        detail = f"proxy node could not open {what}: {text or 'no reason given'}"
        return StreamError(open_failure_reason(code, text), detail)
    return StreamError(Reason.UNAVAILABLE, f"SSH connection lost while opening {what}")


def clock_or_reactor(clock: IReactorTime | None) -> IReactorTime:
    """
    C{clock}, or else the global reactor: imported only then, because
    importing it installs the default reactor, which an in-memory test (or
    C{twistd}, choosing its own) must be free to avoid.
    """
    if clock is not None:
        return clock
    from twisted.internet import reactor

    return IReactorTime(reactor)


@quiet_conch_logs("gateway.ssh.channel")
class OrderedEOFChannel(channel.SSHChannel):
    """
    A channel whose EOF (and anything else ordered with L{after_data}, such
    as a server's C{exit-status}) follows the data queued before it.

    Conch's C{SSHConnection.sendEOF} goes out at once, even while earlier
    data still waits in the channel's buffer for the peer's window; the peer
    would then see data after EOF (a protocol violation) or lose it.
    """

    _after_data: list[Callable[[], None]] | None = None
    _close_after_data = False
    #: Set by C{SSHConnection.openChannel}, before anything here is called.
    conn: connection.SSHConnection

    def after_data(self, action: Callable[[], None]) -> None:
        """Run C{action} once everything written so far has been sent."""
        if self.buf or self.extBuf or self._after_data:
            if self._after_data is None:
                self._after_data = []
            self._after_data.append(action)
        else:
            action()

    def send_eof(self) -> None:
        """Send EOF once everything written so far has been sent."""
        self.after_data(self._send_eof_now)

    def _send_eof_now(self) -> None:
        if not self.localClosed:
            self.conn.sendEOF(self)

    def _run_after_data(self) -> None:
        while self._after_data and not self.buf and not self.extBuf:
            action = self._after_data.pop(0)
            action()

    def loseConnection(self) -> None:
        # A close asked for while ordered actions wait goes after them (else
        # Conch's flush would send CLOSE first and EOF would never go out).
        # If the queued data was dropped (an abort), they run at once.
        self._run_after_data()
        if self._after_data:
            self._close_after_data = True
        else:
            super().loseConnection()

    def drop_queued(self) -> None:
        """Forget data (and ordered actions) still waiting for the peer's window."""
        self.buf = b""
        self.extBuf = []
        self._after_data = None
        self._close_after_data = False

    def closeReceived(self) -> None:
        # The peer will take nothing more, nor open its window again: what
        # is still queued can never go out, and waiting for it (as Conch
        # does) would leave the channel half-open for ever.
        self.drop_queued()
        self.loseConnection()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        self._run_after_data()
        if self._close_after_data and not self._after_data:
            self._close_after_data = False
            self.loseConnection()


@implementer(IPushProducer)
class ConsumerPacedWindow(channel.SSHChannel):
    """
    Receive-side flow control for a channel whose connection leaves the
    window alone (Conch's own re-opens it on arrival, whatever the consumer
    does): the channel is an C{IPushProducer} for whatever consumes its data
    and grants the peer window only while that consumer is not paused, so at
    most one window per channel is ever in flight toward us.  The gateway's
    tunnels and the fake proxy node's streams both receive this way.
    """

    _paused = False
    #: Set by the connection when the channel opens (Conch types it optional).
    conn: connection.SSHConnection

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._grant_window()

    def stopProducing(self) -> None:
        self.loseConnection()

    def _grant_window(self) -> None:
        """Give back what was consumed, once that is half the window (fewer WINDOW_ADJUSTs)."""
        consumed = self.localWindowSize - self.localWindowLeft
        if not self._paused and consumed >= self.localWindowSize // 2 and not self.localClosed:
            self.conn.adjustWindow(self, consumed)


@implementer(IPushProducer)
class TunnelChannel(ConsumerPacedWindow, OrderedEOFChannel):
    """A C{direct-tcpip} channel carrying one client stream."""

    name = b"direct-tcpip"

    def __init__(
        self,
        host: str,
        port: int,
        origin: tuple[str, int] = ("127.0.0.1", 0),
        window_size: int = DEFAULT_WINDOW,
        clock: IReactorTime | None = None,
        open_timeout: float = 0,
    ) -> None:
        """
        @param open_timeout: seconds the proxy node has to open the channel
            (0: no limit): then C{opened} fails with L{Reason.TIMEOUT}, and a
            channel that opens later is closed.  The channel keeps this
            deadline itself so that opening a stream needs one Deferred,
            C{opened}, and no other.
        """
        super().__init__(localWindow=window_size, localMaxPacket=MAX_PACKET)
        self._clock = clock_or_reactor(clock)
        self.host = host
        self.port = port
        self.origin = origin
        self.opened: Deferred[TunnelChannel] = Deferred()
        self._open_timer: IDelayedCall | None = None
        if open_timeout > 0:
            self._open_timer = self._clock.callLater(open_timeout, self._open_timed_out, open_timeout)
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.monotonic()
        self._peer: TunnelPeer | None = None
        #: Called once when the channel has closed (stream accounting).
        self.closed_hooks: list[Callable[[], None]] = []

    # State that most streams never change, or change only at their end, is
    # kept as class defaults: CPython shares one key table among the
    # instances of a class for up to 30 attributes and gives every instance a
    # full dictionary beyond that -- about 1.2 KB more per open stream.
    _closed = False
    #: The cluster connection that opened it (set by the gateway).
    cluster: object | None = None
    #: Why the stream ended badly, in words (None for a normal end); set
    #: before C{closed_hooks} run and before the peer's C{tunnel_closed}.
    close_reason: str | None = None

    # -- opening ---------------------------------------------------------

    def open_request_data(self) -> bytes:
        """The type-specific part of the CHANNEL_OPEN request."""
        return forwarding.packOpen_direct_tcpip((self.host, self.port), (self.origin[0], self.origin[1]))

    def channelOpen(self, specificData: bytes) -> None:
        self.open_succeeded()

    def openFailed(self, reason: Failure | BaseException) -> None:
        self._closed = True
        self.open_failed(open_failure(reason, self.destination))

    def _open_timed_out(self, timeout: float) -> None:
        self._open_timer = None
        self._settle_opened(
            StreamError(Reason.TIMEOUT, f"proxy node did not open {self.destination} within {timeout:g} s")
        )

    def _open_settles(self) -> bool:
        """Stop the open's deadline; False if it passed already (the stream was given up)."""
        timer, self._open_timer = self._open_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return not self.opened.called

    def open_succeeded(self) -> None:
        """The stream is open: fire C{opened}, or close a channel whose stream was given up."""
        if self._open_settles():
            self._settle_opened(self)
        elif not self.localClosed:
            self.close()

    def open_failed(self, error: StreamError) -> None:
        """The stream could not be opened: fail C{opened}, unless that happened already."""
        if self._open_settles():
            self._settle_opened(error)

    def _settle_opened(self, outcome: TunnelChannel | StreamError) -> None:
        # The channel lets go of its Deferred as it fires it: an open stream
        # need not keep one (~300 bytes) for as long as it lasts.
        opened, self.opened = self.opened, SETTLED
        if isinstance(outcome, StreamError):
            opened.errback(outcome)
        else:
            opened.callback(outcome)

    @property
    def destination(self) -> str:
        return host_port(self.host, self.port)

    # -- local side ------------------------------------------------------

    def attach(self, peer: TunnelPeer | None) -> None:
        """Deliver the stream to C{peer} from now on (None: discard it)."""
        self._peer = peer

    def send(self, data: bytes) -> None:
        """Send client bytes toward the destination."""
        self.bytes_up += len(data)
        self.write(data)
        if self.buf and self._peer is not None:
            # Conch signals a full window only once, when it fills; a writer
            # resumed since (or early data larger than the window) must be
            # paused again, or the queue grows without bound.
            self._peer.tunnel_pause_writing()

    def close(self) -> None:
        """Close the stream (after queued data is sent)."""
        if not self._closed and not self.localClosed:
            self.loseConnection()

    def abort(self) -> None:
        """Close now, dropping data still queued for the destination."""
        self.drop_queued()
        self.close()

    def isolate(self) -> None:
        """
        One of this stream's callbacks raised (the connection's exception
        barrier calls this): cut the stream off from its peer, which is told
        the stream was cut (a client is reset), and forget what it queued.
        The connection then closes the channel.
        """
        if self.close_reason is None:
            self.close_reason = "internal error"
        self.drop_queued()
        peer, self._peer = self._peer, None
        if peer is not None:
            try:
                peer.tunnel_closed()
            except Exception:
                pass  # the peer may be what failed; it is cut off either way

    # -- flow control toward us (IPushProducer: ConsumerPacedWindow) ---------

    def stopProducing(self) -> None:
        self.close()

    def dataReceived(self, data: bytes) -> None:
        self.bytes_down += len(data)
        if self._peer is not None:
            self._peer.tunnel_data(data)
        self._grant_window()

    def extReceived(self, dataType: int, data: bytes) -> None:
        # Nothing buffers extended data for the peer: return its window at
        # once, whatever the stdout consumer's pace.  (With Conch's stock
        # connection, which re-opens windows itself, never grant beyond it.)
        consumed = self.localWindowSize - self.localWindowLeft
        grant = min(len(data), consumed)
        if grant > 0 and not self.localClosed:
            self.conn.adjustWindow(self, grant)

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
