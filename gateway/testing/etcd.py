"""
An etcd in memory (L{gateway.store.etcd.client.Etcd}), for tests of the
store and of several gateways sharing it, with the failures a real cluster
has: unreachable, watches cut or silent, revisions compacted away, leases
that expire (on C{clock}) when nobody keeps them alive.

Like etcd, every transaction gets the next revision, and a watch replays
the history from its start revision, then streams; unlike etcd, messages
are delivered through C{clock} (a C{callLater(0, ...)}), so a test decides
when with C{clock.advance}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from gateway.store.etcd.client import EtcdError, EtcdUnavailable, Watch
from gateway.store.etcd.wire import Event, KeyValue, WatchResponse

__all__ = ["MemoryEtcd"]


@dataclass
class _MemoryWatch:
    etcd: MemoryEtcd
    prefix: bytes
    receive: Callable[[WatchResponse], None]
    ended: Deferred[str] = field(default_factory=Deferred)
    #: A silent watch delivers nothing (a member that stopped talking, its connection still open).
    silent: bool = False

    def deliver(self, response: WatchResponse) -> None:
        if not self.ended.called and not self.silent:
            self.etcd.clock.callLater(0, self._deliver, response)

    def _deliver(self, response: WatchResponse) -> None:
        if not self.ended.called:
            self.receive(response)

    def cancel(self) -> None:
        self.end("cancelled")

    def end(self, reason: str) -> None:
        if not self.ended.called:
            self.etcd.watches.remove(self)
            self.ended.callback(reason)


class MemoryEtcd:
    """One etcd cluster's key space, its history and its failures."""

    endpoint = "memory://etcd"

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.revision = 1  # a new etcd is at revision 1
        self.data: dict[bytes, KeyValue] = {}
        #: Every revision's events, for watches that start in the past.
        self.history: list[tuple[int, tuple[Event, ...]]] = []
        self.compacted = 0
        self.unreachable = False
        self.watches: list[_MemoryWatch] = []
        #: Every transaction tried (prefix, seen), for tests that count them.
        self.txns: list[tuple[bytes, int]] = []
        #: Lease id -> (its TTL, the call that ends it).
        self.leases: dict[int, tuple[int, IDelayedCall]] = {}
        #: Whether close() was called (the gateway's stop).
        self.closed = False
        self._lease_ids = itertools.count(0x1000)

    def _refuse(self) -> EtcdUnavailable:
        return EtcdUnavailable(f"{self.endpoint}: connection refused")

    def _under(self, prefix: bytes) -> list[KeyValue]:
        return [kv for key, kv in sorted(self.data.items()) if key.startswith(prefix)]

    # --- Etcd ---------------------------------------------------------------------------

    def range(self, prefix: bytes) -> Deferred[tuple[int, list[KeyValue]]]:
        if self.unreachable:
            return fail(self._refuse())
        return succeed((self.revision, self._under(prefix)))

    def newest(self, prefix: bytes) -> Deferred[int]:
        if self.unreachable:
            return fail(self._refuse())
        return succeed(max((kv.mod_revision for kv in self._under(prefix)), default=0))

    def txn(
        self, prefix: bytes, seen: int, puts: Mapping[bytes, bytes], deletes: Sequence[bytes]
    ) -> Deferred[tuple[bool, int]]:
        if self.unreachable:
            return fail(self._refuse())
        self.txns.append((prefix, seen))
        newest = max((kv.mod_revision for kv in self._under(prefix)), default=0)
        if newest > seen:
            return succeed((False, newest))
        return succeed((True, self.write(puts, deletes)))

    def watch(self, prefix: bytes, start_revision: int, receive: Callable[[WatchResponse], None]) -> Deferred[Watch]:
        if self.unreachable:
            return fail(self._refuse())
        watch = _MemoryWatch(self, prefix, receive)
        self.watches.append(watch)
        if start_revision <= self.compacted:
            watch.deliver(WatchResponse(self.revision, canceled=True, compact_revision=self.compacted))
            return succeed(watch)
        watch.deliver(WatchResponse(self.revision, created=True))
        for revision, events in self.history:
            if revision >= start_revision:
                self._send(watch, revision, events)
        return succeed(watch)

    def get(self, key: bytes) -> Deferred[KeyValue | None]:
        if self.unreachable:
            return fail(self._refuse())
        return succeed(self.data.get(key))

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[int]:
        if self.unreachable:
            return fail(self._refuse())
        if lease and lease not in self.leases:
            return fail(EtcdError(f"{self.endpoint}: etcdserver: requested lease not found"))
        return succeed(self.write({key: value}, lease=lease))

    def grant(self, ttl: int) -> Deferred[int]:
        if self.unreachable:
            return fail(self._refuse())
        lease = next(self._lease_ids)
        self.leases[lease] = (ttl, self.clock.callLater(ttl, self._expire, lease))
        return succeed(lease)

    def keepalive(self, lease: int) -> Deferred[int]:
        if self.unreachable:
            return fail(self._refuse())
        if lease not in self.leases:
            return succeed(0)
        ttl, call = self.leases[lease]
        call.reset(ttl)
        return succeed(ttl)

    def revoke(self, lease: int) -> Deferred[None]:
        if self.unreachable:
            return fail(self._refuse())
        if lease in self.leases:
            self.leases[lease][1].cancel()
            self._expire(lease)
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def _expire(self, lease: int) -> None:
        del self.leases[lease]
        keys = [key for key, kv in self.data.items() if kv.lease == lease]
        if keys:
            self.write({}, keys)

    # --- what etcdctl and failures do ---------------------------------------------------

    def write(self, puts: Mapping[bytes, bytes], deletes: Sequence[bytes] = (), lease: int = 0) -> int:
        """One revision's puts (bound to C{lease}) and deletions, as C{etcdctl txn} would: its revision."""
        self.revision += 1
        events = []
        for key, value in puts.items():
            kv = KeyValue(key, value, self.revision, lease)
            self.data[key] = kv
            events.append(Event(False, kv))
        for key in deletes:
            if self.data.pop(key, None) is not None:
                events.append(Event(True, KeyValue(key, b"", self.revision)))
        if events:
            self.history.append((self.revision, tuple(events)))
            for watch in list(self.watches):
                self._send(watch, self.revision, tuple(events))
        return self.revision

    def _send(self, watch: _MemoryWatch, revision: int, events: tuple[Event, ...]) -> None:
        mine = tuple(e for e in events if e.kv.key.startswith(watch.prefix))
        if mine:
            watch.deliver(WatchResponse(revision, mine))

    def compact(self, revision: int) -> None:
        """Forget the history up to C{revision}; watches that still need it are cancelled, as etcd does."""
        self.compacted = revision
        self.history = [(r, events) for r, events in self.history if r > revision]

    def go_down(self) -> None:
        """Every member unreachable: calls refused, watches cut."""
        self.unreachable = True
        self.cut_watches("connection lost")

    def come_back(self) -> None:
        self.unreachable = False

    def cut_watches(self, reason: str = "the stream ended (member lost)") -> None:
        for watch in list(self.watches):
            watch.end(reason)

    def silence_watches(self) -> None:
        for watch in self.watches:
            watch.silent = True
