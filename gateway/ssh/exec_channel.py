"""
A client stream carried over a command's stdin/stdout: exec mode.

Proxy nodes that forbid TCP forwarding (C{AllowTcpForwarding no},
C{PermitOpen}) still run commands: L{ExecTunnelChannel} is the stream of a
L{TunnelChannel} carried over the stdin/stdout of C{nc HOST PORT} in a
C{session} channel, with the command's stderr and exit status turned into
C{close_reason} when it ends badly.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gateway.errors import Reason, StreamError
from gateway.ssh.channel import DEFAULT_WINDOW, TunnelChannel
from gateway.ssh.command import CommandExit, command_line, program_name


def exec_command_line(template: str, host: str, port: int) -> bytes:
    """
    The command that carries a stream to C{host:port}, e.g. from
    C{"nc {host} {port}"}; both values are shell-quoted (L{command_line}).
    """
    return command_line(template, host=host, port=port)


class ExecTunnelChannel(CommandExit, TunnelChannel):
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
        open_timeout: float = 0,
    ) -> None:
        super().__init__(host, port, origin, window_size, clock, open_timeout)
        self.command = command
        self.program = program_name(command)

    # -- opening ---------------------------------------------------------

    def open_request_data(self) -> bytes:
        return b""

    def channelOpen(self, specificData: bytes) -> None:
        if self.opened.called:
            # Opened after its deadline: the stream was given up, so the
            # command is not started on the proxy node only to be cut.
            self.close()
            return
        requested = self.request_exec()
        if requested is None:  # closed already
            self._open_lost()
            return
        requested.addCallbacks(self._exec_started, self._exec_refused)

    def _exec_started(self, _: object) -> None:
        self.open_succeeded()

    def _exec_refused(self, failure: Failure) -> None:
        if self.localClosed and self.remoteClosed:
            # Conch fails pending requests of a channel that closed (or whose
            # connection was lost) before the answer came.
            self._open_lost()
            return
        self.open_failed(
            StreamError(Reason.PROHIBITED, f"proxy node refused to run {self.program} for {self.destination}")
        )
        if not self.localClosed:
            self.loseConnection()

    def _open_lost(self) -> None:
        if not self.opened.called:
            self.open_failed(
                StreamError(
                    Reason.UNAVAILABLE,
                    f"channel closed before the proxy node ran {self.program} for {self.destination}",
                )
            )

    # -- what the command says -----------------------------------------

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.keep_stderr(dataType, data)
        super().extReceived(dataType, data)

    def _settle_exit(self) -> None:
        """Turn exit status, signal and stderr into close_reason."""
        problem = self.exit_result().problem()
        if problem is not None:
            self.close_reason = problem

    # -- end -------------------------------------------------------------

    def closed(self) -> None:
        self._settle_exit()
        self._open_lost()
        super().closed()
