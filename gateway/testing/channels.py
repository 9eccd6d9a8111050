"""
The fake proxy node's server side of a channel: a C{direct-tcpip} channel or a
C{session} running C{nc HOST PORT}, joined to the node's connection to the
destination, with sshd's flow control and half-close in both directions.
"""

from __future__ import annotations

import os
import shlex
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import common, connection
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.proxy.splice import IClientTransport
from gateway.ssh.channel import ConsumerPacedWindow, OrderedEOFChannel

if TYPE_CHECKING:
    from gateway.testing.node import FakeProxyNode


@implementer(IHalfCloseableProtocol)
class DestinationProtocol(Protocol):
    """The proxy node's TCP connection to a destination, joined to a channel."""

    #: Set by C{makeConnection}; as a listener's client connection, the
    #: destination's is a consumer and a push producer that can half-close.
    transport: IClientTransport

    def __init__(self, tunnel: ServerStream) -> None:
        self._tunnel = tunnel
        self._halves_done = 0
        self.read_closed = False

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.write(data)

    def _half_done(self) -> None:
        self._halves_done += 1
        if self._halves_done == 2:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.read_closed = True
        self._tunnel.destination_eof()
        self._half_done()

    def writeConnectionLost(self) -> None:
        self._half_done()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.read_closed = True
        self._tunnel.destination_lost()


@implementer(IPushProducer)
class ServerStream(ConsumerPacedWindow, OrderedEOFChannel):
    """
    Server side of a channel joined to a destination connection.

    Flow control both ways, as sshd does it: data from the channel goes to
    the destination (queued until it is connected) and window is granted back
    only while the destination keeps up (the channel is the destination
    transport's producer), so an upload to a destination that stops reading
    stalls at one window instead of piling up in the node; the destination
    is paused while the gateway's window is full, so the node buffers at most
    what one read brings.
    """

    def __init__(self, destination: DestinationProtocol | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.destination = destination
        self._connected = destination is not None
        self._queued: list[bytes] = []
        self._client_eof = False
        #: No window is granted back until the destination is there to take the data.
        self._paused = not self._connected

    def _destination_transport(self) -> IClientTransport | None:
        if self.destination is None:
            return None
        return self.destination.transport

    def _connected_transport(self) -> IClientTransport:
        """The destination's transport, once C{destination_connected} has said it is there."""
        transport = self._destination_transport()
        assert transport is not None, "connected, so there is a destination"
        return transport

    def destination_connected(self) -> None:
        self._connected = True
        self._paused = False
        transport = self._connected_transport()
        if self.localClosed or self.remoteClosed:
            transport.loseConnection()
            return
        transport.registerProducer(self, True)
        queued, self._queued = self._queued, []
        for data in queued:
            transport.write(data)
        if self._client_eof:
            transport.loseWriteConnection()
        if not self.areWriting:
            transport.pauseProducing()
        self._grant_window()

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self._connected_transport().write(data)
        else:
            self._queued.append(data)
        self._grant_window()

    def eofReceived(self) -> None:
        self._client_eof = True
        if self._connected:
            self._connected_transport().loseWriteConnection()

    def stopWriting(self) -> None:
        transport = self._destination_transport() if self._connected else None
        if transport is not None:
            transport.pauseProducing()

    def startWriting(self) -> None:
        transport = self._destination_transport() if self._connected else None
        if transport is not None and self.destination is not None and not self.destination.read_closed:
            transport.resumeProducing()

    def destination_eof(self) -> None:
        self.send_eof()

    def destination_lost(self) -> None:
        self.loseConnection()

    def closed(self) -> None:
        transport = self._destination_transport() if self._connected else None
        if transport is not None:
            transport.loseConnection()


class ServerTunnel(ServerStream):
    """Server side of a direct-tcpip channel, already connected."""

    name = b"direct-tcpip"


#: A program the fake node can run in a session: called with the session and
#: the command's words, it answers through the session (L{ServerSession.finish}).
Program = Callable[["ServerSession", list[str]], None]


class ServerSession(ServerStream):
    """
    Server side of a C{session} channel: runs one of the node's C{programs}
    (C{nc HOST PORT}, C{getent ahosts NAME}) the way they would under
    OpenSSH, and nothing else.
    """

    name = b"session"

    def __init__(self, node: FakeProxyNode, **kw: Any) -> None:
        super().__init__(**kw)
        self.node = node
        self._started = False
        self._finished = False

    def request_exec(self, data: bytes) -> bool:
        if not self.node.allow_exec or self._started:
            return False
        self._started = True
        command = common.getNS(data)[0].decode("utf-8", "replace")
        # sshd answers once the command is started: output comes after that.
        self.node.reactor.callLater(0, self._run, command)
        return True

    def _run(self, command: str) -> None:
        try:
            argv = shlex.split(command)
        except ValueError:
            return self.finish(2, f"sh: 1: Syntax error: {command}\n")
        if argv and argv[0] == "exec":
            argv = argv[1:]
        if not argv:
            return self.finish(0)
        program = self.node.programs.get(os.path.basename(argv[0]))
        if program is None:
            return self.finish(127, f"sh: 1: {argv[0]}: command not found\n")
        program(self, argv)

    def run_netcat(self, argv: list[str]) -> None:
        """netcat-openbsd: joins the session to C{routes[(HOST, PORT)]}."""
        # Options (-N, -w 5 ...) are accepted and ignored: HOST PORT come last.
        if len(argv) < 3 or not argv[-1].isdigit():
            return self.finish(1, "usage: nc [-46CDdFhklNnrStUuvZz] destination [port]\n")
        host, port = argv[-2], int(argv[-1])
        target = self.node.routes.get((host, port))
        if target is None:
            return self._refused(host, port, "Connection refused")
        self.destination = DestinationProtocol(self)
        connecting = self.node.dial(target, self.destination)

        def failed(f: Failure) -> None:
            self.destination = None
            text = "Connection refused" if f.check(ConnectionRefusedError) else f.getErrorMessage()
            self._refused(host, port, text)

        connecting.addCallbacks(lambda _: self.destination_connected(), failed)

    def run_getent(self, argv: list[str]) -> None:
        """
        glibc's C{getent ahosts NAME} over the node's C{names}: one line per
        address and socket type, the name on the first; status 2 for a name
        it does not know.
        """
        if len(argv) != 3 or argv[1] != "ahosts":
            return self.finish(1, "Usage: getent [OPTION...] database [key ...]\n")
        addresses = self.node.names.get(argv[2])
        if not addresses:
            return self.finish(2)
        lines: list[str] = []
        for address in addresses:
            for kind in ("STREAM", "DGRAM", "RAW"):
                lines.append(f"{address:<15} {kind:<6} {argv[2] if not lines else ''}\n")
        self.write("".join(lines).encode())
        self.finish(0)

    def _refused(self, host: str, port: int, text: str) -> None:
        self.finish(1, f"nc: connect to {host} port {port} (tcp) failed: {text}\n")

    def destination_eof(self) -> None:
        # netcat-openbsd exits once the network side has closed.
        self.finish(0)

    def destination_lost(self) -> None:
        self.finish(0)

    def finish(self, status: int, stderr: str = "") -> None:
        """The command exits: stderr, then (after all data) EOF, exit-status, close."""
        if self._finished:
            return
        self._finished = True
        if self.localClosed:
            return
        if stderr:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, stderr.encode())

        def exit() -> None:
            if self.localClosed:
                return
            self.conn.sendEOF(self)
            self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status))
            self.loseConnection()

        self.after_data(exit)
