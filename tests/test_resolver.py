"""
Names resolved on the proxy node (L{gateway.cluster.resolver}): the parser of
C{getent ahosts} output, the cache on a L{Clock} with a scripted command, and
L{ClusterConnection.resolve} against the fake proxy node in memory.  Against
real sshd: tests/system/test_resolver.py.
"""

from __future__ import annotations

import shlex
from ipaddress import IPv4Address, IPv6Address, ip_address

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gateway.cluster import connection as connection_module
from gateway.cluster.resolver import (
    MAX_ENTRIES,
    NEGATIVE_TTL,
    Resolver,
    ResolverStats,
    parse_getent_ahosts,
)
from gateway.config import parse_cluster
from gateway.errors import Reason, StreamError
from gateway.routing import IPAddress
from gateway.ssh.command import OUTPUT_LIMIT, CommandResult
from gateway.testing import DEMO_USER, generate_key, private_pem
from gateway.testing.channels import ServerSession
from tests.support import capture_events
from tests.test_cluster import ECHO, ORIGIN, MemoryClusterTestCase

#: `getent ahosts localhost` on this machine (glibc's "%-15s %-6s %s\n").
GETENT_LOCALHOST = b"127.0.0.1       STREAM localhost\n127.0.0.1       DGRAM  \n127.0.0.1       RAW    \n"
#: ... for a name with an IPv6 and an IPv4 address (IPv6 first, as glibc sorts them).
GETENT_DUAL = (
    b"fd00::5         STREAM api.svc.test\n"
    b"fd00::5         DGRAM  \n"
    b"fd00::5         RAW    \n"
    b"10.0.0.5        STREAM \n"
    b"10.0.0.5        DGRAM  \n"
    b"10.0.0.5        RAW    \n"
)
#: `dig +short www.example.test`: the CNAME chain, then the addresses.
DIG_SHORT = b"web.example.test.\nlb.example.test.\n10.0.0.7\n10.0.0.8\n"


def addresses(*texts: str) -> tuple[IPAddress, ...]:
    return tuple(ip_address(text) for text in texts)


def config(**settings: object):
    return parse_cluster(
        "c1",
        {
            "proxies": ["10.0.0.1"],
            "user": DEMO_USER,
            "key": private_pem(generate_key()),
            "insecure_accept_any_host_key": True,
            "networks": ["10.0.0.0/24"],
            **settings,
        },
        "(test)",
        "clusters.c1",
    )


_CONFIG = config()


class ParseTests(SynchronousTestCase):
    def test_real_getent_output(self):
        self.assertEqual(parse_getent_ahosts(GETENT_LOCALHOST), addresses("127.0.0.1"))

    def test_ipv6_and_ipv4_in_order_each_once(self):
        self.assertEqual(parse_getent_ahosts(GETENT_DUAL), addresses("fd00::5", "10.0.0.5"))
        self.assertIsInstance(parse_getent_ahosts(GETENT_DUAL)[0], IPv6Address)

    def test_ipv4_mapped_is_the_ipv4_address(self):
        output = b"::ffff:10.0.0.5  STREAM api\n10.0.0.5 STREAM\n::ffff:a00:6 RAW\n"
        self.assertEqual(parse_getent_ahosts(output), addresses("10.0.0.5", "10.0.0.6"))
        self.assertIsInstance(parse_getent_ahosts(output)[0], IPv4Address)

    def test_zone_ids_are_dropped(self):
        output = b"fe80::1%eth0    STREAM api\nfe80::2%2 DGRAM\n10.0.0.5 STREAM\n"
        self.assertEqual(parse_getent_ahosts(output), addresses("10.0.0.5"))
        self.assertRaises(ValueError, parse_getent_ahosts, b"fe80::1%eth0    STREAM api\n")

    def test_dig_and_one_address_per_line(self):
        self.assertEqual(parse_getent_ahosts(DIG_SHORT), addresses("10.0.0.7", "10.0.0.8"))
        self.assertEqual(parse_getent_ahosts(b"10.0.0.9\r\n\r\nfd00::9"), addresses("10.0.0.9", "fd00::9"))

    def test_garbage_lines_are_skipped(self):
        output = (
            b"\xff\xfe garbage\n"
            b"getent: warning\n"
            b"\x00\x00\n"
            b"   \t \n"
            b"10.0.0.300 STREAM\n"
            b"010.0.0.5 STREAM\n"
            b"1 STREAM\n"
            b"10.0.0.5/24 STREAM\n"
            b"[fd00::1] STREAM\n"
            b"\xd9\xa1\xd9\xa0.0.0.5 STREAM\n"  # Arabic-Indic digits
            b"  10.0.0.5   STREAM indented\n"
        )
        self.assertEqual(parse_getent_ahosts(output), addresses("10.0.0.5"))

    def test_no_address_is_refused(self):
        for output in (b"", b"\n\n", b";; connection timed out; no servers could be reached\n", b"x" * 70000):
            self.assertRaises(ValueError, parse_getent_ahosts, output)


class ScriptedRuns:
    """The run function a L{Resolver} is given: each command waits for the test to answer it."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []
        self.pending: list[Deferred[CommandResult]] = []

    def __call__(self, command: bytes) -> Deferred[CommandResult]:
        self.commands.append(command)
        running: Deferred[CommandResult] = Deferred()
        self.pending.append(running)
        return running

    def answer(self, status: int | None = 0, stdout: bytes = GETENT_LOCALHOST, **result: object) -> None:
        self.pending.pop(0).callback(CommandResult("getent", status, stdout=stdout, **result))  # type: ignore[arg-type]

    def fail(self, error: Exception) -> None:
        self.pending.pop(0).errback(error)


class CacheTests(SynchronousTestCase):
    def resolver(self, max_entries: int = MAX_ENTRIES, **settings: object) -> Resolver:
        self.clock = Clock()
        self.runs = ScriptedRuns()
        self.stats = ResolverStats()
        cluster = config(**settings) if settings else _CONFIG
        return Resolver(cluster, self.runs, self.clock, self.stats, max_entries)

    def resolved(self, resolver: Resolver, name: str = "api.svc.test") -> tuple[IPAddress, ...]:
        return self.successResultOf(resolver.resolve(name))

    def refused(self, resolving: Deferred, reason: Reason) -> StreamError:
        error = self.failureResultOf(resolving, StreamError).value
        self.assertEqual(error.reason, reason)
        return error

    def test_the_name_is_one_shell_word(self):
        resolver = self.resolver(resolver_command="exec getent ahosts {host} # {{x}}")
        for name in ("api.svc.test", "x;reboot", "$(id)", "a b", "it's"):
            resolver.resolve(name)
            command = self.runs.commands[-1].decode()
            self.assertEqual(shlex.split(command, comments=True), ["exec", "getent", "ahosts", name], command)

    def test_answers_are_cached_for_the_ttl(self):
        resolver = self.resolver(resolve_ttl=30)
        resolving = resolver.resolve("api.svc.test")
        self.assertEqual(self.runs.commands, [b"getent ahosts api.svc.test"])
        self.runs.answer(stdout=GETENT_DUAL)
        self.assertEqual(self.successResultOf(resolving), addresses("fd00::5", "10.0.0.5"))
        self.clock.advance(29.9)
        self.assertEqual(self.resolved(resolver), addresses("fd00::5", "10.0.0.5"))
        self.assertEqual(len(self.runs.commands), 1)
        self.clock.advance(0.1)
        resolving = resolver.resolve("api.svc.test")
        self.assertEqual(len(self.runs.commands), 2)
        self.runs.answer()
        self.assertEqual(self.successResultOf(resolving), addresses("127.0.0.1"))
        self.assertEqual((self.stats.runs, self.stats.cache_hits, self.stats.joined), (2, 1, 0))

    def test_the_count_is_bounded_least_recently_used_first(self):
        resolver = self.resolver(max_entries=2)
        for name in ("a.test", "b.test"):
            resolver.resolve(name)
            self.runs.answer()
        self.resolved(resolver, "a.test")  # b.test is now the least recently used
        resolver.resolve("c.test")
        self.runs.answer()
        self.assertEqual(list(resolver._cache), ["a.test", "c.test"])
        self.resolved(resolver, "a.test")
        self.resolved(resolver, "c.test")
        resolver.resolve("b.test")
        self.assertEqual(self.runs.commands[-1], b"getent ahosts b.test")
        self.assertEqual(MAX_ENTRIES, 1024)

    def test_not_found_is_remembered_for_the_negative_ttl(self):
        resolver = self.resolver()
        resolving = resolver.resolve("nope.test")
        self.runs.answer(status=2, stdout=b"")
        error = self.refused(resolving, Reason.HOST_UNREACHABLE)
        self.assertEqual(error.detail, "'nope.test' not found by the proxy node's resolver")
        self.clock.advance(NEGATIVE_TTL - 0.1)
        self.refused(resolver.resolve("nope.test"), Reason.HOST_UNREACHABLE)
        self.assertEqual(len(self.runs.commands), 1)
        self.clock.advance(0.1)
        resolving = resolver.resolve("nope.test")
        self.runs.answer()
        self.successResultOf(resolving)
        self.assertEqual(dict(self.stats.failures), {"host-unreachable": 1})

    def test_the_negative_ttl_is_never_longer_than_the_ttl(self):
        resolver = self.resolver(resolve_ttl=1)
        resolving = resolver.resolve("nope.test")
        self.runs.answer(status=2)
        self.refused(resolving, Reason.HOST_UNREACHABLE)
        self.clock.advance(1)
        resolver.resolve("nope.test")
        self.assertEqual(len(self.runs.commands), 2)

    def test_ttl_zero_caches_nothing(self):
        resolver = self.resolver(resolve_ttl=0)
        for status in (0, 0, 2, 2):
            resolving = resolver.resolve("api.svc.test")
            self.runs.answer(status=status)
            if status:
                self.refused(resolving, Reason.HOST_UNREACHABLE)
            else:
                self.successResultOf(resolving)
        self.assertEqual((len(self.runs.commands), self.stats.cache_hits), (4, 0))
        self.assertEqual(len(resolver._cache), 0)

    def test_transient_failures_are_not_cached(self):
        resolver = self.resolver()
        for error in (
            StreamError(Reason.TIMEOUT, "getent did not finish on the proxy node within 15 s"),
            StreamError(Reason.UNAVAILABLE, "no SSH connection to cluster 'c1' within 15 s"),
            StreamError(Reason.OVERLOADED, "every SSH connection carries 16000 streams"),
        ):
            resolving = resolver.resolve("api.svc.test")
            self.runs.fail(error)
            refused = self.refused(resolving, error.reason)
            self.assertEqual(len(resolver._cache), 0)
        self.assertEqual(refused.detail, error.detail)  # about the cluster: passed on as it is
        resolving = resolver.resolve("api.svc.test")
        self.runs.fail(StreamError(Reason.TIMEOUT, "getent did not finish on the proxy node within 15 s"))
        self.assertEqual(
            self.refused(resolving, Reason.TIMEOUT).detail,
            "'api.svc.test': getent did not finish on the proxy node within 15 s",
        )
        self.assertEqual(len(self.runs.commands), 4)

    def test_command_failures(self):
        resolver = self.resolver(resolve_ttl=0)
        cases = [
            (
                {"status": 0, "stdout": b""},
                Reason.HOST_UNREACHABLE,
                "'x.test': the proxy node's resolver gave no address",
            ),
            ({"status": 0, "stdout": DIG_SHORT[:36]}, Reason.HOST_UNREACHABLE, "gave no address"),
            (
                {"status": 127, "stdout": b"", "stderr": "sh: 1: getent: not found"},
                Reason.GENERAL,
                "'x.test': the proxy node's resolver failed: getent exited with status 127: sh: 1: getent: not found",
            ),
            (
                {"status": 1, "stdout": b"", "stderr": "\x1b[2Jforged\nline"},
                Reason.GENERAL,
                "status 1: \\x1b[2Jforged\\nline",
            ),
            ({"status": None, "signal": "KILL"}, Reason.GENERAL, "failed: getent killed by signal KILL"),
            ({"status": None, "signal": "TERM", "stdout": GETENT_LOCALHOST}, Reason.GENERAL, "signal TERM"),
            ({"status": None}, Reason.GENERAL, "failed: getent ended without an exit status"),
            ({"status": 2, "signal": "SEGV"}, Reason.GENERAL, "signal SEGV"),
        ]
        for result, reason, detail in cases:
            resolving = resolver.resolve("x.test")
            self.runs.answer(**result)  # type: ignore[arg-type]
            error = self.refused(resolving, reason)
            self.assertIn(detail, error.log_detail, result)
            if reason is Reason.GENERAL:  # the node's words are for the log only
                self.assertEqual(error.detail, "'x.test': the proxy node's resolver failed")

    def test_exec_refused_is_logged_once_per_cluster(self):
        events = capture_events(self)
        resolver = self.resolver()
        for name in ("a.test", "b.test", "a.test"):
            resolving = resolver.resolve(name)
            if self.runs.pending:
                self.runs.fail(StreamError(Reason.PROHIBITED, "proxy node refused to run getent"))
            error = self.refused(resolving, Reason.PROHIBITED)
        self.assertEqual(
            error.detail, "names are not resolved on the proxy node: exec refused (proxy node refused to run getent)"
        )
        self.assertEqual(len(self.runs.commands), 2)  # a.test's refusal was remembered
        warnings = [e for e in events if "exec refused" in str(e.get("detail"))]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["log_level"].name, "warn")
        self.assertEqual(warnings[0]["cluster"], "c1")

    def test_off(self):
        resolver = self.resolver(resolver_command="")
        error = self.refused(resolver.resolve("api.svc.test"), Reason.NOT_ALLOWED)
        self.assertIn("names are not resolved on the proxy node (resolver_command is off)", error.detail)
        self.assertEqual(self.runs.commands, [])

    def test_concurrent_requests_share_one_run(self):
        resolver = self.resolver()
        first, second = resolver.resolve("api.svc.test"), resolver.resolve("api.svc.test")
        other = resolver.resolve("other.test")
        self.assertEqual(self.runs.commands, [b"getent ahosts api.svc.test", b"getent ahosts other.test"])
        self.runs.answer(stdout=GETENT_DUAL)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertNoResult(other)
        self.assertEqual((self.stats.runs, self.stats.joined), (2, 1))

    def test_concurrent_requests_share_a_failure(self):
        resolver = self.resolver()
        first, second = resolver.resolve("api.svc.test"), resolver.resolve("api.svc.test")
        self.runs.fail(StreamError(Reason.TIMEOUT, "too slow"))
        self.refused(first, Reason.TIMEOUT)
        self.refused(second, Reason.TIMEOUT)
        self.assertEqual(dict(self.stats.failures), {"timeout": 1})

    def test_a_cancelled_request_leaves_the_others_and_the_cache(self):
        resolver = self.resolver()
        first, second = resolver.resolve("api.svc.test"), resolver.resolve("api.svc.test")
        first.cancel()
        self.failureResultOf(first)
        self.assertNoResult(second)
        self.runs.answer()
        self.assertEqual(self.successResultOf(second), addresses("127.0.0.1"))
        alone = resolver.resolve("alone.test")
        alone.cancel()
        self.failureResultOf(alone)
        self.runs.answer()  # nobody waits: still cached
        self.resolved(resolver, "alone.test")
        self.assertEqual(len(self.runs.commands), 2)

    def test_a_failing_request_leaves_the_others(self):
        resolver = self.resolver()
        first, second = resolver.resolve("api.svc.test"), resolver.resolve("api.svc.test")

        def broken(result: object) -> None:
            raise RuntimeError("the caller's bug")

        first.addCallback(broken)
        self.runs.answer()
        self.failureResultOf(first, RuntimeError)
        self.assertEqual(self.successResultOf(second), addresses("127.0.0.1"))

    def test_a_run_that_fails_at_once(self):
        resolver = self.resolver()
        resolver._run = lambda command: fail(StreamError(Reason.UNAVAILABLE, "cluster 'c1' is not running"))
        self.refused(resolver.resolve("api.svc.test"), Reason.UNAVAILABLE)
        self.assertEqual(resolver._running, {})

    def test_an_internal_error_fails_this_name_only(self):
        resolver = self.resolver()
        resolving = resolver.resolve("api.svc.test")
        self.runs.fail(ZeroDivisionError())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("internal error", self.refused(resolving, Reason.GENERAL).detail)
        resolving = resolver.resolve("other.test")
        self.runs.answer()
        self.successResultOf(resolving)


# -- in memory, against the fake proxy node ------------------------------------

NAMES = {"api.svc.test": ["10.1.0.7", "fd00::7"], "x;reboot": ["10.1.0.8"]}


def never_finishes(session: ServerSession, argv: list[str]) -> None:
    """A command that hangs (a resolver waiting for a DNS server that drops packets)."""


def floods(session: ServerSession, argv: list[str]) -> None:
    session.write(b"10.1.0.7 STREAM\n" * (2 * OUTPUT_LIMIT // 16))
    session.finish(0)


class ClusterResolveTests(MemoryClusterTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.proxy = self.node(("10.0.0.1", 22), names=NAMES)

    def resolve(self, cluster, name: str = "api.svc.test") -> Deferred:
        resolving = cluster.resolve(name)
        self.net.flush()
        return resolving

    def assertNothingOpen(self, cluster) -> None:
        (link,) = cluster.links
        self.assertEqual((link.open_channels, cluster.open_streams), (0, 0))

    def test_resolved_by_getent_on_the_node(self):
        cluster = self.cluster(("10.0.0.1", 22))
        self.assertEqual(self.successResultOf(self.resolve(cluster)), addresses("10.1.0.7", "fd00::7"))
        self.assertEqual(self.successResultOf(self.resolve(cluster, "x;reboot")), addresses("10.1.0.8"))
        self.assertNothingOpen(cluster)
        self.successResultOf(self.resolve(cluster))
        stats = cluster.stats.resolver
        self.assertEqual((stats.runs, stats.cache_hits), (2, 1))

    def test_not_found(self):
        cluster = self.cluster(("10.0.0.1", 22))
        error = self.failureResultOf(self.resolve(cluster, "nope.test"), StreamError).value
        self.assertEqual(error.reason, Reason.HOST_UNREACHABLE)
        self.assertEqual(error.detail, "'nope.test' not found by the proxy node's resolver")
        self.assertNothingOpen(cluster)

    def test_a_custom_command(self):
        self.proxy.programs["resolve"] = lambda session, argv: (session.write(b"10.1.0.9\n"), session.finish(0))
        cluster = self.cluster(("10.0.0.1", 22), resolver_command="exec /usr/local/bin/resolve {host}")
        self.assertEqual(self.successResultOf(self.resolve(cluster)), addresses("10.1.0.9"))

    def test_exec_refused(self):
        self.proxy.allow_exec = False
        cluster = self.cluster(("10.0.0.1", 22))
        error = self.failureResultOf(self.resolve(cluster), StreamError).value
        self.assertEqual(error.reason, Reason.PROHIBITED)
        self.assertIn("names are not resolved on the proxy node: exec refused", error.detail)
        self.assertNothingOpen(cluster)
        self.echo(cluster)

    def test_output_over_the_limit(self):
        self.proxy.programs["getent"] = floods
        cluster = self.cluster(("10.0.0.1", 22))
        error = self.failureResultOf(self.resolve(cluster), StreamError).value
        self.assertEqual(error.reason, Reason.GENERAL)
        self.assertIn(f"getent wrote more than {OUTPUT_LIMIT} bytes", error.detail)
        self.assertNothingOpen(cluster)
        self.echo(cluster)

    def test_deadline_is_the_open_timeout(self):
        self.proxy.programs["getent"] = never_finishes
        cluster = self.cluster(("10.0.0.1", 22), open_timeout=4.0)
        resolving = self.resolve(cluster)
        self.net.advance(3.9)
        self.assertNoResult(resolving)
        self.net.advance(0.1)
        error = self.failureResultOf(resolving, StreamError).value
        self.assertEqual(error.reason, Reason.TIMEOUT)
        self.assertEqual(error.detail, "'api.svc.test': getent did not finish on the proxy node within 4 s")
        self.assertNothingOpen(cluster)
        self.echo(cluster)

    def test_connection_lost_mid_run(self):
        self.proxy.programs["getent"] = never_finishes
        cluster = self.cluster(("10.0.0.1", 22), ("10.0.0.2", 22))
        peer = self.echo(cluster)
        resolving = self.resolve(cluster)
        self.net.take_down("10.0.0.1", 22)
        self.net.flush()
        error = self.failureResultOf(resolving, StreamError).value
        self.assertEqual(error.reason, Reason.UNAVAILABLE)
        self.assertEqual(error.detail, "SSH connection lost while getent ran on the proxy node")
        self.assertTrue(peer.closed)
        self.net.advance(1)  # the next candidate serves, names too
        self.assertEqual(self.up_on(cluster), "10.0.0.2:22")
        self.net.nodes[("10.0.0.2", 22)].names.update(NAMES)
        self.assertEqual(self.successResultOf(self.resolve(cluster)), addresses("10.1.0.7", "fd00::7"))

    def test_unavailable_without_a_link(self):
        self.net.take_down("10.0.0.1", 22)
        cluster = self.cluster(("10.0.0.1", 22), connect_timeout=3.0)
        resolving = self.resolve(cluster)
        self.net.advance(3.0)
        error = self.failureResultOf(resolving, StreamError).value
        self.assertEqual(error.reason, Reason.UNAVAILABLE)
        self.assertIn("within 3 s", error.detail)

    def test_a_run_is_no_stream_but_a_channel(self):
        """It neither counts against max_streams nor holds a retirement; the link counts it."""
        self.proxy.programs["getent"] = never_finishes
        cluster = self.cluster(("10.0.0.1", 22), max_streams=1)
        resolving = self.resolve(cluster)
        (link,) = cluster.links
        self.assertEqual((link.open_channels, cluster.open_streams), (1, 0))
        self.echo(cluster)
        self.assertEqual((link.open_channels, cluster.open_streams), (2, 1))
        self.net.advance(15)
        self.failureResultOf(resolving, StreamError)

    def test_a_full_connection_refuses_the_run(self):
        self.patch(connection_module, "MAX_CHANNELS_PER_CONNECTION", 1)
        cluster = self.cluster(("10.0.0.1", 22))
        self.open(cluster)
        error = self.failureResultOf(self.resolve(cluster), StreamError).value
        self.assertEqual(error.reason, Reason.OVERLOADED)

    def test_a_retiring_link_waits_for_the_run(self):
        self.proxy.programs["getent"] = never_finishes
        cluster = self.cluster(("10.0.0.1", 22), open_timeout=4.0)
        resolving = self.resolve(cluster)
        (link,) = cluster.links
        link.retire()
        self.net.advance(3.9)
        self.assertFalse(link.lost.called)
        self.net.advance(0.1)
        self.failureResultOf(resolving, StreamError)
        self.net.flush()
        self.assertTrue(link.lost.called)

    def test_a_retired_cluster_does_not_wait_for_runs(self):
        self.proxy.programs["getent"] = never_finishes
        cluster = self.cluster(("10.0.0.1", 22))
        resolving = self.resolve(cluster)
        retired = cluster.retire()
        self.net.advance(0)
        self.successResultOf(retired)
        self.assertEqual(self.failureResultOf(resolving, StreamError).value.reason, Reason.UNAVAILABLE)

    def test_streams_still_open_after_resolving(self):
        cluster = self.cluster(("10.0.0.1", 22))
        channel, peer = self.open(cluster, ECHO)
        self.successResultOf(self.resolve(cluster))
        channel.send(b"still")
        self.net.flush()
        self.assertEqual(peer.data, b"still")
        self.assertEqual(ORIGIN[0], "127.0.0.1")
