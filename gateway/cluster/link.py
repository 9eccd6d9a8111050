"""
One SSH connection to one proxy candidate, with its keepalive.

A L{Link} connects and authenticates within C{connect_timeout}, then sends
C{keepalive@openssh.com} every C{keepalive_interval} and declares the peer
dead after C{keepalive_count_max} unanswered probes (a silent peer: VM gone,
packets dropped) -- its streams then end at once instead of hanging.  It can
close politely (cut after L{CLOSE_GRACE}) or be retired: closed once the
streams still using it have finished.
"""

from __future__ import annotations

from twisted.conch.error import ConchError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gateway.cluster.connectors import Connector
from gateway.config import ClusterConfig, ProxyAddress
from gateway.ssh.command import CommandResult
from gateway.ssh.hostkeys import HostKeyPolicy
from gateway.ssh.transport import GatewayClientTransport, TunnelConnection, client_factory

#: Seconds a closing SSH connection gets to say goodbye before it is cut: a
#: silent peer would otherwise hold it until TCP retransmission gives up.
CLOSE_GRACE = 5.0


class Link:
    """
    One SSH connection to one proxy candidate, with its keepalive.

    @param live: the cluster's set of links with a live transport; the link
        is in it from its attempt until its transport is gone, so that a stop
        can close (and a cut can mark) every connection, also retiring ones.
    """

    def __init__(
        self,
        proxy: ProxyAddress,
        config: ClusterConfig,
        clock: IReactorTime,
        connector: Connector,
        host_keys: HostKeyPolicy,
        live: set[Link],
    ) -> None:
        self.proxy = proxy
        self._config = config
        self._clock = clock
        self._connector = connector
        self._host_keys = host_keys
        self._live = live
        self.connection: TunnelConnection | None = None
        self.transport: GatewayClientTransport | None = None
        self.lost: Deferred[str] = Deferred()
        self.retiring = False
        self._keepalive: LoopingCall | None = None
        self._last_answer = 0.0
        self._death: str | None = None
        self._grace: IDelayedCall | None = None
        live.add(self)

    @property
    def open_channels(self) -> int:
        return len(self.connection.channels) if self.connection is not None else 0

    def start(self) -> Deferred[Link]:
        """Connect and authenticate; fires with self, or fails saying why."""
        config = self._config
        factory = client_factory(
            self.proxy.host,
            self.proxy.port,
            config.user,
            config.private_key,
            self._host_keys,
            self._clock,
            rekey_bytes=config.rekey_bytes,
            rekey_interval=config.rekey_interval,
            allow_sha1_signatures=config.allow_sha1_signatures,
            algorithms={
                "kex_algorithms": config.kex_algorithms,
                "ciphers": config.ciphers,
                "macs": config.macs,
                "host_key_algorithms": config.host_key_algorithms,
            },
        )
        return self._connector(self.proxy, factory).addCallback(self._handshake).addCallback(self._up)

    def _handshake(self, transport: GatewayClientTransport) -> Deferred[TunnelConnection]:
        """Wait for the SSH handshake, cutting it at C{connect_timeout}."""
        self.transport = transport
        transport.lost.addCallback(self._transport_lost)
        limit = self._config.connect_timeout

        def too_slow() -> None:
            transport.note_failure(f"SSH handshake with {self.proxy} did not finish within {limit:g} s")
            transport.transport.abortConnection()

        timer = self._clock.callLater(limit, too_slow)

        def settled(result: TunnelConnection | Failure) -> TunnelConnection | Failure:
            if timer.active():
                timer.cancel()
            return result

        return transport.ready.addBoth(settled)

    def _up(self, connection: TunnelConnection) -> Link:
        self.connection = connection
        self._last_answer = self._clock.seconds()
        interval = self._config.keepalive_interval
        if interval > 0:
            self._keepalive = LoopingCall(self._probe)
            self._keepalive.clock = self._clock
            self._keepalive.start(interval, now=False)
        return self

    def _probe(self) -> None:
        """
        Send a keepalive; declare the peer dead once nothing has answered for
        C{keepalive_interval * keepalive_count_max} seconds.
        """
        config = self._config
        silent = self._clock.seconds() - self._last_answer
        if silent >= config.keepalive_interval * config.keepalive_count_max - 1e-9:
            self._death = f"{self.proxy} answered no keepalive for {silent:.1f} s"
            self.abort()
            return
        assert self.connection is not None, "the keepalive runs only while the link is up"
        probe = self.connection.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        # OpenSSH answers REQUEST_FAILURE: any answer proves the peer alive.
        probe.addBoth(self._answered)

    def _answered(self, result: object) -> None:
        if isinstance(result, Failure) and not result.check(ConchError):
            return
        self._last_answer = self._clock.seconds()

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None

    def _transport_lost(self, why: str | None) -> None:
        self._stop_keepalive()
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self.connection = None
        self._live.discard(self)
        # A dead peer (keepalive) first; then what the SSH layer said, such as
        # a bad MAC or the node's own disconnect message.
        lost = f"connection to {self.proxy} lost"
        self.lost.callback(self._death or (f"{lost}: {why}" if why else lost))

    def failed(self) -> None:
        """The attempt failed before a transport existed (or after it went)."""
        if self.transport is None:
            self._live.discard(self)

    def abort(self) -> None:
        """Drop the connection now: its streams end, the slot reconnects."""
        self._stop_keepalive()
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.abortConnection()

    def close(self) -> None:
        """Close the connection cleanly (SSH disconnect), cut after CLOSE_GRACE."""
        self._stop_keepalive()
        if self.transport is not None and not self.lost.called:
            self.transport.loseConnection()
            if self._grace is None:
                self._grace = self._clock.callLater(CLOSE_GRACE, self.abort)

    def run_command(self, command: bytes, timeout: float) -> Deferred[CommandResult]:
        """
        Run C{command} on this link's proxy node (L{TunnelConnection.run_command}):
        no client's stream, but a channel a retiring link waits for.
        """
        assert self.connection is not None, "a command runs on a link that is up"
        return self.connection.run_command(command, timeout, on_closed=self.channel_closed)

    def retire(self) -> None:
        """Close once the streams still using this link have finished."""
        self.retiring = True
        self.channel_closed()

    def channel_closed(self) -> None:
        if self.retiring and self.open_channels == 0:
            self.close()
