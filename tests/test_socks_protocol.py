"""The SOCKS adapter in memory, its proxy node played by L{MemoryProxyNode}."""

from __future__ import annotations

from twisted.conch.ssh import connection
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gateway.proxy.socks.protocol import EARLY_DATA_LIMIT, SocksFactory
from tests.support import MemoryClient, MemoryProxyNode

GREETING = b"\x05\x01\x00"
CONNECT = b"\x05\x01\x00\x01\x0a\x00\x00\x05\x00\x50"  # 10.0.0.5:80


class SocksAdapterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.node = MemoryProxyNode(self.clock, auto_open=False)
        self.client = MemoryClient(SocksFactory, self.node, self.clock)

    def test_payload_and_eof_sent_before_the_reply_reach_the_destination(self) -> None:
        # e.g. `printf ... | nc -X 5` : request, payload and EOF at once
        self.client.send(GREETING + CONNECT + b"GET / HTTP/1.0\r\n\r\n")
        self.client.half_close()
        (channel,) = self.node.channels
        self.node.confirm(channel)
        self.assertEqual(self.client.output(), b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6))
        self.assertEqual(self.node.received(channel), b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(self.node.sent(connection.MSG_CHANNEL_EOF, channel), 1)
        self.node.reply(channel, b"HTTP/1.0 200 OK\r\n\r\n")
        self.node.eof(channel)
        self.assertEqual(self.client.output(), b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertTrue(self.client.transport.disconnecting)

    def test_a_client_waiting_for_its_reply_is_not_paused(self) -> None:
        # Most clients send nothing until the reply: pausing and resuming
        # them would cost two epoll_ctl calls a stream for nothing.
        self.client.send(GREETING + CONNECT)
        self.assertEqual(self.client.transport.producerState, "producing")
        (channel,) = self.node.channels
        self.node.confirm(channel)
        self.assertEqual(self.client.transport.producerState, "producing")

    def test_early_data_past_the_limit_pauses_the_client_until_the_stream_is_open(self) -> None:
        self.client.send(GREETING + CONNECT + b"a" * EARLY_DATA_LIMIT)
        self.assertEqual(self.client.transport.producerState, "producing")  # at the limit: not yet
        self.client.send(b"b")
        self.assertEqual(self.client.transport.producerState, "paused")
        (channel,) = self.node.channels
        self.node.confirm(channel, window=1 << 20)
        self.assertEqual(self.client.transport.producerState, "producing")
        self.assertEqual(self.node.received(channel), b"a" * EARLY_DATA_LIMIT + b"b")

    def test_a_request_arriving_with_too_much_early_data_pauses_at_once(self) -> None:
        self.client.send(GREETING + CONNECT + b"a" * (EARLY_DATA_LIMIT + 1))
        self.assertEqual(self.client.transport.producerState, "paused")

    def test_a_client_gone_while_its_stream_opens_closes_the_stream(self) -> None:
        self.client.send(GREETING + CONNECT)
        self.client.lose()
        (channel,) = self.node.channels
        self.node.confirm(channel)
        self.assertTrue(channel.localClosed)
        self.assertEqual(self.client.slots_used, 0)

    def test_a_silent_client_is_cut_at_the_handshake_deadline(self) -> None:
        """A client that connects and sends nothing more cannot hold a slot."""
        self.client.send(b"\x05")
        self.clock.advance(9.9)
        self.assertFalse(self.client.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.client.transport.disconnecting)

    def test_the_handshake_deadline_stops_at_the_request(self) -> None:
        self.client.send(GREETING + CONNECT)
        self.clock.advance(3600)  # the open is bounded by the cluster's open_timeout instead
        self.assertFalse(self.client.transport.disconnecting)

    def test_a_socks4_user_id_that_names_no_cluster_is_no_credentials(self) -> None:
        # socat always sends $USER (or "anonymous"): the destination picks the cluster.
        self.client.send(b"\x04\x01\x00\x50\x0a\x00\x00\x05anonymous\x00")
        (request,) = self.node.requests
        self.assertEqual((request.host, request.username, request.password), ("10.0.0.5", None, None))
