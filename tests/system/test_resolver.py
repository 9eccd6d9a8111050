"""
Names resolved on the proxy node, against real OpenSSH sshd and glibc's
getent in the namespace lab (tests/system/netlab.py): the names are written in
the proxy namespaces' hosts files, which `ip netns exec` (and so sshd and the
commands it runs) sees as /etc/hosts.

The cluster connection is the gateway's own (L{ClusterConnection}, in this
test process); its SSH connection reaches the proxy node through
`ip netns exec <ctl> nc`, so every packet stays inside the lab's namespaces.
Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import time
from ipaddress import ip_address

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from gateway.cluster.connection import ClusterConnection
from gateway.config import parse_cluster
from gateway.errors import Reason, StreamError
from gateway.ssh.proxycommand import command_endpoint
from tests.support import inline
from tests.system.netlab import INTERNAL_NAME, MIXED_NAME, OUTSIDE_NAME, RESOLVED_NAME, Lab
from tests.system.support import INTERNAL, shared_lab


def _without_sessions(lab: Lab, workdir: str) -> None:
    """The same node and host keys, but no sessions: no command runs."""
    lab.start_sshd("proxy-a-nosession", lab.proxy_ns["a"], lab.proxy_addr["a"], 2222, "MaxSessions 0")


class ResolverSystemTests(TestCase):
    lab: Lab

    def setUp(self) -> None:
        self.lab = shared_lab("resolver_lab", "resolver system tests", _without_sessions)[0]

    def cluster(self, port: int = 22, **settings: object) -> ClusterConnection:
        lab = self.lab
        config = parse_cluster(
            "cluster-a",
            {
                "proxies": [f"{lab.proxy_addr['a']}:{port}"],
                "user": "root",
                "key_file": lab.client_key_ed25519,
                "known_hosts": lab.known_hosts,
                "networks": ["10.251.0.0/24"],
                "connect_timeout": 10,
                **settings,
            },
            "(test)",
            "clusters.cluster-a",
        )
        template = f"ip netns exec {lab.ctl_ns} nc {{host}} {{port}}"
        cluster = ClusterConnection(
            config,
            reactor,
            lambda proxy, factory: command_endpoint(reactor, template, proxy.host, proxy.port).connect(factory),
        )
        cluster.startService()
        self.addCleanup(cluster.stopService)
        return cluster

    async def refused(self, resolving: Deferred, reason: Reason) -> StreamError:
        with self.assertRaises(StreamError) as raised:
            await resolving
        self.assertEqual(raised.exception.reason, reason, raised.exception)
        return raised.exception

    @inline
    async def test_names_of_the_proxy_nodes_hosts_file(self):
        cluster = self.cluster()
        self.assertEqual(await cluster.resolve(RESOLVED_NAME), (ip_address(INTERNAL),))
        self.assertEqual(await cluster.resolve(INTERNAL_NAME), (ip_address(INTERNAL),))
        # what the networks check will refuse: the node's own loopback, and a
        # name with an address on each side
        self.assertEqual(await cluster.resolve(OUTSIDE_NAME), (ip_address("127.0.0.1"),))
        self.assertEqual(set(await cluster.resolve(MIXED_NAME)), {ip_address(INTERNAL), ip_address("127.0.0.1")})
        error = await self.refused(cluster.resolve("nope.tenant.test"), Reason.HOST_UNREACHABLE)
        self.assertEqual(error.detail, "'nope.tenant.test' not found by the proxy node's resolver")
        (link,) = cluster.links
        self.assertEqual((link.open_channels, cluster.open_streams), (0, 0))
        self.assertEqual(cluster.stats.resolver.runs, 5)

    @inline
    async def test_cached_answers_and_one_run_for_concurrent_requests(self):
        cluster = self.cluster()
        started = time.monotonic()
        first = await cluster.resolve(RESOLVED_NAME)
        ran = time.monotonic() - started
        started = time.monotonic()
        self.assertEqual(await cluster.resolve(RESOLVED_NAME), first)
        cached = time.monotonic() - started
        together = [cluster.resolve(INTERNAL_NAME) for _ in range(10)]
        for resolving in together:
            self.assertEqual(await resolving, (ip_address(INTERNAL),))
        stats = cluster.stats.resolver
        self.assertEqual((stats.runs, stats.cache_hits, stats.joined), (2, 1, 9))
        print(
            f"\nresolve on the proxy node: first {ran * 1000:.1f} ms (with the SSH login), cached {cached * 1e6:.0f} us"
        )

    @inline
    async def test_a_custom_command(self):
        cluster = self.cluster(resolver_command="getent hosts {host} | cut -d' ' -f1")
        self.assertEqual(await cluster.resolve(RESOLVED_NAME), (ip_address(INTERNAL),))
        hostile = await self.refused(cluster.resolve("x.test; echo 10.251.0.99"), Reason.HOST_UNREACHABLE)
        self.assertIn("gave no address", hostile.detail)  # the name stayed one word

    @inline
    async def test_a_failing_command_logs_its_stderr(self):
        cluster = self.cluster(resolver_command="no-such-resolver {host}")
        error = await self.refused(cluster.resolve(RESOLVED_NAME), Reason.GENERAL)
        self.assertEqual(error.detail, f"{RESOLVED_NAME!r}: the proxy node's resolver failed")
        self.assertIn("the proxy node's resolver failed: no-such-resolver exited with status 127", error.log_detail)
        self.assertIn("not found", error.log_detail)

    @inline
    async def test_a_node_that_runs_no_commands(self):
        """sshd with `MaxSessions 0` refuses every session: names are not resolved there."""
        cluster = self.cluster(port=2222)
        error = await self.refused(cluster.resolve(RESOLVED_NAME), Reason.PROHIBITED)
        self.assertIn("names are not resolved on the proxy node: exec refused", error.detail)
        (link,) = cluster.links
        self.assertEqual(link.open_channels, 0)
