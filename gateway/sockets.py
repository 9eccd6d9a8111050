"""
What the gateway does to its TCP connections beyond Twisted: no Nagle, and
writes and half-closes that reach the kernel at once.

Twisted's TCP transport never sends from C{write}: it queues the bytes,
registers the socket for writability (an C{epoll_ctl}), sends on the next
turn of the reactor, joined with whatever else was written meanwhile, and
unregisters it (another).  A short stream writes to its client three or
four times -- the SOCKS method, the SOCKS reply, the response, the
half-close -- each on a turn of its own: eight C{epoll_ctl} calls, three
more wake-ups and some 80 Python calls a stream, a tenth of its CPU.  On a
bulk stream the same costs come once per turn, plus the join of the queue
(docs/benchmarks.md).

Here a write to a Twisted TCP (or UNIX) connection with nothing queued goes
straight to C{send}, as OpenSSH and asyncio do; whatever the kernel does not
take, every write behind queued bytes, and every state only Twisted handles
(TLS started, closing, half-closed) go through Twisted's C{write}, so order,
buffering, back-pressure (a paused producer) and errors stay Twisted's from
the first byte it queues.  Anything that is not a Twisted TCP connection
(pipes, a jump host's channel, TLS listeners' wrapped transports, a test's
C{StringTransport}) keeps its own C{write}.

This is the one module that reads Twisted's private transport state;
C{tests/test_sockets.py} pins what it relies on (all of
C{abstract.FileDescriptor} / C{tcp.Connection}):

 - C{socket}: the connected, non-blocking socket;
 - C{dataBuffer}, C{_tempDataLen}: what is queued (C{dataBuffer} is emptied
   once fully sent; C{_tempDataLen} counts what C{write} appended since);
 - C{connected}, C{disconnecting}, C{_aborting}, C{_writeDisconnected}: the
   states in which Twisted's own C{write} queues or drops;
 - C{TLS}: set once TLS starts on the connection;
 - C{producer}, C{_writeDisconnecting}, C{_closeWriteConnection}: what
   Twisted's own half-close waits for and does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport, ITCPTransport

__all__ = ["grow_reads", "half_close", "set_no_delay", "write", "write_through"]

#: The most a client connection reads at a time once it streams (L{grow_reads}).
MAX_READ = 256 * 1024


def set_no_delay(transport: object) -> None:
    """
    Turn off Nagle's algorithm where the transport has it (TCP).

    Twisted already gathers what one reactor turn writes into one send, so
    Nagle only adds delay: a small reply after a small reply waits for an
    ACK the peer delays by up to 40 ms (request/response traffic, keep-alive).
    """
    set_tcp_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_tcp_no_delay is not None:
        set_tcp_no_delay(True)


def grow_reads(transport: object, got: int) -> None:
    """
    A read of C{got} bytes filled the transport's read size: read twice as
    much next time, up to L{MAX_READ}.

    Twisted reads 64 KiB at a time (C{bufferSize}); an upload streaming in
    pays the reactor's dispatch and the SSH layer's per-write work once per
    read, so reading 256 KiB at a time cut the gateway's CPU per uploaded GiB
    by a quarter (1.04 -> 0.76 s).  Only a connection that fills its reads
    grows: a short stream's reads stay small.  C{bufferSize} is also the
    queue Twisted lets a slow reader build before it pauses the producer, so
    that grows with it, to at most L{MAX_READ} per stream.
    """
    size = getattr(transport, "bufferSize", None)
    if isinstance(size, int) and got >= size and size < MAX_READ:
        transport.bufferSize = min(size * 2, MAX_READ)  # type: ignore[attr-defined]


def _idle(t: Any) -> bool:
    """
    A Twisted TCP connection (C{t} is one) open for writing with nothing
    queued.  Not one being aborted: Twisted drops what is written to it then
    (and resets it), so a byte or a FIN sent at once would reach a client
    that must see its stream cut.
    """
    return not (
        t.dataBuffer
        or t._tempDataLen
        or t.TLS
        or t.disconnecting
        or t._aborting
        or t._writeDisconnected
        or not t.connected
    )


def _send_now(t: Any, data: bytes) -> None:
    """Send C{data} on idle connection C{t}; Twisted queues what the kernel does not take."""
    try:
        sent = t.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        t.write(data)  # Twisted's next send meets the error and closes the connection
        return
    if sent < len(data):
        t.write(data[sent:])


def write(transport: ITCPTransport, data: bytes) -> None:
    """C{transport.write(data)}, sent at once where nothing is queued before it."""
    if data and isinstance(transport, tcp.Connection) and _idle(transport):
        _send_now(transport, data)
    else:
        transport.write(data)


def write_through(transport: object) -> Callable[[bytes], None]:
    """
    A C{write} for C{transport} that sends at once when nothing is queued
    (see L{write}), for a connection that writes often: the SSH socket.
    """
    if not isinstance(transport, tcp.Connection):
        return transport.write  # type: ignore[attr-defined]
    queued = transport.write

    def write_now(data: bytes) -> None:
        if _idle(transport):
            _send_now(transport, data)
        else:
            queued(data)

    return write_now


def half_close(transport: ITCPTransport) -> None:
    """
    Shut the write side of C{transport} if it can; otherwise leave it open.

    At once where nothing is queued and no producer waits to be resumed
    (what Twisted's C{loseWriteConnection} would do on its next turn), else
    after the queue, as Twisted does.  Not on TLS: there the attribute
    reaches the raw TCP socket underneath, which would end the stream
    without TLS close_notify; such a client sees the end when both
    directions are done and the connection closes.
    """
    if ISSLTransport.providedBy(transport):
        return
    if isinstance(transport, tcp.Connection) and _idle(transport) and transport.producer is None:
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()
