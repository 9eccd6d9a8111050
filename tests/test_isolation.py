"""
No client can hurt another (issue 10): whatever one stream's client does, or
whatever goes wrong inside one stream, the SSH connection its cluster shares
with every other stream goes on.  In memory: a L{TunnelConnection} over a
transport that records packets, client transports that behave like a real
socket after a reset.
"""

from __future__ import annotations

import struct

from twisted.conch.ssh import connection
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from gateway.proxy.opener import StreamRequest
from gateway.proxy.splice import Splice
from gateway.ssh.channel import TunnelChannel
from tests.support import MemoryProxyNode, capture_events


class ResetTransport(StringTransport):
    """
    A client transport that, once its connection is lost, raises as Twisted's
    TCP transport does for a half-close on a closed socket (C{ValueError: file
    descriptor cannot be a negative integer}).
    """

    lost = False

    def loseWriteConnection(self) -> None:
        if self.lost:
            raise ValueError("file descriptor cannot be a negative integer (-1)")
        super().loseWriteConnection()

    def write(self, data: bytes) -> None:
        if self.lost:
            raise ValueError("write on a closed socket")
        super().write(data)


class Recorder:
    """A TunnelPeer that records what it is told."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def tunnel_data(self, data: bytes) -> None:
        self.events.append(data)

    def tunnel_eof(self) -> None:
        self.events.append("eof")

    def tunnel_closed(self) -> None:
        self.events.append("closed")

    def tunnel_pause_writing(self) -> None:
        self.events.append("pause")

    def tunnel_resume_writing(self) -> None:
        self.events.append("resume")


class Raising(Recorder):
    """A TunnelPeer with a bug: every delivery raises."""

    def tunnel_data(self, data: bytes) -> None:
        raise RuntimeError("a bug in one stream")

    tunnel_eof = tunnel_data  # type: ignore[assignment]


class OneConnection(TestCase):
    """Several channels of one in-memory SSH connection."""

    def setUp(self) -> None:
        self.node = MemoryProxyNode(Clock())
        self.log = capture_events(self)

    def open(self) -> TunnelChannel:
        return self.successResultOf(self.node.open_stream(StreamRequest("10.0.0.5", 80, "socks5", "client")))

    def closes_sent(self) -> list[TunnelChannel]:
        return [channel for channel in self.node.channels if self.node.sent(connection.MSG_CHANNEL_CLOSE, channel)]

    def failures(self) -> list[dict]:
        return [e for e in self.log if e.get("outcome") == "internal-error"]


class ResetClientTests(OneConnection):
    """A client that resets while the destination's reply and EOF are in flight."""

    def test_reply_and_eof_after_a_reset_touch_neither_the_client_nor_the_connection(self) -> None:
        channel = self.open()
        client = ResetTransport()
        splice = Splice(client, channel)
        # The client resets: Twisted's connectionLost reaches the splice.
        client.lost = True
        splice.client_lost()
        self.assertEqual(self.closes_sent(), [channel])
        # What sshd had already sent arrives now.
        self.node.reply(channel, b"the rest of the reply")
        self.node.eof(channel)
        self.node.close(channel)
        self.assertNotIn(channel.id, self.node.conn.channels)
        self.assertEqual(self.failures(), [])
        # The shared connection carries on: another stream opens and works.
        other = self.open()
        peer = Recorder()
        other.attach(peer)
        self.node.reply(other, b"hello")
        self.assertEqual(peer.events, [b"hello"])


class ExceptionBarrierTests(OneConnection):
    """An exception inside one stream's callback ends that stream only."""

    def test_a_raising_callback_closes_its_stream_and_nothing_else(self) -> None:
        bystander, broken = self.open(), self.open()
        watcher = Recorder()
        bystander.attach(watcher)
        broken.attach(Raising())
        closed: list[str | None] = []
        broken.closed_hooks.append(lambda: closed.append(broken.close_reason))
        self.node.reply(broken, b"boom")  # raises inside the peer: must not escape
        self.node.eof(broken)  # and again: logged once
        self.assertEqual(self.closes_sent(), [broken])
        (failure,) = self.failures()
        self.assertIn("RuntimeError: a bug in one stream", failure["log_failure"].getTraceback())
        self.assertEqual(failure["destination"], "10.0.0.5:80")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.node.close(broken)
        self.assertEqual(closed, ["internal error"])
        self.assertNotIn(broken.id, self.node.conn.channels)
        # The other stream on the same connection is untouched.
        self.node.reply(bystander, b"still here")
        self.node.eof(bystander)
        self.assertEqual(watcher.events, [b"still here", "eof"])
        self.assertEqual(self.closes_sent(), [broken])

    def test_an_exception_in_the_close_handshake_still_frees_the_channel(self) -> None:
        channel = self.open()

        def broken_hook() -> None:
            raise RuntimeError("accounting bug")

        channel.closed_hooks.append(broken_hook)
        channel.close()
        self.node.close(channel)
        self.assertNotIn(channel.id, self.node.conn.channels)
        self.assertEqual(len(self.failures()), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_message_for_an_unknown_channel_is_the_peers_protocol_error(self) -> None:
        self.node.conn.packetReceived(connection.MSG_CHANNEL_EOF, struct.pack(">L", 99))
        self.assertEqual(self.node.ssh.disconnects, [b"message for an unknown channel"])


class CutStreamTests(OneConnection):
    def test_streams_cut_by_a_lost_connection_say_so(self) -> None:
        cut, ended = self.open(), self.open()
        ended.close()
        self.node.close(ended)
        self.node.conn.serviceStopped()  # the transport is gone
        self.assertEqual((cut.close_reason, ended.close_reason), ("SSH connection lost", None))
