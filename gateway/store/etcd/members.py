"""
Which gateways of a fleet are alive, as etcd sees them.

Each gateway keeps one key, C{PREFIX members/NAME}, bound to a lease of
L{MEMBER_TTL} seconds that it renews every third of that: a gateway that
dies (SIGKILL, its host gone) disappears from the list when its lease
expires, one that stops cleanly revokes it at once.  The value says when it
started and with which version; every gateway's store follows these keys
with the registry's watch (L{gateway.store.etcd.store.EtcdStore.members}),
so C{GET /v1/health} lists the fleet.  Two gateways with one name are
warned of: names are how operators tell gateways apart in logs and metrics.

The member key is no part of the registry's consistency: it is written
outside the registry's transactions, and a lease that expired while etcd was
unreachable is simply taken again.
"""

from __future__ import annotations

import json
import time

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway.store.etcd.client import Etcd

__all__ = ["MEMBER_TTL", "MEMBERS", "FleetMember"]

log = Logger()

#: Seconds a gateway stays listed after its last renewal.
MEMBER_TTL = 10
#: Where the member keys live, under the store's prefix.
MEMBERS = "members/"


class FleetMember(Service):
    """This gateway's member key, kept alive for as long as the service runs."""

    def __init__(self, etcd: Etcd, clock: IReactorTime, prefix: str, name: str, version: str) -> None:
        self._etcd = etcd
        self._clock = clock
        self._key = (prefix + MEMBERS + name).encode("utf-8")
        self._name = name
        self._value = json.dumps(
            {"gateway": name, "version": version, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        ).encode()
        self.lease = 0
        self._running: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._run())

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        running, self._running = self._running, None
        if running is not None:
            running.cancel()
            running.addErrback(lambda f: f.trap(CancelledError))
        lease, self.lease = self.lease, 0
        if not lease:
            return self._etcd.close()
        # Gone from the list at once, not in MEMBER_TTL seconds; a stop never waits for etcd long.
        # Then the connections kept for the next call close: left to the reactor's shutdown, a TLS one
        # raced Twisted's teardown (an "Unhandled Error" traceback in the log at every stop).
        revoked = self._etcd.revoke(lease).addTimeout(2, self._clock).addErrback(lambda _: None)
        return revoked.addCallback(lambda _: self._etcd.close())

    async def _run(self) -> None:
        await self._namesake_gone()
        while self.running:
            try:
                await self._renew()
            except CancelledError:
                raise
            except Exception as e:  # etcd's state is the store's to report: retry quietly
                log.debug("fleet: cannot renew this gateway's member key: {error}", error=str(e))
            await deferLater(self._clock, MEMBER_TTL / 3)

    async def _namesake_gone(self) -> None:
        """
        Wait while the member key of this name is held (at most one TTL):
        a predecessor that crashed lets its lease expire within it; one
        still held after it is renewed by a live gateway of the same name.
        """
        deadline = self._clock.seconds() + MEMBER_TTL + 1
        while self.running:
            try:
                held = await self._etcd.get(self._key)
            except CancelledError:
                raise
            except Exception:
                return  # etcd out of reach: the renewal loop retries
            if held is None or not held.lease:
                return
            if self._clock.seconds() >= deadline:
                log.warn(
                    "fleet: another gateway named {name} is alive in the fleet: [gateway] name should differ"
                    " on every gateway (logs, metrics and health tell them apart by it)",
                    name=self._name,
                )
                return
            await deferLater(self._clock, MEMBER_TTL / 3)

    async def _renew(self) -> None:
        if self.lease and await self._etcd.keepalive(self.lease) > 0:
            held = await self._etcd.get(self._key)
            if held is not None and held.lease == self.lease:
                return
            # A namesake took the key, then stopped and revoked it: take it back.
            await self._etcd.put(self._key, self._value, self.lease)
            return
        if self.lease:
            log.warn(
                "fleet: this gateway's member key expired (etcd out of reach for {ttl} s?): registering again",
                ttl=MEMBER_TTL,
            )
        self.lease = 0
        lease = await self._etcd.grant(MEMBER_TTL)
        await self._etcd.put(self._key, self._value, lease)
        self.lease = lease
