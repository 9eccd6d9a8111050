"""
Which proxy candidate a cluster's connection slot tries next, and when.

A L{SlotPolicy} is the decision half of a slot, with no reactor and no
connection in it: it is told what happened (an attempt failed, a link came
up, a link was lost, a failback probe answered or not) and answers with the
next L{Step} -- connect to a candidate, or probe the preferred one -- and the
delay before it.  L{ClusterConnection} carries the steps out with its clock;
tests drive the policy alone, with no clock at all.

The rules:
 - slot i prefers candidate i (modulo the number of candidates), so several
   connections spread over the candidates;
 - a failed attempt or a lost link is followed, after L{backoff_delay}, by an
   attempt on the *next* candidate;
 - a slot up on a fallback candidate probes its preferred one on the same
   back-off (counted separately) and moves back when the probe answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def backoff_delay(failures: int, jitter: Callable[[], float] = random.random) -> float:
    """
    Seconds to wait after C{failures} consecutive failed attempts.

    Doubling from L{INITIAL_BACKOFF} up to L{MAX_BACKOFF}, then scaled by a
    random factor in [0.5, 1.0) so that many clusters behind one broken
    network do not reconnect in lock-step.
    """
    delay = min(MAX_BACKOFF, INITIAL_BACKOFF * 2 ** max(0, failures - 1))
    return delay * (0.5 + jitter() / 2)


@dataclass(frozen=True)
class Step:
    """What a slot does next: C{action} on candidate C{candidate} after C{delay} s."""

    #: C{"connect"}: replace the slot's link; C{"probe"}: try the preferred
    #: candidate beside the fallback link that is up.
    action: str
    candidate: int
    delay: float


class SlotPolicy:
    """Rotation, back-off and failback of one connection slot."""

    def __init__(self, index: int, candidates: int, jitter: Callable[[], float] = random.random) -> None:
        self._candidates = candidates
        self._jitter = jitter
        self.preferred = index % candidates
        self._next = self.preferred
        #: Consecutive failed attempts (and lost links) since a link was up.
        self.failures = 0
        #: Failback probes since the slot moved to a fallback.
        self.failback_failures = 0

    @property
    def candidate(self) -> int:
        """The candidate the slot's current (or next) link is to."""
        return self._next % self._candidates

    @property
    def on_fallback(self) -> bool:
        return self.candidate != self.preferred

    def attempt_failed(self) -> Step:
        """An attempt failed: back off, then try the next candidate."""
        self.failures += 1
        self._next += 1
        return Step("connect", self.candidate, backoff_delay(self.failures, self._jitter))

    def link_lost(self) -> Step:
        """A link that was up went away: the same as a failed attempt."""
        return self.attempt_failed()

    def link_up(self) -> Step | None:
        """A link came up: a probe of the preferred candidate if this is a fallback."""
        self.failures = 0
        return self._probe() if self.on_fallback else None

    def probe_failed(self) -> Step:
        """The preferred candidate is still down: probe it again, later."""
        return self._probe()

    def probe_succeeded(self) -> None:
        """The preferred candidate answered: the slot is back on it."""
        self._next = self.preferred
        self.failback_failures = 0

    def _probe(self) -> Step:
        self.failback_failures += 1
        return Step("probe", self.preferred, backoff_delay(self.failback_failures, self._jitter))
