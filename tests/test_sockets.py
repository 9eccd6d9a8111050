"""
L{gateway.sockets}: writes and half-closes that reach the kernel at once,
and the Twisted TCP internals they rely on -- a Twisted release that
renames or changes one fails here.

The connections are Twisted's real C{tcp.Connection} (or C{tcp.Server}) over
a local C{socketpair} (no network), driven by a C{MemoryReactor}, so nothing
runs but what the test calls.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

from twisted.internet import abstract, tcp
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import directlyProvides, implementer

from gateway import sockets
from gateway.sockets import write_through


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    write_lost = 0

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        self.write_lost += 1


class SendNowTests(TestCase):
    def setUp(self) -> None:
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactorClock()
        self.protocol = _Recorder()
        port = SimpleNamespace(_realPortNumber=1080)
        self.transport = tcp.Server(ours, self.protocol, ("127.0.0.1", 5), port, 1, self.reactor)
        self.protocol.makeConnection(self.transport)
        self.addCleanup(ours.close)

    def received(self) -> bytes:
        try:
            return self.peer.recv(1 << 20)
        except BlockingIOError:
            return b"<nothing>"

    def fill_the_kernel(self) -> None:
        """Send until the socket takes nothing more."""
        chunk = b"x" * 65536
        while True:
            try:
                self.transport.socket.send(chunk)
            except BlockingIOError:
                return

    def test_a_write_with_nothing_queued_is_sent_at_once(self) -> None:
        sockets.write(self.transport, b"\x05\x00")
        self.assertEqual(self.received(), b"\x05\x00")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_what_the_kernel_does_not_take_is_queued_and_later_writes_follow_it(self) -> None:
        self.fill_the_kernel()
        sockets.write(self.transport, b"first")
        sockets.write(self.transport, b"second")
        self.assertIn(self.transport, self.reactor.getWriters())
        while self.received() != b"<nothing>":
            pass  # drain what fill_the_kernel sent
        self.transport.doWrite()
        self.assertEqual(self.received(), b"firstsecond")

    def test_a_write_behind_queued_bytes_is_not_sent_ahead_of_them(self) -> None:
        self.transport.write(b"queued ")
        sockets.write(self.transport, b"after")
        self.assertEqual(self.received(), b"<nothing>")
        self.transport.doWrite()
        self.assertEqual(self.received(), b"queued after")

    def test_half_close_with_nothing_queued_shuts_the_write_side_at_once(self) -> None:
        sockets.write(self.transport, b"bye")
        sockets.half_close(self.transport)
        self.assertEqual(self.received(), b"bye")
        self.assertEqual(self.received(), b"")  # EOF
        self.assertEqual(self.protocol.write_lost, 1)
        sockets.write(self.transport, b"late")  # dropped, as Twisted drops it
        self.assertEqual(self.transport.dataBuffer + b"".join(self.transport._tempDataBuffer), b"")
        self.transport.loseConnection()  # then closes at once, as after Twisted's own half-close
        self.assertFalse(self.transport.connected)

    def test_half_close_behind_queued_bytes_waits_for_them(self) -> None:
        self.transport.write(b"queued")
        sockets.half_close(self.transport)
        self.assertEqual(self.protocol.write_lost, 0)
        self.transport.doWrite()
        self.assertEqual(self.received(), b"queued")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.protocol.write_lost, 1)

    def test_half_close_waits_while_a_producer_is_registered(self) -> None:
        # Twisted resumes a registered producer before it half-closes.
        self.transport.registerProducer(SimpleNamespace(resumeProducing=lambda: None), True)
        sockets.half_close(self.transport)
        self.assertEqual(self.protocol.write_lost, 0)
        self.assertTrue(self.transport._writeDisconnecting)

    def test_nothing_reaches_the_client_after_an_abort(self) -> None:
        # Twisted drops what is written after abortConnection and resets the
        # connection: no late byte, and no FIN that would make a cut stream
        # read as a complete one.
        self.transport.abortConnection()
        sockets.write(self.transport, b"late")
        sockets.half_close(self.transport)
        self.assertEqual(self.protocol.write_lost, 0)
        self.reactor.advance(0)
        self.assertEqual([reason.type for reason in self.protocol.lost], [ConnectionAborted])
        self.assertEqual(self.received(), b"")  # closed, and nothing sent before

    def test_other_transports_use_their_own_write(self) -> None:
        transport = StringTransport()
        sockets.write(transport, b"data")
        self.assertEqual(transport.value(), b"data")

    def test_no_half_close_on_tls(self) -> None:
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        transport.loseWriteConnection = lambda: self.fail("half-closed a TLS transport")  # type: ignore[method-assign]
        sockets.half_close(transport)


class _TLSRecorder(Protocol):
    """Stands for the protocol; with TLS started, Twisted's C{write} hands it the bytes."""

    def __init__(self) -> None:
        self.tls_input: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.tls_input.append(data)


class WriteThroughTests(TestCase):
    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.reactor = MemoryReactor()
        self.protocol = _TLSRecorder()
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


class TwistedInternalsTests(TestCase):
    """What L{gateway.sockets} reads and sets, as Twisted defines it."""

    def test_attributes(self) -> None:
        self.assertEqual(abstract.FileDescriptor.dataBuffer, b"")
        self.assertEqual(abstract.FileDescriptor._writeDisconnected, False)
        self.assertEqual(abstract.FileDescriptor._writeDisconnecting, False)
        self.assertIs(tcp.Connection._aborting, False)
        self.assertIsNone(abstract.FileDescriptor.producer)
        self.assertFalse(tcp.Connection.TLS)
        self.assertTrue(callable(tcp.Connection._closeWriteConnection))
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


class GrowReadsTests(TestCase):
    """L{sockets.grow_reads}: a client connection that fills its reads reads more at a time."""

    def setUp(self) -> None:
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        self.conn = tcp.Connection(ours, Protocol(), MemoryReactor())

    def test_a_full_read_doubles_the_read_size_up_to_the_maximum(self) -> None:
        self.assertEqual(self.conn.bufferSize, 65536)  # Twisted's, which this relies on
        sizes = []
        for _ in range(4):
            sockets.grow_reads(self.conn, self.conn.bufferSize)
            sizes.append(self.conn.bufferSize)
        self.assertEqual(sizes, [131072, sockets.MAX_READ, sockets.MAX_READ, sockets.MAX_READ])

    def test_a_read_that_did_not_fill_it_changes_nothing(self) -> None:
        sockets.grow_reads(self.conn, 65535)
        self.assertEqual(self.conn.bufferSize, 65536)

    def test_a_transport_without_a_read_size_is_left_alone(self) -> None:
        transport = StringTransport()
        sockets.grow_reads(transport, 1 << 20)
        self.assertFalse(hasattr(transport, "bufferSize"))
