"""
The gateway's metrics in the Prometheus text exposition format.

L{metrics_text} renders one scrape.  Nothing is counted twice: a
L{GatewayCollector} reads the live objects -- each L{ClusterConnection}'s
state, links, open streams and L{ClusterStats}, and the L{StreamOpener}'s
unrouted-failure and handshake-error counters -- every time it is collected,
in a private C{CollectorRegistry} (never prometheus_client's global one, so
that several gateways in one process, as in the tests, do not collide).

Metrics (per-cluster ones labelled C{cluster}):

 - C{gateway_streams_opened_total{cluster}}
 - C{gateway_streams_failed_total{cluster,reason}}; failures before any
   cluster was chosen (no route, bad credentials, ...) have C{cluster=""}
 - C{gateway_streams_open{cluster}}
 - C{gateway_bytes_total{cluster,direction="up"|"down"}} (closed streams)
 - C{gateway_cluster_up{cluster}} (1 when at least one SSH link is up)
 - C{gateway_cluster_state{cluster,state}} (1 for the current state, 0 for
   the others of C{up}, C{connecting}, C{backoff}, C{stopped})
 - C{gateway_cluster_links_up{cluster}} (SSH connections established)
 - C{gateway_reconnects_total{cluster}}
 - C{gateway_proxy_failures_total{cluster,proxy,kind}}: failed attempts
   and lost connections per proxy candidate, by L{ConnectFailure} kind
   (C{auth}, C{kex}, C{hostkey}, C{dropped}, C{protocol}, C{network}): at
   most six series per candidate, only kinds that happened
 - C{gateway_proxy_last_failure_timestamp_seconds{cluster,proxy,kind}}: when
   the candidate last failed, labelled with that failure's kind; one series
   per candidate that has failed since it last let the gateway in
 - C{gateway_proxy_next_attempt_seconds{cluster,proxy}}: for those, seconds
   until the next attempt is due (none while none is scheduled)
 - C{gateway_handshake_errors_total{frontend}}
 - C{gateway_resolver_lookups_total{cluster,answer="cache"|"joined"|"run"}}:
   names resolved on the proxy node, by where the answer came from (the
   cache, a run already under way for the name, a run of its own)
 - C{gateway_resolver_failures_total{cluster,reason}}: resolver runs that
   gave no address (C{host-unreachable}: the name was not found)
 - C{gateway_store_synced{backend}}: 1 while the store answers (etcd: reachable, watch running), else 0
 - C{gateway_store_revision}: the etcd revision up to which every change is applied here
 - C{gateway_store_rejected_clusters}: clusters of the shared registry this gateway does not serve
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from gateway.cluster.connection import ClusterConnection
    from gateway.proxy.opener import StreamOpener

#: The states of L{ClusterConnection.state}, each exported as a 0/1 series.
STATES = ("up", "connecting", "backoff", "stopped")
#: Front ends whose handshake-error series exist (at 0) from the start.
FRONTENDS = ("socks", "http")


class GatewayCollector(Collector):
    """Reads the gateway's live counters on every C{collect()}."""

    def __init__(
        self,
        gateway: StreamOpener,
        clusters: Callable[[], Iterable[ClusterConnection]],
        store: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._gateway = gateway
        self._clusters = clusters
        self._store = store

    def collect(self) -> Iterator[Metric]:
        opened = CounterMetricFamily(
            "gateway_streams_opened", "Streams opened through the cluster.", labels=["cluster"]
        )
        failed = CounterMetricFamily(
            "gateway_streams_failed",
            'Streams refused, by reason (cluster="" before a cluster was chosen).',
            labels=["cluster", "reason"],
        )
        open_ = GaugeMetricFamily("gateway_streams_open", "Streams open now.", labels=["cluster"])
        transferred = CounterMetricFamily(
            "gateway_bytes",
            "Bytes relayed by closed streams (up: client to destination, down: back).",
            labels=["cluster", "direction"],
        )
        up = GaugeMetricFamily(
            "gateway_cluster_up", "1 when at least one SSH connection to the cluster is up.", labels=["cluster"]
        )
        state = GaugeMetricFamily(
            "gateway_cluster_state", "1 for the cluster's current state, 0 for the others.", labels=["cluster", "state"]
        )
        links = GaugeMetricFamily(
            "gateway_cluster_links_up", "SSH connections to the cluster established now.", labels=["cluster"]
        )
        reconnects = CounterMetricFamily(
            "gateway_reconnects", "SSH connections established after the first one.", labels=["cluster"]
        )
        proxy_failures = CounterMetricFamily(
            "gateway_proxy_failures",
            "Failed attempts and lost connections per proxy candidate, by kind.",
            labels=["cluster", "proxy", "kind"],
        )
        last_failure = GaugeMetricFamily(
            "gateway_proxy_last_failure_timestamp_seconds",
            "When the proxy candidate last failed (kind: of that failure); only since it last let the gateway in.",
            labels=["cluster", "proxy", "kind"],
        )
        next_attempt = GaugeMetricFamily(
            "gateway_proxy_next_attempt_seconds",
            "Seconds until the next attempt to a proxy candidate that failed.",
            labels=["cluster", "proxy"],
        )
        lookups = CounterMetricFamily(
            "gateway_resolver_lookups",
            "Names resolved on the proxy node, by where the answer came from.",
            labels=["cluster", "answer"],
        )
        resolver_failed = CounterMetricFamily(
            "gateway_resolver_failures",
            "Resolver runs on the proxy node that gave no address, by reason.",
            labels=["cluster", "reason"],
        )
        info = GaugeMetricFamily(
            "gateway_info",
            "1, labelled with this gateway's name ([gateway] name): join on it to tell a fleet's gateways apart.",
            labels=["gateway"],
        )
        info.add_metric([self._gateway.settings.name], 1)
        handshake = CounterMetricFamily(
            "gateway_handshake_errors",
            "Malformed or timed-out client handshakes, by front end.",
            labels=["frontend"],
        )

        for cluster in self._clusters():
            name = cluster.name
            stats = cluster.stats
            current = cluster.state
            opened.add_metric([name], stats.streams_opened)
            for reason, count in sorted(stats.streams_failed.items()):
                failed.add_metric([name, reason], count)
            open_.add_metric([name], cluster.open_streams)
            transferred.add_metric([name, "up"], stats.bytes_up)
            transferred.add_metric([name, "down"], stats.bytes_down)
            up.add_metric([name], 1 if current == "up" else 0)
            for each in STATES if current in STATES else (*STATES, current):
                state.add_metric([name, each], 1 if each == current else 0)
            links.add_metric([name], sum(1 for link in list(cluster.links) if link.connection is not None))
            reconnects.add_metric([name], stats.reconnects)
            due = cluster.pacer.next_attempts()
            for proxy, gate in cluster.pacer.gates.items():
                labels = [name, str(proxy)]
                for kind, count in sorted(gate.failures.items()):
                    proxy_failures.add_metric([*labels, kind], count)
                failure = gate.last_failure
                if failure is not None:
                    last_failure.add_metric([*labels, failure.kind.value], failure.at)
                    if proxy in due:
                        next_attempt.add_metric(labels, due[proxy])
            resolver = stats.resolver
            for answer, count in (("cache", resolver.cache_hits), ("joined", resolver.joined), ("run", resolver.runs)):
                lookups.add_metric([name, answer], count)
            for reason, count in sorted(resolver.failures.items()):
                resolver_failed.add_metric([name, reason], count)

        for reason, count in sorted(self._gateway.unrouted_failures.items()):
            failed.add_metric(["", reason], count)
        errors = self._gateway.handshake_errors
        for frontend in sorted(set(FRONTENDS) | set(errors)):
            handshake.add_metric([frontend], errors.get(frontend, 0))

        if self._store is not None:
            yield from _store_metrics(self._store())
        yield from (
            info,
            opened,
            failed,
            open_,
            transferred,
            up,
            state,
            links,
            reconnects,
            proxy_failures,
            last_failure,
            next_attempt,
            lookups,
            resolver_failed,
            handshake,
        )


def _store_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The store's series, from its C{status()} (the C{store} section of C{GET /v1/health})."""
    synced = GaugeMetricFamily("gateway_store_synced", "1 while the store answers, else 0.", labels=["backend"])
    synced.add_metric([str(status.get("backend"))], 1 if status.get("synced") else 0)
    yield synced
    if "revision" in status:
        yield GaugeMetricFamily(
            "gateway_store_revision",
            "The etcd revision up to which every change is applied here.",
            value=status["revision"],
        )
        yield GaugeMetricFamily(
            "gateway_store_rejected_clusters",
            "Clusters of the shared registry this gateway does not serve.",
            value=len(status.get("rejected") or ()),
        )


def metrics_text(
    gateway: StreamOpener,
    clusters: Callable[[], Iterable[ClusterConnection]],
    store: Callable[[], Mapping[str, Any]] | None = None,
) -> bytes:
    """
    One scrape of the gateway's metrics, as Prometheus text format 0.0.4 (the control API serves it as
    L{gateway.control.http.METRICS_TYPE}).

    C{clusters} is called once per scrape, so clusters added or removed at
    run time (through the control API) appear and disappear.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway, clusters, store))
    return generate_latest(registry)
