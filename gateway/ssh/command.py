"""
Commands run on the proxy node, in C{session} channels of a cluster's SSH
connection.

Two kinds of channel run one: exec mode's client stream carried over
C{nc HOST PORT} (L{gateway.ssh.exec_channel.ExecTunnelChannel}), and
L{CommandChannel}, which runs a command for the gateway itself -- the
resolver's C{getent ahosts NAME} (L{gateway.cluster.resolver}) -- and hands
back what it printed.  Both build the command line the same way
(L{command_line}: every value shell-quoted) and read the command's end the
same way (L{CommandExit}: C{exit-status}, C{exit-signal}, stderr).
"""

from __future__ import annotations

import os.path
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass

from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from gateway.errors import Reason, StreamError, peer_text
from gateway.ssh._conch import quiet_conch_logs
from gateway.ssh.channel import MAX_PACKET, open_failure

#: At most this much of a command's stderr is kept (for messages).
STDERR_LIMIT = 4096
#: At most this much of a L{CommandChannel}'s stdout is taken: more fails
#: the run (a resolver's answer is a few lines; more is a broken command).
OUTPUT_LIMIT = 64 * 1024


def command_line(template: str, **values: object) -> bytes:
    """
    The command from C{template} (checked by the configuration readers), e.g.
    C{"nc {host} {port}"}: every value is shell-quoted, so a hostile host name
    stays one word.
    """
    return template.format(**{k: shlex.quote(str(v)) for k, v in values.items()}).encode("utf-8")


def program_name(command: bytes) -> str:
    """C{nc} for C{b"exec /usr/bin/nc -w 5 h 80"}: for messages only."""
    try:
        words = shlex.split(command.decode("utf-8", "replace"))
    except ValueError:
        words = command.decode("utf-8", "replace").split()
    while words and words[0] in ("exec", "command", "env"):
        words.pop(0)
    return os.path.basename(words[0]) if words else "command"


@dataclass(frozen=True)
class CommandResult:
    """How a command run on the proxy node ended, and what it wrote."""

    #: The command's program, for messages (L{program_name}).
    program: str
    #: From the C{exit-status} request; None if none came (e.g. a signal).
    status: int | None
    #: From the C{exit-signal} request: the signal name, e.g. C{"TERM"}.
    signal: str | None = None
    signal_message: str = ""
    #: At most L{STDERR_LIMIT} bytes of stderr, decoded and stripped.
    stderr: str = ""
    stdout: bytes = b""

    def problem(self) -> str | None:
        """
        The end in words when it was not a quiet success (C{"nc exited with
        status 1: ..."}, with the proxy node's words escaped and cut), else
        None: status 0 (or no word at all) and nothing on stderr.
        """
        if self.signal is None and self.status in (None, 0) and not self.stderr:
            return None
        if self.signal is not None:
            reason = f"{self.program} killed by signal {self.signal}"
            details = [d for d in (self.signal_message, self.stderr) if d]
        elif self.status is not None:
            reason = f"{self.program} exited with status {self.status}"
            details = [self.stderr] if self.stderr else []
        else:
            reason = f"{self.program} ended without an exit status"
            details = [self.stderr]
        if details:
            reason += ": " + "; ".join(peer_text(detail.encode()) for detail in details)
        return reason


class CommandExit(SSHChannel):
    """
    The part of a C{session} channel that runs one command: the C{exec}
    request, and what the proxy node says of the command's end.  A subclass
    sets C{command} and C{program} and feeds stderr to L{keep_stderr}; one
    that is also another kind of channel lists this base first.
    """

    command: bytes
    program: str
    #: Set by C{SSHConnection.openChannel}.
    conn: connection.SSHConnection
    #: From the C{exit-status} request, if any.
    exit_status: int | None = None
    #: From the C{exit-signal} request: the signal name, e.g. C{"TERM"}.
    exit_signal: str | None = None
    _exit_signal_message = ""
    _stderr = b""

    @property
    def stderr(self) -> str:
        """What the command wrote to stderr (at most 4 KiB), stripped."""
        return self._stderr.decode("utf-8", "replace").strip()

    def request_exec(self) -> Deferred[object] | None:
        """Ask the proxy node to run C{command}; None if the channel is closed already."""
        return self.conn.sendRequest(self, b"exec", NS(self.command), wantReply=True)

    def keep_stderr(self, dataType: int, data: bytes) -> None:
        if dataType == connection.EXTENDED_DATA_STDERR:
            room = STDERR_LIMIT - len(self._stderr)
            if room > 0:
                self._stderr += data[:room]

    def request_exit_status(self, data: bytes) -> bool:
        if len(data) < 4:
            return False
        (self.exit_status,) = struct.unpack(">L", data[:4])
        return True

    def request_exit_signal(self, data: bytes) -> bool:
        name, rest = getNS(data)
        self.exit_signal = peer_text(name, limit=32)
        try:
            message, _ = getNS(rest[1:])
            self._exit_signal_message = message.decode("utf-8", "replace").strip()
        except (struct.error, IndexError):
            pass
        return True

    def exit_result(self, stdout: bytes = b"") -> CommandResult:
        return CommandResult(
            self.program, self.exit_status, self.exit_signal, self._exit_signal_message, self.stderr, stdout
        )


@quiet_conch_logs("gateway.ssh.command")
class CommandChannel(CommandExit):
    """
    A C{session} channel that runs one command for the gateway: stdin is
    closed at once, stdout (at most C{output_limit} bytes) and stderr are
    collected, and L{result} fires with the L{CommandResult} once the channel
    has closed.

    L{result} fails with L{StreamError}: C{PROHIBITED} when the proxy node
    refuses the session or the command, C{TIMEOUT} past the deadline,
    C{GENERAL} for output over the limit (the channel is closed in both
    cases), C{UNAVAILABLE} when the SSH connection is lost meanwhile.
    Cancelling it closes the channel.

    The receive window is the output limit and is never re-opened for stdout,
    so a runaway command cannot make the gateway buffer more; stderr's window
    comes back at once, so a chatty stderr cannot stall stdout.
    """

    name = b"session"
    #: What the exception barrier's log line calls it.
    destination = "a command on the proxy node"
    #: Why the channel was cut (set by the connection when it is lost).
    close_reason: str | None = None

    def __init__(
        self,
        command: bytes,
        clock: IReactorTime,
        timeout: float,
        output_limit: int = OUTPUT_LIMIT,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        # One byte more than the limit: enough to tell "over it" from "at it".
        super().__init__(localWindow=output_limit + 1, localMaxPacket=MAX_PACKET)
        self.command = command
        self.program = program_name(command)
        self.result: Deferred[CommandResult] = Deferred(lambda _: self._give_up())
        self._output_limit = output_limit
        self._stdout: list[bytes] = []
        self._size = 0
        self._open = False
        self._on_closed = on_closed
        self._deadline: IDelayedCall = clock.callLater(timeout, self._timed_out, timeout)

    # -- the outcome ---------------------------------------------------------

    def _stop_deadline(self) -> None:
        if self._deadline.active():
            self._deadline.cancel()

    def _fail(self, reason: Reason, detail: str) -> None:
        if not self.result.called:
            self._stop_deadline()
            self.result.errback(StreamError(reason, detail))

    def _give_up(self) -> None:
        """Close the channel (once it is open: Conch cannot close it before)."""
        self._stop_deadline()
        if self._open and not self.localClosed:
            self.loseConnection()

    def _timed_out(self, timeout: float) -> None:
        self._fail(Reason.TIMEOUT, f"{self.program} did not finish on the proxy node within {timeout:g} s")
        self._give_up()

    def isolate(self) -> None:
        """One of this channel's callbacks raised (see the connection's exception barrier)."""
        self._fail(Reason.GENERAL, f"internal error while {self.program} ran on the proxy node")

    # -- opening -------------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self._open = True
        if self.result.called:  # timed out or cancelled while opening
            self.loseConnection()
            return
        requested = self.request_exec()
        if requested is not None:
            requested.addCallbacks(self._exec_started, self._exec_refused)

    def openFailed(self, reason: Failure | BaseException) -> None:
        error = open_failure(reason, f"a session for {self.program}")
        # A session reaches nothing on the network: whatever the code (sshd
        # with MaxSessions 0 answers 2, "open failed"), the node refuses it.
        self._fail(Reason.UNAVAILABLE if error.reason is Reason.UNAVAILABLE else Reason.PROHIBITED, error.detail)
        self._ended()

    def _exec_started(self, _: object) -> None:
        if not self.localClosed:
            self.conn.sendEOF(self)  # no input: a command waiting for stdin ends

    def _exec_refused(self, failure: Failure) -> None:
        if self.localClosed and self.remoteClosed:
            return  # the channel closed before the answer came: closed() says so
        self._fail(Reason.PROHIBITED, f"proxy node refused to run {self.program}")
        self._give_up()

    # -- what the command writes ---------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self._size += len(data)
        if self._size > self._output_limit:
            self._fail(Reason.GENERAL, f"{self.program} wrote more than {self._output_limit} bytes on the proxy node")
            self._give_up()
            return
        self._stdout.append(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.keep_stderr(dataType, data)
        if not self.localClosed:
            self.conn.adjustWindow(self, len(data))

    # -- end -----------------------------------------------------------------

    def closed(self) -> None:
        if self.close_reason is not None:
            self._fail(Reason.UNAVAILABLE, f"{self.close_reason} while {self.program} ran on the proxy node")
        elif not self.result.called:
            self._stop_deadline()
            self.result.callback(self.exit_result(b"".join(self._stdout)))
        self._ended()

    def _ended(self) -> None:
        """The channel is gone from the connection: it no longer counts there."""
        hook, self._on_closed = self._on_closed, None
        if hook is not None:
            hook()
