"""
The C{ssh-connection} service of a cluster's SSH connection: the channels
that carry its streams, and the exception barrier between them.

Every stream of a cluster shares this one connection, so what one stream's
channel (or the client behind it) does wrong must end that stream only;
and data delivery is the channel's to pace (see L{TunnelChannel}).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.conch.ssh import connection, transport
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.ssh._conch import ConchClientTransport, quiet_conch_logs
from gateway.ssh.channel import DEFAULT_WINDOW, TunnelChannel
from gateway.ssh.command import OUTPUT_LIMIT, CommandChannel, CommandResult
from gateway.ssh.exec_channel import ExecTunnelChannel

log = Logger()

_CHANNEL_DATA_HEADER = struct.Struct(">2L")  # recipient channel, data length
_CHANNEL_ID = struct.Struct(">L")
#: The messages addressed to one of our channels (RFC 4254 5.1-5.4).
_CHANNEL_MESSAGES = frozenset(range(connection.MSG_CHANNEL_OPEN_CONFIRMATION, connection.MSG_CHANNEL_FAILURE + 1))


@quiet_conch_logs("gateway.ssh.connection")
class TunnelConnection(connection.SSHConnection):
    """
    The C{ssh-connection} service, opening C{direct-tcpip} tunnels (or
    C{session} channels running netcat, L{open_exec}), and running commands
    for the gateway itself (L{run_command}).

    Data delivery is overridden so the channel, not Conch, decides when to
    re-open the receive window (see L{TunnelChannel}).
    """

    #: Set by the transport's C{setService}, before the service starts.
    transport: ConchClientTransport

    def __init__(self, ready: Deferred[TunnelConnection], clock: IReactorTime) -> None:
        super().__init__()
        self._ready = ready
        self._clock = clock

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._ready.callback(self)

    def sendData(self, channel: SSHChannel, data: bytes) -> None:
        # Conch's packs the header, then NS(data), then header + NS(data):
        # two copies of the data before the packet's own join.
        if channel.localClosed:
            return
        header = _CHANNEL_DATA_HEADER.pack(self.channelsToRemoteChannel[channel], len(data))
        self.transport.send_message(connection.MSG_CHANNEL_DATA, header, data)

    def _take_window(self, local_id: int, length: int) -> TunnelChannel | None:
        """The channel C{length} bytes arrived for, its window debited; None if it must not get them."""
        channel = self.channels.get(local_id)
        if channel is None:
            return None
        if length > channel.localWindowLeft or length > channel.localMaxPacket:
            log.warn("proxy node overran the window of channel {id}; closing it", id=local_id)
            self.sendClose(channel)
            return None
        channel.localWindowLeft -= length
        return channel

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        self.channel_data(packet, 0, len(packet))

    def channel_data(self, message: bytes, start: int, end: int) -> None:
        """
        A C{CHANNEL_DATA} message whose payload is C{message[start:end]}.
        The transport calls this directly with the decrypted packet, so the
        data is copied once (out of the packet) on its way to the client
        rather than twice, and skips Conch's per-message name lookup.
        """
        if end - start < 8:
            self.transport.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"short CHANNEL_DATA")
            return
        local_id, length = _CHANNEL_DATA_HEADER.unpack_from(message, start)
        channel = self._take_window(local_id, length)
        if channel is not None:
            try:
                channel.dataReceived(message[start + 8 : min(start + 8 + length, end)])
            except Exception:
                self._stream_failed(channel, Failure())

    # -- the exception barrier ---------------------------------------------
    #
    # Every stream of a cluster shares this connection, and Twisted drops a
    # connection whose dataReceived raises.  So nothing a channel (or the
    # client behind it) does wrong may travel up into the transport: an
    # exception from a channel callback ends that channel alone.

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        if messageNum not in _CHANNEL_MESSAGES:
            super().packetReceived(messageNum, packet)
            return
        if len(packet) < 4 or _CHANNEL_ID.unpack_from(packet)[0] not in self.channels:
            # The peer named no channel of ours: its bug, not a stream's.
            self.transport.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"message for an unknown channel")
            return
        channel = self.channels[_CHANNEL_ID.unpack_from(packet)[0]]
        try:
            super().packetReceived(messageNum, packet)
        except Exception:
            if messageNum == connection.MSG_CHANNEL_CLOSE:
                channel.remoteClosed = True  # Conch raised before noting it
            self._stream_failed(channel, Failure())

    def _stream_failed(self, channel: SSHChannel, failure: Failure) -> None:
        """End C{channel}, one of whose callbacks raised C{failure}; log that once."""
        if not getattr(channel, "failed", False):
            channel.failed = True  # type: ignore[attr-defined]
            log.failure(
                "stream {destination} failed inside the gateway; closing that stream only",
                failure,
                destination=getattr(channel, "destination", "?"),
                outcome="internal-error",
            )
        isolate = getattr(channel, "isolate", None)
        if isolate is not None:
            isolate()
        if channel in self.channelsToRemoteChannel:
            if not channel.localClosed:
                self.sendClose(channel)
            if channel.remoteClosed:
                self.channelClosed(channel)

    def serviceStopped(self) -> None:
        # The SSH connection is gone: every channel still open was cut, and
        # its stream's log event (or command's result) must say so rather
        # than read as a normal end.
        for open_channel in self.channelsToRemoteChannel:
            if isinstance(open_channel, (TunnelChannel, CommandChannel)) and open_channel.close_reason is None:
                open_channel.close_reason = "SSH connection lost"
        super().serviceStopped()

    def channelClosed(self, channel: SSHChannel) -> None:
        # Also reached from serviceStopped for every open channel: one whose
        # clean-up raises must not keep the others from being closed.
        try:
            super().channelClosed(channel)
        except Exception:
            self._stream_failed(channel, Failure())

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        # As for data: the channel re-opens the window (for stderr at once).
        local_id, data_type, length = struct.unpack(">3L", packet[:12])
        channel = self._take_window(local_id, length)
        if channel is not None:
            channel.extReceived(data_type, packet[12 : 12 + length])

    def open_tunnel(
        self,
        host: str,
        port: int,
        origin: tuple[str, int],
        window_size: int = DEFAULT_WINDOW,
        open_timeout: float = 0,
    ) -> Deferred[TunnelChannel]:
        """Open a C{direct-tcpip} channel to C{host:port}, within C{open_timeout} seconds (0: no limit)."""
        channel = TunnelChannel(host, port, origin, window_size, self._clock, open_timeout)
        self.openChannel(channel, channel.open_request_data())
        return channel.opened

    def open_exec(
        self,
        command: bytes,
        host: str,
        port: int,
        origin: tuple[str, int],
        window_size: int = DEFAULT_WINDOW,
        open_timeout: float = 0,
    ) -> Deferred[TunnelChannel]:
        """
        Carry a stream to C{host:port} over C{command}'s stdin/stdout (a
        C{session} channel running e.g. C{nc host port}); see
        L{gateway.ssh.channel.exec_command_line}.  Fires once the proxy node
        runs the command; fails with L{StreamError} C{PROHIBITED} if it will
        not, or with C{TIMEOUT} after C{open_timeout} seconds (0: no limit).
        C{host} and C{port} are for logs and C{destination} only.
        """
        channel = ExecTunnelChannel(command, host, port, origin, window_size, self._clock, open_timeout)
        self.openChannel(channel, channel.open_request_data())
        return channel.opened

    def run_command(
        self,
        command: bytes,
        timeout: float,
        output_limit: int = OUTPUT_LIMIT,
        on_closed: Callable[[], None] | None = None,
    ) -> Deferred[CommandResult]:
        """
        Run C{command} on the proxy node (a C{session} channel, no client
        stream: see L{CommandChannel}) and collect what it prints; gives up
        after C{timeout} seconds.  C{on_closed} is called once the channel no
        longer counts on this connection.
        """
        channel = CommandChannel(command, self._clock, timeout, output_limit, on_closed)
        self.openChannel(channel)
        return channel.result
