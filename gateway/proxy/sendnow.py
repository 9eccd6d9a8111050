"""
Writes to a client connection that reach the kernel at once.

Twisted's TCP transport never sends from C{write}: it queues the bytes,
registers the socket for writability (an C{epoll_ctl}), sends on the next
turn of the reactor and unregisters it (another).  A short stream writes to
its client three or four times -- the SOCKS method, the SOCKS reply, the
response, the half-close -- each on a turn of its own, so that was eight
C{epoll_ctl} calls, three more wake-ups and some 80 Python calls per stream,
a tenth of the gateway's CPU for short connections (docs/benchmarks.md).

Here a write to a plain TCP (or UNIX) transport with nothing queued goes
straight to C{send}; whatever the kernel does not take, and every write
behind queued bytes, goes through Twisted's C{write} as before, so order,
buffering and the producer's back-pressure are Twisted's.  A half-close
with nothing queued shuts the socket's write side at once.  TLS transports,
test transports and anything else are left to their own C{write}.

This is the one module that reads Twisted's private transport state
(C{dataBuffer}, C{offset}, C{_tempDataBuffer}, C{_aborting},
C{_writeDisconnected}, C{_closeWriteConnection}); C{tests/test_sendnow.py}
pins what it relies on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport, ITCPTransport


def _idle(transport: Any) -> bool:
    """
    A plain TCP/UNIX connection, open for writing, with nothing queued.  Not
    one being aborted: Twisted drops what is written to it then (and it is
    reset), so a byte or a FIN sent at once would reach a client that must
    see its stream cut.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and bool(transport.connected)
        and not transport._aborting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    )


def write(transport: ITCPTransport, data: bytes) -> None:
    """C{transport.write(data)}, sent at once where nothing is queued before it."""
    if data and _idle(transport):
        try:
            sent = transport.socket.send(data)  # type: ignore[attr-defined]
        except OSError:
            # EAGAIN: the kernel is full, Twisted waits for room.  Anything
            # else (a reset): Twisted's next send meets it and closes.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


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
    if _idle(transport) and transport.producer is None:  # type: ignore[attr-defined]
        transport._writeDisconnecting = True  # type: ignore[attr-defined]
        transport._writeDisconnected = True  # type: ignore[attr-defined]
        transport._closeWriteConnection()  # type: ignore[attr-defined]
        return
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()
