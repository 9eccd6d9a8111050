"""
The etcd backend: one registry shared by a fleet of gateways.

Layout under C{prefix} (default C{/gateway/})::

    PREFIX clusters/NAME   the cluster's body, JSON, its secrets sealed with [store] secret_key_file
    PREFIX meta/last-write which gateway wrote last (every write touches it: see below)
    PREFIX members/NAME    a live gateway of the fleet, bound to its lease (L{gateway.store.etcd.members})

Reading: at start and after a compaction, the whole prefix is read (one
range) and the difference to what this gateway serves is applied; then a
watch from the next revision streams every change.  A watch that ends (a
member gone, a leader lost) is started again from the revision after the
last one applied, on the next member; one whose revision was compacted
away, or whose catch-up cannot be read (one message over the decoder's
limit: every change since, big bodies), reads the whole prefix again.  Every change carries its revision, and
one at or below the last applied is skipped: nothing is applied twice, and
nothing between is missed.  A probe (the newest revision under the prefix,
a linearizable read) runs every C{probe_interval} seconds: it says whether
etcd is reachable, and restarts a watch that has fallen silent while the
registry moved on.

Writing: a write is one transaction that succeeds only if no key under the
prefix changed after the revision this gateway last applied, so the body
was checked against the registry it lands in.  Deletions change no key that
stays, hence C{meta/last-write}, written by every transaction: a deletion
through one gateway makes a concurrent write through another conflict.  The
loser waits until its watch has applied the winner's change, checks again,
and tries again (L{gateway.control.registry}).  A deletion made with
C{etcdctl} touches no C{meta/last-write}, so a write may succeed before it
has arrived here: a write's revision counts as applied only when it is the
next one; else the watch brings the revisions between (and skips the write).

etcd is not on the data path: while it is unreachable the gateway serves
the last registry it applied, answers writes with 503, and keeps trying.
Each applied change is also written to a 0600 local cache file, from which a
gateway starts when etcd is down at its start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from gateway.config import NAME_RULE, is_valid_name
from gateway.config.values import show
from gateway.store.base import Body, Sink, StoreConflict, StoreUnavailable
from gateway.store.etcd.client import Etcd, EtcdError, EtcdUnavailable, Watch
from gateway.store.etcd.members import MEMBERS
from gateway.store.etcd.wire import EtcdProtocolError, Event, KeyValue, WatchResponse
from gateway.store.sealing import Sealer, SealError, is_sealed
from gateway.store.statefile import StateFile, StoreError

__all__ = ["EtcdStore"]

log = Logger()

_CLUSTERS = "clusters/"
_LAST_WRITE = "meta/last-write"
#: Seconds between attempts while etcd is unreachable: from the first to the last.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
#: A watch that ends sooner than this many seconds counts as a failure (no busy loop).
MIN_WATCH = 1.0
#: Seconds the local cache may lag behind the registry (a burst of changes is written once).
CACHE_DELAY = 0.2
#: Reads of the whole prefix before one behind this gateway's own writes is taken as etcd's truth.
SYNC_READS = 3


def _failure_text(error: Exception) -> str:
    return str(error) or type(error).__name__


class EtcdStore(Service):
    """
    L{gateway.store.base.Store} on etcd (see the module).

    @param cache: the local cache; C{bodies} and its C{revision} as it was read at start-up.
    @param on_fatal: called once if the registry holds secrets sealed with
        another key at the first sync: this gateway cannot serve the fleet's
        clusters and must not start as if it could.
    """

    backend = "etcd"

    def __init__(
        self,
        etcd: Etcd,
        clock: IReactorTime,
        *,
        prefix: str,
        gateway: str,
        sealer: Sealer | None,
        cache: StateFile | None,
        bodies: Mapping[str, Body] | None = None,
        probe_interval: float = 1.0,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._etcd = etcd
        self._clock = clock
        self._prefix = prefix.encode("utf-8")
        self._gateway = gateway
        self._sealer = sealer
        self._cache = cache
        self._probe_interval = probe_interval
        self._on_fatal = on_fatal
        self.lock = DeferredLock()
        self.bodies: dict[str, Body] = dict(bodies or {})
        #: Every change up to this revision is applied (0: never synced; the
        #: cache's revision is not trusted for writes: etcd may have moved on).
        self.revision = 0
        #: This gateway's own writes the watch has not brought back yet (see
        #: L{_write}): skipped when it does, unlike the revisions between.
        self._written: set[int] = set()
        #: "starting" (nothing read yet), "synced", or "degraded" (etcd unreachable).
        self.state = "starting"
        self.last_error: str | None = None
        #: Clusters in the registry this gateway does not serve, with why.
        self.rejected: dict[str, str] = {}
        #: The fleet's live gateways (L{gateway.store.etcd.members}), by name: what each says of itself.
        self.members: dict[str, Mapping[str, Any]] = {}
        self._sink: Sink | None = None
        self._loaded = bodies is not None
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._queue: list[WatchResponse] = []
        self._draining: Deferred[None] | None = None
        self._watch: Watch | None = None
        #: Why the whole prefix is to be read (None: the watch resumes): "start", "compacted" or "unreadable".
        self._resync: str | None = "start"
        self._stale_probes = 0
        self._probe = LoopingCall(self._check)
        self._probe.clock = clock
        self._cache_call: IDelayedCall | None = None
        self._running: Deferred[None] | None = None

    # --- the Store interface ------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        self._sink = sink

    def put(self, name: str, body: Body) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write(name, body))

    def delete(self, name: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write(name, None))

    def caught_up(self, revision: int) -> Deferred[None]:
        if revision <= self.revision:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove((revision, d)))
        self._waiters.append((revision, d))
        return d

    def status(self) -> dict[str, Any]:
        return {
            "backend": "etcd",
            "state": self.state,
            "synced": self.state == "synced",
            "endpoint": self._etcd.endpoint,
            "revision": self.revision,
            "last_error": self.last_error,
            "cache": self._cache.path if self._cache else None,
            "rejected": dict(self.rejected),
            "members": sorted(self.members),
        }

    def not_ready(self) -> list[str]:
        if self._loaded:
            return []
        return [f"store: the registry is not read yet (etcd: {self.last_error or 'connecting'})"]

    # --- keys and values ----------------------------------------------------------------

    def _key(self, name: str) -> bytes:
        return self._prefix + (_CLUSTERS + name).encode("utf-8")

    def _name(self, key: bytes) -> str | None:
        """The cluster a key holds, or None for the store's other keys."""
        head = self._prefix + _CLUSTERS.encode()
        if not key.startswith(head):
            return None
        try:
            return key[len(head) :].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _note_member(self, kv: KeyValue, deleted: bool) -> None:
        """Follow the fleet's member keys (any other key that is not a cluster's is ignored)."""
        head = self._prefix + MEMBERS.encode()
        if not kv.key.startswith(head):
            return
        name = kv.key[len(head) :].decode("utf-8", "replace")
        if deleted:
            self.members.pop(name, None)
            return
        try:
            info = json.loads(kv.value)
        except (UnicodeDecodeError, ValueError, RecursionError):
            info = {}
        self.members[name] = info if isinstance(info, dict) else {}

    def _encode(self, name: str, body: Body) -> bytes:
        if self._sealer is not None:
            body = self._sealer.seal_body(name, body)
        return json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8")

    def _decode(self, name: str, value: bytes) -> Body:
        """The body of a value; ValueError saying why it cannot be served (never its content)."""
        if not is_valid_name(name):  # written with etcdctl: the API takes no such name
            raise ValueError(f"its name is invalid: {NAME_RULE}")
        try:
            body = json.loads(value)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError("its value in etcd is not JSON") from None
        if not isinstance(body, dict):
            raise ValueError("its value in etcd is not a JSON object")
        if self._sealer is None:
            if any(is_sealed(v) for v in body.values()):
                raise _Sealed("its secrets are sealed: set [store] secret_key_file to the key that sealed them")
            return body
        try:
            return self._sealer.open_body(name, body)
        except SealError as e:
            raise _Sealed(str(e)) from None

    # --- writing ------------------------------------------------------------------------

    async def _write(self, name: str, body: Body | None) -> None:
        """Under the lock (the caller holds it): one transaction on the registry as last applied."""
        if self.revision == 0:
            raise StoreUnavailable(self._unavailable(f"not synced with etcd yet ({self.last_error or 'connecting'})"))
        key = self._key(name)
        marker = json.dumps({"gateway": self._gateway, "cluster": name, "at": self._clock.seconds()}).encode()
        puts = {self._prefix + _LAST_WRITE.encode(): marker}
        if body is not None:
            puts[key] = self._encode(name, body)
        try:
            succeeded, revision = await self._etcd.txn(self._prefix, self._seen(), puts, [key] if body is None else [])
        except (EtcdUnavailable, EtcdError, EtcdProtocolError) as e:
            self._degraded(_failure_text(e))
            raise StoreUnavailable(self._unavailable(_failure_text(e))) from None
        if not succeeded:
            raise StoreConflict(revision)
        if body is None:
            self.bodies.pop(name, None)
        else:
            self.bodies[name] = dict(body)
        self.rejected.pop(name, None)
        # A deletion made with etcdctl changes no key the transaction compares:
        # it may lie between the last revision applied and this write, still on
        # its way.  Only when nothing can be between does the write count as
        # applied; else the watch brings it back after what was between.
        if revision == self.revision + 1:
            self._advance(revision)
        else:
            self._written.add(revision)

    def _seen(self) -> int:
        """The newest revision the registry here holds: applied, or this gateway's own write."""
        return max(self._written, default=self.revision)

    def _unavailable(self, why: str) -> str:
        return f"the registry cannot be changed now: {why}; this gateway keeps serving {self._served()}"

    def _served(self) -> str:
        """What this gateway serves while etcd does not answer, for logs and 503s."""
        if self.revision:
            return f"the registry as of revision {self.revision}"
        if self._loaded:
            return "the registry of its local cache"
        return "no API cluster (it has not read the registry yet)"

    # --- reading ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._loaded and self._sink is not None:
            log.info(
                "etcd store: serving the {count} clusters of the local cache {path} until etcd answers",
                count=len(self.bodies),
                path=self._cache.path if self._cache else None,
            )
        self._probe.start(self._probe_interval, now=False)
        self._running = Deferred.fromCoroutine(self._run())

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._probe.running:
            self._probe.stop()
        if self._watch is not None:
            self._watch.cancel()
        if self._cache_call is not None and self._cache_call.active():
            self._cache_call.cancel()
            self._save_cache()
        running, self._running = self._running, None
        if running is not None:
            running.cancel()
            running.addErrback(lambda _: None)
        return None

    async def _run(self) -> None:
        """Sync, watch, and again, for as long as the service runs."""
        failures = 0
        while self.running:
            started = self._clock.seconds()
            try:
                if self._resync:
                    await self._sync()
                await self._watch_once()
            except (EtcdUnavailable, EtcdError, EtcdProtocolError) as e:
                self._degraded(_failure_text(e))
            except CancelledError:
                raise  # stopService
            except Exception:
                if not self.running:
                    return  # stopService cancelled a call (a connection attempt fails with its own error)
                # A bug must not end the following of the registry for good.
                log.failure("etcd store: unexpected error (trying again)")
                self._degraded("unexpected error (see the log)")
            else:
                # A compacted start revision is no failure: read everything at once.
                if self._resync == "compacted" or self._clock.seconds() - started >= MIN_WATCH:
                    failures = 0
                    continue
            # Unreachable, or a watch that ended at once: wait, longer each time.
            await deferLater(self._clock, RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
            failures += 1

    async def _sync(self) -> None:
        """Read the whole prefix and apply what differs from what is served here."""
        for attempt in range(1, SYNC_READS + 1):
            revision, kvs = await self._etcd.range(self._prefix)
            await self.lock.acquire()
            try:
                # A write of this gateway's that etcd made after the read is
                # not in it: applying it would undo that write here.  An etcd
                # that stays behind went back itself (restored from a snapshot,
                # another cluster at the endpoints): its registry is the truth.
                behind = revision < self._seen()
                if behind and attempt < SYNC_READS:
                    continue
                if behind:
                    log.warn(
                        "etcd store: etcd is at revision {revision}, behind the {seen} this gateway applied"
                        " (restored from a snapshot, or another cluster?): serving its registry as it is",
                        revision=revision,
                        seen=self._seen(),
                    )
                    self.revision, self._written = 0, set()
                await self._apply_snapshot(revision, kvs)
                break
            finally:
                self.lock.release()
        self._resync = None

    async def _apply_snapshot(self, revision: int, kvs: Sequence[KeyValue]) -> None:
        first = self.revision == 0
        found: dict[str, bytes] = {}
        self.members = {}
        for kv in kvs:
            name = self._name(kv.key)
            if name is not None:
                found[name] = kv.value
            else:
                self._note_member(kv, deleted=False)
        sealed_elsewhere = []
        if first and self.bodies and not found:
            self._keep_emptied_cache()
        # Removals first: what they free (a name, an alias, a port) may be
        # what a body of the snapshot takes.
        for name in sorted(set(self.bodies) - set(found)):
            await self._apply(name, None)
        changed = []
        for name in sorted(found):
            try:
                body = self._decode(name, found[name])
            except _Sealed as e:
                sealed_elsewhere.append(f"{name}: {e}")
                await self._reject(name, str(e))
                continue
            except ValueError as e:
                await self._reject(name, str(e))
                continue
            if body != self.bodies.get(name) or name in self.rejected:
                changed.append((name, body))
        # Then the bodies, in rounds: one refused because of another body the
        # snapshot also changes (an alias or a port moved between clusters)
        # is tried again once that one is in, until a round changes nothing.
        while changed:
            for name, body in changed:
                await self._apply(name, body)
            refused = [(name, body) for name, body in changed if name in self.rejected]
            if len(refused) == len(changed):
                break
            changed = refused
        self._loaded = True
        self._advance(revision)
        self._set_state("synced")
        log.info(
            "etcd store: the registry read at revision {revision}: {count} clusters",
            revision=revision,
            count=len(found),
        )
        if first and sealed_elsewhere and self._on_fatal is not None:
            self._on_fatal(f"etcd holds secrets this gateway cannot open ({sealed_elsewhere[0]})")

    async def _watch_once(self) -> None:
        """One watch, from the revision after the last applied, until it ends."""
        self._watch = watch = await self._etcd.watch(self._prefix, self.revision + 1, self._received)
        self._stale_probes = 0
        self._set_state("synced")
        try:
            reason = await watch.ended
        finally:
            self._watch = None
        # What arrived before the end is applied before the next watch starts.
        if self._draining is not None and not self._draining.called:
            await self._draining
        if self.running and not self._resync:
            log.info(
                "etcd store: the watch ended ({reason}): resuming from revision {revision}",
                reason=reason,
                revision=self.revision + 1,
            )

    def _received(self, response: WatchResponse) -> None:
        if response.canceled:
            if response.compact_revision:
                log.info(
                    "etcd store: revision {revision} is compacted: reading the whole registry again",
                    revision=self.revision + 1,
                )
                self._resync = "compacted"
            elif response.unreadable:
                # A catch-up too big for one message, say: replayed, it would be again.
                log.warn(
                    "etcd store: the watch from revision {revision} sent what cannot be read ({reason}):"
                    " reading the whole registry again",
                    revision=self.revision + 1,
                    reason=response.reason,
                )
                self._resync = "unreadable"
            if self._watch is not None:
                self._watch.cancel()
            return
        if response.events:
            self._queue.append(response)
            if self._draining is None or self._draining.called:
                self._draining = Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            response = self._queue.pop(0)
            await self.lock.acquire()
            try:
                await self._apply_events(response.events)
            finally:
                self.lock.release()

    async def _apply_events(self, events: Sequence[Event]) -> None:
        """Events in revision order; a revision's events all applied before the revision counts as applied."""
        for index, event in enumerate(events):
            revision = event.kv.mod_revision
            if revision <= self.revision:
                continue  # applied already: read by a resync, or repeated by a member
            name = self._name(event.kv.key)
            if name is None:
                self._note_member(event.kv, event.deleted)
            elif revision not in self._written:  # this gateway's own: applied as written
                if event.deleted:
                    await self._apply(name, None)
                else:
                    try:
                        body = self._decode(name, event.kv.value)
                    except ValueError as e:
                        await self._reject(name, str(e))
                    else:
                        await self._apply(name, body)
            last_of_revision = index + 1 == len(events) or events[index + 1].kv.mod_revision != revision
            if last_of_revision:
                self._advance(revision)

    async def _apply(self, name: str, body: Body | None) -> None:
        """One change from elsewhere, to the sink; the body is kept whether this gateway serves it or not."""
        if body is None:
            self.bodies.pop(name, None)
            self.rejected.pop(name, None)
        else:
            self.bodies[name] = body
        refused = await self._sink(name, body) if self._sink is not None else None
        if refused is None:
            self.rejected.pop(name, None)
        else:
            self.rejected[name] = refused

    async def _reject(self, name: str, reason: str) -> None:
        # Shown quoted: a key written with etcdctl may hold anything, a newline and a forged log line too.
        log.error(
            "etcd store: cluster {cluster} is not served by this gateway: {reason}", cluster=show(name), reason=reason
        )
        self.bodies.pop(name, None)
        if self._sink is not None:
            await self._sink(name, None)
        self.rejected[name] = reason

    def _advance(self, revision: int) -> None:
        if revision <= self.revision:
            return
        self.revision = revision
        self._written = {r for r in self._written if r > revision}
        ready = [(r, d) for r, d in self._waiters if r <= revision]
        self._waiters = [(r, d) for r, d in self._waiters if r > revision]
        for _, d in ready:
            d.callback(None)
        if self._cache is not None and (self._cache_call is None or not self._cache_call.active()):
            self._cache_call = self._clock.callLater(CACHE_DELAY, self._save_cache)

    def _keep_emptied_cache(self) -> None:
        """
        etcd holds no cluster where the local cache held some: the registry
        is the truth and they go, but this is also what wrong C{endpoints} or
        a wrong C{prefix} look like, and the cache is then the only copy: it
        is kept aside (0600, as written) before it is overwritten.
        """
        kept = None
        if self._cache is not None:
            kept = self._cache.path + ".before-empty"
            try:
                StateFile(kept, self._cache.sealer).save(self.bodies, revision=self._cache.revision)
            except StoreError as e:
                kept = f"not kept: {e}"
        log.warn(
            "etcd store: etcd holds no cluster under {prefix!r}, the local cache held {count}: removing them"
            " (wrong endpoints or prefix? the cache is kept as {kept})",
            prefix=self._prefix.decode("utf-8", "replace"),
            count=len(self.bodies),
            kept=kept,
        )

    def _save_cache(self) -> None:
        if self._cache is None:
            return
        # What this gateway serves, not what it refuses: a start from the
        # cache binds every cached cluster's ports, and one taken on this
        # host stops the start (the way it refused the cluster, for ever).
        served = {name: body for name, body in self.bodies.items() if name not in self.rejected}
        try:
            self._cache.save(served, revision=self.revision)
        except StoreError as e:
            log.warn("etcd store: cannot write the local cache: {error}", error=str(e))

    # --- health -------------------------------------------------------------------------

    def _check(self) -> Deferred[None]:
        """The probe: is etcd reachable, and is the watch keeping up?"""
        return Deferred.fromCoroutine(self._probe_once())

    async def _probe_once(self) -> None:
        watching = self._watch
        try:
            newest = await self._etcd.newest(self._prefix)
        except CancelledError:
            raise
        except Exception as e:  # a LoopingCall whose call fails stops for good
            if self._watch is not None and self._watch is not watching:
                # Asked while etcd was away, failed after it came back: a watch
                # opened meanwhile says etcd answers, the probe is older news.
                return
            self._degraded(_failure_text(e))
            if self._watch is not None:
                self._watch.cancel()  # another member may still answer
            return
        if self._watch is None:
            return
        self._set_state("synced")
        self._stale_probes = self._stale_probes + 1 if newest > self.revision else 0
        if self._stale_probes >= 2:
            log.warn("etcd store: the watch fell silent behind revision {newest}: restarting it", newest=newest)
            self._watch.cancel()

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        if state == "synced":
            log.info(
                "etcd store: synced with {endpoint} at revision {revision}",
                endpoint=self._etcd.endpoint,
                revision=self.revision,
            )
            self.last_error = None
        self.state = state

    def _degraded(self, error: str) -> None:
        self.last_error = error
        if self.state != "degraded":
            log.warn(
                "etcd store: etcd failed ({error}): serving {served}, refusing changes until it answers",
                error=error,
                served=self._served(),
            )
        self.state = "degraded"


class _Sealed(ValueError):
    """A value sealed with another key than this gateway's."""
