"""
L{gateway.ssh._tcp.write_through}, and the Twisted TCP internals it relies
on: a Twisted release that renames or changes one fails here.

The connections are Twisted's real C{tcp.Connection} over a local
C{socketpair} (no network), driven by a C{MemoryReactor}.
"""

from __future__ import annotations

import socket

from twisted.internet import abstract, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gateway.ssh._tcp import write_through


class _Recorder(Protocol):
    """Stands for the protocol; with TLS started, Twisted's C{write} hands it the bytes."""

    def __init__(self) -> None:
        self.tls_input: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.tls_input.append(data)


class WriteThroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.reactor = MemoryReactor()
        self.protocol = _Recorder()
        self.conn = tcp.Connection(self.ours, self.protocol, self.reactor)
        self.addCleanup(self.ours.close)
        self.conn.connected = True
        self.write = write_through(self.conn)

    def received(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk

    def test_sent_at_once_when_nothing_is_queued(self) -> None:
        self.write(b"hello")
        self.assertEqual(self.received(), b"hello")
        self.assertEqual(self.conn._tempDataLen, 0)
        self.assertNotIn(self.conn, self.reactor.getWriters())

    def test_queued_behind_what_twisted_holds(self) -> None:
        self.conn.write(b"first ")
        self.write(b"second")
        self.assertEqual(self.received(), b"")
        self.conn.doWrite()
        self.assertEqual(self.received(), b"first second")

    def test_what_the_kernel_does_not_take_is_queued_in_order(self) -> None:
        data = bytes(range(256)) * 16384  # 4 MiB: more than a socket buffer
        self.write(data)
        self.assertGreater(self.conn._tempDataLen, 0)
        self.assertIn(self.conn, self.reactor.getWriters())
        self.write(b"after")
        got = self.received()
        for _ in range(1000):  # bounded: the reactor's turns, by hand
            if not self.conn._tempDataLen and not self.conn.dataBuffer:
                break
            self.conn.doWrite()
            got += self.received()
        self.assertEqual(got, data + b"after")
        self.assertNotIn(self.conn, self.reactor.getWriters())

    def test_queued_while_disconnecting(self) -> None:
        self.conn.disconnecting = True
        self.write(b"x")
        self.assertEqual((self.received(), self.conn._tempDataLen), (b"", 1))

    def test_left_to_tls_once_it_started(self) -> None:
        self.conn.TLS = True  # Twisted's write then hands the bytes to the TLS protocol
        self.write(b"clear")
        self.assertEqual((self.received(), self.protocol.tls_input), (b"", [b"clear"]))

    def test_dropped_after_the_write_side_closed(self) -> None:
        self.conn._writeDisconnected = True
        self.write(b"late")
        self.assertEqual((self.received(), self.conn._tempDataLen), (b"", 0))

    def test_a_send_error_is_left_for_twisted_to_find(self) -> None:
        self.peer.close()
        self.write(b"into a closed socket")  # EPIPE: no exception here
        self.assertEqual(self.conn._tempDataLen, len(b"into a closed socket"))
        self.conn.doWrite()  # Twisted's own send fails: CONNECTION_LOST
        self.assertIsNotNone(self.conn.doWrite())

    def test_other_transports_write_their_own_way(self) -> None:
        transport = StringTransport()
        write_through(transport)(b"data")
        self.assertEqual(transport.value(), b"data")


class TwistedInternalsTests(SynchronousTestCase):
    """What C{write_through} reads, as Twisted defines it."""

    def test_attributes(self) -> None:
        self.assertEqual(abstract.FileDescriptor.dataBuffer, b"")
        self.assertEqual(abstract.FileDescriptor._writeDisconnected, False)
        self.assertFalse(tcp.Connection.TLS)
        for name in ("connected", "disconnecting"):
            self.assertIn(name, vars(abstract.FileDescriptor))

    def test_write_counts_what_it_queues(self) -> None:
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        conn = tcp.Connection(ours, Protocol(), MemoryReactor())
        conn.connected = True
        self.assertEqual(conn._tempDataLen, 0)
        conn.write(b"abc")
        self.assertEqual(conn._tempDataLen, 3)
        conn.doWrite()
        self.assertEqual((conn.dataBuffer, conn._tempDataLen), (b"", 0))
        self.assertIs(conn.socket, ours)
