"""
Tests for L{gateway.store.etcd.store}: the etcd backend's sync, watch,
resume, writes and cache, over L{gateway.testing.etcd.MemoryEtcd} and a
fake clock.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from gateway.store.base import StoreConflict, StoreUnavailable
from gateway.store.etcd.client import EtcdUnavailable
from gateway.store.etcd.store import RETRY_DELAYS, EtcdStore
from gateway.store.etcd.wire import WatchResponse
from gateway.store.sealing import Sealer
from gateway.store.statefile import StateFile
from gateway.testing.etcd import MemoryEtcd
from tests.support import capture_events

PREFIX = b"/gw/"


def key(name: str) -> bytes:
    return PREFIX + b"clusters/" + name.encode()


def value(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


class Gateway:
    """What a store applies changes to: a registry of bodies, refusing some names."""

    def __init__(self) -> None:
        self.clusters: dict[str, Any] = {}
        self.changes: list[tuple[str, Any]] = []
        self.refuse: dict[str, str] = {}

    def sink(self, name: str, body: Any) -> Deferred[str | None]:
        self.changes.append((name, body))
        if body is None:
            self.clusters.pop(name, None)
            return succeed(None)
        if name in self.refuse:
            self.clusters.pop(name, None)
            return succeed(self.refuse[name])
        self.clusters[name] = body
        return succeed(None)


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.etcd = MemoryEtcd(self.clock)

    def store(self, **kw: Any) -> tuple[EtcdStore, Gateway]:
        gateway = Gateway()
        kw.setdefault("sealer", None)
        kw.setdefault("cache", None)
        store = EtcdStore(self.etcd, self.clock, prefix=PREFIX.decode(), gateway="gw-a", **kw)
        store.attach(gateway.sink)
        store.startService()
        self.addCleanup(store.stopService)
        self.clock.advance(0)
        return store, gateway

    def settle(self) -> None:
        for _ in range(5):
            self.clock.advance(0)

    def write(self, store: EtcdStore, name: str, body: Any) -> None:
        """A write as the control API makes it: under the lock."""
        store.lock.acquire()
        try:
            d = store.delete(name) if body is None else store.put(name, body)
            self.successResultOf(d)
        finally:
            store.lock.release()


class SyncTests(StoreTestCase):
    def test_reads_the_registry_then_follows_it(self) -> None:
        self.etcd.write({key("a"): value({"user": "u"}), PREFIX + b"meta/x": b"{}"})
        store, gateway = self.store()
        self.assertEqual(gateway.clusters, {"a": {"user": "u"}})
        self.assertEqual(store.state, "synced")
        self.assertEqual(store.not_ready(), [])
        self.etcd.write({key("b"): value({"user": "v"})})
        self.etcd.write({}, [key("a")])
        self.settle()
        self.assertEqual(gateway.clusters, {"b": {"user": "v"}})
        self.assertEqual(store.revision, self.etcd.revision)

    def test_not_ready_until_read(self) -> None:
        self.etcd.go_down()
        store, _ = self.store()
        self.assertEqual(store.state, "degraded")
        self.assertIn("store: the registry is not read yet", store.not_ready()[0])
        self.etcd.come_back()
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        self.assertEqual(store.not_ready(), [])

    def test_a_cache_is_served_while_etcd_is_down(self) -> None:
        self.etcd.go_down()
        store, gateway = self.store(bodies={"a": {"user": "u"}})
        self.assertEqual(store.not_ready(), [])
        self.assertEqual(store.status()["state"], "degraded")
        self.assertEqual(gateway.changes, [])  # the cache was applied at start-up, not again
        self.etcd.come_back()
        self.etcd.write({key("b"): value({"user": "v"})})
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        # a was not in etcd: removed; b was: added.
        self.assertEqual(gateway.changes, [("a", None), ("b", {"user": "v"})])

    def test_the_same_body_is_not_applied_again(self) -> None:
        self.etcd.write({key("a"): value({"user": "u"})})
        store, gateway = self.store(bodies={"a": {"user": "u"}})
        self.assertEqual(gateway.changes, [])

    def test_refused_clusters_are_reported(self) -> None:
        self.etcd.write({key("a"): value({"user": "u"}), key("bad"): b"not json"})
        gateway_refuses = {"a": "socks[0]: port in use"}
        store = EtcdStore(self.etcd, self.clock, prefix="/gw/", gateway="g", sealer=None, cache=None)
        gateway = Gateway()
        gateway.refuse = gateway_refuses
        store.attach(gateway.sink)
        store.startService()
        self.addCleanup(store.stopService)
        self.assertEqual(
            store.status()["rejected"], {"a": "socks[0]: port in use", "bad": "its value in etcd is not JSON"}
        )
        self.assertEqual(gateway.clusters, {})


class WatchTests(StoreTestCase):
    def test_a_cut_watch_resumes_without_gaps_or_repeats(self) -> None:
        store, gateway = self.store()
        self.etcd.write({key("a"): value({"n": 1})})
        self.settle()
        self.etcd.cut_watches()
        # Changed while no watch runs:
        self.etcd.write({key("a"): value({"n": 2})})
        self.etcd.write({key("b"): value({"n": 3})})
        self.clock.advance(RETRY_DELAYS[0])  # a watch that ended at once waits before the next
        self.settle()
        self.assertEqual(gateway.changes, [("a", {"n": 1}), ("a", {"n": 2}), ("b", {"n": 3})])

    def test_events_at_or_below_the_applied_revision_are_skipped(self) -> None:
        store, gateway = self.store()
        self.etcd.write({key("a"): value({"n": 1})})
        self.settle()
        self.etcd.cut_watches()
        watch = self.etcd.watch
        # A watch that starts too early (a member's history): the replay repeats revision 2.
        self.patch(self.etcd, "watch", lambda prefix, start, receive: watch(prefix, 1, receive))
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        self.assertEqual(gateway.changes, [("a", {"n": 1})])

    def test_one_revision_applies_every_event_it_holds(self) -> None:
        store, gateway = self.store()
        self.etcd.write({key("a"): value({"n": 1}), key("b"): value({"n": 2})})
        self.settle()
        self.assertEqual(gateway.clusters, {"a": {"n": 1}, "b": {"n": 2}})

    def test_a_deletion_outside_the_gateways_is_applied_after_a_write(self) -> None:
        """
        C{etcdctl del} touches no key a transaction compares: a write through
        this gateway succeeds before the deletion has arrived here, and the
        deletion must still be applied when it does.
        """
        store, gateway = self.store()
        self.etcd.write({key("a"): value({"n": 1})})
        self.settle()
        self.etcd.write({}, [key("a")])  # etcdctl del, still on its way
        self.write(store, "b", {"n": 2})
        self.settle()
        self.assertEqual(gateway.clusters, {})  # a gone; b is the writer's own (applied by the registry)
        self.assertEqual(store.bodies, {"b": {"n": 2}})
        self.assertEqual(gateway.changes, [("a", {"n": 1}), ("a", None)])
        self.assertEqual(store.revision, self.etcd.revision)
        self.write(store, "c", {"n": 3})  # the next write is on what this one wrote: no conflict
        self.assertEqual(set(store.bodies), {"b", "c"})

    def test_a_lease_ended_before_a_write_is_applied_too(self) -> None:
        """The same for another gateway's member key: its lease's end (revoked, expired) touches nothing else either."""
        store, _ = self.store()
        lease = self.successResultOf(self.etcd.grant(10))
        self.successResultOf(self.etcd.put(PREFIX + b"members/gw-x", b"{}", lease))
        self.settle()
        self.assertEqual(sorted(store.members), ["gw-x"])
        self.successResultOf(self.etcd.revoke(lease))  # gw-x stopped: its key goes, on its way here
        self.write(store, "b", {"n": 2})
        self.settle()
        self.assertEqual(store.members, {})

    def test_a_resync_read_before_a_write_of_this_gateway_is_read_again(self) -> None:
        """
        A resync's range that etcd answered before this gateway's own write
        was made must not be applied after it: it would undo the write here.
        """
        store, gateway = self.store()
        self.etcd.write({key("a"): value({"n": 1})})
        self.settle()
        read = self.etcd.range
        answers: list[tuple[Deferred[Any], Any]] = []

        def held(prefix: bytes) -> Deferred[Any]:
            answers.append((Deferred(), self.successResultOf(read(prefix))))
            return answers[-1][0]

        self.patch(self.etcd, "range", held)
        self.etcd.cut_watches()
        self.etcd.write({b"/other/x": b"1"})  # another prefix: nothing for this registry to catch up on
        self.etcd.compact(self.etcd.revision)
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()  # the watch is refused as compacted: a resync reads the prefix
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        [(pending, answer)] = answers
        self.write(store, "b", {"n": 2})  # meanwhile, through this gateway's API
        pending.callback(answer)
        self.settle()
        self.assertEqual(len(answers), 2)
        answers[1][0].callback(answers[1][1])
        self.settle()
        self.assertEqual(store.bodies, {"a": {"n": 1}, "b": {"n": 2}})
        self.assertNotIn(("b", None), gateway.changes)
        self.assertEqual(store.revision, self.etcd.revision)

    def test_a_registry_older_than_the_one_served_is_taken_as_it_is(self) -> None:
        """
        etcd restored from a snapshot (or another cluster at the same
        endpoints) answers a revision below the one applied here: the read
        is not refused for ever (a loop of ranges), the registry it holds is
        what is served, and the watch goes on from it.
        """
        store, gateway = self.store()
        for n in range(5):
            self.etcd.write({key(f"c{n}"): value({"n": n})})
        self.settle()
        # Restored from the snapshot taken at revision 3:
        self.etcd.data = {k: kv for k, kv in self.etcd.data.items() if kv.mod_revision <= 3}
        self.etcd.history = [(r, events) for r, events in self.etcd.history if r <= 3]
        self.etcd.revision = 3
        read = self.etcd.range
        reads: list[int] = []

        def counted(prefix: bytes) -> Deferred[Any]:
            reads.append(1)
            if len(reads) > 20:
                raise AssertionError("read again and again")
            return read(prefix)

        self.patch(self.etcd, "range", counted)
        for watch in list(self.etcd.watches):  # a resync (say, the watch's revision compacted meanwhile)
            watch.deliver(WatchResponse(3, canceled=True, compact_revision=3))
        self.settle()
        self.assertEqual(len(reads), 3)
        self.assertEqual(sorted(gateway.clusters), ["c0", "c1"])
        self.assertEqual(store.revision, 3)
        self.etcd.write({key("c9"): value({"n": 9})})
        self.settle()
        self.assertEqual(sorted(gateway.clusters), ["c0", "c1", "c9"])

    def test_compaction_reads_everything_again(self) -> None:
        store, gateway = self.store()
        self.etcd.write({key("a"): value({"n": 1}), key("b"): value({"n": 2})})
        self.settle()
        self.etcd.cut_watches()
        self.etcd.write({}, [key("a")])
        self.etcd.write({key("c"): value({"n": 3})})
        self.etcd.compact(self.etcd.revision)
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()  # the watch is cancelled as compacted
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        self.assertEqual(gateway.clusters, {"b": {"n": 2}, "c": {"n": 3}})
        self.assertEqual(store.revision, self.etcd.revision)
        self.assertEqual(gateway.changes.count(("b", {"n": 2})), 1)

    def test_a_catch_up_too_big_to_read_reads_everything_again(self) -> None:
        """
        A watch resumed from an old revision gets every change since in one
        message; over the decoder's limit (big bodies), replaying from the
        same revision would meet it again, for ever: read the prefix instead.
        """
        store, gateway = self.store()
        self.etcd.cut_watches()
        for n in range(12):
            self.etcd.write({key(f"c{n}"): value({"n": n})})
        watch = self.etcd.watch
        behind = self.etcd.revision

        def too_big(prefix: bytes, start: int, receive: Any) -> Deferred[Any]:
            if start >= behind:
                return watch(prefix, start, receive)
            opened = self.successResultOf(watch(prefix, self.etcd.revision + 1, receive))
            reason = "a watch message over 16777216 bytes"
            opened.deliver(WatchResponse(0, canceled=True, reason=reason, unreadable=True))
            return succeed(opened)

        self.patch(self.etcd, "watch", too_big)
        for delay in RETRY_DELAYS[:3]:
            self.clock.advance(delay)
            self.settle()
        self.assertEqual(len(gateway.clusters), 12)
        self.assertEqual(store.revision, self.etcd.revision)
        self.assertEqual(store.state, "synced")

    def test_a_silent_watch_is_restarted_by_the_probe(self) -> None:
        store, gateway = self.store(probe_interval=1.0)
        self.etcd.silence_watches()
        self.etcd.write({key("a"): value({"n": 1})})
        self.settle()
        self.assertEqual(gateway.clusters, {})
        self.clock.advance(1.0)
        self.clock.advance(1.0)  # two probes saw the registry ahead: the watch restarts
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        self.assertEqual(gateway.clusters, {"a": {"n": 1}})

    def test_unreachable_then_back(self) -> None:
        store, gateway = self.store()
        self.etcd.go_down()
        self.settle()
        self.clock.advance(1.0)  # the probe
        self.assertEqual(store.state, "degraded")
        self.assertIn("connection refused", store.status()["last_error"])
        # Written meanwhile with etcdctl (once etcd is back, before this gateway retried):
        self.etcd.come_back()
        self.etcd.write({key("x"): value({"n": 9})})
        self.clock.advance(max(RETRY_DELAYS))
        self.settle()
        self.assertEqual(store.state, "synced")
        self.assertEqual(gateway.clusters, {"x": {"n": 9}})

    def test_a_stop_while_a_watch_connects_is_quiet(self) -> None:
        """
        Cancelling a connection attempt fails with ConnectingCancelledError,
        no CancelledError: a stop while the watch connects is no
        "unexpected error" (a critical line and a traceback at every stop).
        """
        store, _ = self.store()
        self.etcd.cut_watches()
        connecting: Deferred[Any] = Deferred(lambda d: d.errback(ConnectingCancelledError(None)))
        self.patch(self.etcd, "watch", lambda prefix, start, receive: connecting)
        self.clock.advance(RETRY_DELAYS[0])
        events = capture_events(self)
        store.stopService()
        self.assertEqual([e for e in events if e["log_level"] in (LogLevel.critical, LogLevel.error)], [])
        self.assertEqual(store.state, "synced")

    def test_a_probe_that_fails_after_a_resync_is_older_news(self) -> None:
        """
        A probe asked while etcd was away (a member that accepts and does
        not answer yet) fails after the store has synced again: the store
        stays synced and its new watch is not cut (seen under load in
        test_etcd_fleet's etcd gone-and-back: "degraded" right after both
        gateways had served the change made meanwhile).
        """
        store, gateway = self.store(probe_interval=1.0)
        self.etcd.go_down()
        self.clock.advance(1.0)  # a probe sees it: degraded
        self.assertEqual(store.state, "degraded")
        asked: Deferred[int] = Deferred()
        self.patch(self.etcd, "newest", lambda prefix: asked)
        self.clock.advance(1.0)  # the next probe waits for a member
        self.etcd.come_back()
        self.etcd.write({key("a"): value({"n": 1})})
        self.clock.advance(max(RETRY_DELAYS))
        self.settle()
        self.assertEqual((store.state, gateway.clusters), ("synced", {"a": {"n": 1}}))
        watches = list(self.etcd.watches)
        asked.errback(EtcdUnavailable("memory://etcd: no answer within 2 s"))
        self.assertEqual(store.state, "synced")
        self.assertEqual(self.etcd.watches, watches)

    def test_retries_back_off_and_stop_with_the_service(self) -> None:
        self.etcd.go_down()
        store, _ = self.store()
        tries = len(self.clock.getDelayedCalls())
        for delay in RETRY_DELAYS:
            self.clock.advance(delay)
        self.assertEqual(store.state, "degraded")
        store.stopService()
        self.clock.advance(max(RETRY_DELAYS))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertGreater(tries, 0)


class WriteTests(StoreTestCase):
    def test_a_write_is_a_transaction_on_the_applied_revision(self) -> None:
        store, gateway = self.store()
        self.write(store, "a", {"user": "u"})
        self.assertEqual(self.etcd.txns, [(PREFIX, 1)])
        self.assertEqual(store.bodies, {"a": {"user": "u"}})
        self.settle()
        self.assertEqual(gateway.changes, [])  # the writer applies its own change; the watch skips it
        self.assertEqual(store.revision, self.etcd.revision)
        self.write(store, "a", None)
        self.assertNotIn(key("a"), self.etcd.data)
        self.assertIn(PREFIX + b"meta/last-write", self.etcd.data)

    def test_a_concurrent_change_is_a_conflict(self) -> None:
        store, gateway = self.store()
        self.etcd.cut_watches()
        other = self.etcd.write({key("b"): value({"n": 1})})
        store.lock.acquire()
        failure = self.failureResultOf(store.put("a", {"n": 2}), StoreConflict)
        store.lock.release()
        self.assertEqual(failure.value.newest, other)
        waiting = store.caught_up(other)
        self.assertNoResult(waiting)
        self.clock.advance(RETRY_DELAYS[0])
        self.settle()
        self.successResultOf(waiting)
        self.write(store, "a", {"n": 2})
        self.assertEqual(set(store.bodies), {"a", "b"})

    def test_a_deletion_elsewhere_is_a_conflict_too(self) -> None:
        one, _ = self.store()
        two, _ = self.store()
        self.write(one, "a", {"n": 1})
        self.settle()
        self.write(one, "a", None)  # changes no key that stays: meta/last-write does
        two.lock.acquire()
        self.failureResultOf(two.put("b", {"n": 2}), StoreConflict)
        two.lock.release()

    def test_unreachable_writes_are_refused_with_the_reason(self) -> None:
        store, _ = self.store()
        self.etcd.go_down()
        store.lock.acquire()
        failure = self.failureResultOf(store.put("a", {"n": 1}), StoreUnavailable)
        store.lock.release()
        self.assertIn("connection refused", str(failure.value))
        self.assertIn("keeps serving the registry as of revision 1", str(failure.value))

    def test_no_write_before_the_first_read(self) -> None:
        self.etcd.go_down()
        store, _ = self.store(bodies={"a": {}})
        self.etcd.come_back()
        store.lock.acquire()
        failure = self.failureResultOf(store.put("b", {}), StoreUnavailable)
        store.lock.release()
        self.assertIn("not synced with etcd yet", str(failure.value))
        self.assertEqual(self.etcd.txns, [])


class SealingTests(StoreTestCase):
    def test_secrets_never_reach_etcd_in_plaintext(self) -> None:
        store, _ = self.store(sealer=Sealer(b"k" * 32))
        self.write(store, "a", {"key": "-----BEGIN OPENSSH PRIVATE KEY-----", "token": "t0ken", "user": "u"})
        raw = self.etcd.data[key("a")].value
        self.assertNotIn(b"BEGIN", raw)
        self.assertNotIn(b"t0ken", raw)
        self.assertIn(b"sealed:v1:", raw)
        self.assertEqual(store.bodies["a"]["token"], "t0ken")

    def test_another_key_stops_the_first_sync(self) -> None:
        writer, _ = self.store(sealer=Sealer(b"k" * 32))
        self.write(writer, "a", {"token": "t0ken"})
        reasons: list[str] = []
        reader, gateway = self.store(sealer=Sealer(b"j" * 32), on_fatal=reasons.append)
        self.assertEqual(len(reasons), 1)
        self.assertIn("etcd holds secrets this gateway cannot open (a: ", reasons[0])
        self.assertNotIn("t0ken", reasons[0])
        self.assertIn("a", reader.rejected)
        self.assertEqual(gateway.clusters, {})

    def test_sealed_values_without_a_key_are_refused(self) -> None:
        writer, _ = self.store(sealer=Sealer(b"k" * 32))
        self.write(writer, "a", {"token": "t0ken"})
        reader, gateway = self.store()
        self.assertIn("set [store] secret_key_file", reader.rejected["a"])


class CacheTests(StoreTestCase):
    def test_every_applied_revision_reaches_the_cache(self) -> None:
        path = os.path.join(self.mktemp(), "cache.json")
        cache = StateFile(path, Sealer(b"k" * 32))
        store, _ = self.store(cache=cache)
        self.etcd.write({key("a"): value({"token": "t0ken"})})
        self.settle()
        self.clock.advance(1)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            self.assertNotIn(b"t0ken", f.read())
        again = StateFile(path, Sealer(b"k" * 32))
        self.assertEqual(again.load(), {"a": {"token": "t0ken"}})
        self.assertEqual(again.revision, self.etcd.revision)

    def test_a_cluster_refused_here_is_not_cached(self) -> None:
        """
        A start from the cache binds each cached cluster's ports, and one
        that cannot stops the start: a cluster refused for its port taken on
        this host, cached, would stop every later start of this gateway.
        """
        path = os.path.join(self.mktemp(), "cache.json")
        store, gateway = self.store(cache=StateFile(path))
        gateway.refuse["a"] = "socks: cannot listen on 'tcp:2100': Address already in use"
        self.etcd.write({key("a"): value({"n": 1}), key("b"): value({"n": 2})})
        self.settle()
        self.clock.advance(1)
        self.assertEqual(StateFile(path).load(), {"b": {"n": 2}})
        self.assertIn("a", store.rejected)

    def test_a_name_the_api_refuses_is_refused_and_logged_quoted(self) -> None:
        """A key written with etcdctl may hold any name: one with a newline must not forge a log line."""
        store, gateway = self.store()
        events = capture_events(self)
        forged = "x\n2026-12-01T00:00:00+0000 [gateway.app#critical] forged"
        self.etcd.write({key(forged): value({"n": 1}), key("a/b"): value({"n": 2})})
        self.settle()
        self.assertEqual(gateway.clusters, {})  # the sink is only told not to serve them
        self.assertEqual(sorted(store.rejected), ["a/b", forged])
        self.assertIn("its name is invalid", store.rejected["a/b"])
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(lines), 2)
        self.assertNotIn("\n", "".join(lines))

    def test_deeply_nested_values_are_refused_not_raised(self) -> None:
        store, gateway = self.store()
        self.etcd.write({key("deep"): b"[" * 100000 + b"]" * 100000, key("ok"): value({"n": 1})})
        self.settle()
        self.assertEqual(gateway.clusters, {"ok": {"n": 1}})
        self.assertEqual(store.rejected, {"deep": "its value in etcd is not JSON"})

    def test_sealed_values_without_a_key_stop_the_first_sync(self) -> None:
        writer, _ = self.store(sealer=Sealer(b"k" * 32))
        self.write(writer, "a", {"token": "t0ken"})
        reasons: list[str] = []
        self.store(on_fatal=reasons.append)
        self.assertEqual(len(reasons), 1)
        self.assertIn("set [store] secret_key_file", reasons[0])

    def test_what_is_served_while_etcd_is_away(self) -> None:
        self.etcd.go_down()
        cached, _ = self.store(bodies={"a": {}})
        cached.lock.acquire()
        failure = self.failureResultOf(cached.put("b", {}), StoreUnavailable)
        cached.lock.release()
        self.assertIn("keeps serving the registry of its local cache", str(failure.value))
        empty, _ = self.store()
        self.assertEqual(empty._served(), "no API cluster (it has not read the registry yet)")


class EmptiedCacheTests(StoreTestCase):
    def test_an_empty_etcd_keeps_the_cache_aside(self) -> None:
        path = os.path.join(self.mktemp(), "cache.json")
        cache = StateFile(path, Sealer(b"k" * 32))
        cache.save({"a": {"token": "t0ken"}}, revision=7)
        events = capture_events(self)
        store, gateway = self.store(cache=cache, bodies={"a": {"token": "t0ken"}})
        self.assertEqual(gateway.changes, [("a", None)])
        kept = StateFile(path + ".before-empty", Sealer(b"k" * 32))
        self.assertEqual(kept.load(), {"a": {"token": "t0ken"}})
        self.assertEqual(stat.S_IMODE(os.stat(kept.path).st_mode), 0o600)
        warnings = [e["log_format"] for e in events if "holds no cluster" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_not_when_etcd_has_clusters(self) -> None:
        path = os.path.join(self.mktemp(), "cache.json")
        cache = StateFile(path)
        self.etcd.write({key("b"): value({"n": 1})})
        self.store(cache=cache, bodies={"a": {}})
        self.assertFalse(os.path.exists(path + ".before-empty"))
