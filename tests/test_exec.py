"""
Exec mode: streams carried over C{nc HOST PORT} in C{session} channels, for
proxy nodes that forbid TCP forwarding.

Unit tests drive L{ExecTunnelChannel} through a L{TunnelConnection} with a
fake SSH transport; the in-process tests talk to a L{FakeProxyNode} with
C{allow_tcp_forwarding=False} over loopback, with destination services on
unix sockets in the test's temp dir.
"""

from __future__ import annotations

import os
import random
import shlex
import struct

from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS, getNS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gateway.errors import Reason, StreamError
from gateway.ssh.channel import TunnelChannel
from gateway.ssh.command import STDERR_LIMIT
from gateway.ssh.connection import TunnelConnection
from gateway.ssh.exec_channel import ExecTunnelChannel, exec_command_line
from gateway.ssh.hostkeys import HostKeyPolicy
from gateway.ssh.transport import client_factory
from gateway.testing import FakeProxyNode, generate_key
from tests.support import FakeSSHTransport, HalfCloseEcho, inline, quiet_factory, sleep

REFUSED_TEXT = b"nc: connect to 10.0.0.5 port 81 (tcp) failed: Connection refused\n"


class RecordingPeer:
    """A TunnelPeer that records what happened, and what the channel said when it closed."""

    def __init__(self, channel: TunnelChannel) -> None:
        self.channel = channel
        self.events: list[bytes] = []
        self.data: list[bytes] = []
        self.eof = False
        self.closed: Deferred[None] = Deferred()
        self.reason_at_close: str | None = None
        channel.attach(self)

    def received(self) -> bytes:
        return b"".join(self.data)

    def tunnel_data(self, data: bytes) -> None:
        self.data.append(data)

    def tunnel_eof(self) -> None:
        self.eof = True
        self.events.append(b"<eof>")

    def tunnel_closed(self) -> None:
        self.reason_at_close = self.channel.close_reason
        self.events.append(b"<closed>")
        self.closed.callback(None)

    def tunnel_pause_writing(self) -> None:
        self.events.append(b"<pause>")

    def tunnel_resume_writing(self) -> None:
        self.events.append(b"<resume>")


# -- unit tests with a fake SSH transport --------------------------------------


class ExecChannelTests(TestCase):
    def setUp(self):
        self.transport = FakeSSHTransport()
        self.conn = TunnelConnection(Deferred(), Clock())
        self.conn.transport = self.transport
        self.conn.serviceStarted()
        self.command = exec_command_line("nc {host} {port}", "10.0.0.5", 81)
        self.opened = self.conn.open_exec(self.command, "10.0.0.5", 81, ("127.0.0.1", 5000), window_size=65536)

    def _confirm(self, remote_window: int = 100) -> None:
        # remote channel 7, max packet 32768
        self.conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", 0, 7, remote_window, 32768))

    def _open(self, remote_window: int = 100) -> tuple[ExecTunnelChannel, RecordingPeer]:
        self._confirm(remote_window)
        self.conn.ssh_CHANNEL_SUCCESS(struct.pack(">L", 0))
        channel = self.successResultOf(self.opened)
        return channel, RecordingPeer(channel)

    def _request(self, kind: bytes, data: bytes) -> None:
        self.conn.ssh_CHANNEL_REQUEST(struct.pack(">L", 0) + NS(kind) + b"\x00" + data)

    def _stderr(self, text: bytes) -> None:
        self.conn.ssh_CHANNEL_EXTENDED_DATA(struct.pack(">2L", 0, connection.EXTENDED_DATA_STDERR) + NS(text))

    def _data(self, size: int) -> None:
        self.conn.ssh_CHANNEL_DATA(struct.pack(">L", 0) + NS(b"x" * size))

    def _adjustments(self) -> list[int]:
        return [struct.unpack(">2L", p)[1] for p in self.transport.of_kind(connection.MSG_CHANNEL_WINDOW_ADJUST)]

    def _remote_close(self) -> None:
        self.conn.ssh_CHANNEL_CLOSE(struct.pack(">L", 0))

    def test_a_session_confirmed_after_the_open_deadline_runs_no_command(self):
        # The stream was given up: netcat must not be started on the proxy
        # node only to be closed again.
        clock = Clock()
        conn = TunnelConnection(Deferred(), clock)
        conn.transport = transport = FakeSSHTransport()
        conn.serviceStarted()
        opened = conn.open_exec(self.command, "10.0.0.5", 81, ("127.0.0.1", 5000), open_timeout=4)
        clock.advance(4)
        self.assertEqual(self.failureResultOf(opened, StreamError).value.reason, Reason.TIMEOUT)
        conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", 0, 7, 100, 32768))
        self.assertEqual(transport.of_kind(connection.MSG_CHANNEL_REQUEST), [])
        self.assertEqual(len(transport.of_kind(connection.MSG_CHANNEL_CLOSE)), 1)

    def test_session_open_then_exec_with_want_reply(self):
        (payload,) = self.transport.of_kind(connection.MSG_CHANNEL_OPEN)
        kind, rest = getNS(payload)
        self.assertEqual(kind, b"session")
        self.assertEqual(struct.unpack(">3L", rest), (0, 65536, 32768))  # no type-specific data
        self.assertEqual(self.transport.of_kind(connection.MSG_CHANNEL_REQUEST), [])

        self._confirm()
        (request,) = self.transport.of_kind(connection.MSG_CHANNEL_REQUEST)
        self.assertEqual(struct.unpack(">L", request[:4])[0], 7)
        name, rest = getNS(request[4:])
        self.assertEqual((name, rest[:1]), (b"exec", b"\x01"))
        self.assertEqual(getNS(rest[1:]), (b"nc 10.0.0.5 81", b""))
        self.assertNoResult(self.opened)

        self.conn.ssh_CHANNEL_SUCCESS(struct.pack(">L", 0))
        channel = self.successResultOf(self.opened)
        self.assertIsInstance(channel, ExecTunnelChannel)
        self.assertEqual((channel.host, channel.port, channel.destination), ("10.0.0.5", 81, "10.0.0.5:81"))
        self.assertEqual(channel.origin, ("127.0.0.1", 5000))
        self.assertIsNone(channel.close_reason)

    def test_refused_exec_is_prohibited_and_closes_the_channel(self):
        self._confirm()
        self.conn.ssh_CHANNEL_FAILURE(struct.pack(">L", 0))
        error = self.failureResultOf(self.opened, StreamError).value
        self.assertEqual(error.reason, Reason.PROHIBITED)
        self.assertIn("proxy node refused to run nc", error.detail)
        self.assertIn("10.0.0.5:81", error.detail)
        self.assertEqual(len(self.transport.of_kind(connection.MSG_CHANNEL_CLOSE)), 1)
        self._remote_close()
        self.assertEqual(self.conn.channels, {})

    def test_closed_before_exec_answer_is_unavailable(self):
        self._confirm()
        self._remote_close()
        error = self.failureResultOf(self.opened, StreamError).value
        self.assertEqual(error.reason, Reason.UNAVAILABLE)

    def test_refused_session_open_maps_like_direct_tcpip(self):
        self.conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", 0, 1) + NS(b"open failed") + NS(b""))
        error = self.failureResultOf(self.opened, StreamError).value
        self.assertEqual(error.reason, Reason.PROHIBITED)

    def test_stderr_and_exit_status_are_read_before_tunnel_closed(self):
        channel, peer = self._open()
        seen_by_hook = []
        channel.closed_hooks.append(lambda: seen_by_hook.append(channel.close_reason))
        self._stderr(REFUSED_TEXT)
        self._request(b"exit-status", struct.pack(">L", 1))
        self.conn.ssh_CHANNEL_EOF(struct.pack(">L", 0))
        self.assertFalse(peer.closed.called)
        self._remote_close()
        self.successResultOf(peer.closed)

        expected = "nc exited with status 1: " + REFUSED_TEXT.decode().strip()
        self.assertEqual(channel.exit_status, 1)
        self.assertEqual(channel.stderr, REFUSED_TEXT.decode().strip())
        self.assertEqual(peer.reason_at_close, expected)
        self.assertEqual(seen_by_hook, [expected])
        self.assertEqual(peer.events, [b"<eof>", b"<closed>"])
        self.assertEqual(peer.received(), b"")
        # stderr does not count as stream bytes, and its window comes back at once
        self.assertEqual(channel.bytes_down, 0)
        self.assertEqual(self._adjustments(), [len(REFUSED_TEXT)])

    def test_normal_end_has_no_close_reason(self):
        channel, peer = self._open()
        self._data(5)
        self._request(b"exit-status", struct.pack(">L", 0))
        self._remote_close()
        self.successResultOf(peer.closed)
        self.assertIsNone(peer.reason_at_close)
        self.assertEqual(channel.bytes_down, 5)

    def test_exit_status_without_stderr(self):
        channel, peer = self._open()
        self._request(b"exit-status", struct.pack(">L", 2))
        self._remote_close()
        self.assertEqual(peer.reason_at_close, "nc exited with status 2")

    def test_warning_on_stderr_with_status_zero_is_reported_but_no_failure(self):
        channel, peer = self._open()
        self._stderr(b"nc: warning\n")
        self._request(b"exit-status", struct.pack(">L", 0))
        self._remote_close()
        self.assertEqual(peer.reason_at_close, "nc exited with status 0: nc: warning")

    def test_exit_signal(self):
        channel, peer = self._open()
        self._request(b"exit-signal", NS(b"TERM") + b"\x00" + NS(b"") + NS(b""))
        self._remote_close()
        self.assertEqual(channel.exit_signal, "TERM")
        self.assertEqual(peer.reason_at_close, "nc killed by signal TERM")

    def test_the_commands_words_are_escaped_in_the_close_reason(self):
        channel, peer = self._open()
        self._stderr(b"nc: refused\n\x1b[2Jforged line")
        self._request(b"exit-status", struct.pack(">L", 1))
        self._remote_close()
        self.assertEqual(peer.reason_at_close, "nc exited with status 1: nc: refused\\n\\x1b[2Jforged line")

    def test_stderr_is_capped(self):
        channel, _ = self._open()
        for _ in range(3):
            self._stderr(b"e" * 2000)
        self.assertEqual(len(channel.stderr), STDERR_LIMIT)
        self.assertEqual(self._adjustments(), [2000, 2000, 2000])

    def test_paused_consumer_gets_no_window(self):
        channel, peer = self._open()
        channel.pauseProducing()
        self._data(32768)
        self._data(32768)
        self.assertEqual(self._adjustments(), [])
        self.assertEqual(channel.localWindowLeft, 0)
        channel.resumeProducing()
        self.assertEqual(self._adjustments(), [65536])
        self.assertEqual(channel.bytes_down, 65536)

    def test_full_remote_window_pauses_writer_and_eof_waits_for_data(self):
        channel, peer = self._open(remote_window=100)
        channel.send(b"y" * 150)
        self.assertIn(b"<pause>", peer.events)
        channel.send_eof()
        channel.close()
        kinds = [k for k, _ in self.transport.packets]
        self.assertNotIn(connection.MSG_CHANNEL_EOF, kinds)
        self.assertNotIn(connection.MSG_CHANNEL_CLOSE, kinds)
        self.conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", 0, 1000))
        kinds = [k for k, _ in self.transport.packets]
        self.assertEqual(
            kinds[-3:],
            [connection.MSG_CHANNEL_DATA, connection.MSG_CHANNEL_EOF, connection.MSG_CHANNEL_CLOSE],
        )
        self.assertEqual(channel.bytes_up, 150)

    def test_remote_close_with_data_still_queued_closes_at_once(self):
        channel, peer = self._open(remote_window=100)
        channel.send(b"y" * 150)
        channel.send_eof()
        self._remote_close()
        self.assertEqual(len(self.transport.of_kind(connection.MSG_CHANNEL_CLOSE)), 1)
        self.assertEqual(self.transport.of_kind(connection.MSG_CHANNEL_EOF), [])
        self.assertEqual(peer.events[-1], b"<closed>")
        self.assertEqual(self.conn.channels, {})

    def test_close_after_dropping_queued_data_is_not_held_back(self):
        channel, peer = self._open(remote_window=100)
        channel.send(b"y" * 150)
        channel.send_eof()
        channel.buf = b""  # an abort drops what is queued
        channel.close()
        kinds = [k for k, _ in self.transport.packets]
        self.assertEqual(kinds[-2:], [connection.MSG_CHANNEL_EOF, connection.MSG_CHANNEL_CLOSE])


class CommandLineTests(TestCase):
    def test_plain_values_are_left_alone(self):
        self.assertEqual(exec_command_line("nc {host} {port}", "10.0.0.5", 80), b"nc 10.0.0.5 80")
        self.assertEqual(exec_command_line("nc -N {host} {port}", "::1", 22), b"nc -N ::1 22")

    def test_hostile_host_stays_one_word(self):
        for host in ("evil host", "a;rm -rf /", "$(reboot)", "x' y", "`id`"):
            line = exec_command_line("exec nc {host} {port}", host, 80)
            self.assertEqual(shlex.split(line.decode()), ["exec", "nc", host, "80"], host)

    def test_utf8(self):
        line = exec_command_line("nc {host} {port}", "bücher.example", 1)
        self.assertEqual(shlex.split(line.decode("utf-8")), ["nc", "bücher.example", "1"])


# -- in-process, against the fake proxy node ----------------------------------

ECHO = ("10.99.0.10", 7)
PAYLOAD = ("10.99.0.10", 19)
PAYLOAD_BYTES = random.Random(4).randbytes(4 * 1024 * 1024)


class Payload(Protocol):
    """Writes PAYLOAD_BYTES as fast as the consumer takes them, then closes."""

    def connectionMade(self) -> None:
        self._offset = 0
        self._paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._offset = len(PAYLOAD_BYTES)

    def resumeProducing(self) -> None:
        self._paused = False
        while self._offset < len(PAYLOAD_BYTES) and not self._paused:
            chunk = PAYLOAD_BYTES[self._offset : self._offset + 65536]
            self._offset += len(chunk)
            self.transport.write(chunk)
        if self._offset >= len(PAYLOAD_BYTES):
            self.transport.unregisterProducer()
            self.transport.loseConnection()


class ExecEndToEndTests(TestCase):
    """The gateway's SSH client against a node with C{AllowTcpForwarding no}."""

    @inline
    async def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        routes = {}
        for name, address, protocol in (("echo", ECHO, HalfCloseEcho), ("payload", PAYLOAD, Payload)):
            path = os.path.join(directory, f"{name}.sock")
            port = await serverFromString(reactor, f"unix:{path}").listen(quiet_factory(protocol))
            self.addCleanup(port.stopListening)
            routes[address] = f"unix:{path}"
        key = generate_key()
        self.node = FakeProxyNode(reactor, [key], routes=routes, allow_tcp_forwarding=False)
        ssh = await self.node.listen()
        self.addCleanup(ssh.stopListening)
        port = ssh.getHost().port
        factory = client_factory(
            "127.0.0.1", port, "demo", key, HostKeyPolicy(pinned=[self.node.host_key.public()]), reactor
        )
        transport = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.addCleanup(self._disconnect, transport)
        self.conn: TunnelConnection = await transport.ready

    async def _disconnect_async(self, transport):
        transport.loseConnection()
        await transport.lost
        # let the node's side of the connection (and its destinations) go too
        await sleep(0.05)

    def _disconnect(self, transport):
        return Deferred.fromCoroutine(self._disconnect_async(transport))

    async def _open(self, host: str, port: int, window_size: int = 2 * 1024 * 1024) -> ExecTunnelChannel:
        command = exec_command_line("nc {host} {port}", host, port)
        return await self.conn.open_exec(command, host, port, ("127.0.0.1", 1), window_size)

    @inline
    async def test_direct_tcpip_is_prohibited(self):
        with self.assertRaises(StreamError) as raised:
            await self.conn.open_tunnel(*ECHO, ("127.0.0.1", 1))
        self.assertEqual(raised.exception.reason, Reason.PROHIBITED)

    @inline
    async def test_echo_round_trip_with_half_close(self):
        channel = await self._open(*ECHO)
        peer = RecordingPeer(channel)
        channel.send(b"hello")
        channel.send_eof()
        await peer.closed
        self.assertEqual(peer.received(), b"hellobye")
        self.assertEqual(peer.events[-2:], [b"<eof>", b"<closed>"])
        self.assertEqual(channel.exit_status, 0)
        self.assertIsNone(peer.reason_at_close)
        self.assertEqual((channel.bytes_up, channel.bytes_down), (5, 8))

    @inline
    async def test_unrouted_port_closes_with_connection_refused(self):
        channel = await self._open("10.99.0.10", 81)
        peer = RecordingPeer(channel)
        await peer.closed
        self.assertIn("Connection refused", peer.reason_at_close)
        self.assertEqual(
            peer.reason_at_close,
            "nc exited with status 1: nc: connect to 10.99.0.10 port 81 (tcp) failed: Connection refused",
        )
        self.assertEqual(peer.received(), b"")

    @inline
    async def test_other_commands_are_not_found(self):
        opening = self.conn.open_exec(b"cat /etc/passwd", "10.99.0.10", 7, ("127.0.0.1", 1), 65536)
        channel = await opening
        peer = RecordingPeer(channel)
        await peer.closed
        self.assertEqual(channel.exit_status, 127)
        self.assertIn("command not found", peer.reason_at_close)

    @inline
    async def test_refused_exec_is_prohibited(self):
        self.node.allow_exec = False
        with self.assertRaises(StreamError) as raised:
            await self._open(*ECHO)
        self.assertEqual(raised.exception.reason, Reason.PROHIBITED)
        await sleep(0.05)
        self.assertEqual(len(self.conn.channels), 0)

    @inline
    async def test_4mib_download_is_byte_exact(self):
        channel = await self._open(*PAYLOAD, window_size=256 * 1024)
        peer = RecordingPeer(channel)
        await peer.closed
        data = peer.received()
        self.assertEqual(len(data), len(PAYLOAD_BYTES))
        self.assertTrue(data == PAYLOAD_BYTES, "payload differs")
        self.assertEqual(channel.bytes_down, len(PAYLOAD_BYTES))
        self.assertIsNone(peer.reason_at_close)

    @inline
    async def test_paused_reader_stalls_at_one_window_then_drains(self):
        window = 256 * 1024
        channel = await self._open(*PAYLOAD, window_size=window)
        channel.pauseProducing()
        peer = RecordingPeer(channel)
        await sleep(0.3)
        stalled = channel.bytes_down
        self.assertLessEqual(stalled, window)
        await sleep(0.1)
        self.assertEqual(channel.bytes_down, stalled)
        channel.resumeProducing()
        await peer.closed
        self.assertTrue(peer.received() == PAYLOAD_BYTES, "payload differs")
