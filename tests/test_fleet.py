"""
Two gateways sharing one registry, in memory: L{GatewayControl} over
L{EtcdStore} over one L{MemoryEtcd}, a fake clock for both.  Changes made
through either API, at once, converge; conflicts are retried against the
winner's change; a refused body is refused by both.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gateway.app.service import GatewayService
from gateway.config import GatewayConfig, GatewaySettings, ListenConfig
from gateway.control.contract import ControlError
from gateway.control.registry import GatewayControl
from gateway.store.etcd.store import EtcdStore
from gateway.testing.etcd import MemoryEtcd
from gateway.testing.keys import generate_key, private_pem, public_line
from tests.test_listeners import _ListenReactor

KEY = private_pem(generate_key())
HOST_KEY = public_line(generate_key())


def body(network: int = 1, **more: Any) -> dict[str, Any]:
    return {
        "proxies": ["127.0.0.1:1"],
        "user": "u",
        "key": KEY,
        "host_keys": [HOST_KEY],
        "networks": [f"10.{network}.0.0/24"],
        **more,
    }


class Fleet(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = _ListenReactor()  # ports bind and close as the kernel's do (closing takes a turn)
        self.etcd = MemoryEtcd(self.reactor)
        self.gateways = [self.gateway(name) for name in ("gw-a", "gw-b")]

    def gateway(
        self, name: str, config_names: frozenset[str] = frozenset()
    ) -> tuple[GatewayService, EtcdStore, GatewayControl]:
        config = GatewayConfig(ListenConfig(socks=(), http=(), control=()), {}, "gw.toml", GatewaySettings(name=name))
        service = GatewayService(config, self.reactor)  # type: ignore[arg-type]
        store = EtcdStore(self.etcd, self.reactor, prefix="/gw/", gateway=name, sealer=None, cache=None)
        control = GatewayControl(service, store, set(config_names))
        store.startService()
        self.addCleanup(store.stopService)
        self.settle()
        return service, store, control

    def settle(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            self.reactor.advance(0.1)

    def registry(self) -> dict[str, Any]:
        prefix = b"/gw/clusters/"
        return {
            k[len(prefix) :].decode(): json.loads(kv.value) for k, kv in self.etcd.data.items() if k.startswith(prefix)
        }

    def test_a_put_through_one_is_served_by_the_other(self) -> None:
        (_, _, a), (b_service, _, b) = self.gateways
        self.assertTrue(self.successResultOf(a.put_cluster("c1", body())))
        self.settle(1)
        self.assertIn("c1", b_service.clusters)
        self.successResultOf(b.delete_cluster("c1"))
        self.settle(1)
        self.assertEqual(self.gateways[0][0].clusters, {})

    def test_concurrent_changes_converge(self) -> None:
        rng = random.Random(13)
        names = [f"c{i}" for i in range(6)]
        results: list[Deferred[Any]] = []
        for i in range(50):
            _, _, control = rng.choice(self.gateways)
            name = rng.choice(names)
            if rng.random() < 0.3:
                results.append(control.delete_cluster(name))
            else:
                results.append(control.put_cluster(name, body(network=i + 1)))
            if rng.random() < 0.3:
                self.reactor.advance(0)
        self.settle()
        outcomes = []
        for d in results:
            result: list[Any] = []
            d.addBoth(result.append)
            self.assertEqual(len(result), 1, "a change never ended")
            if isinstance(result[0], Failure):
                result[0].trap(ControlError)
                outcomes.append(result[0].value.status)
            else:
                outcomes.append(200)
        self.assertEqual(set(outcomes) - {200, 404}, set(), outcomes)
        registry = self.registry()
        for service, store, _ in self.gateways:
            self.assertEqual(dict(store.bodies), registry)
            self.assertEqual(sorted(service.clusters), sorted(registry))
            for name, cluster in service.clusters.items():
                self.assertEqual([str(n) for n in cluster.config.networks], registry[name]["networks"])
        self.assertGreater(len(self.etcd.txns), 50, "no conflict was retried")

    def test_an_alias_taken_meanwhile_is_refused_after_the_retry(self) -> None:
        (_, _, a), (_, b_store, b) = self.gateways
        self.etcd.cut_watches()  # b does not see a's change before it writes
        self.successResultOf(a.put_cluster("c1", body(aliases=["x"])))
        pending = b.put_cluster("c2", body(aliases=["x"]))
        self.settle()
        failure = self.failureResultOf(pending, ControlError)
        self.assertEqual(failure.value.status, 409)
        self.assertIn("alias 'x' is already used by cluster 'c1'", failure.value.reason)
        self.assertEqual(sorted(self.registry()), ["c1"])

    def test_a_resync_applies_what_a_snapshot_frees_first(self) -> None:
        """
        A snapshot (a start from the cache, a resync after a compaction)
        holds the registry after several changes at once: c2 deleted, its
        alias taken by c1.  Applied by name, c1 would meet c2's alias and
        stay refused here for good.
        """
        (_, _, a), (b_service, b_store, _) = self.gateways
        self.successResultOf(a.put_cluster("c2", body(aliases=["x"])))
        self.successResultOf(a.put_cluster("c3", body(network=3, aliases=["y"])))
        self.settle()
        self.etcd.silence_watches()  # gw-b misses the changes: its probe restarts the watch, too late
        self.successResultOf(a.delete_cluster("c2"))
        self.successResultOf(a.put_cluster("c1", body(aliases=["x"])))
        self.successResultOf(a.put_cluster("c3", body(network=3)))
        self.successResultOf(a.put_cluster("c0", body(network=4, aliases=["y"])))
        self.etcd.compact(self.etcd.revision)
        self.settle()
        self.assertEqual(b_store.rejected, {})
        self.assertEqual(sorted(b_service.clusters), ["c0", "c1", "c3"])
        self.assertEqual(b_service.clusters["c1"].config.aliases, ("x",))

    def test_a_put_retried_after_a_conflict_binds_its_ports_again(self) -> None:
        """The first try's ports are closed before the retry binds them: no 400 "address already in use"."""
        (a_service, _, a), (_, _, b) = self.gateways
        self.successResultOf(b.put_cluster("c2", body(network=2)))  # not seen by gw-a yet: a conflict
        pending = a.put_cluster("c1", body(socks=["tcp:2100:interface=127.0.0.1"]))
        self.settle()
        self.assertTrue(self.successResultOf(pending))
        self.assertEqual(a_service.listeners.bound("c1")["socks"], ["127.0.0.1:2100"])
        self.assertEqual(len(self.etcd.txns), 3)

    def test_a_cluster_refused_here_can_be_deleted_here(self) -> None:
        """
        gw-b does not serve c1 (its port is taken on gw-b's host: here, by
        gw-a, on the same reactor), but c1 is in the registry: a DELETE
        through gw-b removes it from every gateway, not 404.
        """
        (a_service, _, a), (b_service, b_store, b) = self.gateways
        self.successResultOf(a.put_cluster("c1", body(socks=["tcp:2100:interface=127.0.0.1"])))
        self.settle()
        self.assertIn("Address already in use", b_store.rejected["c1"])
        self.assertNotIn("c1", b_service.clusters)
        self.successResultOf(b.delete_cluster("c1"))
        self.settle()
        self.assertEqual(self.registry(), {})
        self.assertEqual(a_service.clusters, {})
        self.assertEqual(b_store.rejected, {})

    def test_a_body_refused_here_is_reported(self) -> None:
        (_, _, _), (b_service, b_store, _) = self.gateways
        self.etcd.write({b"/gw/clusters/c1": json.dumps(body(proxy_command="nc %h %p")).encode()})
        self.settle(1)
        self.assertNotIn("c1", b_service.clusters)
        self.assertIn("proxy_command", b_store.status()["rejected"]["c1"])

    def test_store_metrics_and_health(self) -> None:
        (_, a_store, a), _ = self.gateways
        self.successResultOf(a.put_cluster("c1", body()))
        text = a.metrics().decode()
        self.assertIn('gateway_store_synced{backend="etcd"} 1.0', text)
        self.assertIn(f"gateway_store_revision {float(a_store.revision)}", text)
        self.assertIn("gateway_store_rejected_clusters 0.0", text)
        self.etcd.go_down()
        self.settle(15)
        health = a.health()
        self.assertEqual(health["store"]["state"], "degraded")
        # etcd is off the data path: the store adds no reason (the service itself is not started here).
        self.assertEqual(health["not_ready"], ["not running"])
        self.assertIn('gateway_store_synced{backend="etcd"} 0.0', a.metrics().decode())

    def test_a_toml_namesake_is_refused_until_the_registry_deletes_it(self) -> None:
        _, store, _ = self.gateway("gw-c", frozenset({"c9"}))
        self.etcd.write({b"/gw/clusters/c9": json.dumps(body()).encode()})
        self.settle(1)
        self.assertIn("defined in this gateway's configuration file", store.status()["rejected"]["c9"])
        self.etcd.write({}, [b"/gw/clusters/c9"])
        self.settle(1)
        self.assertEqual(store.status()["rejected"], {})
