"""
A client stream carried over a command's stdin/stdout: exec mode.

Proxy nodes that forbid TCP forwarding (C{AllowTcpForwarding no},
C{PermitOpen}) still run commands: L{ExecTunnelChannel} is the stream of a
L{TunnelChannel} carried over the stdin/stdout of C{nc HOST PORT} in a
C{session} channel, with the command's stderr and exit status turned into
C{close_reason} when it ends badly.
"""

from __future__ import annotations

import os.path
import shlex
import struct

from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gateway.errors import Reason, StreamError, peer_text
from gateway.ssh.channel import DEFAULT_WINDOW, TunnelChannel

#: At most this much of an exec command's stderr is kept (for close_reason).
STDERR_LIMIT = 4096


def exec_command_line(template: str, host: str, port: int) -> bytes:
    """
    The command that carries a stream to C{host:port}, e.g. from
    C{"nc {host} {port}"}; both values are shell-quoted, so a hostile host
    name stays one word.
    """
    return template.format(host=shlex.quote(host), port=shlex.quote(str(port))).encode("utf-8")


def _program_name(command: bytes) -> str:
    """C{nc} for C{b"exec /usr/bin/nc -w 5 h 80"}: for messages only."""
    try:
        words = shlex.split(command.decode("utf-8", "replace"))
    except ValueError:
        words = command.decode("utf-8", "replace").split()
    while words and words[0] in ("exec", "command", "env"):
        words.pop(0)
    return os.path.basename(words[0]) if words else "command"


class ExecTunnelChannel(TunnelChannel):
    """
    A client stream carried over a command's stdin/stdout in a C{session}
    channel: C{exec nc HOST PORT} for proxy nodes that forbid TCP forwarding.

    C{opened} fires once the proxy node has agreed to run the command (which
    says nothing yet about reaching the destination: netcat reports that on
    stderr and in its exit status, which become C{close_reason} when the
    channel closes).  Flow control, half-close and
    byte counting are L{TunnelChannel}'s.
    """

    name = b"session"

    def __init__(
        self,
        command: bytes,
        host: str,
        port: int,
        origin: tuple[str, int] = ("127.0.0.1", 0),
        window_size: int = DEFAULT_WINDOW,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(host, port, origin, window_size, clock)
        self.command = command
        self.program = _program_name(command)
        #: From the C{exit-status} request, if any.
        self.exit_status: int | None = None
        #: From the C{exit-signal} request: the signal name, e.g. C{"TERM"}.
        self.exit_signal: str | None = None
        self._exit_signal_message = ""
        self._stderr = b""

    @property
    def stderr(self) -> str:
        """What the command wrote to stderr (at most 4 KiB), stripped."""
        return self._stderr.decode("utf-8", "replace").strip()

    # -- opening ---------------------------------------------------------

    def open_request_data(self) -> bytes:
        return b""

    def channelOpen(self, specificData: bytes) -> None:
        requested = self.conn.sendRequest(self, b"exec", NS(self.command), wantReply=True)
        if requested is None:  # closed already
            self._open_lost()
            return
        requested.addCallbacks(self._exec_started, self._exec_refused)

    def _exec_started(self, _: object) -> None:
        if not self.opened.called:
            self.opened.callback(self)

    def _exec_refused(self, failure: Failure) -> None:
        if self.localClosed and self.remoteClosed:
            # Conch fails pending requests of a channel that closed (or whose
            # connection was lost) before the answer came.
            self._open_lost()
            return
        if not self.opened.called:
            self.opened.errback(
                StreamError(
                    Reason.PROHIBITED,
                    f"proxy node refused to run {self.program} for {self.destination}",
                )
            )
        if not self.localClosed:
            self.loseConnection()

    def _open_lost(self) -> None:
        if not self.opened.called:
            self.opened.errback(
                StreamError(
                    Reason.UNAVAILABLE,
                    f"channel closed before the proxy node ran {self.program} for {self.destination}",
                )
            )

    # -- what the command says -----------------------------------------

    def extReceived(self, dataType: int, data: bytes) -> None:
        if dataType == connection.EXTENDED_DATA_STDERR:
            room = STDERR_LIMIT - len(self._stderr)
            if room > 0:
                self._stderr += data[:room]
        super().extReceived(dataType, data)

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

    def _settle_exit(self) -> None:
        """Turn exit status, signal and stderr into close_reason."""
        stderr = self.stderr
        if self.exit_signal is None and self.exit_status in (None, 0) and not stderr:
            return  # a normal end, or a channel that closed without a word
        if self.exit_signal is not None:
            reason = f"{self.program} killed by signal {self.exit_signal}"
            details = [d for d in (self._exit_signal_message, stderr) if d]
        elif self.exit_status is not None:
            reason = f"{self.program} exited with status {self.exit_status}"
            details = [stderr] if stderr else []
        else:
            reason = f"{self.program} ended without an exit status"
            details = [stderr]
        if details:
            # The proxy node's words, for a log line: escaped and cut.
            reason += ": " + "; ".join(peer_text(detail.encode()) for detail in details)
        self.close_reason = reason

    # -- end -------------------------------------------------------------

    def closed(self) -> None:
        self._settle_exit()
        self._open_lost()
        super().closed()
