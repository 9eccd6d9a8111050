"""
ClusterConnection in memory: the gateway's real SSH client against Conch
proxy nodes over C{twisted.test.iosim} (L{gateway.testing.MemoryNetwork}),
on a C{MemoryReactorClock} moved by C{clock.advance} -- no socket, no sleep.
(The same behaviours over loopback are in tests/test_resilience.py, against
real OpenSSH in tests/system/test_faults.py.)
"""

from __future__ import annotations

from twisted.conch.ssh import transport
from twisted.internet.defer import fail
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.wire import Echo
from twisted.trial.unittest import TestCase

from gateway.cluster import connection as connection_module
from gateway.cluster.connection import ClusterConnection
from gateway.config import parse_cluster
from gateway.errors import Reason, StreamError
from gateway.ssh.channel import TunnelChannel
from gateway.ssh.exec_channel import ExecTunnelChannel
from gateway.ssh.transport import SSHConnectError
from gateway.testing import DEMO_USER, MemoryNetwork, generate_key, private_pem, public_line

A = ("10.0.0.1", 22)
B = ("10.0.0.2", 22)
ECHO = ("10.1.0.7", 7)
#: A destination that never answers: the node never confirms the open.
SILENT = ("10.1.0.9", 9)
ORIGIN = ("127.0.0.1", 40000)
INTERVAL = 1.0
COUNT = 3


def no_jitter() -> float:
    """The top of the jitter range: back-off delays come out exact."""
    return 1.0


class Collector:
    """A channel's peer that keeps what the destination sends."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def tunnel_data(self, data: bytes) -> None:
        self.data += data

    def tunnel_eof(self) -> None:
        pass

    def tunnel_closed(self) -> None:
        self.closed = True

    def tunnel_pause_writing(self) -> None:
        pass

    def tunnel_resume_writing(self) -> None:
        pass


class MemoryClusterTestCase(TestCase):
    """Two proxy candidates (A preferred) in memory, each reaching an echo service."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = MemoryNetwork(self.clock)
        self.key = generate_key()
        self.net.destinations["echo"] = Factory.forProtocol(Echo)
        self.net.destinations["silent"] = None
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def node(self, address: tuple[str, int], **options):
        node = self.net.add_node(*address, [self.key], **options)
        node.routes.update({ECHO: "echo", SILENT: "silent"})
        return node

    def cluster(self, *candidates: tuple[str, int], **settings) -> ClusterConnection:
        """A started cluster of C{candidates} (default A and B, made here)."""
        candidates = candidates or (A, B)
        for address in candidates:
            if address not in self.net.nodes:
                self.node(address)
        config = parse_cluster(
            "c1",
            {
                "proxies": [f"{host}:{port}" for host, port in candidates],
                "user": DEMO_USER,
                "key": private_pem(self.key),
                "host_keys": [public_line(self.net.nodes[a].host_key) for a in candidates],
                "networks": ["10.1.0.0/24"],
                "keepalive_interval": INTERVAL,
                "keepalive_count_max": COUNT,
                **settings,
            },
            "(test)",
            "clusters.c1",
        )
        cluster = ClusterConnection(config, self.clock, self.net.connect, jitter=no_jitter)
        cluster.startService()
        self.addCleanup(self._stop, cluster)
        self.net.flush()
        return cluster

    def _stop(self, cluster: ClusterConnection) -> None:
        if cluster.running:
            stopping = cluster.stopService()
            self.net.advance(0)
            self.successResultOf(stopping)

    def open(self, cluster: ClusterConnection, destination=ECHO) -> tuple[TunnelChannel, Collector]:
        opening = cluster.open_stream(*destination, ORIGIN)
        self.net.flush()
        channel = self.successResultOf(opening)
        peer = Collector()
        channel.attach(peer)
        return channel, peer

    def echo(self, cluster: ClusterConnection) -> Collector:
        """Open a stream to the echo service and check it carries bytes."""
        channel, peer = self.open(cluster)
        channel.send(b"ping")
        self.net.flush()
        self.assertEqual(peer.data, b"ping")
        return peer

    def up_on(self, cluster: ClusterConnection) -> str:
        self.assertEqual(cluster.state, "up")
        return str(cluster.proxy)


class StreamTests(MemoryClusterTestCase):
    def test_a_stream_carries_bytes_through_the_preferred_candidate(self):
        cluster = self.cluster()
        self.assertEqual(self.up_on(cluster), "10.0.0.1:22")
        self.echo(cluster)
        self.assertEqual(cluster.open_streams, 1)

    def test_streams_end_count_down(self):
        cluster = self.cluster()
        channel, peer = self.open(cluster)
        channel.close()
        self.net.flush()
        self.assertTrue(peer.closed)
        self.assertEqual(cluster.open_streams, 0)


class KeepaliveTests(MemoryClusterTestCase):
    def test_keepalives_keep_a_quiet_connection_up(self):
        cluster = self.cluster()
        (link,) = cluster.links
        for _ in range(COUNT * 4):
            self.net.advance(INTERVAL)
        self.assertEqual(cluster.links, {link})
        self.assertEqual(self.up_on(cluster), "10.0.0.1:22")

    def test_a_frozen_node_is_dead_after_count_max_probes_and_its_streams_end(self):
        cluster = self.cluster()
        peer = self.echo(cluster)
        self.net.nodes[A].frozen = True
        self.net.advance(INTERVAL * COUNT - 0.1)
        self.assertFalse(peer.closed)
        self.assertEqual(cluster.state, "up")
        self.net.advance(0.1)
        self.assertTrue(peer.closed)
        self.assertEqual(cluster.open_streams, 0)
        self.assertEqual(cluster.state, "backoff")
        self.assertEqual(cluster.last_error, f"10.0.0.1:22 answered no keepalive for {INTERVAL * COUNT:.1f} s")
        self.assertTrue(any("answered no keepalive" in str(e.get("error")) for e in self.events))


class RotationTests(MemoryClusterTestCase):
    def test_a_dead_node_is_replaced_by_the_next_candidate_after_the_back_off(self):
        cluster = self.cluster()
        self.net.nodes[A].frozen = True
        self.net.advance(INTERVAL * COUNT)
        self.assertEqual(cluster.state, "backoff")
        self.net.advance(0.49)
        self.assertEqual(cluster.state, "backoff")
        self.net.advance(0.01)
        self.assertEqual(self.up_on(cluster), "10.0.0.2:22")
        self.echo(cluster)

    def test_a_refusing_candidate_is_skipped(self):
        self.node(A)
        self.net.take_down(*A)
        cluster = self.cluster()
        self.assertEqual(cluster.state, "backoff")
        self.assertIn("cannot connect to 10.0.0.1:22", cluster.last_error)
        self.net.advance(0.5)
        self.assertEqual(self.up_on(cluster), "10.0.0.2:22")
        self.assertIsNone(cluster.last_error)

    def test_a_crashed_node_ends_its_streams_and_the_next_candidate_serves(self):
        cluster = self.cluster()
        peer = self.echo(cluster)
        self.net.take_down(*A)
        self.net.flush()
        self.assertTrue(peer.closed)
        self.assertEqual(cluster.last_error, "connection to 10.0.0.1:22 lost")
        self.net.advance(0.5)
        self.assertEqual(self.up_on(cluster), "10.0.0.2:22")
        self.echo(cluster)
        self.assertEqual(cluster.stats.reconnects, 1)


class BackoffTests(MemoryClusterTestCase):
    def test_attempts_double_their_spacing_and_alternate_while_all_are_down(self):
        for address in (A, B):
            self.node(address)
            self.net.take_down(*address)
        cluster = self.cluster()
        self.net.advance(70)
        self.assertEqual(
            self.net.attempts[:7],
            [
                (0.0, "10.0.0.1:22"),
                (0.5, "10.0.0.2:22"),
                (1.5, "10.0.0.1:22"),
                (3.5, "10.0.0.2:22"),
                (7.5, "10.0.0.1:22"),
                (15.5, "10.0.0.2:22"),
                (31.5, "10.0.0.1:22"),
            ],
        )
        # Capped at 30 s.
        self.assertEqual(self.net.attempts[7], (61.5, "10.0.0.2:22"))
        self.assertEqual(cluster.state, "backoff")

    def test_a_link_that_comes_up_resets_the_back_off(self):
        self.node(A)
        self.node(B)
        self.net.take_down(*B)
        self.net.take_down(*A)
        cluster = self.cluster(A)
        self.net.advance(0.5)
        self.net.advance(1.0)
        self.assertEqual(len(self.net.attempts), 3)
        self.net.bring_back(*A)
        self.net.advance(2.0)
        self.assertEqual(self.up_on(cluster), "10.0.0.1:22")
        self.net.take_down(*A)
        self.net.flush()
        lost_at = self.clock.seconds()
        self.net.bring_back(*A)
        self.net.advance(0.5)
        self.assertEqual(self.net.attempts[-1], (lost_at + 0.5, "10.0.0.1:22"))
        self.assertEqual(cluster.state, "up")


class FailbackTests(MemoryClusterTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.node(A)
        self.net.take_down(*A)
        self.cluster_ = self.cluster()
        self.net.advance(0.5)
        self.assertEqual(self.up_on(self.cluster_), "10.0.0.2:22")

    def probes_of_a(self) -> list[float]:
        return [at for at, proxy in self.net.attempts if proxy == "10.0.0.1:22"]

    def test_the_preferred_candidate_is_probed_on_the_back_off(self):
        self.net.advance(8.0)
        # The first attempt; up on B at 0.5; probes 0.5, 1, 2 and 4 s apart.
        self.assertEqual(self.probes_of_a(), [0.0, 1.0, 2.0, 4.0, 8.0])
        self.assertEqual(self.up_on(self.cluster_), "10.0.0.2:22")

    def test_back_on_the_preferred_candidate_the_fallback_retires_after_its_streams(self):
        cluster = self.cluster_
        peer = self.echo(cluster)
        (fallback,) = cluster.links
        self.net.bring_back(*A)
        self.net.advance(0.5)
        self.assertEqual(self.up_on(cluster), "10.0.0.1:22")
        self.assertTrue(fallback.retiring)
        self.assertEqual(len(cluster.links), 2)
        self.assertFalse(peer.closed)
        # New streams go to the preferred candidate; the old one finishes.
        self.echo(cluster)
        (old,) = [c for c in fallback.connection.channels.values()]
        old.close()
        self.net.flush()
        self.assertEqual([str(link.proxy) for link in cluster.links], ["10.0.0.1:22"])
        self.assertNotIn(fallback, cluster.links)

    def test_after_failback_a_loss_rotates_on_from_the_preferred_candidate(self):
        cluster = self.cluster_
        self.net.bring_back(*A)
        self.net.advance(0.5)
        self.assertEqual(self.up_on(cluster), "10.0.0.1:22")
        self.net.take_down(*A)
        self.net.advance(0.5)
        self.assertEqual(self.net.attempts[-1], (1.5, "10.0.0.2:22"))
        self.assertEqual(self.up_on(cluster), "10.0.0.2:22")


class RetirementTests(MemoryClusterTestCase):
    def test_a_retired_cluster_stops_after_its_last_stream(self):
        cluster = self.cluster()
        channel, peer = self.open(cluster)
        retired = cluster.retire()
        self.net.advance(60)
        self.assertNoResult(retired)
        self.assertTrue(cluster.running)
        channel.send(b"still here")
        self.net.flush()
        self.assertEqual(peer.data, b"still here")
        channel.close()
        self.net.advance(0)
        self.successResultOf(retired)
        self.assertFalse(cluster.running)
        self.assertEqual(cluster.links, set())

    def test_a_retired_cluster_without_streams_stops_at_once(self):
        cluster = self.cluster()
        retired = cluster.retire()
        self.net.flush()
        self.successResultOf(retired)
        self.assertEqual((cluster.running, cluster.links), (False, set()))


class ExecSwitchTests(MemoryClusterTestCase):
    def test_a_node_refusing_forwarding_switches_the_cluster_to_exec_once(self):
        self.node(A, allow_tcp_forwarding=False)
        cluster = self.cluster(A)
        self.assertFalse(cluster.exec_mode)
        openings = [cluster.open_stream(*ECHO, ORIGIN) for _ in range(2)]
        self.net.flush()
        channels = [self.successResultOf(opening) for opening in openings]
        self.assertTrue(cluster.exec_mode)
        self.assertTrue(all(isinstance(channel, ExecTunnelChannel) for channel in channels))
        switches = [e for e in self.events if "switching to exec mode" in e.get("log_format", "")]
        self.assertEqual(len(switches), 1)
        peer = Collector()
        channels[0].attach(peer)
        channels[0].send(b"over netcat")
        self.net.flush()
        self.assertEqual(peer.data, b"over netcat")

    def test_mode_direct_tcpip_does_not_switch(self):
        self.node(A, allow_tcp_forwarding=False)
        cluster = self.cluster(A, mode="direct-tcpip")
        opening = cluster.open_stream(*ECHO, ORIGIN)
        self.net.flush()
        self.assertEqual(self.failureResultOf(opening, StreamError).value.reason, Reason.PROHIBITED)
        self.assertFalse(cluster.exec_mode)
        self.assertEqual(cluster.open_streams, 0)


class OpenTimeoutTests(MemoryClusterTestCase):
    def test_a_node_that_does_not_answer_the_open_times_out(self):
        cluster = self.cluster(open_timeout=4.0)
        opening = cluster.open_stream(*SILENT, ORIGIN)
        self.net.advance(3.9)
        self.assertNoResult(opening)
        self.net.advance(0.1)
        error = self.failureResultOf(opening, StreamError).value
        self.assertEqual(error.reason, Reason.TIMEOUT)
        self.assertEqual(error.detail, "proxy node did not open 10.1.0.9:9 within 4 s")
        self.assertEqual(cluster.open_streams, 0)

    def test_a_waiting_stream_fails_unavailable_when_no_candidate_answers(self):
        for address in (A, B):
            self.node(address)
            self.net.take_down(*address)
        cluster = self.cluster(connect_timeout=3.0)
        waiting = cluster.open_stream(*ECHO, ORIGIN)
        self.net.advance(2.9)
        self.assertNoResult(waiting)
        self.net.advance(0.1)
        error = self.failureResultOf(waiting, StreamError).value
        self.assertEqual(error.reason, Reason.UNAVAILABLE)
        self.assertIn("within 3 s", error.detail)


class AdmissionTests(MemoryClusterTestCase):
    def test_max_streams_refuses_until_a_stream_ends(self):
        cluster = self.cluster(max_streams=1)
        channel, _ = self.open(cluster)
        refused = self.failureResultOf(cluster.open_stream(*ECHO, ORIGIN), StreamError).value
        self.assertEqual(refused.reason, Reason.OVERLOADED)
        channel.close()
        self.net.flush()
        self.open(cluster)

    def test_a_full_ssh_connection_refuses_instead_of_overrunning_sshd(self):
        # OpenSSH ends a connection past 16384 channels; here the cap is 1.
        self.patch(connection_module, "MAX_CHANNELS_PER_CONNECTION", 1)
        cluster = self.cluster()
        self.open(cluster)
        opening = cluster.open_stream(*ECHO, ORIGIN)
        self.assertEqual(self.failureResultOf(opening, StreamError).value.reason, Reason.OVERLOADED)
        self.assertEqual(cluster.open_streams, 1)

    def test_links_spread_over_candidates_and_streams_over_links(self):
        cluster = self.cluster(connections=2)
        self.assertEqual(sorted(str(link.proxy) for link in cluster.links), ["10.0.0.1:22", "10.0.0.2:22"])
        self.open(cluster)
        self.open(cluster)
        self.assertEqual(sorted(link.open_channels for link in cluster.links), [1, 1])


class LostConnectionTests(MemoryClusterTestCase):
    def test_why_an_established_connection_ended_is_logged(self):
        # Conch's own "Disconnecting with error" line is filtered out (too
        # chatty at hundreds of clusters), so the cluster's event says it.
        cluster = self.cluster()
        (link,) = cluster.links
        link.transport.sendDisconnect(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
        self.net.flush()
        self.assertEqual(cluster.last_error, "connection to 10.0.0.1:22 lost: bad MAC")
        self.assertTrue(any("bad MAC" in str(e.get("error")) for e in self.events), self.events)


class ConnectorTests(TestCase):
    """ClusterConnection over a connector that fails every attempt: no SSH at all."""

    def setUp(self):
        self.clock = Clock()
        self.attempts: list[str] = []
        self.config = parse_cluster(
            "c1",
            {
                "proxies": ["10.0.0.1:22", "10.0.0.2:2222"],
                "user": "root",
                "key": private_pem(generate_key()),
                "insecure_accept_any_host_key": True,
                "networks": ["10.1.0.0/24"],
                "connect_timeout": 3.0,
            },
            "(test)",
            "clusters.c1",
        )

    def _failing_connector(self, proxy, factory):
        self.attempts.append(str(proxy))
        return fail(SSHConnectError(f"cannot reach {proxy}"))

    def test_candidates_rotate_with_backoff(self):
        cluster = ClusterConnection(self.config, self.clock, self._failing_connector, jitter=lambda: 0.999999)
        cluster.startService()
        self.assertEqual(cluster.state, "backoff")
        self.assertEqual(self.attempts, ["10.0.0.1:22"])
        self.clock.advance(0.49)
        self.assertEqual(len(self.attempts), 1)
        self.clock.advance(0.01)
        self.assertEqual(self.attempts, ["10.0.0.1:22", "10.0.0.2:2222"])
        self.clock.advance(1.0)
        self.assertEqual(self.attempts[-1], "10.0.0.1:22")
        self.assertEqual(cluster.last_error, "cannot reach 10.0.0.1:22")
        cluster.stopService()
        self.assertEqual(cluster.state, "stopped")
        self.clock.advance(60)
        self.assertEqual(len(self.attempts), 3)

    def test_waiting_stream_fails_unavailable_after_connect_timeout(self):
        cluster = ClusterConnection(self.config, self.clock, self._failing_connector)
        cluster.startService()
        waiting = cluster.open_stream("10.1.0.5", 22, ("127.0.0.1", 0))
        self.assertNoResult(waiting)
        self.clock.advance(3.0)
        error = self.failureResultOf(waiting, StreamError).value
        self.assertEqual(error.reason, Reason.UNAVAILABLE)
        self.assertIn("within 3 s", error.detail)
        self.assertIn("cannot reach", error.detail)
        cluster.stopService()

    def test_stopped_cluster_is_unavailable_at_once(self):
        cluster = ClusterConnection(self.config, self.clock, self._failing_connector)
        error = self.failureResultOf(cluster.connection(), StreamError).value
        self.assertEqual(error.reason, Reason.UNAVAILABLE)
