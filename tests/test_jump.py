"""
Tests of the jump-host endpoint: an SSH connection carried in a
C{direct-tcpip} channel of another one (L{gateway.ssh.jump}).

The transport over a fake channel in memory; SSH over SSH with real Conch
stacks on loopback, where the "internal" addresses exist only in the fake
proxy nodes' route tables.
"""

from __future__ import annotations

import os

from twisted.internet import error, reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.errors import Reason, StreamError
from gateway.ssh.hostkeys import HostKeyPolicy
from gateway.ssh.jump import ChannelEndpoint, ChannelTransport
from gateway.ssh.transport import client_factory
from gateway.testing import DEMO_PAGE, FakeProxyNode, demo_web_site, generate_key
from tests.support import WEB, Collector, OneShot, fetch, inline, within

JUMP = ("10.99.0.20", 22)
ORIGIN = ("127.0.0.1", 0)


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.peer = None
        self.buf = b""
        self.extBuf: list = []

    def attach(self, peer) -> None:
        self.peer = peer

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_eof(self) -> None:
        self.events.append("eof")

    def abort(self) -> None:
        # As TunnelChannel.abort: queued data is dropped, then the close.
        self.buf = b""
        self.close()

    def close(self) -> None:
        self.events.append("close")

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")


@implementer(IHalfCloseableProtocol)
class HalfCloser(Collector):
    read_lost = False

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        pass


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class ChannelTransportTests(TestCase):
    def _transport(self, protocol=None):
        self.clock = Clock()
        self.channel = FakeChannel()
        self.protocol = protocol or Collector()
        transport = ChannelTransport(self.channel, self.protocol, "10.99.0.20", 22, self.clock)
        self.channel.attach(transport)
        self.protocol.makeConnection(transport)
        return transport

    def test_interfaces_and_addresses(self):
        transport = self._transport()
        self.assertTrue(verifyObject(ITransport, transport))
        self.assertTrue(verifyObject(IPushProducer, transport))
        self.assertTrue(verifyObject(IConsumer, transport))
        self.assertEqual(str(transport.getPeer()), "10.99.0.20:22 via channel")
        self.assertEqual(str(transport.getHost()), "10.99.0.20:22 via channel")

    def test_data_both_ways(self):
        transport = self._transport()
        transport.write(b"a")
        transport.writeSequence([b"b", b"c"])
        self.assertEqual(self.channel.sent, [b"a", b"bc"])
        self.channel.peer.tunnel_data(b"xyz")
        self.assertEqual(self.protocol.data, b"xyz")

    def test_lose_connection_sends_eof_then_close(self):
        transport = self._transport()
        transport.loseConnection()
        transport.loseConnection()
        transport.write(b"late")
        self.assertEqual(self.channel.events, ["eof", "close"])
        self.assertEqual(self.channel.sent, [])
        self.channel.peer.tunnel_closed()
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionDone)

    def test_eof_closes_a_plain_protocol(self):
        self._transport()
        self.channel.peer.tunnel_eof()
        self.assertEqual(self.channel.events, ["eof", "close"])
        self.channel.peer.tunnel_closed()
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionDone)

    def test_eof_half_closes_a_half_closeable_protocol(self):
        transport = self._transport(HalfCloser())
        self.channel.peer.tunnel_eof()
        self.assertTrue(self.protocol.read_lost)
        self.assertEqual(self.channel.events, [])
        transport.write(b"still writing")
        self.assertEqual(self.channel.sent, [b"still writing"])

    def test_close_without_eof_is_connection_lost(self):
        self._transport()
        self.channel.peer.tunnel_closed()
        reason = self.successResultOf(self.protocol.lost)
        self.assertIsInstance(reason, error.ConnectionLost)
        self.assertNotIsInstance(reason, error.ConnectionDone)

    def test_abort_drops_buffer_and_loses_connection(self):
        transport = self._transport()
        self.channel.buf = b"unsent"
        transport.abortConnection()
        self.assertEqual(self.channel.buf, b"")
        self.assertEqual(self.channel.events, ["close"])
        self.assertIsNone(self.channel.peer)
        self.clock.advance(0)
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionAborted)

    def test_window_pauses_a_registered_streaming_producer(self):
        transport = self._transport()
        self.channel.peer.tunnel_pause_writing()  # nobody registered: ignored
        self.channel.peer.tunnel_resume_writing()
        producer = Producer()
        transport.registerProducer(producer, True)
        self.channel.peer.tunnel_pause_writing()
        self.channel.peer.tunnel_resume_writing()
        self.assertEqual(producer.events, ["pause", "resume"])
        transport.unregisterProducer()
        self.channel.peer.tunnel_pause_writing()
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_pull_producer_is_pulled_while_window_is_open(self):
        transport = self._transport()
        producer = Producer()
        transport.registerProducer(producer, False)
        self.clock.advance(0)
        self.assertEqual(producer.events, ["resume"])
        self.channel.peer.tunnel_pause_writing()
        transport.write(b"x")
        self.clock.advance(0)
        self.assertEqual(producer.events, ["resume"])
        self.channel.peer.tunnel_resume_writing()
        self.clock.advance(0)
        self.assertEqual(producer.events, ["resume", "resume"])

    def test_producer_is_stopped_when_the_channel_closes(self):
        transport = self._transport()
        producer = Producer()
        transport.registerProducer(producer, True)
        self.channel.peer.tunnel_closed()
        self.assertEqual(producer.events, ["stop"])

    def test_pausing_the_transport_pauses_the_channel(self):
        transport = self._transport()
        transport.pauseProducing()
        transport.resumeProducing()
        self.assertEqual(self.channel.events, ["pause", "resume"])


class ChannelEndpointUnitTests(TestCase):
    def test_cancel_before_open_closes_the_channel_when_it_opens(self):
        opening: Deferred = Deferred()
        factory = OneShot(Collector())
        d = ChannelEndpoint(lambda host, port: opening, "10.99.0.20", 22, Clock()).connect(factory)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        channel = FakeChannel()
        opening.callback(channel)
        self.assertEqual(channel.events, ["close"])
        self.assertFalse(hasattr(factory, "address"))  # no protocol was built

    def test_cancel_then_open_failure_is_quiet(self):
        opening: Deferred = Deferred()
        d = ChannelEndpoint(lambda host, port: opening, "h", 22, Clock()).connect(OneShot(Collector()))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        opening.errback(StreamError(Reason.REFUSED, "nope"))
        self.assertIsNone(self.successResultOf(opening))  # the failure was consumed

    def test_open_failure_fails_connect(self):
        opening: Deferred = Deferred()
        d = ChannelEndpoint(lambda host, port: opening, "h", 22, Clock()).connect(OneShot(Collector()))
        self.assertNoResult(d)
        opening.errback(StreamError(Reason.PROHIBITED, "no"))
        self.assertEqual(self.failureResultOf(d, StreamError).value.reason, Reason.PROHIBITED)

    def test_connects_the_protocol_after_open(self):
        opening: Deferred = Deferred()
        asked = []
        protocol = Collector()
        factory = OneShot(protocol)

        def opener(host, port):
            asked.append((host, port))
            return opening

        d = ChannelEndpoint(opener, "10.99.0.20", 22, Clock()).connect(factory)
        self.assertEqual(asked, [("10.99.0.20", 22)])
        channel = FakeChannel()
        opening.callback(channel)
        self.assertIs(self.successResultOf(d), protocol)
        self.assertIsInstance(protocol.transport, ChannelTransport)
        self.assertIs(channel.peer, protocol.transport)
        self.assertEqual(str(factory.address), "10.99.0.20:22 via channel")


class SSHOverSSHTests(TestCase):
    @inline
    async def setUp(self):
        self.key = generate_key()
        tmp = self.mktemp()
        os.makedirs(tmp)
        sock = os.path.join(tmp, "web.sock")
        web = await serverFromString(reactor, f"unix:{sock}").listen(demo_web_site())
        self.addCleanup(web.stopListening)
        self.inner_node = FakeProxyNode(reactor, [self.key], routes={WEB: f"unix:{sock}"})
        inner = await self.inner_node.listen()
        self.addCleanup(inner.stopListening)
        self.outer_node = FakeProxyNode(reactor, [self.key], routes={JUMP: f"tcp:127.0.0.1:{inner.getHost().port}"})
        outer = await self.outer_node.listen()
        self.addCleanup(outer.stopListening)
        port = outer.getHost().port
        self.outer, self.outer_conn = await self._ssh(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), "127.0.0.1", port, self.outer_node
        )
        self.channels = []

    def _open(self, host: str, port: int) -> Deferred:
        def opened(channel):
            self.channels.append(channel)
            return channel

        return self.outer_conn.open_tunnel(host, port, ORIGIN).addCallback(opened)

    async def _ssh(self, endpoint, host, port, node):
        factory = client_factory(host, port, "demo", self.key, HostKeyPolicy(pinned=[node.host_key.public()]), reactor)
        transport = await within(endpoint.connect(factory))

        def close():
            if not transport.lost.called:
                transport.loseConnection()
            return within(transport.lost)

        self.addCleanup(close)
        return transport, await within(transport.ready)

    @inline
    async def test_ssh_over_ssh(self):
        with self.assertRaises(StreamError):  # only the inner node reaches the web server
            await within(self.outer_conn.open_tunnel(*WEB, ORIGIN))
        inner, inner_conn = await self._ssh(ChannelEndpoint(self._open, *JUMP), *JUMP, self.inner_node)
        self.assertEqual(str(inner.transport.getPeer()), "10.99.0.20:22 via channel")
        self.assertEqual(await fetch(inner_conn), DEMO_PAGE)
        self.assertEqual(await fetch(inner_conn), DEMO_PAGE)
        self.assertEqual(len(self.outer_conn.channels), 1)

    @inline
    async def test_closing_the_inner_connection_closes_the_channel(self):
        inner, _ = await self._ssh(ChannelEndpoint(self._open, *JUMP), *JUMP, self.inner_node)
        (channel,) = self.channels
        closed = []
        channel.closed_hooks.append(lambda: closed.append(True))
        inner.loseConnection()
        await within(inner.lost)
        self.assertEqual(closed, [True])
        self.assertEqual(len(self.outer_conn.channels), 0)
        self.assertFalse(self.outer.lost.called)
        # The jump connection carries on.
        again, again_conn = await self._ssh(ChannelEndpoint(self._open, *JUMP), *JUMP, self.inner_node)
        self.assertEqual(await fetch(again_conn), DEMO_PAGE)

    @inline
    async def test_open_failure_fails_connect(self):
        factory = client_factory(
            "10.99.0.21", 22, "demo", self.key, HostKeyPolicy(pinned=[self.inner_node.host_key.public()]), reactor
        )
        with self.assertRaises(StreamError) as caught:
            await within(ChannelEndpoint(self._open, "10.99.0.21", 22).connect(factory))
        self.assertEqual(caught.exception.reason, Reason.REFUSED)
        self.assertEqual(len(self.outer_conn.channels), 0)
