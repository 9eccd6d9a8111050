"""
Tests for L{gateway.control.metrics}.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from gateway.cluster.connection import ClusterStats
from gateway.cluster.penalty import ProxyFailure, ProxyGate
from gateway.config import GatewaySettings, ProxyAddress
from gateway.control.metrics import metrics_text
from gateway.proxy.opener import StreamOpener
from gateway.ssh.transport import ConnectFailure


class FakeLink:
    def __init__(self, connection: object | None) -> None:
        self.connection = connection


class FakePacer:
    """What metrics read of a L{gateway.cluster.penalty.Pacer}: its gates, and when attempts are due."""

    def __init__(self) -> None:
        self.gates: dict[ProxyAddress, ProxyGate] = {}
        self.due: dict[ProxyAddress, float] = {}

    def next_attempts(self) -> dict[ProxyAddress, float]:
        return self.due


class FakeCluster:
    """The attributes of L{gateway.cluster.connection.ClusterConnection} that metrics read."""

    def __init__(self, name: str, state: str = "up", links: int = 1, down_links: int = 0) -> None:
        self.name = name
        self.state = state
        self.open_streams = 0
        self.links = {FakeLink(object()) for _ in range(links)} | {FakeLink(None) for _ in range(down_links)}
        self.stats = ClusterStats()
        self.pacer = FakePacer()


class FakeGateway:
    def __init__(self) -> None:
        self.unrouted_failures: Counter[str] = Counter()
        self.handshake_errors: Counter[str] = Counter()
        self.settings = GatewaySettings(name="gw-a")


def scrape(gateway, clusters) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """
    Render and parse one scrape: sample name -> {sorted labels -> value}.
    """
    text = metrics_text(gateway, lambda: list(clusters)).decode("utf-8")
    result: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return result


def types_of(gateway, clusters) -> dict[str, str]:
    text = metrics_text(gateway, lambda: list(clusters)).decode("utf-8")
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def lbl(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class MetricsTextTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gateway = FakeGateway()
        self.a = FakeCluster("cluster-a", "up", links=2, down_links=1)
        self.b = FakeCluster("cluster-b", "backoff", links=0, down_links=1)
        self.clusters = [self.a, self.b]

    def test_types(self) -> None:
        """Counters are counters (the family name has no C{_total}); gauges gauges."""
        self.assertEqual(
            types_of(self.gateway, self.clusters),
            {
                "gateway_info": "gauge",
                "gateway_streams_opened": "counter",
                "gateway_streams_failed": "counter",
                "gateway_streams_open": "gauge",
                "gateway_bytes": "counter",
                "gateway_cluster_up": "gauge",
                "gateway_cluster_state": "gauge",
                "gateway_cluster_links_up": "gauge",
                "gateway_reconnects": "counter",
                "gateway_proxy_failures": "counter",
                "gateway_proxy_last_failure_timestamp_seconds": "gauge",
                "gateway_proxy_next_attempt_seconds": "gauge",
                "gateway_resolver_lookups": "counter",
                "gateway_resolver_failures": "counter",
                "gateway_handshake_errors": "counter",
            },
        )

    def test_values(self) -> None:
        """Every metric carries the value of the live objects."""
        a = self.a
        a.open_streams = 3
        a.stats.streams_opened = 10
        a.stats.streams_failed["timeout"] += 2
        a.stats.streams_failed["refused"] += 1
        a.stats.bytes_up = 1234
        a.stats.bytes_down = 56789
        a.stats.reconnects = 4
        self.gateway.unrouted_failures["no-route"] += 5
        self.gateway.handshake_errors["socks"] += 7

        m = scrape(self.gateway, self.clusters)

        self.assertEqual(m["gateway_streams_opened_total"], {lbl(cluster="cluster-a"): 10, lbl(cluster="cluster-b"): 0})
        self.assertEqual(
            m["gateway_streams_failed_total"],
            {
                lbl(cluster="cluster-a", reason="timeout"): 2,
                lbl(cluster="cluster-a", reason="refused"): 1,
                lbl(cluster="", reason="no-route"): 5,
            },
        )
        self.assertEqual(m["gateway_streams_open"], {lbl(cluster="cluster-a"): 3, lbl(cluster="cluster-b"): 0})
        self.assertEqual(
            m["gateway_bytes_total"],
            {
                lbl(cluster="cluster-a", direction="up"): 1234,
                lbl(cluster="cluster-a", direction="down"): 56789,
                lbl(cluster="cluster-b", direction="up"): 0,
                lbl(cluster="cluster-b", direction="down"): 0,
            },
        )
        self.assertEqual(m["gateway_cluster_up"], {lbl(cluster="cluster-a"): 1, lbl(cluster="cluster-b"): 0})
        self.assertEqual(m["gateway_cluster_links_up"], {lbl(cluster="cluster-a"): 2, lbl(cluster="cluster-b"): 0})
        self.assertEqual(m["gateway_reconnects_total"], {lbl(cluster="cluster-a"): 4, lbl(cluster="cluster-b"): 0})
        self.assertEqual(m["gateway_handshake_errors_total"], {lbl(frontend="socks"): 7, lbl(frontend="http"): 0})

    def test_resolver(self) -> None:
        """Names resolved on the proxy node: lookups by answer, failed runs by reason."""
        resolver = self.a.stats.resolver
        resolver.cache_hits, resolver.joined, resolver.runs = 5, 2, 3
        resolver.failures["host-unreachable"] += 1
        m = scrape(self.gateway, self.clusters)
        self.assertEqual(
            m["gateway_resolver_lookups_total"],
            {
                **{lbl(cluster="cluster-a", answer=a): n for a, n in (("cache", 5), ("joined", 2), ("run", 3))},
                **{lbl(cluster="cluster-b", answer=a): 0 for a in ("cache", "joined", "run")},
            },
        )
        self.assertEqual(m["gateway_resolver_failures_total"], {lbl(cluster="cluster-a", reason="host-unreachable"): 1})

    def test_proxies(self) -> None:
        """Per proxy candidate: failures by kind; the last one's time and kind and the next attempt, until a success."""
        good, bad = ProxyAddress("10.0.0.1"), ProxyAddress("10.0.0.2", 2222)
        pacer = self.a.pacer
        pacer.gates = {good: ProxyGate(good), bad: ProxyGate(bad)}
        for gate in pacer.gates.values():
            gate.failed(gate.start(), ProxyFailure(ConnectFailure.NETWORK, "refused", 100.0))
            gate.failed(gate.start(), ProxyFailure(ConnectFailure.AUTH, "key refused", 200.0))
        pacer.gates[good].succeeded()
        pacer.due = {bad: 12.5}
        m = scrape(self.gateway, self.clusters)
        self.assertEqual(
            m["gateway_proxy_failures_total"],
            {
                lbl(cluster="cluster-a", proxy=proxy, kind=kind): 1
                for proxy in ("10.0.0.1:22", "10.0.0.2:2222")
                for kind in ("auth", "network")
            },
        )
        self.assertEqual(
            m["gateway_proxy_last_failure_timestamp_seconds"],
            {lbl(cluster="cluster-a", proxy="10.0.0.2:2222", kind="auth"): 200.0},
        )
        self.assertEqual(
            m["gateway_proxy_next_attempt_seconds"], {lbl(cluster="cluster-a", proxy="10.0.0.2:2222"): 12.5}
        )

    def test_state(self) -> None:
        """One 1 per cluster for its state, 0 for the other three."""
        m = scrape(self.gateway, self.clusters)["gateway_cluster_state"]
        expected = {}
        for name, current in (("cluster-a", "up"), ("cluster-b", "backoff")):
            for state in ("up", "connecting", "backoff", "stopped"):
                expected[lbl(cluster=name, state=state)] = 1 if state == current else 0
        self.assertEqual(m, expected)

    def test_second_scrape(self) -> None:
        """A later scrape shows the counters and states as they are then."""
        first = scrape(self.gateway, self.clusters)
        self.assertNotIn("gateway_streams_failed_total", first)

        self.a.stats.streams_opened += 2
        self.a.stats.streams_failed["prohibited"] += 1
        self.a.stats.bytes_down += 100
        self.a.state = "connecting"
        self.a.links = set()
        self.b.state = "up"
        self.b.links.add(FakeLink(object()))
        self.b.stats.reconnects += 1
        self.gateway.handshake_errors["http"] += 1
        self.gateway.handshake_errors["socks"] += 2

        second = scrape(self.gateway, self.clusters)
        self.assertEqual(second["gateway_streams_opened_total"][lbl(cluster="cluster-a")], 2)
        self.assertEqual(second["gateway_streams_failed_total"], {lbl(cluster="cluster-a", reason="prohibited"): 1})
        self.assertEqual(second["gateway_bytes_total"][lbl(cluster="cluster-a", direction="down")], 100)
        self.assertEqual(second["gateway_cluster_up"], {lbl(cluster="cluster-a"): 0, lbl(cluster="cluster-b"): 1})
        self.assertEqual(second["gateway_cluster_state"][lbl(cluster="cluster-a", state="connecting")], 1)
        self.assertEqual(second["gateway_cluster_state"][lbl(cluster="cluster-a", state="up")], 0)
        self.assertEqual(second["gateway_cluster_links_up"], {lbl(cluster="cluster-a"): 0, lbl(cluster="cluster-b"): 1})
        self.assertEqual(second["gateway_reconnects_total"][lbl(cluster="cluster-b")], 1)
        self.assertEqual(second["gateway_handshake_errors_total"], {lbl(frontend="socks"): 2, lbl(frontend="http"): 1})

    def test_clusters_asked_each_scrape(self) -> None:
        """Clusters added or removed between scrapes appear and disappear."""
        clusters = [self.a]
        text = lambda: metrics_text(self.gateway, lambda: list(clusters)).decode()  # noqa: E731
        self.assertIn('cluster="cluster-a"', text())
        self.assertNotIn('cluster="cluster-c"', text())
        clusters[:] = [FakeCluster("cluster-c")]
        self.assertIn('cluster="cluster-c"', text())
        self.assertNotIn('cluster="cluster-a"', text())

    def test_no_clusters(self) -> None:
        """Without clusters only the gateway-wide series remain."""
        m = scrape(self.gateway, [])
        self.assertEqual(set(m), {"gateway_info", "gateway_handshake_errors_total"})
        self.assertEqual(m["gateway_info"], {lbl(gateway="gw-a"): 1})

    def test_unknown_state(self) -> None:
        """A state outside the four known ones still gets its series."""
        self.a.state = "draining"
        m = scrape(self.gateway, [self.a])["gateway_cluster_state"]
        self.assertEqual(m[lbl(cluster="cluster-a", state="draining")], 1)
        self.assertEqual(m[lbl(cluster="cluster-a", state="up")], 0)
        self.assertEqual(scrape(self.gateway, [self.a])["gateway_cluster_up"], {lbl(cluster="cluster-a"): 0})

    def test_label_escaping(self) -> None:
        """Label values with quotes or backslashes survive the round trip."""
        self.gateway.unrouted_failures['odd "reason"\\'] += 1
        m = scrape(self.gateway, [])
        self.assertEqual(m["gateway_streams_failed_total"], {lbl(cluster="", reason='odd "reason"\\'): 1})

    def test_real_gateway(self) -> None:
        """The counters are read under the names L{StreamOpener} gives them."""
        gateway = StreamOpener(router=None, clusters={})
        gateway.unrouted_failures["auth-failed"] += 1
        gateway.handshake_errors["http"] += 3
        m = scrape(gateway, [])
        self.assertEqual(m["gateway_streams_failed_total"], {lbl(cluster="", reason="auth-failed"): 1})
        self.assertEqual(m["gateway_handshake_errors_total"][lbl(frontend="http")], 3)

    def test_private_registry(self) -> None:
        """Nothing is registered in prometheus_client's global registry."""
        metrics_text(self.gateway, lambda: self.clusters)
        metrics_text(self.gateway, lambda: self.clusters)
        names = {family.name for family in REGISTRY.collect()}
        self.assertFalse([name for name in names if name.startswith("gateway_")])
