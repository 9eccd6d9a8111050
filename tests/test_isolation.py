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
from twisted.conch.ssh.common import NS
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from gateway.relay import Splice
from gateway.ssh.channel import TunnelChannel
from gateway.ssh.client import TunnelConnection
from tests.support import FakeSSHTransport


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
        self.ssh = FakeSSHTransport()
        self.conn = TunnelConnection(Deferred(), Clock())
        self.conn.transport = self.ssh
        self.conn.serviceStarted()
        self.log: list[dict] = []
        globalLogPublisher.addObserver(self.log.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log.append)

    def open(self, remote_id: int) -> TunnelChannel:
        opened = self.conn.open_tunnel("10.0.0.5", 80, ("127.0.0.1", 5000))
        local_id = max(self.conn.channels)
        self.conn.packetReceived(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", local_id, remote_id, 1 << 20, 32768)
        )
        return self.successResultOf(opened)

    def receive(self, channel: TunnelChannel, kind: int, payload: bytes = b"") -> None:
        """A message for C{channel} as the transport hands it over (through the barrier)."""
        self.conn.packetReceived(kind, struct.pack(">L", channel.id) + payload)

    def data(self, channel: TunnelChannel, data: bytes) -> None:
        message = struct.pack(">L", channel.id) + NS(data)
        self.conn.channel_data(message, 0, len(message))

    def sent(self, kind: int) -> list[int]:
        """The recipient channel of each packet of C{kind} sent so far."""
        return [struct.unpack(">L", payload[:4])[0] for k, payload in self.ssh.packets if k == kind]

    def failures(self) -> list[dict]:
        return [e for e in self.log if e.get("outcome") == "internal-error"]


class ResetClientTests(OneConnection):
    """A client that resets while the destination's reply and EOF are in flight."""

    def test_reply_and_eof_after_a_reset_touch_neither_the_client_nor_the_connection(self) -> None:
        channel = self.open(remote_id=7)
        client = ResetTransport()
        Splice(client, channel)
        # The client resets: Twisted's connectionLost reaches the splice.
        client.lost = True
        channel._peer.client_lost()  # type: ignore[union-attr]
        self.assertEqual(self.sent(connection.MSG_CHANNEL_CLOSE), [7])
        # What sshd had already sent arrives now.
        self.data(channel, b"the rest of the reply")
        self.receive(channel, connection.MSG_CHANNEL_EOF)
        self.receive(channel, connection.MSG_CHANNEL_CLOSE)
        self.assertNotIn(channel.id, self.conn.channels)
        self.assertEqual(self.failures(), [])
        # The shared connection carries on: another stream opens and works.
        other = self.open(remote_id=8)
        peer = Recorder()
        other.attach(peer)
        self.data(other, b"hello")
        self.assertEqual(peer.events, [b"hello"])


class ExceptionBarrierTests(OneConnection):
    """An exception inside one stream's callback ends that stream only."""

    def test_a_raising_callback_closes_its_stream_and_nothing_else(self) -> None:
        bystander, broken = self.open(remote_id=7), self.open(remote_id=8)
        watcher = Recorder()
        bystander.attach(watcher)
        broken.attach(Raising())
        closed: list[str | None] = []
        broken.closed_hooks.append(lambda: closed.append(broken.close_reason))
        self.data(broken, b"boom")  # raises inside the peer: must not escape
        self.receive(broken, connection.MSG_CHANNEL_EOF)  # and again: logged once
        self.assertEqual(self.sent(connection.MSG_CHANNEL_CLOSE), [8])
        (failure,) = self.failures()
        self.assertIn("RuntimeError: a bug in one stream", failure["log_failure"].getTraceback())
        self.assertEqual(failure["destination"], "10.0.0.5:80")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.receive(broken, connection.MSG_CHANNEL_CLOSE)
        self.assertEqual(closed, ["internal error"])
        self.assertNotIn(broken.id, self.conn.channels)
        # The other stream on the same connection is untouched.
        self.data(bystander, b"still here")
        self.receive(bystander, connection.MSG_CHANNEL_EOF)
        self.assertEqual(watcher.events, [b"still here", "eof"])
        self.assertEqual(self.sent(connection.MSG_CHANNEL_CLOSE), [8])

    def test_an_exception_in_the_close_handshake_still_frees_the_channel(self) -> None:
        channel = self.open(remote_id=7)

        def broken_hook() -> None:
            raise RuntimeError("accounting bug")

        channel.closed_hooks.append(broken_hook)
        channel.close()
        self.receive(channel, connection.MSG_CHANNEL_CLOSE)
        self.assertNotIn(channel.id, self.conn.channels)
        self.assertEqual(len(self.failures()), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_message_for_an_unknown_channel_is_the_peers_protocol_error(self) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_EOF, struct.pack(">L", 99))
        self.assertEqual(self.ssh.disconnects, [b"message for an unknown channel"])
