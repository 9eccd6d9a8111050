"""
Tests for L{gateway.store.etcd.members}: each gateway's member key on a
lease, renewed, taken again after an outage, revoked on a clean stop, and
followed by every store -- over L{MemoryEtcd} and a fake clock.
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.store.etcd.members import MEMBER_TTL, FleetMember
from gateway.store.etcd.store import EtcdStore
from gateway.testing.etcd import MemoryEtcd
from tests.support import capture_events

PREFIX = "/gw/"
KEY = b"/gw/members/gw-a"


class MemberTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.etcd = MemoryEtcd(self.clock)
        self.events = capture_events(self)

    def member(self, name: str = "gw-a") -> FleetMember:
        member = FleetMember(self.etcd, self.clock, PREFIX, name, "1.2")
        member.startService()
        self.addCleanup(lambda: member.running and member.stopService())
        return member

    def warnings(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_level") and e["log_level"].name == "warn"]

    def test_registered_on_a_lease_and_renewed(self) -> None:
        member = self.member()
        kv = self.etcd.data[KEY]
        self.assertEqual(kv.lease, member.lease)
        self.assertIn(b'"version": "1.2"', kv.value)
        for _ in range(10):
            self.clock.advance(MEMBER_TTL / 3)
        self.assertIn(KEY, self.etcd.data)
        self.assertEqual(self.etcd.data[KEY].lease, member.lease)

    def test_expired_while_etcd_was_away_then_taken_again(self) -> None:
        member = self.member()
        first = member.lease
        self.etcd.unreachable = True
        for _ in range(4):
            self.clock.advance(MEMBER_TTL / 3)
        self.assertNotIn(KEY, self.etcd.data)  # the lease expired
        self.etcd.come_back()
        self.clock.advance(MEMBER_TTL / 3)
        self.assertIn(KEY, self.etcd.data)
        self.assertNotEqual(member.lease, first)
        self.assertTrue(any("member key expired" in w for w in self.warnings()))

    def test_a_clean_stop_revokes(self) -> None:
        member = self.member()
        self.successResultOf(member.stopService())
        self.assertNotIn(KEY, self.etcd.data)
        self.assertEqual(self.etcd.leases, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.etcd.closed)  # after the revoke: see test_etcd_secure's TLS test

    def test_a_stop_while_etcd_is_away_does_not_hang(self) -> None:
        member = self.member()
        self.etcd.unreachable = True
        d = member.stopService()
        self.successResultOf(d)
        self.assertTrue(self.etcd.closed)

    def test_a_crashed_namesake_is_waited_for_quietly(self) -> None:
        crashed = self.etcd.write({KEY: b"{}"}, lease=self.successResultOf(self.etcd.grant(MEMBER_TTL)))
        self.assertTrue(crashed)
        member = self.member()
        self.assertEqual(member.lease, 0)
        self.clock.advance(MEMBER_TTL)  # its lease expires: nobody renews it
        self.clock.advance(MEMBER_TTL / 3)
        self.assertNotEqual(member.lease, 0)
        self.assertEqual(self.warnings(), [])

    def test_a_live_namesake_is_warned_of(self) -> None:
        other = self.member()
        self.patch(other, "_renew", lambda: self.etcd.keepalive(other.lease).addCallback(lambda _: None))
        self.member()
        for _ in range(5):
            self.clock.advance(MEMBER_TTL / 3)
        self.assertTrue(any("another gateway named {name} is alive" in w for w in self.warnings()))

    def test_the_store_lists_the_fleet(self) -> None:
        store = EtcdStore(self.etcd, self.clock, prefix=PREFIX, gateway="gw-a", sealer=None, cache=None)
        store.attach(lambda name, body: succeed(None))
        b = self.member("gw-b")  # before the store's first read: in its snapshot
        store.startService()
        self.addCleanup(store.stopService)
        self.member("gw-a")  # after: through its watch
        self.clock.advance(0)
        self.assertEqual(store.status()["members"], ["gw-a", "gw-b"])
        self.assertEqual(store.members["gw-b"]["version"], "1.2")
        self.successResultOf(b.stopService())
        self.clock.advance(0)
        self.assertEqual(store.status()["members"], ["gw-a"])

    def test_a_key_taken_and_revoked_by_a_namesake_is_taken_back(self) -> None:
        member = self.member()
        namesake = self.successResultOf(self.etcd.grant(MEMBER_TTL))
        self.etcd.write({KEY: b"{}"}, lease=namesake)
        self.successResultOf(self.etcd.revoke(namesake))  # the namesake stops: its revoke takes the key
        self.assertNotIn(KEY, self.etcd.data)
        self.clock.advance(MEMBER_TTL / 3)
        self.assertEqual(self.etcd.data[KEY].lease, member.lease)
