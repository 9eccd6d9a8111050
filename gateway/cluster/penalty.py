"""
When a cluster's connection slots take their next steps, mindful of the
penalties sshd keeps against the gateway's address.

OpenSSH 9.8 and later penalise a source address (C{PerSourcePenalties}, on
by default): 5 s for a connection that failed authentication, 1 s for one
that ended before authenticating (a refused host key, a failed key
exchange), added up while earlier ones still run; once an address owes more
than 15 s, sshd drops its connections unread -- for up to 10 minutes, and
for every cluster this gateway reaches through that node.  A penalty that
runs out before the next failure never adds up.  So after a failure of a
penalised kind (L{PENALISED}) the next attempt to that proxy node waits at
least L{PENALTY_BACKOFF} s, doubling to L{MAX_BACKOFF} (L{penalty_delay}),
and until one succeeds only one attempt at a time goes out to it: a
cluster's slots would otherwise fail together, a penalty each.  Network
errors (refused, timed out, reset) cost nothing at sshd and keep the slots'
own back-off (L{gateway.cluster.slots}).

A L{ProxyGate} per proxy candidate holds this, and the candidate's last
failure for status and metrics; a cluster's L{Pacer} times each slot's next
step for when both its policy's delay is over and the step's node is open.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from gateway.cluster.slots import MAX_BACKOFF, Step
from gateway.config import ClusterConfig, ProxyAddress
from gateway.ssh.failure import ConnectFailure

#: Seconds the next attempt to a proxy node waits after a penalised failure:
#: twice sshd's default authentication-failure penalty, so that each one has
#: run out before the next failure could add to it.
PENALTY_BACKOFF = 10.0

#: Failures sshd's PerSourcePenalties counts against the gateway's address.
PENALISED = frozenset({ConnectFailure.AUTH, ConnectFailure.KEX, ConnectFailure.HOSTKEY, ConnectFailure.DROPPED})


def penalty_delay(penalties: int, jitter: Callable[[], float] = random.random) -> float:
    """
    Seconds before the next attempt after C{penalties} consecutive penalised
    failures: L{PENALTY_BACKOFF}, doubling to L{MAX_BACKOFF}, then stretched
    by a random factor in (1.0, 1.5] -- never shortened, so that the floor
    holds, and spread so that several clusters failing behind one node do
    not hand sshd their failures at the same moment.
    """
    return min(MAX_BACKOFF, PENALTY_BACKOFF * 2 ** max(0, penalties - 1)) * (1.5 - jitter() / 2)


@dataclass(frozen=True)
class ProxyFailure:
    """The last failure at one proxy node: an attempt that failed, or a link that was lost."""

    kind: ConnectFailure
    error: str
    #: Clock time of the failure.
    at: float


class ProxyGate:
    """A cluster's penalty back-off at one proxy candidate, and its last failure."""

    def __init__(self, proxy: ProxyAddress, jitter: Callable[[], float] = random.random) -> None:
        self.proxy = proxy
        self._jitter = jitter
        #: Consecutive penalised failures since the node last let us in.
        self.penalties = 0
        #: Clock time before which no attempt goes to the node.
        self.not_before = 0.0
        #: Since the node last let us in (None after a success).
        self.last_failure: ProxyFailure | None = None
        #: Failures of every kind (by its value), for metrics.
        self.failures: Counter[str] = Counter()
        # Moves on at each penalised failure counted and at each success: an
        # attempt that started before either is stale (see failed).
        self._epoch = 0
        self._probing = False

    def wait(self, now: float) -> float | None:
        """
        Seconds before an attempt may go out (0: now), or None while the one
        attempt a penalised node is allowed has not settled.
        """
        if not self.penalties:
            return 0.0
        if self._probing:
            return None
        return max(0.0, self.not_before - now)

    def start(self) -> int:
        """An attempt goes out now (L{wait} said 0); what it reports its outcome with."""
        if self.penalties:
            self._probing = True
        return self._epoch

    def succeeded(self) -> None:
        """The node let us in: its penalty back-off is over."""
        self.penalties = 0
        self.not_before = 0.0
        self.last_failure = None
        self._probing = False
        self._epoch += 1

    def failed(self, attempt: int, failure: ProxyFailure) -> float | None:
        """
        Record the C{failure} of C{attempt} (what L{start} returned); for a
        penalised one, the seconds until the node may be tried again (None
        for other kinds).  Attempts that were already out when an earlier
        one failed count once between them: several slots failing together
        double the wait once, not once each.
        """
        self._record(failure)
        current = attempt == self._epoch
        if current:
            self._probing = False
        if failure.kind not in PENALISED:
            return None
        if current:
            self.penalties += 1
            self._epoch += 1
            self.not_before = failure.at + penalty_delay(self.penalties, self._jitter)
        return max(0.0, self.not_before - failure.at)

    def lost(self, error: str, now: float) -> None:
        """A link that was up to the node went away: a network failure, for status."""
        self._record(ProxyFailure(ConnectFailure.NETWORK, error, now))

    def _record(self, failure: ProxyFailure) -> None:
        self.last_failure = failure
        self.failures[failure.kind.value] += 1


@dataclass
class _Due:
    """A slot's step waiting for its time."""

    step: Step
    #: Clock time the slot policy's delay ends.
    earliest: float
    timer: IDelayedCall
    #: The timer waits for the node's gate, not for the policy's delay.
    gated: bool


class Pacer:
    """
    Runs each slot's next step (C{run(slot, step)}) once its policy's delay
    is over and the step's proxy node's L{ProxyGate} lets an attempt go.
    Slots are known by their index.
    """

    def __init__(
        self,
        config: ClusterConfig,
        clock: IReactorTime,
        run: Callable[[int, Step], None],
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._proxies = config.proxies
        #: How long an attempt can be out (connection, then handshake).
        self._attempt_bound = 2 * config.connect_timeout
        self._clock = clock
        self._run = run
        self.gates = {proxy: ProxyGate(proxy, jitter) for proxy in config.proxies}
        self._due: dict[int, _Due] = {}

    def follow(self, slot: int, step: Step) -> None:
        """Take C{step} after its delay (or later: see the class)."""
        self.cancel(slot)
        self._schedule(slot, step, self._clock.seconds() + step.delay)

    def cancel(self, slot: int) -> None:
        due = self._due.pop(slot, None)
        if due is not None and due.timer.active():
            due.timer.cancel()

    def _gate(self, step: Step) -> ProxyGate:
        return self.gates[self._proxies[step.candidate]]

    def _schedule(self, slot: int, step: Step, earliest: float) -> None:
        now = self._clock.seconds()
        wait = self._gate(step).wait(now)
        # None: another slot's attempt to the node is out; its outcome wakes
        # this one (see _settled), the attempt's own time-outs bound it.
        gate = self._attempt_bound if wait is None else wait
        own = earliest - now
        timer = self._clock.callLater(max(0.0, own, gate), self._fire, slot)
        self._due[slot] = _Due(step, earliest, timer, gate > own)

    def _fire(self, slot: int) -> None:
        due = self._due.pop(slot)
        wait = self._gate(due.step).wait(self._clock.seconds())
        if wait is None or wait > 1e-6:  # the node closed since the timer was set
            self._schedule(slot, due.step, due.earliest)
        else:
            self._run(slot, due.step)

    def _settled(self, proxy: ProxyAddress) -> None:
        """An attempt to C{proxy} settled: the slots waiting for its gate look again."""
        for slot, due in list(self._due.items()):
            if due.gated and self._proxies[due.step.candidate] == proxy:
                due.timer.cancel()
                self._schedule(slot, due.step, due.earliest)

    def start(self, proxy: ProxyAddress) -> int:
        """An attempt to C{proxy} goes out; what its outcome is reported with."""
        return self.gates[proxy].start()

    def succeeded(self, proxy: ProxyAddress) -> None:
        self.gates[proxy].succeeded()
        self._settled(proxy)

    def failed(self, proxy: ProxyAddress, attempt: int, kind: ConnectFailure, error: str) -> float | None:
        """L{ProxyGate.failed} at C{proxy}'s gate, now; the slots waiting for it look again."""
        closed_for = self.gates[proxy].failed(attempt, ProxyFailure(kind, error, self._clock.seconds()))
        self._settled(proxy)
        return closed_for

    def lost(self, proxy: ProxyAddress, error: str) -> None:
        """L{ProxyGate.lost}, now."""
        self.gates[proxy].lost(error, self._clock.seconds())

    def next_attempts(self) -> dict[ProxyAddress, float]:
        """Seconds until the next attempt due to each proxy node (one with none due is left out)."""
        now = self._clock.seconds()
        due: dict[ProxyAddress, float] = {}
        for each in self._due.values():
            proxy = self._proxies[each.step.candidate]
            wait = max(0.0, each.timer.getTime() - now)
            due[proxy] = min(wait, due.get(proxy, wait))
        return due
