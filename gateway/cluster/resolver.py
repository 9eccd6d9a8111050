"""
Names resolved on the cluster's proxy node.

A destination name that matches none of a cluster's C{hostnames} patterns is
not taken on trust: the proxy node resolves it -- one C{session} channel
running the cluster's C{resolver_command}, C{getent ahosts NAME} by default
-- and the caller admits the name only if every address lies inside the
cluster's networks, then opens the stream to one of those addresses, so the
proxy node never resolves the name a second time (no window for DNS
rebinding between the check and the connection).

L{Resolver} is one cluster's: it caches answers for C{resolve_ttl} seconds
(at most L{MAX_ENTRIES} names; a name not found for at most L{NEGATIVE_TTL}),
and concurrent requests for one name share one run of the command.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import ClusterConfig
from gateway.errors import Reason, StreamError, shown
from gateway.routing import IPAddress
from gateway.ssh.command import CommandResult, command_line

log = Logger()

#: Names a cluster's cache holds at most; the least recently used goes first.
MAX_ENTRIES = 1024
#: Seconds at most that a failed resolution (name not found, exec refused,
#: the command failing) is remembered: a name added to the proxy node's DNS
#: (or a resolver fixed) is seen soon, yet a client retrying in a loop does
#: not run a command per attempt.
NEGATIVE_TTL = 5.0
#: getent's exit status for "key not found"; any resolver command may use it.
NOT_FOUND_STATUS = 2
#: Failures that say nothing about the name (no connection, the node too
#: slow, too many channels): never cached, the next request tries again.
_TRANSIENT = frozenset({Reason.UNAVAILABLE, Reason.TIMEOUT, Reason.OVERLOADED})
#: How much of a name a message shows (a DNS name is at most 253 characters).
_NAME_SHOWN = 253

#: What a resolution gives: the addresses, or why there are none.
Answer = tuple[IPAddress, ...] | StreamError


def parse_getent_ahosts(output: bytes) -> tuple[IPAddress, ...]:
    """
    The addresses in a resolver command's output, each once, in order.

    Every line whose first word is an IP address counts: C{getent ahosts}
    prints one per address and socket type (C{10.0.0.5  STREAM api.svc.test},
    C{10.0.0.5  DGRAM}, ...), C{dig +short} or a script one address per line.
    Other lines (dig's CNAME targets, warnings) are skipped.  IPv4-mapped
    IPv6 addresses count as the IPv4 address, as the router reads them; an
    address with a zone id (C{fe80::1%eth0}) names an interface of the proxy
    node and is never a destination, so it is dropped.

    @raise ValueError: if no line starts with an address.
    """
    found: dict[IPAddress, None] = {}
    for line in output.splitlines():
        words = line.split(maxsplit=1)
        if not words:
            continue
        try:
            address = ipaddress.ip_address(words[0].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id is not None:
                continue
            address = address.ipv4_mapped or address
        found.setdefault(address, None)
    if not found:
        raise ValueError("no address in the resolver's output")
    return tuple(found)


@dataclass
class ResolverStats:
    """Counters of one cluster's resolver (part of its ClusterStats, read by metrics)."""

    #: Requests answered from the cache (addresses or a remembered failure).
    cache_hits: int = 0
    #: Requests that waited for a run already under way for the same name.
    joined: int = 0
    #: Resolver commands run on the proxy node.
    runs: int = 0
    #: Runs that gave no address, by reason (C{host-unreachable}: not found).
    failures: Counter[str] = field(default_factory=Counter)


class Resolver:
    """
    One cluster's names, resolved by its proxy node and cached.

    @param run: runs a command on the cluster's proxy node (its
        L{ClusterConnection.run_command}).
    @param clock: the cache's time (C{seconds()}).
    """

    def __init__(
        self,
        config: ClusterConfig,
        run: Callable[[bytes], Deferred[CommandResult]],
        clock: IReactorTime,
        stats: ResolverStats,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._cluster = config.name
        self._command = config.resolver_command
        self._ttl = config.resolve_ttl
        self._run = run
        self._clock = clock
        self._max_entries = max_entries
        self.stats = stats
        #: name -> (expiry time, answer), least recently used first.
        self._cache: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        #: name -> the requests waiting for its run.
        self._running: dict[str, list[Deferred[tuple[IPAddress, ...]]]] = {}
        self._refusal_logged = False

    def resolve(self, name: str) -> Deferred[tuple[IPAddress, ...]]:
        """
        The addresses of C{name} (as the router normalised it: lower case, no
        trailing dot, A-labels) as the proxy node's resolver sees them.

        Fails with L{StreamError}: C{NOT_ALLOWED} when C{resolver_command} is
        off; C{HOST_UNREACHABLE} when the name is not found; C{PROHIBITED}
        when the proxy node refuses to run commands; C{GENERAL} when the
        command fails; and the SSH layer's C{UNAVAILABLE}, C{TIMEOUT} or
        C{OVERLOADED}.  Cancelling the result leaves other requests for the
        name waiting.
        """
        if not self._command:
            return fail(
                StreamError(
                    Reason.NOT_ALLOWED,
                    f"{shown(name, _NAME_SHOWN)}: names are not resolved on the proxy node (resolver_command is off)",
                )
            )
        cached = self._cached(name)
        if cached is not None:
            self.stats.cache_hits += 1
            return fail(cached) if isinstance(cached, StreamError) else succeed(cached)
        waiter: Deferred[tuple[IPAddress, ...]] = Deferred(lambda d: self._forget(name, d))
        waiting = self._running.get(name)
        if waiting is not None:
            self.stats.joined += 1
            waiting.append(waiter)
            return waiter
        self._running[name] = [waiter]
        self.stats.runs += 1
        maybeDeferred(self._run, command_line(self._command, host=name)).addBoth(self._finished, name)
        return waiter

    # -- the cache -----------------------------------------------------------

    def _cached(self, name: str) -> Answer | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        expires, answer = entry
        if self._clock.seconds() >= expires:
            del self._cache[name]
            return None
        self._cache.move_to_end(name)
        return answer

    def _remember(self, name: str, answer: Answer) -> None:
        if isinstance(answer, StreamError):
            if answer.reason in _TRANSIENT:
                return
            ttl = min(self._ttl, NEGATIVE_TTL)
        else:
            ttl = self._ttl
        if ttl <= 0:
            return
        self._cache[name] = (self._clock.seconds() + ttl, answer)
        self._cache.move_to_end(name)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def _forget(self, name: str, waiter: Deferred[tuple[IPAddress, ...]]) -> None:
        """A request was cancelled: the run goes on for the others (and the cache)."""
        waiting = self._running.get(name, [])
        if waiter in waiting:
            waiting.remove(waiter)

    # -- a run's end ---------------------------------------------------------

    def _finished(self, outcome: CommandResult | Failure, name: str) -> None:
        try:
            answer = self._failure(name, outcome) if isinstance(outcome, Failure) else self._answer(name, outcome)
        except Exception:  # a bug here or below: this name's requests fail, nothing else
            log.failure(
                "cluster {cluster}: resolving {name} failed inside the gateway", cluster=self._cluster, name=name
            )
            answer = StreamError(Reason.GENERAL, f"{shown(name, _NAME_SHOWN)}: internal error while resolving")
        if isinstance(answer, StreamError):
            self.stats.failures[answer.reason.value] += 1
        self._remember(name, answer)
        for waiter in self._running.pop(name, []):
            if waiter.called:  # cancelled
                continue
            if isinstance(answer, StreamError):
                waiter.errback(answer)
            else:
                waiter.callback(answer)

    def _answer(self, name: str, result: CommandResult) -> Answer:
        shown_name = shown(name, _NAME_SHOWN)
        if result.signal is None and result.status == 0:
            try:
                return parse_getent_ahosts(result.stdout)
            except ValueError:
                return StreamError(Reason.HOST_UNREACHABLE, f"{shown_name}: the proxy node's resolver gave no address")
        if result.signal is None and result.status == NOT_FOUND_STATUS:
            return StreamError(Reason.HOST_UNREACHABLE, f"{shown_name} not found by the proxy node's resolver")
        # The command's own words (stderr) go to the log only: a client that
        # proved no token learns nothing of the proxy node's set-up.
        problem = result.problem() or f"{result.program} ended without an exit status"
        failed = f"{shown_name}: the proxy node's resolver failed"
        return StreamError(Reason.GENERAL, failed, log_detail=f"{failed}: {problem}")

    def _failure(self, name: str, failure: Failure) -> StreamError:
        error = failure.value
        if not isinstance(error, StreamError):
            failure.raiseException()
        if error.reason is Reason.PROHIBITED:
            refused = StreamError(
                Reason.PROHIBITED, f"names are not resolved on the proxy node: exec refused ({error.detail})"
            )
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warn(
                    "cluster {cluster}: {detail}; names that match no hostnames pattern are refused",
                    cluster=self._cluster,
                    detail=refused.detail,
                )
            return refused
        if error.reason in (Reason.UNAVAILABLE, Reason.OVERLOADED):
            return error  # about the cluster, not the name
        return StreamError(error.reason, f"{shown(name, _NAME_SHOWN)}: {error.detail}")
