"""
Delayed ACKs against an sshd that sets no C{TCP_NODELAY}: the reason each
sequential short stream used to stall for 40 ms, and the one socket option
that removes the stall.  See docs/architecture.md, "Delayed ACKs".
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial

#: Linux only; not sticky, so it is set again after every read.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def quick_ack(transport: object) -> Callable[[], None] | None:
    """
    A call that sets C{TCP_QUICKACK} on C{transport}'s TCP socket; None
    where there is no such socket (a proxy command's pipes, a channel of a
    jump connection) or no such option (not Linux).

    sshd sets no C{TCP_NODELAY} on a forwarding-only connection, so a small
    packet it sends right after another (an open confirmation, a channel
    close, the last segment of a reply) waits until we acknowledge the one
    before -- and Linux delays that ACK by up to 40 ms once the connection
    looks interactive.  Every short stream would stall by that much.
    QUICKACK acknowledges at once; the kernel drops back to delayed ACKs by
    itself, hence one call per read.
    """
    if _TCP_QUICKACK is None:
        return None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    sock = get_handle()
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    if getattr(sock, "type", None) != socket.SOCK_STREAM:
        return None
    return partial(sock.setsockopt, socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
