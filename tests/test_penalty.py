"""
Penalty-aware back-off (gateway.cluster.penalty): after a failure sshd's
PerSourcePenalties counts, the next attempt to that proxy node waits 10 s,
doubling to 30 s, one attempt at a time; network errors keep the slots' own
back-off; a success resets it.  The gate alone, then the gateway's real SSH
client against Conch proxy nodes in memory (L{MemoryNetwork}) on a
C{MemoryReactorClock}; against real sshd in tests/system/test_penalty.py.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gateway.cluster.connection import ClusterConnection
from gateway.cluster.penalty import ProxyFailure, ProxyGate, penalty_delay
from gateway.config import ProxyAddress, parse_cluster
from gateway.control.registry import cluster_status
from gateway.ssh.transport import ConnectFailure
from gateway.testing import DEMO_USER, MemoryNetwork, generate_key, private_pem, public_line

A = ("10.0.0.1", 22)
B = ("10.0.0.2", 22)


def top() -> float:
    """The top of the jitter range: back-off delays come out exact."""
    return 1.0


class DelayTests(SynchronousTestCase):
    def test_floor_doubling_cap(self):
        self.assertEqual([penalty_delay(n, top) for n in range(1, 6)], [10.0, 20.0, 30.0, 30.0, 30.0])

    def test_jitter_only_stretches(self):
        self.assertEqual(penalty_delay(1, lambda: 0.0), 15.0)
        self.assertEqual(penalty_delay(4, lambda: 0.0), 45.0)


class GateTests(SynchronousTestCase):
    def setUp(self):
        self.gate = ProxyGate(ProxyAddress("10.0.0.1"), top)

    def fail(self, attempt: int, kind: ConnectFailure, at: float) -> float | None:
        return self.gate.failed(attempt, ProxyFailure(kind, "why", at))

    def test_one_attempt_at_a_time(self):
        gate = self.gate
        self.assertEqual(self.fail(gate.start(), ConnectFailure.AUTH, 5.0), 10.0)
        self.assertEqual((gate.wait(5.0), gate.wait(14.0), gate.wait(15.0)), (10.0, 1.0, 0.0))
        probe = gate.start()
        self.assertIsNone(gate.wait(15.0))
        # A network failure settles it without closing the node for longer.
        self.assertIsNone(self.fail(probe, ConnectFailure.NETWORK, 16.0))
        self.assertEqual((gate.wait(16.0), gate.penalties), (0.0, 1))

    def test_together_count_once(self):
        gate = self.gate
        attempts = [gate.start() for _ in range(3)]
        waits = [self.fail(attempt, ConnectFailure.KEX, 1.0 + i) for i, attempt in enumerate(attempts)]
        self.assertEqual((waits, gate.penalties), ([10.0, 9.0, 8.0], 1))
        self.assertEqual(gate.failures, {"kex": 3})

    def test_success_resets(self):
        gate = self.gate
        for at in (0.0, 10.0):
            self.fail(gate.start(), ConnectFailure.HOSTKEY, at)
        self.assertEqual((gate.penalties, gate.not_before), (2, 30.0))
        gate.start()
        gate.succeeded()
        self.assertEqual((gate.penalties, gate.wait(30.0), gate.last_failure), (0, 0.0, None))
        self.assertEqual(self.fail(gate.start(), ConnectFailure.DROPPED, 40.0), 10.0)


class _Dropper(Protocol):
    """What sshd does with a source it penalises (or past MaxStartups): one line, then close."""

    line = b"Not allowed at this time\r\n"

    def connectionMade(self) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()


class _OldDropper(_Dropper):
    """sshd before 9.8, past MaxStartups."""

    line = b"Exceeded MaxStartups\r\n"


class _Http(_Dropper):
    line = b"HTTP/1.1 400 Bad Request\r\n\r\n"


class _Stand:
    """A stand-in for a proxy node: L{MemoryNetwork.connect} needs only its factory."""

    def __init__(self, protocol: type[Protocol]) -> None:
        self.factory = Factory.forProtocol(protocol)


class SpacingTests(SynchronousTestCase):
    """The attempts a cluster makes, with the times, against nodes in memory."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.net = MemoryNetwork(self.clock)
        self.key = generate_key()
        self.stranger = generate_key()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def node(self, address, *, refuse: bool = False, **options):
        """A node at C{address} (a new one replaces the old, keeping its host key) that may refuse our key."""
        old = self.net.nodes.get(address)
        if old is not None and hasattr(old, "host_key"):
            options.setdefault("host_key", old.host_key)
        return self.net.add_node(*address, [self.stranger if refuse else self.key], **options)

    def cluster(self, *candidates, host_keys=None, **settings) -> ClusterConnection:
        config = parse_cluster(
            "c1",
            {
                "proxies": [f"{host}:{port}" for host, port in candidates],
                "user": DEMO_USER,
                "key": private_pem(self.key),
                "host_keys": host_keys or [public_line(self.net.nodes[a].host_key) for a in candidates],
                "networks": ["10.1.0.0/24"],
                **settings,
            },
            "(test)",
            "clusters.c1",
        )
        cluster = ClusterConnection(config, self.clock, self.net.connect, jitter=top)
        cluster.startService()
        self.addCleanup(self._stop, cluster)
        self.net.flush()
        return cluster

    def _stop(self, cluster: ClusterConnection) -> None:
        if not cluster.running:
            return
        stopping = cluster.stopService()
        self.net.advance(0)
        self.successResultOf(stopping)

    def times(self, proxy: str = "10.0.0.1:22") -> list[float]:
        return [at for at, to in self.net.attempts if to == proxy]

    def last_failure(self, cluster: ClusterConnection, address=A) -> ProxyFailure:
        failure = cluster.pacer.gates[ProxyAddress(*address)].last_failure
        assert failure is not None
        return failure

    def test_auth_spacing(self):
        """A node refusing the key: 10 s, 20 s, then 30 s (the maximum) between attempts."""
        self.node(A, refuse=True)
        cluster = self.cluster(A)
        self.net.advance(150)
        self.assertEqual(self.times(), [0.0, 10.0, 30.0, 60.0, 90.0, 120.0, 150.0])
        self.assertEqual(self.last_failure(cluster).kind, ConnectFailure.AUTH)
        self.assertEqual(cluster.state, "backoff")

    def test_network_unchanged(self):
        self.node(A)
        self.net.take_down(*A)
        cluster = self.cluster(A)
        self.net.advance(62)
        self.assertEqual(self.times(), [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5, 61.5])
        self.assertEqual(self.last_failure(cluster).kind, ConnectFailure.NETWORK)

    def test_success_resets(self):
        self.node(A, refuse=True)
        cluster = self.cluster(A)
        self.net.advance(15)
        self.node(A)  # the key is authorized now
        self.net.advance(15)
        self.assertEqual((self.times(), cluster.state), ([0.0, 10.0, 30.0], "up"))
        self.assertEqual(cluster_status(cluster)["proxies"], [{"proxy": "10.0.0.1:22", "last_failure": None}])
        # Refused again after the link is lost: 10 s again, not 40.
        self.net.take_down(*A)
        self.node(A, refuse=True)
        self.net.bring_back(*A)
        self.net.advance(11)
        self.assertEqual(self.times(), [0.0, 10.0, 30.0, 30.5, 40.5])

    def test_slots_one_at_a_time(self):
        """Three slots start together; after that, one attempt goes to the refusing node at a time."""
        self.node(A, refuse=True)
        self.cluster(A, connections=3)
        self.net.advance(60)
        self.assertEqual(self.times(), [0.0, 0.0, 0.0, 10.0, 30.0, 60.0])

    def test_fallback_probes_wait(self):
        """Up on B, the slot's probes of its preferred A (which refuses the key) keep to A's gate."""
        self.node(A, refuse=True)
        self.node(B)
        cluster = self.cluster(A, B)
        self.net.advance(60)
        self.assertEqual(cluster.proxy, ProxyAddress(*B))
        self.assertEqual(self.times(), [0.0, 10.0, 30.0, 60.0])

    def test_kinds(self):
        """Each failure's kind, and whether it closes the node for 10 s or keeps the 0.5 s back-off."""
        stranger = [public_line(generate_key())]

        def old_kex():
            node = self.node(A)
            group14 = {"supportedKeyExchanges": [b"diffie-hellman-group14-sha1"]}
            node.factory.protocol = type("OldKex", (node.factory.protocol,), group14)

        cases = [
            ("auth", lambda: self.node(A, refuse=True), None, 10.0, "the proxy node refused the key"),
            ("hostkey", lambda: self.node(A), stranger, 10.0, "host key"),
            ("kex", old_kex, None, 10.0, "no key exchange in common with the proxy node"),
            (
                "dropped",
                lambda: self.net.nodes.__setitem__(A, _Stand(_Dropper)),
                stranger,
                10.0,
                "unread ('Not allowed at this time': MaxStartups, or PerSourcePenalties from OpenSSH 9.8)",
            ),
            ("dropped", lambda: self.net.nodes.__setitem__(A, _Stand(_OldDropper)), stranger, 10.0, "'Exceeded MaxS"),
            ("protocol", lambda: self.net.nodes.__setitem__(A, _Stand(_Http)), stranger, 0.5, "not an SSH server"),
        ]
        for kind, make, host_keys, wait, says in cases:
            self.net.attempts.clear()
            make()
            start = self.clock.seconds()
            cluster = self.cluster(A, host_keys=host_keys)
            self.net.advance(12)
            failure = self.last_failure(cluster)
            self.assertEqual(failure.kind.value, kind)
            self.assertIn(says, failure.error)
            self.assertEqual(self.times()[:2], [start, start + wait], kind)
            self._stop(cluster)
            del self.net.nodes[A]

    def test_log_once(self):
        """One warning per failure, saying that sshd may be penalising us and when the next attempt is."""
        self.node(A, refuse=True)
        self.cluster(A)
        self.net.advance(35)
        warnings = [e for e in self.events if "PerSourcePenalties" in e.get("log_format", "")]
        self.assertEqual(
            [(e["kind"], e["next_attempt_in"]) for e in warnings], [("auth", 10.0), ("auth", 20.0), ("auth", 30.0)]
        )
        self.assertEqual(
            warnings[0]["log_format"].format(**warnings[0]),
            f"cluster c1: authentication as {DEMO_USER!r} failed: the proxy node refused the key; sshd may be"
            " penalising this source (PerSourcePenalties): next attempt to 10.0.0.1:22 in 10 s",
        )

    def test_status(self):
        """status.proxies: each candidate's last failure with its kind, time and the next attempt."""
        self.node(A, refuse=True)
        self.node(B)
        self.net.take_down(*B)
        cluster = self.cluster(A, B)
        self.net.advance(1)
        self.assertEqual(
            cluster_status(cluster)["proxies"],
            [
                {
                    "proxy": "10.0.0.1:22",
                    "last_failure": {
                        "kind": "auth",
                        "error": f"authentication as {DEMO_USER!r} failed: the proxy node refused the key",
                        "at": "1970-01-01T00:00:00Z",
                        "next_attempt_in": 9.0,
                    },
                },
                {
                    "proxy": "10.0.0.2:22",
                    "last_failure": {
                        "kind": "network",
                        "error": "cannot connect to 10.0.0.2:22: Connection was refused by other side: 10.0.0.2: 22.",
                        "at": "1970-01-01T00:00:00Z",
                        "next_attempt_in": None,
                    },
                },
            ],
        )
