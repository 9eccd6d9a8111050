"""
A cluster's SSH connections, kept up for as long as the cluster is configured.

L{ClusterConnection} is a service holding C{connections} slots (one by
default).  Each slot keeps one L{Link} (gateway.cluster.link: an SSH
connection with its keepalive) up; which candidate it tries next and when --
rotation, back-off, failback to the preferred candidate -- is its
L{SlotPolicy}'s answer (gateway.cluster.slots), carried out on the clock by
a L{Pacer}, which also holds attempts back from a proxy node after a failure
sshd penalises (gateway.cluster.penalty).  A fallback link is retired once
the preferred one is back and its streams have finished.

States (C{connecting}, C{up}, C{backoff}, C{stopped}) are logged per slot and
summarised per cluster for status and metrics.

Streams: L{ClusterConnection.open_stream} waits at most C{connect_timeout}
for a link, picks the least loaded one, enforces C{max_streams}, and gives the
proxy node C{open_timeout} to open the channel.  In C{mode = "auto"} a proxy
node that refuses TCP forwarding ("administratively prohibited") switches the
cluster to running C{exec_command} (netcat) in session channels, once, logged.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.cluster.connectors import Connector, IConnectingReactor, host_key_policy, tcp_connector
from gateway.cluster.link import Link
from gateway.cluster.penalty import Pacer
from gateway.cluster.resolver import Resolver, ResolverStats
from gateway.cluster.slots import SlotPolicy, Step
from gateway.config import ClusterConfig, ProxyAddress
from gateway.errors import Reason, StreamError
from gateway.routing import IPAddress
from gateway.ssh.channel import TunnelChannel
from gateway.ssh.command import CommandResult
from gateway.ssh.connection import TunnelConnection
from gateway.ssh.exec_channel import exec_command_line
from gateway.ssh.failure import ConnectFailure
from gateway.ssh.transport import SSHConnectError

log = Logger()

#: Streams one SSH connection may carry.  OpenSSH's sshd allows 16384
#: channels per connection (CHANNELS_MAX_CHANNELS) and, past that, ends the
#: whole connection with a fatal error, resetting every stream on it.  The
#: margin covers channels still closing, which sshd counts until both sides
#: have closed them.
MAX_CHANNELS_PER_CONNECTION = 16000


@dataclass
class ClusterStats:
    """Counters of one cluster, read by status and metrics."""

    streams_opened: int = 0
    streams_failed: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    #: Links that came up after the first one (reconnects and failbacks).
    reconnects: int = 0
    links_up: int = 0
    #: reactor.seconds() when the cluster last went from no link to a link.
    connected_since: float | None = None
    resolver: ResolverStats = field(default_factory=ResolverStats)


class _Slot:
    """A place for one link: what it runs now, and its policy for what comes next."""

    def __init__(self, index: int, policy: SlotPolicy) -> None:
        self.index = index
        self.policy = policy
        self.state = "stopped"
        self.link: Link | None = None
        self.attempt: Deferred | None = None


class ClusterConnection(Service):
    """Keeps a cluster's SSH connection(s) to its proxy node(s)."""

    #: The cluster's name (C{Service.name} may be None; a cluster's is not).
    name: str

    def __init__(
        self,
        config: ClusterConfig,
        reactor: IConnectingReactor,
        connector: Connector | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.connector = connector or tcp_connector(reactor, config.connect_timeout)
        self.host_keys = host_key_policy(config)
        self._slots = [_Slot(i, SlotPolicy(i, len(config.proxies), jitter)) for i in range(config.connections)]
        self.pacer = Pacer(config, reactor, self._take_step, jitter)
        self._waiters: list[Deferred[Link]] = []
        #: Every link with a live transport (up, connecting, or retiring).
        self.links: set[Link] = set()
        self.last_error: str | None = None
        self.open_streams = 0
        #: Set by C{retire}: fires once the last stream has ended.
        self._retired: Deferred[None] | None = None
        self.exec_mode = config.mode == "exec"
        self.stats = ClusterStats()
        self.resolver = Resolver(config, self.run_command, reactor, self.stats.resolver)

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> str:
        """The best state of any slot: up > connecting > backoff > stopped."""
        states = {slot.state for slot in self._slots}
        for state in ("up", "connecting", "backoff"):
            if state in states:
                return state
        return "stopped"

    @property
    def proxy(self) -> ProxyAddress | None:
        """The proxy node of the first link that is up."""
        for slot in self._slots:
            if slot.link is not None:
                return slot.link.proxy
        return None

    def _set_state(self, slot: _Slot, state: str, proxy: ProxyAddress | None = None) -> None:
        if state == slot.state:
            return
        slot.state = state
        log.info(
            "cluster {cluster} {state}" + (" ({proxy})" if proxy else ""),
            cluster=self.name,
            slot=slot.index,
            state=state,
            proxy=str(proxy) if proxy else None,
            last_error=self.last_error,
        )

    def _new_link(self, candidate: int) -> Link:
        proxy = self.config.proxies[candidate]
        return Link(proxy, self.config, self.reactor, self.connector, self.host_keys, self.links)

    def _follow(self, slot: _Slot, step: Step | None) -> None:
        """Carry out the slot policy's next step when it is due."""
        if step is not None:
            self.pacer.follow(slot.index, step)

    def _take_step(self, index: int, step: Step) -> None:
        slot = self._slots[index]
        (self._connect if step.action == "connect" else self._try_failback)(slot)

    # -- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for slot in self._slots:
            self._connect(slot)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._fail_waiters(StreamError(Reason.UNAVAILABLE, "gateway is shutting down"))
        for slot in self._slots:
            self.pacer.cancel(slot.index)
            slot.link = None
            if slot.attempt is not None:
                slot.attempt.cancel()
            self._set_state(slot, "stopped")
        closing = [link.lost for link in self.links if link.transport is not None]
        for link in list(self.links):
            link.close()
        return gatherResults(closing).addBoth(lambda _: None)

    def _connect(self, slot: _Slot) -> None:
        proxy = self.config.proxies[slot.policy.candidate]
        self._set_state(slot, "connecting", proxy)
        link = self._new_link(slot.policy.candidate)
        ticket = self.pacer.start(proxy)
        attempt = link.start()
        slot.attempt = attempt
        attempt.addCallbacks(lambda _: self._up(slot, link), lambda f: self._failed(slot, link, f, ticket))

    def _count_up(self) -> None:
        stats = self.stats
        if stats.links_up:
            stats.reconnects += 1
        stats.links_up += 1
        if self.state != "up":
            stats.connected_since = self.reactor.seconds()

    def _up(self, slot: _Slot, link: Link) -> None:
        slot.attempt = None
        if not self.running:
            link.close()
            return
        self._count_up()
        self.pacer.succeeded(link.proxy)
        slot.link = link
        self.last_error = None
        link.lost.addCallback(lambda why: self._lost(slot, link, why))
        self._set_state(slot, "up", link.proxy)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(link)
        self._follow(slot, slot.policy.link_up())

    def _refused(self, proxy: ProxyAddress, failure: Failure, ticket: int, quiet: bool = False) -> str:
        """Why an attempt to C{proxy} failed; told to the pacer and logged (if C{quiet}, only when penalised)."""
        error = failure.value
        if isinstance(error, SSHConnectError):
            why, kind = str(error), error.kind
        else:
            why, kind = f"cannot connect to {proxy}: {failure.getErrorMessage()}", ConnectFailure.NETWORK
        closed_for = self.pacer.failed(proxy, ticket, kind, why)
        fields = {"cluster": self.name, "error": why, "proxy": str(proxy), "kind": kind.value}
        if closed_for is not None:  # once per failure, and those are PENALTY_BACKOFF apart
            log.warn(
                "cluster {cluster}: {error}; sshd may be penalising this source (PerSourcePenalties):"
                " next attempt to {proxy} in {next_attempt_in:.0f} s",
                next_attempt_in=closed_for,
                **fields,
            )
        elif not quiet:
            log.warn("cluster {cluster}: {error}", **fields)
        return why

    def _failed(self, slot: _Slot, link: Link, failure: Failure, ticket: int) -> None:
        slot.attempt = None
        link.failed()
        if not self.running:
            return
        self.last_error = self._refused(link.proxy, failure, ticket)
        self._retry(slot, slot.policy.attempt_failed())

    def _lost(self, slot: _Slot, link: Link, why: str) -> None:
        if slot.link is not link:
            return  # a retired fallback link, or after stop
        slot.link = None
        if not self.running:
            return
        self.last_error = why
        self.pacer.lost(link.proxy, why)
        log.warn("cluster {cluster}: {error}", cluster=self.name, error=why, proxy=str(link.proxy))
        self._retry(slot, slot.policy.link_lost())

    def _retry(self, slot: _Slot, step: Step) -> None:
        """Back off, then try the candidate the policy names (replacing any step still due)."""
        self._set_state(slot, "backoff")
        self._follow(slot, step)

    def _try_failback(self, slot: _Slot) -> None:
        """While on a fallback, see whether the preferred candidate is back."""
        probe = self._new_link(slot.policy.preferred)
        preferred = probe.proxy

        def back(_: object) -> None:
            self.pacer.succeeded(preferred)
            old = slot.link
            if not self.running or old is None:
                # Stopped, or the fallback died meanwhile (its own reconnect
                # is under way): let that path decide.
                probe.close()
                return
            log.info(
                "cluster {cluster}: preferred proxy {proxy} is back; moving from {old}",
                cluster=self.name,
                proxy=str(preferred),
                old=str(old.proxy),
            )
            self._count_up()
            slot.link = probe
            slot.policy.probe_succeeded()
            probe.lost.addCallback(lambda why: self._lost(slot, probe, why))
            old.retire()

        def still_down(failure: Failure) -> None:
            probe.failed()
            if self.running:
                self._refused(preferred, failure, ticket, quiet=True)  # a node still down: no line per probe
                if slot.link is not None:
                    self._follow(slot, slot.policy.probe_failed())

        ticket = self.pacer.start(preferred)
        attempt = probe.start()
        slot.attempt = attempt

        def settled(result: object) -> object:
            if slot.attempt is attempt:  # not replaced by a reconnect meanwhile
                slot.attempt = None
            return result

        attempt.addBoth(settled)
        attempt.addCallbacks(back, still_down)

    # -- streams -------------------------------------------------------------

    def _fail_waiters(self, error: StreamError) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _least_loaded(self) -> Link | None:
        # A plain loop: this runs for every stream, and min() over a list
        # with a key function cost several times as much.
        best, fewest = None, 0
        for slot in self._slots:
            link = slot.link
            if link is not None and link.connection is not None:
                channels = len(link.connection.channels)
                if best is None or channels < fewest:
                    best, fewest = link, channels
        return best

    def _link(self) -> Deferred[Link]:
        """A link that is up, waiting up to C{connect_timeout} for one."""
        link = self._least_loaded()
        if link is not None:
            return succeed(link)
        if not self.running:
            return fail(StreamError(Reason.UNAVAILABLE, f"cluster {self.name!r} is not running"))
        waiter: Deferred[Link] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        timeout = self.config.connect_timeout

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                raise StreamError(
                    Reason.UNAVAILABLE,
                    f"no SSH connection to cluster {self.name!r} within {timeout:g} s"
                    + (f" ({self.last_error})" if self.last_error else ""),
                )
            return failure

        waiter.addTimeout(timeout, self.reactor)
        return waiter.addErrback(timed_out)

    def connection(self) -> Deferred[TunnelConnection]:
        """The least loaded SSH connection, waiting up to C{connect_timeout}."""
        return self._link().addCallback(_connection_of)

    def open_stream(
        self, host: str, port: int, origin: tuple[str, int], *, carrier: bool = False
    ) -> Deferred[TunnelChannel]:
        """
        Open a tunnel to C{host:port} through this cluster's proxy node.

        A C{carrier} is the channel another cluster's SSH connection runs in
        (C{jump = "<this cluster>"}): it is no client's stream, so it neither
        counts against C{max_streams} nor keeps a drain or retirement waiting
        (it ends with the connection it carries).

        Fails with L{StreamError}: C{OVERLOADED} at C{max_streams},
        C{UNAVAILABLE} when no connection comes up in time, C{TIMEOUT} when
        the proxy node does not answer the open in time, or the proxy node's
        own reason.
        """
        if carrier:
            return self._link().addCallback(self._open_on, host, port, origin, carrier=True)
        if self.open_streams >= self.config.max_streams:
            return fail(
                StreamError(
                    Reason.OVERLOADED,
                    f"cluster {self.name!r} has {self.open_streams} open streams (max_streams)",
                )
            )
        self.open_streams += 1
        link = self._least_loaded()
        if link is not None:
            # The usual case: a link is up, and the stream opens on it now,
            # without a Deferred for the link to chain the open's onto.
            opening = maybeDeferred(self._open_on, link, host, port, origin)
        else:
            opening = self._link().addCallback(self._open_on, host, port, origin)
        opening.addErrback(self._not_opened)
        return opening

    def _not_opened(self, failure: Failure) -> Failure:
        self.open_streams -= 1
        self._maybe_retired()
        return failure

    def _with_room(self, link: Link) -> Link:
        """C{link}, the least loaded one, unless it is full: then all are, and sshd would drop one and its streams."""
        if link.open_channels >= MAX_CHANNELS_PER_CONNECTION:
            raise StreamError(
                Reason.OVERLOADED,
                f"cluster {self.name!r}: every SSH connection carries {MAX_CHANNELS_PER_CONNECTION} streams "
                "(raise `connections`)",
            )
        return link

    def _open_on(
        self, link: Link, host: str, port: int, origin: tuple[str, int], carrier: bool = False
    ) -> Deferred[TunnelChannel]:
        self._with_room(link)

        def opened(channel: TunnelChannel) -> TunnelChannel:
            if not carrier:
                channel.closed_hooks.append(self._stream_closed)
            channel.closed_hooks.append(link.channel_closed)
            return channel

        def prohibited(failure: Failure) -> Deferred[TunnelChannel] | Failure:
            error = failure.value
            if isinstance(error, StreamError) and error.reason is Reason.PROHIBITED:
                # Every direct-tcpip attempt refused this way is retried over
                # exec, also those that were in flight when the first answer
                # switched the cluster; the switch itself is logged once.
                if self.exec_mode:
                    return self._open_channel(link, host, port, origin)
                self.exec_mode = True
                log.warn(
                    "cluster {cluster}: proxy node {proxy} refuses TCP forwarding ({detail}); "
                    "switching to exec mode ({command})",
                    cluster=self.name,
                    proxy=str(link.proxy),
                    detail=error.detail,
                    command=self.config.exec_command,
                )
                return self._open_channel(link, host, port, origin)
            return failure

        opening = self._open_channel(link, host, port, origin)
        if not self.exec_mode and self.config.mode == "auto":
            opening.addErrback(prohibited)
        return opening.addCallback(opened)

    def _open_channel(self, link: Link, host: str, port: int, origin: tuple[str, int]) -> Deferred[TunnelChannel]:
        connection = link.connection
        if connection is None:
            return fail(StreamError(Reason.UNAVAILABLE, f"connection to {link.proxy} lost"))
        window, timeout = self.config.window_size, self.config.open_timeout
        if self.exec_mode:
            command = exec_command_line(self.config.exec_command, host, port)
            return connection.open_exec(command, host, port, origin, window, timeout)
        return connection.open_tunnel(host, port, origin, window, timeout)

    def resolve(self, name: str) -> Deferred[tuple[IPAddress, ...]]:
        """The addresses of C{name} from the proxy node's resolver, cached (see L{Resolver.resolve})."""
        return self.resolver.resolve(name)

    def run_command(self, command: bytes) -> Deferred[CommandResult]:
        """Run C{command} on the least loaded link's proxy node within C{open_timeout} (L{Link.run_command})."""
        running = self._link().addCallback(self._with_room)
        return running.addCallback(Link.run_command, command, self.config.open_timeout)

    def cut_streams(self, reason: str) -> None:
        """Say why the streams still open are about to be cut: their log events show it."""
        for link in self.links:
            if link.connection is not None:
                for channel in link.connection.channels.values():
                    if isinstance(channel, TunnelChannel) and channel.close_reason is None:
                        channel.close_reason = reason

    def _stream_closed(self) -> None:
        self.open_streams -= 1
        self._maybe_retired()

    def retire(self) -> Deferred[None]:
        """
        Stop once the streams still open have ended (the caller has already
        stopped routing new streams here): how a replaced cluster's old
        connection lets its clients finish.
        """
        self._retired = Deferred()
        self._maybe_retired()
        return self._retired

    def _maybe_retired(self) -> None:
        retired = self._retired
        if retired is None or retired.called or self.open_streams:
            return
        stopping = self.disownServiceParent() if self.parent is not None else self.stopService()
        maybeDeferred(lambda: stopping).chainDeferred(retired)


def _connection_of(link: Link) -> TunnelConnection:
    """The SSH connection of a link that is up (what C{_link} fires with)."""
    assert link.connection is not None, "a link is up only with its connection"
    return link.connection
