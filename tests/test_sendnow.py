"""
L{gateway.proxy.sendnow}: writes that reach the kernel at once, on a real
Twisted TCP transport over a local socket pair (no network), driven by a
L{MemoryReactorClock} so nothing runs but what the test calls.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

from twisted.internet import tcp
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import directlyProvides, implementer

from gateway.proxy import sendnow


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

    def test_pins_the_twisted_state_it_reads(self) -> None:
        # Twisted's private transport state sendnow relies on.
        t = self.transport
        self.assertEqual((t.dataBuffer, t.offset, t._tempDataBuffer), (b"", 0, []))
        self.assertIs(t.TLS, False)
        self.assertFalse(t._aborting)
        self.assertFalse(t._writeDisconnected)
        self.assertFalse(t._writeDisconnecting)
        self.assertTrue(callable(t._closeWriteConnection))
        self.assertIsNone(t.producer)

    def test_a_write_with_nothing_queued_is_sent_at_once(self) -> None:
        sendnow.write(self.transport, b"\x05\x00")
        self.assertEqual(self.received(), b"\x05\x00")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_what_the_kernel_does_not_take_is_queued_and_later_writes_follow_it(self) -> None:
        self.fill_the_kernel()
        sendnow.write(self.transport, b"first")
        sendnow.write(self.transport, b"second")
        self.assertIn(self.transport, self.reactor.getWriters())
        while self.received() != b"<nothing>":
            pass  # drain what fill_the_kernel sent
        self.transport.doWrite()
        self.assertEqual(self.received(), b"firstsecond")

    def test_a_write_behind_queued_bytes_is_not_sent_ahead_of_them(self) -> None:
        self.transport.write(b"queued ")
        sendnow.write(self.transport, b"after")
        self.assertEqual(self.received(), b"<nothing>")
        self.transport.doWrite()
        self.assertEqual(self.received(), b"queued after")

    def test_half_close_with_nothing_queued_shuts_the_write_side_at_once(self) -> None:
        sendnow.write(self.transport, b"bye")
        sendnow.half_close(self.transport)
        self.assertEqual(self.received(), b"bye")
        self.assertEqual(self.received(), b"")  # EOF
        self.assertEqual(self.protocol.write_lost, 1)
        sendnow.write(self.transport, b"late")  # dropped, as Twisted drops it
        self.assertEqual(self.transport.dataBuffer + b"".join(self.transport._tempDataBuffer), b"")
        self.transport.loseConnection()  # then closes at once, as after Twisted's own half-close
        self.assertFalse(self.transport.connected)

    def test_half_close_behind_queued_bytes_waits_for_them(self) -> None:
        self.transport.write(b"queued")
        sendnow.half_close(self.transport)
        self.assertEqual(self.protocol.write_lost, 0)
        self.transport.doWrite()
        self.assertEqual(self.received(), b"queued")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.protocol.write_lost, 1)

    def test_half_close_waits_while_a_producer_is_registered(self) -> None:
        # Twisted resumes a registered producer before it half-closes.
        self.transport.registerProducer(SimpleNamespace(resumeProducing=lambda: None), True)
        sendnow.half_close(self.transport)
        self.assertEqual(self.protocol.write_lost, 0)
        self.assertTrue(self.transport._writeDisconnecting)

    def test_nothing_reaches_the_client_after_an_abort(self) -> None:
        # Twisted drops what is written after abortConnection and resets the
        # connection: no late byte, and no FIN that would make a cut stream
        # read as a complete one.
        self.transport.abortConnection()
        sendnow.write(self.transport, b"late")
        sendnow.half_close(self.transport)
        self.assertEqual(self.protocol.write_lost, 0)
        self.reactor.advance(0)
        self.assertEqual([reason.type for reason in self.protocol.lost], [ConnectionAborted])
        self.assertEqual(self.received(), b"")  # closed, and nothing sent before

    def test_other_transports_use_their_own_write(self) -> None:
        transport = StringTransport()
        sendnow.write(transport, b"data")
        self.assertEqual(transport.value(), b"data")

    def test_no_half_close_on_tls(self) -> None:
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        transport.loseWriteConnection = lambda: self.fail("half-closed a TLS transport")  # type: ignore[method-assign]
        sendnow.half_close(transport)
