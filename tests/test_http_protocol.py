"""
The HTTP proxy adapter in memory: every stage's deadline, a client that goes
away mid-request, the retry of a request that raced an origin's keep-alive
time-out, and the switch to a splice on C{101}.  The proxy node is played by
L{MemoryProxyNode}; time is a L{Clock}.
"""

from __future__ import annotations

from twisted.conch.ssh import connection
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gateway.config import GatewaySettings
from gateway.errors import Reason, StreamError
from gateway.proxy.http.protocol import MAX_BUFFERED, HttpProxyFactory
from gateway.ssh.channel import TunnelChannel
from tests.support import MemoryClient, MemoryProxyNode, capture_events

SETTINGS = GatewaySettings(handshake_timeout=10, body_timeout=3, response_timeout=7, keepalive_timeout=20)
GET = b"GET http://10.0.0.5/x HTTP/1.1\r\nHost: 10.0.0.5\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class HttpAdapterTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.node = MemoryProxyNode(self.clock, SETTINGS)
        self.client = MemoryClient(HttpProxyFactory, self.node, self.clock)
        self.events = capture_events(self)

    def outcomes(self) -> list[str]:
        return [e["outcome"] for e in self.events if e.get("log_namespace") == "gateway.proxy.http.protocol"]

    def assertGone(self) -> None:
        """The client connection is closed or reset, and every channel closed."""
        self.assertTrue(self.client.transport.disconnecting or self.client.transport.disconnected)
        self.assertTrue(all(channel.localClosed for channel in self.node.channels))


class ClientGoneTests(HttpAdapterTestCase):
    def test_half_sent_post_then_close_frees_the_stream_at_once(self) -> None:
        self.client.send(b"POST http://10.0.0.5/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
        (channel,) = self.node.channels
        self.assertTrue(self.node.received(channel).endswith(b"\r\n\r\nabc"))
        self.client.half_close()  # the FIN of a client that closed
        self.assertGone()
        self.assertEqual(self.outcomes(), ["client-gone"])
        self.client.lose()
        self.assertEqual(self.client.slots_used, 0)

    def test_a_complete_request_then_half_close_is_still_answered(self) -> None:
        self.client.send(GET)
        self.client.half_close()
        (channel,) = self.node.channels
        self.node.reply(channel, OK)
        self.assertTrue(self.client.output().endswith(b"Connection: close\r\n\r\nok"))
        self.assertTrue(self.client.transport.disconnecting)

    def test_connect_payload_and_eof_before_the_tunnel_opens(self) -> None:
        self.node.auto_open = False
        self.client.send(b"CONNECT 10.0.0.5:22 HTTP/1.1\r\n\r\nSSH-2.0-x\r\n")
        self.client.half_close()
        (channel,) = self.node.channels
        self.node.confirm(channel)
        self.assertEqual(self.node.received(channel), b"SSH-2.0-x\r\n")
        self.assertEqual(self.node.sent(connection.MSG_CHANNEL_EOF, channel), 1)


class DeadlineTests(HttpAdapterTestCase):
    def test_a_silent_client_is_cut_at_the_handshake_deadline(self) -> None:
        """A client that starts a request head and sends nothing more cannot hold a slot."""
        self.client.send(b"GET http://10.0.0.1/ HTTP/1.1\r\n")
        self.clock.advance(10)
        self.assertTrue(self.client.transport.disconnecting)

    def test_a_stalled_body_gets_408_after_body_timeout(self) -> None:
        self.client.send(b"POST http://10.0.0.5/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
        self.clock.advance(2)
        self.client.send(b"cd")  # each byte re-arms the idle deadline
        self.clock.advance(2.9)
        self.assertFalse(self.client.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertGone()
        self.assertEqual(self.outcomes(), ["body-timeout"])

    def test_no_body_deadline_while_the_upstream_window_is_full(self) -> None:
        self.client.send(b"POST http://10.0.0.5/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
        (channel,) = self.node.channels
        channel.stopWriting()  # Conch: the peer's window is full
        self.clock.advance(100)
        self.assertFalse(self.client.transport.disconnecting)
        channel.startWriting()
        self.clock.advance(0)  # the writer resumes from the reactor
        self.clock.advance(3)
        self.assertTrue(self.client.transport.disconnecting)

    def test_a_silent_upstream_gets_504_after_response_timeout(self) -> None:
        self.client.send(GET)
        self.clock.advance(6.9)
        self.assertEqual(self.client.output(), b"")
        self.clock.advance(0.1)
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertGone()
        self.assertEqual(self.outcomes(), ["response-timeout"])

    def test_a_streaming_response_has_no_deadline(self) -> None:
        self.client.send(GET)
        (channel,) = self.node.channels
        self.node.reply(channel, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        self.clock.advance(3600)
        self.assertFalse(self.client.transport.disconnecting)

    def test_idle_keep_alive_connection_is_closed_politely(self) -> None:
        self.client.send(GET)
        self.node.reply(self.node.channels[0], OK)
        self.clock.advance(19.9)
        self.assertFalse(self.client.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.client.transport.disconnecting)
        self.assertEqual(self.node.handshake_errors["http"], 0)

    def test_a_second_head_begun_and_not_finished_counts_as_a_handshake_failure(self) -> None:
        self.client.send(GET)
        self.node.reply(self.node.channels[0], OK)
        self.client.send(b"GET http://10.0.0.5/y HTTP/1.1\r\n")
        self.clock.advance(20)
        self.assertEqual(self.node.handshake_errors["http"], 1)


class RetryTests(HttpAdapterTestCase):
    def _reuse_then_close(self, request: bytes) -> None:
        self.client.send(GET)
        first = self.node.channels[0]
        self.node.reply(first, OK)
        self.client.output()
        self.client.send(request)
        self.assertEqual(len(self.node.channels), 1)  # sent on the kept-alive tunnel
        # ...which the origin closes at that moment (its keep-alive time-out).
        self.node.eof(first)
        self.node.close(first)

    def test_an_idempotent_request_is_sent_again_on_a_new_tunnel(self) -> None:
        self._reuse_then_close(GET)
        first, second = self.node.channels
        self.assertEqual(self.node.received(second), self.node.received(first)[-len(self.node.received(second)) :])
        self.node.reply(second, OK)
        self.assertTrue(self.client.output().endswith(b"ok"))
        self.assertEqual(self.outcomes(), ["retry"])

    def test_only_once(self) -> None:
        self._reuse_then_close(GET)
        second = self.node.channels[1]
        self.node.eof(second)
        self.node.close(second)
        self.assertEqual(len(self.node.channels), 2)
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertEqual(self.outcomes(), ["retry", "upstream-error"])

    def test_a_post_is_not_repeated_and_its_502_is_logged(self) -> None:
        self._reuse_then_close(b"POST http://10.0.0.5/x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nz")
        self.assertEqual(len(self.node.channels), 1)
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertEqual(self.outcomes(), ["upstream-error"])


class UpgradeTests(HttpAdapterTestCase):
    UPGRADE = (
        b"GET http://10.0.0.5/ws HTTP/1.1\r\nHost: 10.0.0.5\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    SWITCH = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )

    def test_a_websocket_upgrade_becomes_a_splice(self) -> None:
        self.client.send(self.UPGRADE)
        (channel,) = self.node.channels
        head = self.node.received(channel)
        self.assertIn(b"\r\nUpgrade: websocket\r\n", head)
        self.assertIn(b"\r\nConnection: Upgrade\r\n", head)
        self.node.reply(channel, self.SWITCH + b"\x81\x02hi")
        answer = self.client.output()
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), answer)
        self.assertIn(b"Connection: Upgrade\r\n", answer)
        self.assertTrue(answer.endswith(b"\r\n\r\n\x81\x02hi"))
        # Raw bytes both ways from now on, with no deadline.
        self.client.send(b"\x81\x82\x00\x00\x00\x00ho")
        self.assertTrue(self.node.received(channel).endswith(b"\x81\x82\x00\x00\x00\x00ho"))
        self.clock.advance(3600)
        self.node.reply(channel, b"later")
        self.assertEqual(self.client.output(), b"later")

    def test_a_client_paused_for_what_it_sent_ahead_is_read_again_once_switched(self) -> None:
        # Bytes sent behind the upgrade request, before the 101, wait in the
        # parser; past its limit the client is paused.  The splice must
        # resume it, or the client's direction of the new protocol is dead.
        self.client.send(self.UPGRADE)
        self.client.send(b"\x81" * (MAX_BUFFERED + 1))
        self.assertEqual(self.client.transport.producerState, "paused")
        (channel,) = self.node.channels
        self.node.reply(channel, self.SWITCH)
        self.assertEqual(self.client.transport.producerState, "producing")
        self.assertTrue(self.node.received(channel).endswith(b"\x81" * (MAX_BUFFERED + 1)))

    def test_an_unsolicited_101_is_a_502(self) -> None:
        self.client.send(GET)
        self.node.reply(self.node.channels[0], self.SWITCH)
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertGone()


class ChallengeTests(HttpAdapterTestCase):
    """
    Browsers, Java, ncat, OpenBSD nc -P and curl --proxy-anyauth send a request
    without credentials first and offer them only when challenged.
    """

    def refuse(self, reason: Reason) -> None:
        self.node.open_stream = lambda request: fail(StreamError(reason, "refused in the test"))

    def test_auth_required_is_a_challenge(self) -> None:
        self.refuse(Reason.AUTH_REQUIRED)
        self.client.send(b"CONNECT 10.0.0.5:22 HTTP/1.1\r\n\r\n")
        self.assertIn(b'\r\nProxy-Authenticate: Basic realm="gateway"\r\n', self.client.output())

    def test_an_ambiguous_destination_without_credentials_is_a_challenge(self) -> None:
        """Credentials are what resolves it, so say so in the one way such clients understand: 407."""
        self.refuse(Reason.AMBIGUOUS)
        self.client.send(b"CONNECT 10.0.0.5:22 HTTP/1.1\r\n\r\n")
        output = self.client.output()
        self.assertTrue(output.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), output)
        self.assertIn(b'\r\nProxy-Authenticate: Basic realm="gateway"\r\n', output)


class CutShortTests(HttpAdapterTestCase):
    """
    An upstream that closes in the middle of a framed response body.  With
    Content-Length or chunked framing the client sees the truncation itself
    (curl: "transfer closed with 90 bytes remaining", requests: IncompleteRead)
    once the connection closes.  A reset instead makes the kernel drop the head
    and the bytes not yet read: curl reports status 000 and requests a
    ProxyError, blaming the gateway and losing what did arrive.
    """

    def assertCleanCloseAfter(self, head: bytes) -> None:
        self.client.send(GET)
        (channel,) = self.node.channels
        self.node.reply(channel, head + b"0123456789")
        self.node.eof(channel)
        self.node.close(channel)
        self.assertTrue(self.client.output().endswith(b"0123456789"))
        self.assertTrue(self.client.transport.disconnecting)
        self.assertFalse(self.client.transport.disconnected)  # StringTransport: set by abortConnection only

    def test_content_length(self) -> None:
        self.assertCleanCloseAfter(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")

    def test_chunked(self) -> None:
        self.assertCleanCloseAfter(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n")

    def test_a_close_delimited_body_is_reset(self) -> None:
        self.client.send(GET)
        (channel,) = self.node.channels
        self.node.reply(channel, b"HTTP/1.1 200 OK\r\n\r\nsome")
        self.node.close(channel)  # cut without EOF: the close must not read as the end
        self.assertTrue(self.client.transport.disconnected)


class DrainTests(HttpAdapterTestCase):
    """At shutdown an HTTP client connection finishes what it must, then closes."""

    def test_an_idle_kept_alive_connection_closes_at_once(self) -> None:
        self.client.send(GET)
        (channel,) = self.node.channels
        self.node.reply(channel, OK)
        self.client.protocol.drain()
        self.assertGone()

    def test_an_exchange_in_progress_is_answered_with_connection_close(self) -> None:
        self.client.send(GET)
        self.client.protocol.drain()
        self.assertFalse(self.client.transport.disconnecting)
        self.node.reply(self.node.channels[0], OK)
        self.assertIn(b"\r\nConnection: close\r\n", self.client.output())
        self.assertGone()


class SlowDestinationTests(HttpAdapterTestCase):
    """A destination that reads slowly (a full window) and a client that is slow or gone (found in review)."""

    POST = b"POST http://10.0.0.5/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"

    def setUp(self) -> None:
        super().setUp()
        self.node.auto_open = False

    def open(self, window: int = 1 << 20) -> TunnelChannel:
        (channel,) = self.node.channels
        self.node.confirm(channel, window=window)
        return channel

    def test_no_408_while_the_destination_window_is_full(self) -> None:
        self.client.send(self.POST)
        self.open(window=1000)
        self.client.send(b"x" * 5000)  # more than the destination's window
        self.assertEqual(self.client.transport.producerState, "paused")  # the client waits: not its fault
        self.clock.advance(3)
        self.assertEqual(self.client.output(), b"")

    def test_a_gone_client_frees_a_channel_with_queued_body(self) -> None:
        self.client.send(self.POST)
        channel = self.open(window=1000)
        self.client.send(b"x" * 5000)
        self.client.half_close()
        self.client.lose()
        self.assertTrue(channel.localClosed)

    def test_a_response_timeout_frees_a_channel_with_queued_request(self) -> None:
        self.client.send(b"GET http://10.0.0.5/x HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 3000 + b"\r\n\r\n")
        channel = self.open(window=1000)
        self.clock.advance(7)
        self.client.lose()
        self.assertTrue(channel.localClosed)

    def test_an_idle_close_unregisters_the_tunnel_first(self) -> None:
        """A paused producer still registered would be resumed by the drained transport instead of the close."""
        self.client.send(GET)
        self.node.reply(self.open(), OK)
        self.clock.advance(20)
        self.assertTrue(self.client.transport.disconnecting)
        self.assertIsNone(self.client.transport.producer)

    def test_a_half_close_between_requests_unregisters_the_tunnel_first(self) -> None:
        self.client.send(GET)
        self.node.reply(self.open(), OK)
        self.client.half_close()
        self.assertTrue(self.client.transport.disconnecting)
        self.assertIsNone(self.client.transport.producer)


class ExchangeOrderTests(HttpAdapterTestCase):
    """Pipelined requests and early responses, in memory."""

    def test_pipelined_requests_are_answered_in_order_on_one_tunnel(self) -> None:
        second = GET.replace(b"/x", b"/y")
        self.client.send(GET + second)
        (channel,) = self.node.channels
        # The second request waits until the first exchange is over.
        self.assertNotIn(b"GET /y", self.node.received(channel))
        self.node.reply(channel, OK)
        self.assertIn(b"GET /y", self.node.received(channel))
        self.node.reply(channel, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
        answer = self.client.output()
        self.assertLess(answer.index(b"\r\n\r\nok"), answer.index(b"\r\n\r\nyes"))
        self.assertEqual(len(self.node.channels), 1)

    def test_an_early_response_ends_the_exchange_and_the_rest_of_the_body_is_dropped(self) -> None:
        self.client.send(b"POST http://10.0.0.5/up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nabc")
        (channel,) = self.node.channels
        self.node.reply(channel, b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 413 Content Too Large\r\n"))
        sent = self.node.received(channel)
        self.client.send(b"x" * 997)  # the rest of the body goes nowhere
        self.assertEqual(self.node.received(channel), sent)
        self.assertTrue(channel.localClosed)
