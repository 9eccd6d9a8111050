"""
OpenSSH's C{ProxyCommand}, for a proxy node the gateway cannot connect to
directly (a jump host is L{gateway.ssh.jump}).

L{command_endpoint} is an C{IStreamClientEndpoint}, so a cluster's
L{Connector} can hand the SSH client factory to it exactly as it would to a
TCP endpoint.  A local command (run by C{/bin/sh -c}) is connected to the
proxy node, and the SSH connection runs over its stdin/stdout.  Sahara's
network-namespace setups, where the controller reaches instances with C{ip
netns exec qrouter-<router id> nc <host> <port>}, map directly to::

    proxy_command = "ip netns exec qrouter-1234 nc {host} {port}"
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProcessTransport,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: Seconds a closed command gets to exit by itself before SIGTERM, and again
#: between SIGTERM and SIGKILL.
STOP_TIMEOUT = 5.0
#: A stderr "line" longer than this is logged in pieces (bounded memory).
MAX_STDERR_LINE = 4096

_PLACEHOLDERS = frozenset({"host", "port"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


#: Secrets of the gateway's own environment that a proxy_command never needs.
_PRIVATE_VARIABLES = ("GATEWAY_CONTROL_TOKEN", "GATEWAY_TOKEN")


def _child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _PRIVATE_VARIABLES}


def format_command(template: str, host: str, port: int) -> str:
    """
    The shell command for C{template}, with C{{host}} and C{{port}} replaced
    by the shell-quoted values (C{{{}} and C{}}} are literal braces).

    @raise ValueError: the template is malformed or uses another field.
    """
    try:
        for _literal, field, _spec, _conversion in string.Formatter().parse(template):
            if field is not None and field not in _PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{field}}}")
        return template.format(host=shlex.quote(host), port=shlex.quote(str(port)))
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(
            f"bad proxy_command {template!r}: {e} (only {{host}} and {{port}} may be used; "
            "write {{ and }} for literal braces)"
        ) from None


def program_name(command: str) -> str:
    """The name of the program C{command} runs first, for log messages."""
    try:
        words = shlex.split(command)
    except ValueError:
        return "sh"
    for word in words:
        word = word.lstrip("({!")
        if not word or word == "exec" or _ASSIGNMENT.fullmatch(word):
            continue
        return os.path.basename(word.rstrip(";&|)}")) or "sh"
    return "sh"


@implementer(IAddress)
@dataclass(frozen=True)
class CommandAddress:
    """The "address" of a proxy command's stdio: the command and its pid."""

    command: str
    pid: int | None

    def __str__(self) -> str:
        return f"proxy_command {self.command!r} (pid {self.pid})"


class IProcessReactor(IReactorProcess, IReactorTime):
    """
    A reactor that spawns processes and keeps time: the command endpoint
    spawns the command and times its stop (SIGTERM, then SIGKILL).

    Every real reactor provides both interfaces but declares none that
    unites them, so this one names the combination for the type checker;
    nothing checks it at run time.
    """


class IProcessPipes(IProcessTransport, IConsumer, IPushProducer):
    """
    A spawned process as L{CommandTransport} uses it: its stdin a consumer
    (flow control from the SSH side), its stdout a push producer.

    Twisted's C{Process} has those methods but declares only
    C{IProcessTransport}; this interface names them for the type checker.
    """


def command_endpoint(
    reactor: IProcessReactor,
    template: str,
    host: str,
    port: int,
    *,
    stop_timeout: float = STOP_TIMEOUT,
) -> IStreamClientEndpoint:
    """
    An endpoint that connects through a local command, like OpenSSH's
    C{ProxyCommand}: C{/bin/sh -c <command>} with the connection on the
    command's stdin/stdout.

    C{command} is C{template} with C{{host}} and C{{port}} replaced by the
    shell-quoted values (L{format_command}); e.g. Sahara's
    C{ip netns exec qrouter-{router_id} nc {host} {port}} becomes
    C{proxy_command = "ip netns exec qrouter-1234 nc {host} {port}"}.

    The command's stderr is logged line by line.  The connection is lost when
    the command exits.  Closing the connection closes the command's stdin; a
    command still running C{stop_timeout} seconds later is sent SIGTERM, and
    SIGKILL after as long again.  The command runs in its own session (via
    C{setsid(1)} when available) so that the signals reach everything it
    started, not only the shell.

    @raise ValueError: C{template} is not a valid template.
    """
    return CommandEndpoint(reactor, format_command(template, host, port), stop_timeout=stop_timeout)


@implementer(IStreamClientEndpoint)
class CommandEndpoint:
    """Connects a protocol to the stdin/stdout of C{/bin/sh -c command}."""

    def __init__(
        self,
        reactor: IProcessReactor,
        command: str,
        *,
        stop_timeout: float = STOP_TIMEOUT,
        shell: str = "/bin/sh",
    ) -> None:
        self._reactor = reactor
        self.command = command
        self.program = program_name(command)
        self._stop_timeout = stop_timeout
        self._shell = shell

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        args = [self._shell, "-c", self.command]
        setsid = shutil.which("setsid")
        if setsid is not None:
            # Not a process-group leader, setsid(1) calls setsid() and execs
            # the shell in the same process: the pid is the group's id.
            args = [setsid, *args]
        protocol = protocolFactory.buildProtocol(CommandAddress(self.command, None))
        if protocol is None:
            return fail(error.ConnectionRefusedError("the factory refused the connection"))
        process_protocol = CommandProcessProtocol(
            protocol,
            self.command,
            self.program,
            self._reactor,
            self._stop_timeout,
            group=setsid is not None,
        )
        try:
            self._reactor.spawnProcess(process_protocol, args[0], args, env=_child_environment())
        except Exception:
            return fail()
        return succeed(protocol)


@implementer(ITransport, IPushProducer, IConsumer)
class CommandTransport:
    """The C{ITransport} a protocol sees over a proxy command's stdio."""

    def __init__(self, owner: CommandProcessProtocol) -> None:
        self._owner = owner
        self.connected = True
        self.disconnecting = False

    @property
    def pid(self) -> int | None:
        """The command's process id (None once it has been reaped)."""
        return self._owner.pid

    def write(self, data: bytes) -> None:
        if not self.disconnecting and not self._owner.ended:
            self._owner.transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close the command's stdin; it is stopped if it does not exit."""
        self.disconnecting = True
        self._owner.stop()

    def loseWriteConnection(self) -> None:
        """Half-close: close the command's stdin only."""
        if not self._owner.ended:
            self._owner.transport.closeStdin()

    def abortConnection(self) -> None:
        """Kill the command now."""
        self.disconnecting = True
        self._owner.stop(abort=True)

    def getPeer(self) -> CommandAddress:
        return CommandAddress(self._owner.command, self._owner.spawned_pid)

    def getHost(self) -> CommandAddress:
        return self.getPeer()

    # IConsumer: the command's stdin.
    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._owner.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._owner.transport.unregisterProducer()

    # IPushProducer: the command's stdout.
    def pauseProducing(self) -> None:
        if not self._owner.ended:
            self._owner.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._owner.ended:
            self._owner.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()


class CommandProcessProtocol(ProcessProtocol):
    """
    Joins a proxy command to a protocol: stdout to C{dataReceived}, stderr to
    the log, the process's end to C{connectionLost}; and stops the command,
    within a bounded time, when the protocol closes the connection.
    """

    #: Set by the reactor's C{spawnProcess}, before C{connectionMade}.
    transport: IProcessPipes

    def __init__(
        self,
        protocol: IProtocol,
        command: str,
        program: str,
        clock: IReactorTime,
        stop_timeout: float = STOP_TIMEOUT,
        group: bool = False,
    ) -> None:
        self.protocol = protocol
        self.command = command
        self.program = program
        self._clock = clock
        self._stop_timeout = stop_timeout
        self._group = group
        self.spawned_pid: int | None = None
        self.stopping = False
        #: The command had exited before we began stopping it.
        self._exited_first = False
        self.exited = False
        self.ended = False
        self._lost = False
        self._timer: IDelayedCall | None = None
        self._stderr = b""
        self.command_transport = CommandTransport(self)

    @property
    def pid(self) -> int | None:
        return None if self.exited else self.spawned_pid

    def connectionMade(self) -> None:
        self.spawned_pid = getattr(self.transport, "pid", None)
        self.protocol.makeConnection(self.command_transport)

    # -- from the command -------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        if not self._lost:
            self.protocol.dataReceived(data)

    def errReceived(self, data: bytes) -> None:
        try:
            self._stderr += data
            *lines, self._stderr = self._stderr.split(b"\n")
            while len(self._stderr) > MAX_STDERR_LINE:
                lines.append(self._stderr[:MAX_STDERR_LINE])
                self._stderr = self._stderr[MAX_STDERR_LINE:]
            for line in lines:
                self._log_stderr(line)
        except Exception:
            self._stderr = b""

    def _log_stderr(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.strip():
                log.info(
                    "proxy_command ({program}) stderr: {line}",
                    program=self.program,
                    line=line,
                    pid=self.spawned_pid,
                    command=self.command,
                )
        except Exception:
            pass

    def errConnectionLost(self) -> None:
        if self._stderr:
            rest, self._stderr = self._stderr, b""
            self._log_stderr(rest)

    def outConnectionLost(self) -> None:
        half_closeable = IHalfCloseableProtocol(self.protocol, None)
        if half_closeable is not None and not self._lost:
            half_closeable.readConnectionLost()

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        # Normally processEnded follows at once.  If something the command
        # started still holds its stdout or stderr, stop that too.
        self.stop()

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self.ended = True
        self._cancel_timer()
        self.errConnectionLost()
        if self.stopping and not self._exited_first:
            # We closed the connection; how the command ended is our doing.
            why: Failure = Failure(error.ConnectionDone())
        elif reason.check(error.ProcessDone):
            why = Failure(error.ConnectionDone())
        else:
            value = reason.value
            signum = getattr(value, "signal", None)
            if signum:
                text = f"killed by signal {signum}"
            else:
                text = f"exited with status {getattr(value, 'exitCode', '?')}"
            log.info(
                "proxy_command ({program}) {text}",
                program=self.program,
                text=text,
                pid=self.spawned_pid,
                command=self.command,
            )
            why = Failure(error.ConnectionLost(f"proxy_command ({self.program}) {text}"))
        self._connection_lost(why)

    def _connection_lost(self, why: Failure) -> None:
        if self._lost:
            return
        self._lost = True
        self.command_transport.connected = False
        self.command_transport.disconnecting = True
        self.protocol.connectionLost(why)

    # -- stopping ---------------------------------------------------------

    def stop(self, abort: bool = False) -> None:
        """
        Make the command go away: close its stdin, then SIGTERM and SIGKILL
        (after C{stop_timeout} each) while it lingers; C{abort}: SIGKILL now.
        """
        if self.ended:
            return
        if not self.stopping:
            self.stopping = True
            self._exited_first = self.exited
            self.transport.closeStdin()
            if not abort:
                self._schedule(self._terminate)
        if abort:
            self._kill()

    def _schedule(self, step: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(self._stop_timeout, step)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _terminate(self) -> None:
        self._timer = None
        if self.ended:
            return
        self._signal(signal.SIGTERM)
        self._schedule(self._kill)

    def _kill(self) -> None:
        self._timer = None
        if self.ended:
            return
        self._signal(signal.SIGKILL)
        self._schedule(self._abandon)

    def _abandon(self) -> None:
        # SIGKILL did not end it (its pipes are held outside its process
        # group, or it is stuck in the kernel): stop waiting for it.
        self._timer = None
        if self.ended:
            return
        log.warn(
            "proxy_command ({program}) pid {pid} did not go away after SIGKILL; abandoning it",
            program=self.program,
            pid=self.spawned_pid,
            command=self.command,
        )
        try:
            self.transport.loseConnection()
        except Exception:
            pass
        self._connection_lost(Failure(error.ConnectionLost(f"proxy_command ({self.program}) did not exit")))

    def _signal(self, signum: int) -> None:
        pid = self.spawned_pid
        if self._group and pid is not None:
            try:
                os.killpg(pid, signum)
                return
            except ProcessLookupError:
                pass  # not (yet) a group of its own, or all gone
            except OSError as e:
                log.warn("cannot signal proxy_command process group {pid}: {e}", pid=pid, e=e)
        if not self.exited:
            try:
                self.transport.signalProcess(signum)
            except (error.ProcessExitedAlready, OSError):
                pass
