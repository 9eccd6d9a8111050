"""
Write-through for Twisted's TCP transports: the one place the gateway reads
the internals of C{twisted.internet.tcp.Connection} (and of
C{abstract.FileDescriptor} under it).  C{tests/test_tcp_pins.py} checks that
each still exists and means what we rely on.

Twisted's C{write} queues and registers the socket for writability; the
bytes go out on the reactor's next turn, joined with whatever else was
written meanwhile.  On a bulk stream that costs, per turn, two C{epoll_ctl}
calls (start and stop writing), a wake-up and a copy of the whole queue.
L{write_through} sends at once when nothing is queued, as OpenSSH and
asyncio do, and hands Twisted only what the kernel did not take -- so
ordering, back-pressure (a paused producer), half-close and errors stay
Twisted's, from the first byte it queues.

Internals relied on (all of C{FileDescriptor}/C{tcp.Connection}):

 - C{socket}: the connected, non-blocking socket;
 - C{dataBuffer}, C{_tempDataLen}: what is queued (C{dataBuffer} is emptied
   once fully sent; C{_tempDataLen} counts what C{write} appended since);
 - C{connected}, C{disconnecting}, C{_writeDisconnected}: the states in
   which Twisted's own C{write} queues or drops, left to it;
 - C{TLS}: set once TLS starts on the connection, where the bytes written
   are not the bytes sent.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import tcp

__all__ = ["write_through"]


def write_through(transport: object) -> Callable[[bytes], None]:
    """
    A C{write} for C{transport} that sends at once when nothing is queued:
    a Twisted TCP connection's, else (pipes, a jump host's channel, a test's
    C{StringTransport}) its own C{write}.
    """
    if not isinstance(transport, tcp.Connection):
        return transport.write  # type: ignore[attr-defined]
    send = transport.socket.send
    queued = transport.write

    def write(data: bytes) -> None:
        t = transport
        if t.dataBuffer or t._tempDataLen or t.TLS or t.disconnecting or t._writeDisconnected or not t.connected:
            queued(data)  # behind what is queued, or a state only Twisted handles
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            queued(data)  # Twisted's next send meets the error and closes the connection
            return
        if sent < len(data):
            queued(data[sent:])

    return write
