"""
Commands the gateway runs on the proxy node for itself
(L{gateway.ssh.command.CommandChannel}, L{TunnelConnection.run_command}),
driven packet by packet through a L{TunnelConnection} over a fake SSH
transport, on a L{Clock}.  Against the fake proxy node in memory: see
tests/test_resolver.py.
"""

from __future__ import annotations

import shlex
import struct

from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.errors import Reason, StreamError
from gateway.ssh.command import (
    OUTPUT_LIMIT,
    STDERR_LIMIT,
    CommandChannel,
    CommandResult,
    command_line,
    program_name,
)
from gateway.ssh.connection import TunnelConnection
from tests.support import FakeSSHTransport, capture_events

COMMAND = b"getent ahosts api.svc.test"
ANSWER = b"10.0.0.5        STREAM api.svc.test\n10.0.0.5        DGRAM  \n10.0.0.5        RAW    \n"
TIMEOUT = 5.0


class CommandChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = FakeSSHTransport()
        self.conn = TunnelConnection(Deferred(), self.clock)
        self.conn.transport = self.transport
        self.conn.serviceStarted()
        self.closed: list[None] = []
        self.result = self.conn.run_command(COMMAND, TIMEOUT, on_closed=lambda: self.closed.append(None))
        self.channel = self.conn.channels[0]

    # -- the proxy node's side, packet by packet --------------------------------

    def _confirm(self, local: int = 0, remote: int = 7) -> None:
        self.conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", local, remote, 1 << 20, 32768))

    def _started(self, local: int = 0) -> None:
        self._confirm(local)
        self.conn.ssh_CHANNEL_SUCCESS(struct.pack(">L", local))

    def _stdout(self, data: bytes, local: int = 0) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_DATA, struct.pack(">L", local) + NS(data))

    def _stderr(self, data: bytes) -> None:
        payload = struct.pack(">2L", 0, connection.EXTENDED_DATA_STDERR) + NS(data)
        self.conn.packetReceived(connection.MSG_CHANNEL_EXTENDED_DATA, payload)

    def _request(self, kind: bytes, data: bytes) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_REQUEST, struct.pack(">L", 0) + NS(kind) + b"\x00" + data)

    def _exit(self, status: int) -> None:
        self._request(b"exit-status", struct.pack(">L", status))

    def _remote_close(self, local: int = 0) -> None:
        self.conn.packetReceived(connection.MSG_CHANNEL_CLOSE, struct.pack(">L", local))

    def _kinds(self) -> list[int]:
        return [kind for kind, _ in self.transport.packets]

    def _error(self, reason: Reason) -> StreamError:
        error = self.failureResultOf(self.result, StreamError).value
        self.assertEqual(error.reason, reason)
        return error

    # -- tests -----------------------------------------------------------------

    def test_session_with_the_limit_as_window_then_exec_then_eof(self):
        self.assertIsInstance(self.channel, CommandChannel)
        (payload,) = self.transport.of_kind(connection.MSG_CHANNEL_OPEN)
        kind, rest = getNS(payload)
        self.assertEqual(kind, b"session")
        self.assertEqual(struct.unpack(">3L", rest), (0, OUTPUT_LIMIT + 1, 32768))
        self._confirm()
        (request,) = self.transport.of_kind(connection.MSG_CHANNEL_REQUEST)
        name, rest = getNS(request[4:])
        self.assertEqual((name, rest[:1], getNS(rest[1:])[0]), (b"exec", b"\x01", COMMAND))
        self.assertNotIn(connection.MSG_CHANNEL_EOF, self._kinds())
        self.conn.ssh_CHANNEL_SUCCESS(struct.pack(">L", 0))
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_EOF)  # stdin closed at once
        self.assertNoResult(self.result)

    def test_result_when_the_channel_closes(self):
        self._started()
        self._stdout(ANSWER[:20])
        self._stderr(b"a warning\n")
        self._stdout(ANSWER[20:])
        self._exit(0)
        self.conn.ssh_CHANNEL_EOF(struct.pack(">L", 0))
        self.assertNoResult(self.result)
        self._remote_close()
        result = self.successResultOf(self.result)
        self.assertEqual(result, CommandResult("getent", 0, None, "", "a warning", ANSWER))
        self.assertEqual(result.problem(), "getent exited with status 0: a warning")
        self.assertEqual(self.closed, [None])
        self.assertEqual(self.conn.channels, {})
        # stdout's window is never re-opened; stderr's comes back at once
        adjustments = [struct.unpack(">2L", p)[1] for p in self.transport.of_kind(connection.MSG_CHANNEL_WINDOW_ADJUST)]
        self.assertEqual(adjustments, [len(b"a warning\n")])

    def test_exit_status_and_signal(self):
        self._started()
        self._exit(2)
        self._remote_close()
        self.assertEqual(self.successResultOf(self.result).status, 2)

    def test_killed_by_a_signal(self):
        self._started()
        self._request(b"exit-signal", NS(b"KILL") + b"\x00" + NS(b"out of memory") + NS(b""))
        self._remote_close()
        result = self.successResultOf(self.result)
        self.assertEqual((result.status, result.signal), (None, "KILL"))
        self.assertEqual(result.problem(), "getent killed by signal KILL: out of memory")

    def test_refused_exec_is_prohibited_and_closes(self):
        self._confirm()
        self.conn.ssh_CHANNEL_FAILURE(struct.pack(">L", 0))
        self.assertEqual(self._error(Reason.PROHIBITED).detail, "proxy node refused to run getent")
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_CLOSE)
        self.assertEqual(self.closed, [])
        self._remote_close()
        self.assertEqual(self.closed, [None])
        self.assertEqual(self.conn.channels, {})

    def test_refused_session_is_prohibited(self):
        """sshd with C{MaxSessions 0} refuses the session itself, with code 2 ("connect failed")."""
        self.conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", 0, 2) + NS(b"open failed") + NS(b""))
        error = self._error(Reason.PROHIBITED)
        self.assertEqual(error.detail, "proxy node could not open a session for getent: open failed")
        self.assertEqual(self.closed, [None])
        self.assertEqual(self.conn.channels, {})
        for code in (1, 4):
            refused = self.conn.run_command(COMMAND, TIMEOUT)
            (local,) = self.conn.channels
            self.conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", local, code) + NS(b"no") + NS(b""))
            self.assertEqual(self.failureResultOf(refused, StreamError).value.reason, Reason.PROHIBITED)

    def test_output_over_the_limit_fails_and_closes(self):
        self._started()
        self._stdout(b"x" * 32768)
        self._stdout(b"x" * 32768)
        self.assertNoResult(self.result)
        self._stdout(b"x")
        error = self._error(Reason.GENERAL)
        self.assertEqual(error.detail, f"getent wrote more than {OUTPUT_LIMIT} bytes on the proxy node")
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_CLOSE)
        self._remote_close()
        self.assertEqual(self.closed, [None])

    def test_output_beyond_the_window_is_not_taken(self):
        """A peer that ignores the window loses the channel; the gateway keeps nothing of it."""
        self._started()
        self._stdout(b"x" * 32768)
        self._stdout(b"x" * 32768)
        self._stdout(b"xx")
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_CLOSE)
        self._remote_close()
        self.assertEqual(self.successResultOf(self.result).stdout, b"x" * OUTPUT_LIMIT)

    def test_stderr_is_capped(self):
        self._started()
        for _ in range(3):
            self._stderr(b"e" * 2000)
        self._exit(1)
        self._remote_close()
        self.assertEqual(len(self.successResultOf(self.result).stderr), STDERR_LIMIT)

    def test_deadline_closes_the_channel(self):
        self._started()
        self.clock.advance(TIMEOUT - 0.1)
        self.assertNoResult(self.result)
        self.clock.advance(0.1)
        error = self._error(Reason.TIMEOUT)
        self.assertEqual(error.detail, "getent did not finish on the proxy node within 5 s")
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_CLOSE)
        self._stdout(ANSWER)  # late output is dropped
        self._remote_close()
        self.assertEqual(self.closed, [None])

    def test_deadline_before_the_session_opens(self):
        self.clock.advance(TIMEOUT)
        self._error(Reason.TIMEOUT)
        self.assertNotIn(connection.MSG_CHANNEL_CLOSE, self._kinds())  # nothing to close yet
        self._confirm()
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_CLOSE)
        self.assertEqual(self.transport.of_kind(connection.MSG_CHANNEL_REQUEST), [])
        self._remote_close()
        self.assertEqual(self.closed, [None])

    def test_a_finished_run_leaves_no_timer(self):
        self._started()
        self._exit(0)
        self._remote_close()
        self.successResultOf(self.result)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_closes_the_channel(self):
        self._started()
        self.result.cancel()
        self.failureResultOf(self.result, CancelledError)
        self.assertEqual(self._kinds()[-1], connection.MSG_CHANNEL_CLOSE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_while_running(self):
        self._started()
        self._stdout(ANSWER)
        self.conn.serviceStopped()
        error = self._error(Reason.UNAVAILABLE)
        self.assertEqual(error.detail, "SSH connection lost while getent ran on the proxy node")
        self.assertEqual(self.closed, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_while_opening(self):
        self.conn.serviceStopped()
        self.assertEqual(
            self._error(Reason.UNAVAILABLE).detail, "SSH connection lost while opening a session for getent"
        )
        self.assertEqual(self.closed, [None])

    def test_connection_lost_before_the_exec_answer(self):
        self._confirm()
        self.conn.serviceStopped()
        self._error(Reason.UNAVAILABLE)

    def test_a_raising_callback_ends_this_channel_only(self):
        """The connection's exception barrier covers command channels: the others go on."""
        events = capture_events(self)
        other = self.conn.run_command(b"getent ahosts other.test", TIMEOUT)
        self._started()
        self._started(local=1)

        def broken(data: bytes) -> None:
            raise RuntimeError("a bug")

        self.channel.dataReceived = broken  # type: ignore[method-assign]
        self._stdout(ANSWER)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self._error(Reason.GENERAL).detail, "internal error while getent ran on the proxy node")
        self.assertIn("a command on the proxy node", [e.get("destination") for e in events])
        self.assertEqual(self.transport.disconnects, [])
        self._stdout(ANSWER, local=1)
        self.conn.packetReceived(
            connection.MSG_CHANNEL_REQUEST, struct.pack(">L", 1) + NS(b"exit-status") + b"\x00" + struct.pack(">L", 0)
        )
        self._remote_close(local=1)
        self.assertEqual(self.successResultOf(other).stdout, ANSWER)


class CommandLineTests(SynchronousTestCase):
    def test_values_are_quoted(self):
        for host in ("api.svc.test", "evil host", "a;rm -rf /", "$(reboot)", "x' y", "`id`"):
            line = command_line("getent ahosts {host}", host=host)
            self.assertEqual(shlex.split(line.decode()), ["getent", "ahosts", host], host)
        self.assertEqual(command_line("nc {host} {port}", host="::1", port=22), b"nc ::1 22")

    def test_program_name(self):
        self.assertEqual(program_name(b"exec /usr/bin/getent ahosts x"), "getent")
        self.assertEqual(program_name(b"env dig +short x"), "dig")
        self.assertEqual(program_name(b"'unbalanced x"), "'unbalanced")
        self.assertEqual(program_name(b""), "command")
