"""
Tests for L{gateway.routing}.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from fnmatch import fnmatchcase

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import keys
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import ClusterConfig, ProxyAddress
from gateway.destinations import canonical_host, normalise_host
from gateway.errors import Reason, StreamError
from gateway.routing import Route, Router, show_username


@functools.cache
def _key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def cluster(
    name: str,
    networks: tuple[str, ...] = (),
    hostnames: tuple[str, ...] = (),
    token: str | None = None,
    aliases: tuple[str, ...] = (),
    resolver: str = "",
) -> ClusterConfig:
    """A cluster; names are resolved on its proxy node only when C{resolver} says how (see ResolvedNameTests)."""
    return ClusterConfig(
        name=name,
        aliases=aliases,
        proxies=(ProxyAddress("10.250.0.1", 22),),
        user="root",
        private_key=_key(),
        known_hosts=None,
        host_keys=(),
        insecure_accept_any_host_key=True,
        networks=tuple(ipaddress.ip_network(n) for n in networks),
        hostnames=hostnames,
        token=token,
        resolver_command=resolver,
    )


A = cluster("a", ("10.251.0.0/24",), aliases=("net-aaaa",))
B = cluster("b", ("10.252.0.0/24", "fd00:b::/64"), ("*.b.internal", "db"), token="tok-b")
C = cluster("c", ("10.253.0.0/24",), ("*.shared.internal",), token="tok-c")
D = cluster("d", ("10.254.0.0/24",), ("*.shared.internal",))
V6 = cluster("v6", ("::/0",))


class RouterTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.router = Router([A, B, C, D, V6])

    def assertStreamError(
        self, reason: Reason, detail: str | None, host: str, port: int = 22, *args: str | None, log: str | None = None
    ) -> StreamError:
        """C{detail} is what the client reads, C{log} (by default the same) what the log says."""
        e = self.assertRaises(StreamError, self.router.route, host, port, *args)
        self.assertEqual(e.reason, reason)
        if detail is not None:
            self.assertEqual(e.detail, detail)
            self.assertEqual(e.log_detail, log or detail)
        for secret in ("tok-b", "tok-c"):
            self.assertNotIn(secret, str(e))
            self.assertNotIn(secret, e.log_detail)
        return e


class LookupTests(RouterTestCase):
    def test_lookup(self) -> None:
        self.assertIs(self.router.lookup("a"), A)
        self.assertIs(self.router.lookup("net-aaaa"), A)
        self.assertIsNone(self.router.lookup("A"))
        self.assertIsNone(self.router.lookup("nope"))
        self.assertEqual(self.router.clusters, (A, B, C, D, V6))

    def test_duplicate_names(self) -> None:
        self.assertRaises(ValueError, Router, [A, cluster("x", ("10.0.0.0/8",), aliases=("a",))])
        self.assertRaises(ValueError, Router, [A, A])

    def test_empty(self) -> None:
        router = Router([])
        e = self.assertRaises(StreamError, router.route, "10.0.0.1", 22)
        self.assertEqual(e.reason, Reason.NO_ROUTE)


class AuthenticateTests(RouterTestCase):
    def test_authenticate(self) -> None:
        r = self.router
        self.assertTrue(r.authenticate("a", None))
        self.assertTrue(r.authenticate("a", "anything"))
        self.assertTrue(r.authenticate("net-aaaa", ""))
        self.assertTrue(r.authenticate("b", "tok-b"))
        self.assertFalse(r.authenticate("b", "tok-c"))
        self.assertFalse(r.authenticate("b", "tok-b "))
        self.assertFalse(r.authenticate("b", ""))
        self.assertFalse(r.authenticate("b", None))
        self.assertFalse(r.authenticate("nope", "tok-b"))
        self.assertFalse(r.authenticate("B", "tok-b"))

    def test_non_ascii(self) -> None:
        router = Router([cluster("u", ("10.0.0.0/8",), token="pässwörd-✓")])
        self.assertTrue(router.authenticate("u", "pässwörd-✓"))
        self.assertFalse(router.authenticate("u", "passwort"))
        self.assertFalse(router.authenticate("u", "\udcff\ud800"))
        self.assertEqual(router.route("10.0.0.1", 1, "u", "pässwörd-✓").cluster.name, "u")

    def test_constant_time(self) -> None:
        """Tokens are compared with hmac.compare_digest, on bytes."""
        calls: list[tuple[object, object]] = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", spy)
        self.assertTrue(self.router.authenticate("b", "tok-b"))
        self.assertEqual(calls, [(b"tok-b", b"tok-b")])
        del calls[:]
        self.assertStreamError(Reason.AUTH_FAILED, None, "10.252.0.1", 22, "b", "wrong")
        self.assertEqual(calls, [(b"wrong", b"tok-b")])
        del calls[:]
        self.router.route("10.252.0.1", 22, "b", "tok-b")
        self.assertEqual(calls, [(b"tok-b", b"tok-b")])


class ExplicitClusterTests(RouterTestCase):
    """Rule 1: a username names the cluster."""

    def test_unknown(self) -> None:
        refused = "proxy credentials not accepted"
        self.assertStreamError(
            Reason.AUTH_FAILED, refused, "10.251.0.1", 22, "x", log="a username of 1 bytes names no cluster"
        )
        self.assertStreamError(
            Reason.AUTH_FAILED, refused, "10.251.0.1", 22, "", "p", log="a username of 0 bytes names no cluster"
        )
        self.assertStreamError(
            Reason.AUTH_FAILED, refused, "10.251.0.1", 22, "y" * 1000, log="a username of 1000 bytes names no cluster"
        )

    def test_unknown_never_echoes_a_token(self) -> None:
        """A SOCKS4-style "cluster:token" sent as a username: the log shows the cluster part only."""
        self.assertStreamError(
            Reason.AUTH_FAILED, None, "10.251.0.1", 22, "nope:tok-b", "p", log="a username of 10 bytes names no cluster"
        )
        e = self.assertStreamError(Reason.AUTH_FAILED, None, "10.251.0.1", 22, "b:tok-b", "tok-b")
        self.assertEqual(e.log_detail, "username 'b:...' names no cluster")

    def test_token(self) -> None:
        self.assertStreamError(
            Reason.AUTH_REQUIRED,
            "proxy credentials required: the cluster name and its token",
            "10.252.0.1",
            22,
            "b",
            log="cluster 'b' needs its token as the proxy password",
        )
        self.assertStreamError(
            Reason.AUTH_FAILED,
            "proxy credentials not accepted",
            "10.252.0.1",
            22,
            "b",
            "tok-c",
            log="wrong password for cluster 'b'",
        )
        route = self.router.route("10.252.0.1", 443, "b", "tok-b")
        self.assertEqual(route, Route(B, "10.252.0.1", 443))

    def test_no_token_ignores_password(self) -> None:
        for password in (None, "", "whatever"):
            self.assertEqual(self.router.route("10.251.0.9", 80, "a", password), Route(A, "10.251.0.9", 80))
        self.assertEqual(self.router.route("10.251.0.9", 80, "net-aaaa").cluster, A)

    def test_auth_before_destination(self) -> None:
        """Credentials are checked before the destination is."""
        self.assertStreamError(Reason.AUTH_FAILED, None, "10.9.9.9", 22, "b", "nope")
        self.assertStreamError(Reason.AUTH_REQUIRED, None, "elsewhere.example", 22, "b")

    def test_not_allowed(self) -> None:
        self.assertStreamError(
            Reason.NOT_ALLOWED,
            "10.9.9.9 is not allowed through cluster 'a'",
            "10.9.9.9",
            22,
            "a",
            log="10.9.9.9 is outside cluster 'a' networks (10.251.0.0/24)",
        )
        self.assertStreamError(
            Reason.NOT_ALLOWED,
            "10.251.0.1 is outside cluster 'b' networks (10.252.0.0/24, fd00:b::/64)",
            "10.251.0.1",
            22,
            "b",
            "tok-b",
        )
        self.assertStreamError(
            Reason.NOT_ALLOWED,
            "web.a.internal does not match cluster 'b' hostnames (*.b.internal, db)",
            "Web.A.Internal",
            22,
            "b",
            "tok-b",
        )
        self.assertStreamError(
            Reason.NOT_ALLOWED,
            "db.example is not allowed through cluster 'a'",
            "db.example",
            22,
            "a",
            log="db.example does not match cluster 'a' hostnames (none)",
        )

    def test_not_allowed_many_networks(self) -> None:
        many = cluster("m", tuple(f"10.{i}.0.0/16" for i in range(20)))
        e = self.assertRaises(StreamError, Router([many]).route, "11.0.0.1", 1, "m")
        self.assertEqual(e.reason, Reason.NOT_ALLOWED)
        self.assertIn("10.7.0.0/16, ... (12 more)", e.log_detail)
        self.assertNotIn("10.7.0.0/16", e.detail)  # m has no token: the client proved nothing

    def test_names(self) -> None:
        r = self.router
        self.assertEqual(r.route("x.b.internal", 5432, "b", "tok-b"), Route(B, "x.b.internal", 5432))
        # Sent as the proxy node's resolver needs it: lower case, no trailing dot.
        self.assertEqual(r.route("X.B.Internal.", 1, "b", "tok-b"), Route(B, "x.b.internal", 1))
        self.assertEqual(r.route("a.x.b.internal", 1, "b", "tok-b").cluster, B)
        self.assertEqual(r.route("DB", 1, "b", "tok-b").host, "db")
        self.assertStreamError(Reason.NOT_ALLOWED, None, "b.internal", 22, "b", "tok-b")
        self.assertStreamError(Reason.NOT_ALLOWED, None, "db.b.internal.evil", 22, "b", "tok-b")
        self.assertStreamError(Reason.NOT_ALLOWED, None, "xb.internal", 22, "b", "tok-b")


class ImplicitClusterTests(RouterTestCase):
    """Rule 2: without a username the destination picks the cluster."""

    def test_one_network(self) -> None:
        self.assertEqual(self.router.route("10.251.0.5", 22), Route(A, "10.251.0.5", 22))
        self.assertEqual(self.router.route("10.251.0.5", 22, None, "ignored"), Route(A, "10.251.0.5", 22))

    def test_token_needs_credentials(self) -> None:
        for host in ("10.252.0.5", "x.b.internal"):
            self.assertStreamError(
                Reason.AUTH_REQUIRED,
                f"{host} needs proxy credentials: the cluster name and its token",
                host,
                log="cluster 'b' needs credentials",
            )

    def test_no_route(self) -> None:
        self.assertStreamError(Reason.NO_ROUTE, "10.9.9.9 is in no cluster's networks", "10.9.9.9")
        self.assertStreamError(Reason.NO_ROUTE, "nowhere.example is in no cluster's hostnames", "Nowhere.Example.")

    def test_ambiguous_names(self) -> None:
        self.assertStreamError(
            Reason.AMBIGUOUS,
            "x.shared.internal is in several clusters' hostnames: name one with proxy credentials",
            "x.shared.internal",
            log="x.shared.internal matches the hostnames of clusters c, d: name one with proxy credentials",
        )
        self.assertEqual(self.router.route("x.shared.internal", 1, "d").cluster, D)
        self.assertEqual(self.router.route("x.shared.internal", 1, "c", "tok-c").cluster, C)

    def test_ipv6(self) -> None:
        self.assertStreamError(
            Reason.AMBIGUOUS,
            "fd00:b::5 is in several clusters' networks: name one with proxy credentials",
            "FD00:B:0::5",
            log="fd00:b::5 is in the networks of clusters b, v6: name one with proxy credentials",
        )
        self.assertEqual(self.router.route("2001:db8::1", 22), Route(V6, "2001:db8::1", 22))
        self.assertEqual(self.router.route("[2001:DB8::1]", 22), Route(V6, "2001:db8::1", 22))
        self.assertEqual(self.router.route("[fd00:b::1]", 22, "b", "tok-b"), Route(B, "fd00:b::1", 22))

    def test_zone_ids_refused(self) -> None:
        """A zone names an interface of whoever reads it: it must not reach the proxy node."""
        for host in ("fe80::1%eth0", "[fe80::1%eth0]", "fe80::1%25eth0", "FE80::1%1"):
            self.assertStreamError(Reason.BAD_REQUEST, None, host)
            self.assertStreamError(Reason.BAD_REQUEST, None, host, 22, "v6")

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 address is routed as the IPv4 address."""
        self.assertEqual(self.router.route("::ffff:10.251.0.7", 22), Route(A, "10.251.0.7", 22))
        self.assertEqual(self.router.route("[::ffff:afb:7]", 22), Route(A, "10.251.0.7", 22))
        # ...and so is not inside ::/0
        self.assertStreamError(
            Reason.NOT_ALLOWED,
            "10.251.0.7 is not allowed through cluster 'v6'",
            "::ffff:10.251.0.7",
            22,
            "v6",
            log="10.251.0.7 is outside cluster 'v6' networks (::/0)",
        )

    def test_ipv4_not_in_ipv6_network(self) -> None:
        router = Router([V6])
        e = self.assertRaises(StreamError, router.route, "10.0.0.1", 22)
        self.assertEqual(e.reason, Reason.NO_ROUTE)
        e = self.assertRaises(StreamError, router.route, "10.0.0.1", 22, "v6")
        self.assertEqual(e.reason, Reason.NOT_ALLOWED)


class OverlapTests(SynchronousTestCase):
    """Two clusters sharing 10.0.0.0/24 (the example of the docs)."""

    def setUp(self) -> None:
        self.a = cluster("a", ("10.0.0.0/24", "10.1.0.0/24"))
        self.b = cluster("b", ("10.0.0.0/16",), token="tb")
        self.router = Router([self.b, self.a])

    def test_ambiguous(self) -> None:
        e = self.assertRaises(StreamError, self.router.route, "10.0.0.5", 22)
        self.assertEqual(e.reason, Reason.AMBIGUOUS)
        self.assertEqual(e.log_detail, "10.0.0.5 is in the networks of clusters a, b: name one with proxy credentials")
        self.assertEqual(e.detail, "10.0.0.5 is in several clusters' networks: name one with proxy credentials")

    def test_credentials_choose(self) -> None:
        self.assertEqual(self.router.route("10.0.0.5", 22, "a").cluster, self.a)
        self.assertEqual(self.router.route("10.0.0.5", 22, "b", "tb").cluster, self.b)

    def test_unique_parts(self) -> None:
        self.assertEqual(self.router.route("10.1.0.5", 22).cluster, self.a)
        e = self.assertRaises(StreamError, self.router.route, "10.0.9.5", 22)
        self.assertEqual(e.reason, Reason.AUTH_REQUIRED)

    def test_docs_table(self) -> None:
        """The table of docs/configuration.md, "two clusters sharing 10.0.0.0/24"."""
        a = cluster("a", ("10.0.0.0/24",))
        b = cluster("b", ("10.0.0.0/24", "10.1.0.0/24"), token="b-secret")
        router = Router([a, b])
        self.assertIs(router.route("10.0.0.5", 22, "a", "anything").cluster, a)
        self.assertIs(router.route("10.0.0.5", 22, "b", "b-secret").cluster, b)
        rows = [
            (
                ("10.0.0.5", 22),
                Reason.AMBIGUOUS,
                "10.0.0.5 is in several clusters' networks: name one with proxy credentials",
            ),
            (("10.0.0.5", 22, "b"), Reason.AUTH_REQUIRED, None),
            (("10.0.0.5", 22, "b", "nope"), Reason.AUTH_FAILED, None),
            (
                ("10.1.0.5", 22),
                Reason.AUTH_REQUIRED,
                "10.1.0.5 needs proxy credentials: the cluster name and its token",
            ),
            (("10.1.0.5", 22, "a"), Reason.NOT_ALLOWED, "10.1.0.5 is not allowed through cluster 'a'"),
            (("10.9.9.9", 22), Reason.NO_ROUTE, None),
            (("10.0.0.5", 0), Reason.BAD_REQUEST, None),
        ]
        for args, reason, detail in rows:
            e = self.assertRaises(StreamError, router.route, *args)
            self.assertEqual(e.reason, reason, args)
            if detail is not None:
                self.assertEqual(e.detail, detail)


class QualifiedNameTests(SynchronousTestCase):
    """HOST.CLUSTER.gw.internal: a cluster for clients that cannot send credentials."""

    def setUp(self) -> None:
        self.a = cluster("cluster-a", ("10.0.0.0/24", "fd00::/64"), ("*.svc.test",), aliases=("Net-AAAA",))
        self.b = cluster("cluster-b", ("10.0.0.0/24",), token="tok-b")
        self.dotted = cluster("prod.x", ("10.9.0.0/16",))
        self.router = Router([self.a, self.b, self.dotted])

    def route(self, host: str, *args: str | None) -> Route:
        return self.router.route(host, 8080, *args)

    def test_overlapping_networks(self) -> None:
        """The same 10.x address reaches either cluster by name: no ambiguity, no credentials."""
        route = self.route("10-0-0-5.cluster-a.gw.internal")
        self.assertEqual((route.cluster, route.host, route.port), (self.a, "10.0.0.5", 8080))
        e = self.assertRaises(StreamError, self.route, "10.0.0.5")
        self.assertEqual(e.reason, Reason.AMBIGUOUS)

    def test_alias_case_and_ipv6(self) -> None:
        self.assertIs(self.route("10-0-0-7.net-aaaa.gw.internal").cluster, self.a)
        self.assertEqual(self.route("FD00--7.CLUSTER-A.GW.INTERNAL.").host, "fd00::7")

    def test_names(self) -> None:
        self.assertEqual(self.route("api.svc.test.cluster-a.gw.internal").host, "api.svc.test")
        self.assertEqual(self.route("10-9-1-1.prod.x.gw.internal").cluster, self.dotted)

    def test_still_no_open_relay(self) -> None:
        for host in ("10-1-0-5.cluster-a.gw.internal", "evil.example.cluster-a.gw.internal"):
            e = self.assertRaises(StreamError, self.route, host)
            self.assertEqual(e.reason, Reason.NOT_ALLOWED, host)
            self.assertNotIn("10.0.0.0", e.detail)

    def test_token_still_needed(self) -> None:
        e = self.assertRaises(StreamError, self.route, "10-0-0-5.cluster-b.gw.internal")
        self.assertEqual(e.reason, Reason.AUTH_REQUIRED)
        self.assertEqual(self.route("10-0-0-5.cluster-b.gw.internal", "cluster-b", "tok-b").cluster, self.b)
        e = self.assertRaises(StreamError, self.route, "10-0-0-5.cluster-b.gw.internal", "cluster-b", "wrong")
        self.assertEqual(e.reason, Reason.AUTH_FAILED)

    def test_credentials_must_name_the_same_cluster(self) -> None:
        e = self.assertRaises(StreamError, self.route, "10-0-0-5.cluster-b.gw.internal", "cluster-a", None)
        self.assertEqual(e.reason, Reason.AUTH_FAILED)
        self.assertIn("'cluster-b'", e.log_detail)

    def test_unknown_cluster(self) -> None:
        e = self.assertRaises(StreamError, self.route, "10-0-0-5.nope.gw.internal")
        self.assertEqual((e.reason, e.detail), (Reason.NO_ROUTE, "10-0-0-5.nope.gw.internal names no cluster"))
        e = self.assertRaises(StreamError, self.route, "cluster-a.gw.internal")
        self.assertEqual(e.reason, Reason.BAD_REQUEST)

    def test_names_differing_in_case(self) -> None:
        router = Router([cluster("Lab", ("10.0.0.0/8",)), cluster("lab", ("10.0.0.0/8",))])
        e = self.assertRaises(StreamError, router.route, "10-0-0-1.lab.gw.internal", 80)
        self.assertEqual(e.reason, Reason.AMBIGUOUS)
        self.assertIs(router.route("10.0.0.1", 80, "Lab").cluster, router.lookup("Lab"))

    def test_destination_host(self) -> None:
        """What an origin must see in Host: the real destination; anything else as it is."""
        self.assertEqual(self.router.destination_host("10-0-0-5.Cluster-A.gw.internal"), "10.0.0.5")
        self.assertEqual(self.router.destination_host("fd00--5.cluster-a.gw.internal"), "fd00::5")
        self.assertEqual(self.router.destination_host("API.svc.test"), "api.svc.test")
        self.assertEqual(self.router.destination_host("x.nope.gw.internal"), "x.nope.gw.internal")

    def test_other_domain(self) -> None:
        router = Router([self.a], domain="clusters.example.org")
        self.assertEqual(router.route("10-0-0-5.cluster-a.clusters.example.org", 80).host, "10.0.0.5")
        self.assertRaises(StreamError, router.route, "10-0-0-5.cluster-a.gw.internal", 80)


class ResolvedNameTests(SynchronousTestCase):
    """A name outside the hostnames of a cluster the client named: its proxy node resolves it."""

    def setUp(self) -> None:
        self.a = cluster("a", ("10.0.0.0/24",), ("*.glob.test",), resolver="getent ahosts {host}")
        self.b = cluster("b", ("10.0.0.0/24",), token="tok-b", resolver="getent ahosts {host}")
        self.router = Router([self.a, self.b])

    def test_named_clusters_resolve(self) -> None:
        for args in (("a",), (None, None, "a")):
            route = self.router.route("API.Svc.Test.", 80, *args)
            self.assertEqual(route, Route(self.a, "api.svc.test", 80, resolve=True))
        route = self.router.route("api.svc.test.a.gw.internal", 80)
        self.assertEqual(route, Route(self.a, "api.svc.test", 80, resolve=True))

    def test_globs_are_trusted_as_before(self) -> None:
        self.assertEqual(self.router.route("x.glob.test", 80, "a"), Route(self.a, "x.glob.test", 80))

    def test_unnamed_clusters_do_not(self) -> None:
        """Without a named cluster, which proxy node would answer? As before: the globs decide."""
        e = self.assertRaises(StreamError, self.router.route, "api.svc.test", 80)
        self.assertEqual(e.reason, Reason.NO_ROUTE)

    def test_every_address_inside(self) -> None:
        route = self.router.route("api.svc.test", 80, "a")
        inside = [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("10.0.0.6")]
        self.assertEqual(self.router.check_resolved(route, inside), inside[0])
        for answer in ([*inside, ipaddress.ip_address("127.0.0.1")], [ipaddress.ip_address("fd00::1")], []):
            e = self.assertRaises(StreamError, self.router.check_resolved, route, answer)
            self.assertEqual(
                (e.reason, e.detail), (Reason.NOT_ALLOWED, "api.svc.test is not allowed through cluster 'a'")
            )
        e = self.assertRaises(StreamError, self.router.check_resolved, route, [ipaddress.ip_address("127.0.0.1")])
        self.assertEqual(e.log_detail, "api.svc.test resolves to 127.0.0.1, outside cluster 'a' networks (10.0.0.0/24)")

    def test_policy_shown_to_token_holders_only(self) -> None:
        route = self.router.route("api.svc.test", 80, "b", "tok-b")
        e = self.assertRaises(StreamError, self.router.check_resolved, route, [ipaddress.ip_address("127.0.0.1")])
        self.assertEqual(e.detail, e.log_detail)
        self.assertIn("10.0.0.0/24", e.detail)


class ListenerClusterTests(SynchronousTestCase):
    """A per-cluster listener serves its cluster only and asks no credentials."""

    def setUp(self) -> None:
        self.a = cluster("cluster-a", ("10.0.0.0/24",), token="tok-a")
        self.b = cluster("cluster-b", ("10.0.0.0/24",))
        self.router = Router([self.a, self.b])

    def test_no_credentials_overlap_and_token(self) -> None:
        route = self.router.route("10.0.0.5", 80, cluster="cluster-a")
        self.assertIs(route.cluster, self.a)
        self.assertIs(self.router.route("10-0-0-5.cluster-a.gw.internal", 80, cluster="cluster-a").cluster, self.a)

    def test_only_its_cluster(self) -> None:
        e = self.assertRaises(StreamError, self.router.route, "10-0-0-5.cluster-b.gw.internal", 80, cluster="cluster-a")
        self.assertEqual(e.reason, Reason.NOT_ALLOWED)
        e = self.assertRaises(StreamError, self.router.route, "10.0.0.5", 80, "cluster-b", None, "cluster-a")
        self.assertEqual(e.reason, Reason.AUTH_FAILED)
        e = self.assertRaises(StreamError, self.router.route, "10.1.0.5", 80, cluster="cluster-a")
        self.assertEqual(e.reason, Reason.NOT_ALLOWED)

    def test_credentials_naming_it_are_fine(self) -> None:
        """Clients configured with credentials keep working; the password is not checked there."""
        self.assertIs(self.router.route("10.0.0.5", 80, "cluster-a", "anything", "cluster-a").cluster, self.a)
        self.assertTrue(self.router.authenticate("cluster-a", "anything", cluster="cluster-a"))
        self.assertFalse(self.router.authenticate("cluster-b", None, cluster="cluster-a"))
        self.assertFalse(self.router.authenticate("nope", None, cluster="cluster-a"))

    def test_cluster_gone(self) -> None:
        e = self.assertRaises(StreamError, self.router.route, "10.0.0.5", 80, cluster="gone")
        self.assertEqual(e.reason, Reason.UNAVAILABLE)

    def test_cluster_gone_and_its_name_an_alias(self) -> None:
        """A listener serves the cluster of that name: not another one that has taken the name as an alias since."""
        router = Router([cluster("b", ("10.0.0.0/24",), token="tok-b", aliases=("cluster-a",))])
        e = self.assertRaises(StreamError, router.route, "10.0.0.5", 80, cluster="cluster-a")
        self.assertEqual(e.reason, Reason.UNAVAILABLE)


class BadRequestTests(RouterTestCase):
    def test_ports(self) -> None:
        for port in (0, -1, 65536, 10**9):
            self.assertStreamError(Reason.BAD_REQUEST, f"port {port} is not between 1 and 65535", "10.251.0.1", port)
        self.assertStreamError(Reason.BAD_REQUEST, None, "10.251.0.1", True)  # type: ignore[arg-type]
        self.assertEqual(self.router.route("10.251.0.1", 65535).port, 65535)
        self.assertEqual(self.router.route("10.251.0.1", 1).port, 1)

    def test_bad_request_first(self) -> None:
        self.assertStreamError(Reason.BAD_REQUEST, None, "10.251.0.1", 0, "nope", "x")
        self.assertStreamError(Reason.BAD_REQUEST, None, "bad host", 22, "nope", "x")

    def test_hosts(self) -> None:
        for host in (
            "",
            "[10.251.0.1]",
            "[nonsense]",
            "[]",
            "a b",
            "a..b",
            ".",
            "-a.example",
            "a" * 64 + ".example",
            "x." * 127 + "x",
            "host:22",
            "☃.example",  # not a valid IDNA label (internationalised names are: see test_destinations)
            "a\x00b",
            "10.1",  # a resolver reads these as 10.0.0.1 etc.
            "10.251.0.1.",
            "167772161",
            "0x0afb0001",
            "0x0a.0xfb.0.1",
            "1.2.3.4.5",
        ):
            self.assertStreamError(Reason.BAD_REQUEST, None, host, 22, "a")

    def test_normalise_host(self) -> None:
        self.assertEqual(normalise_host("10.0.0.1"), ipaddress.IPv4Address("10.0.0.1"))
        self.assertEqual(normalise_host("[::1]"), ipaddress.IPv6Address("::1"))
        self.assertEqual(normalise_host("::ffff:1.2.3.4"), ipaddress.IPv4Address("1.2.3.4"))
        self.assertEqual(normalise_host("Foo.Example."), "foo.example")
        self.assertEqual(normalise_host("_srv.x-y.example"), "_srv.x-y.example")

    def test_canonical_host(self) -> None:
        """The text both front ends match, log and send: one trailing dot goes, case folds."""
        self.assertEqual(canonical_host("API.SVC.TEST."), "api.svc.test")
        self.assertEqual(canonical_host("[2001:DB8::1]"), "2001:db8::1")
        self.assertEqual(canonical_host("::ffff:10.0.0.1"), "10.0.0.1")
        for host in ("api.svc.test..", "fe80::1%eth0", "a b"):
            self.assertRaises(StreamError, canonical_host, host)


class RedactionTests(RouterTestCase):
    """What a client that has not proved a token may read, and what the log may."""

    def test_show_username(self) -> None:
        self.assertEqual(show_username("cluster-a"), "username 'cluster-a'")
        self.assertEqual(show_username("cluster-a:s3cret"), "username 'cluster-a:...'")
        self.assertEqual(show_username(":s3cret"), "a username of 7 bytes")
        self.assertEqual(show_username("bad name:s3cret"), "a username of 15 bytes")
        self.assertEqual(show_username("ü"), "a username of 2 bytes")
        self.assertEqual(show_username("x" * 65), "a username of 65 bytes")

    def test_token_in_the_username_field_is_not_logged(self) -> None:
        """A username that names no cluster may be a token typed into the wrong field, cluster-shaped or not."""
        listener = Router([A, B, cluster("l", ("10.0.0.0/8",))])
        for router, cluster_name in ((self.router, None), (listener, "l")):
            e = self.assertRaises(StreamError, router.route, "10.251.0.5", 22, "Zm9vYmFyVG9rZW4", None, cluster_name)
            self.assertEqual(e.reason, Reason.AUTH_FAILED)
            self.assertNotIn("Zm9vYmFyVG9rZW4", e.log_detail + e.detail)
            self.assertIn("a username of 15 bytes", e.log_detail)
        e = self.assertRaises(StreamError, listener.route, "10.251.0.5", 22, "a", None, "l")
        self.assertIn("username 'a'", e.log_detail)  # a cluster's name is no secret

    def test_unauthenticated_replies_name_no_cluster(self) -> None:
        """Cluster names and networks stay in the log; the client gets a generic text."""
        cases = [
            ("x.shared.internal", None, None),  # ambiguous: c, d
            ("10.252.0.5", None, None),  # needs b's token
            ("10.252.0.5", "b", None),
            ("10.252.0.5", "b", "wrong"),
            ("10.252.0.5", "nope", "x"),
            ("10.9.9.9", "a", None),  # a has no token: its networks are not shown
        ]
        for host, username, password in cases:
            e = self.assertRaises(StreamError, self.router.route, host, 22, username, password)
            for secret in ("10.251.0.0", "10.252.0.0", "*.", "'b'", "'c'", "'d'", "c, d", "nope"):
                self.assertNotIn(secret, e.detail, (host, username))
            self.assertNotEqual(e.detail, e.log_detail)


# --- property ----------------------------------------------------------------------------

PROP_CLUSTERS = [
    cluster("a", ("10.0.0.0/24", "fd00::/64"), ("*.a.internal",), aliases=("net-a",)),
    cluster("b", ("10.0.0.0/16",), ("*.internal", "db"), token="tb"),
    cluster("c", ("192.168.0.0/16",), token="tc"),
    cluster("d", (), ("?.d.example", "x[0-9].d.example")),
    cluster("e", ("0.0.0.0/0", "::/0")),
]
PROP_ROUTER = Router(PROP_CLUSTERS)

ipv4s = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(network="10.0.0.0/23"),
    st.ip_addresses(network="192.168.0.0/24"),
)
ipv6s = st.one_of(st.ip_addresses(v=6), st.ip_addresses(network="fd00::/120"))
labels = st.one_of(
    st.sampled_from(["a", "b", "d", "x1", "db", "internal", "example", "A"]),
    st.sampled_from(["-", "1", "0x1", "_", "", "a-", "é"]),
)
hosts = st.one_of(
    ipv4s.map(str),
    ipv6s.map(str),
    ipv6s.map(lambda a: f"[{a}]"),
    ipv4s.map(lambda a: f"::ffff:{a}"),
    ipv4s.map(lambda a: f"[::ffff:{a}]"),
    st.lists(labels, min_size=1, max_size=5).map(".".join),
    st.lists(labels, min_size=1, max_size=4).map(lambda xs: ".".join(xs) + "."),
    st.sampled_from(["db", "x.a.internal", "y.internal", "a.d.example", "x7.d.example", "DB."]),
    st.text(max_size=30),
)
usernames = st.one_of(st.none(), st.sampled_from(["a", "net-a", "b", "c", "d", "e", "zz"]), st.text(max_size=5))
passwords = st.one_of(st.none(), st.sampled_from(["tb", "tc", ""]), st.sampled_from(["tb", "tc"]), st.text(max_size=5))
good_ports = st.integers(min_value=1, max_value=65535)
ports = st.one_of(good_ports, good_ports, good_ports, st.sampled_from([-1, 0, 65536, 70000]))


class NormaliseCacheTests(SynchronousTestCase):
    def test_answers_are_cached_and_refusals_are_not(self):
        normalise_host.cache_clear()
        first = normalise_host("10.0.0.5")
        self.assertIs(normalise_host("10.0.0.5"), first)
        for _ in range(2):
            self.assertRaises(StreamError, normalise_host, "10.1")
        info = normalise_host.cache_info()
        self.assertEqual((info.hits, info.currsize), (1, 1))


class RouteCacheTests(RouterTestCase):
    def count_rule_runs(self) -> list[tuple]:
        runs: list[tuple] = []
        rules = self.router._route

        def counted(*args):
            runs.append(args)
            return rules(*args)

        self.router._route = counted  # type: ignore[method-assign]
        return runs

    def test_a_request_asked_again_gets_the_same_route_without_the_rules(self) -> None:
        runs = self.count_rule_runs()
        first = self.router.route("10.252.0.1", 22, "b", "tok-b")
        self.assertIs(self.router.route("10.252.0.1", 22, "b", "tok-b"), first)
        self.assertEqual(len(runs), 1)
        self.router.route("10.252.0.1", 23, "b", "tok-b")  # any other field is another request
        self.assertEqual(len(runs), 2)

    def test_refusals_are_not_kept_so_a_wrong_password_is_checked_every_time(self) -> None:
        runs = self.count_rule_runs()
        for _ in range(2):
            self.assertStreamError(Reason.AUTH_FAILED, None, "10.252.0.1", 22, "b", "wrong")
        self.assertEqual(len(runs), 2)
        self.assertEqual(self.router._routes, {})

    def test_a_bad_port_is_refused_before_the_cache(self) -> None:
        self.router.route("10.251.0.9", 1)
        self.assertStreamError(Reason.BAD_REQUEST, None, "10.251.0.9", True)  # True == 1 as a key

    def test_the_cache_is_bounded(self) -> None:
        for port in range(1, 4100):
            self.router.route("10.251.0.9", port)
        self.assertLessEqual(len(self.router._routes), 4096)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=1500, deadline=None)
    @given(host=hosts, port=ports, username=usernames, password=passwords)
    def test_route_or_stream_error(self, host: str, port: int, username: str | None, password: str | None) -> None:
        """
        route() returns a Route inside the cluster's networks / hostnames,
        reached with valid credentials, or raises StreamError: nothing else.
        """
        try:
            route = PROP_ROUTER.route(host, port, username, password)
        except StreamError as e:
            self.assertIsInstance(e.reason, Reason)
            self.assertTrue(e.detail)
            return
        self.assertIn(route.cluster, PROP_CLUSTERS)
        self.assertTrue(1 <= route.port <= 65535)
        self.assertEqual(route.port, port)
        dest = normalise_host(route.host)
        if isinstance(dest, str):
            self.assertTrue(any(fnmatchcase(dest, p) for p in route.cluster.hostnames))
        else:
            self.assertEqual(str(dest), route.host)
            self.assertTrue(any(dest.version == n.version and dest in n for n in route.cluster.networks))
        if username is not None:
            self.assertIs(route.cluster, PROP_ROUTER.lookup(username))
        if route.cluster.token is not None:
            self.assertEqual(password, route.cluster.token)
            self.assertIsNotNone(username)


# Qualified names, per-cluster listeners and names resolved on the proxy node, with
# the spellings a hostile client may try: dashed addresses (v4-mapped too), fullwidth
# digits and dots, soft hyphens UTS 46 maps away, numeric look-alikes, mixed case.
RESOLVER = "getent ahosts {host}"
NAMED_CLUSTERS = [
    cluster("a", ("10.0.0.0/24", "fd00::/64"), ("*.a.internal",), aliases=("net-a",), resolver=RESOLVER),
    cluster("b", ("10.0.0.0/16",), ("*.internal", "db"), token="tb", resolver=RESOLVER),
    cluster("c", ("192.168.0.0/16",), token="tc"),
    cluster("d", (), ("?.d.example", "x[0-9].d.example")),
    cluster("e.x", ("127.0.0.0/30",), resolver=RESOLVER),
    cluster("x", ("172.16.0.0/12",), token="tx", aliases=("E",)),
]
NAMED_ROUTER = Router(NAMED_CLUSTERS)
qualified_labels = st.sampled_from(
    ["a", "b", "c", "d", "e", "x", "net-a", "NET-A", "E", "gw", "internal", "db", "10-0-0-5", "10-0-0-300"]
    + ["fd00--1", "0-0-0-0-0-ffff-a00-5", "0-0-0-0-0-ffff-7f00-1", "127-0-0-1", "192-168-1-1", "172-16-0-1"]
    + ["１０-０-０-５", "ａ", "ｇｗ", "1", "0x7f", "10", "ß", "a\u00ad", "_", "xn--zca", "evil"]
)
dots = st.sampled_from([".", ".", "．", "。"])
qualified_hosts = st.one_of(
    # HOST.CLUSTER.gw.internal as a client means it ...
    st.tuples(
        st.lists(qualified_labels, min_size=1, max_size=2).map(".".join),
        dots,
        st.sampled_from(["a", "net-a", "NET-A", "ａ", "b", "c", "d", "e.x", "E", "x", "nope"]),
        st.sampled_from([".gw.internal", ".GW.INTERNAL", ".gw.internal.", ".gw．internal"]),
    ).map("".join),
    # ... and any mix of the same labels
    st.tuples(
        st.lists(st.tuples(qualified_labels, dots), min_size=1, max_size=6),
        st.sampled_from(["", ".gw.internal", ".gw.internal."]),
    ).map(lambda t: "".join(label + dot for label, dot in t[0])[:-1] + t[1]),
)


class NamedClusterPropertyTests(SynchronousTestCase):
    @settings(max_examples=2000, deadline=None)
    @given(
        host=st.one_of(qualified_hosts, hosts),
        username=st.one_of(st.none(), st.sampled_from(["a", "net-a", "b", "c", "d", "e.x", "x", "E", "zz"])),
        password=st.one_of(st.none(), st.sampled_from(["tb", "tc", "tx", "", "no"])),
        listener=st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "e.x", "x", "gone"])),
    )
    def test_no_open_relay(self, host: str, username: str | None, password: str | None, listener: str | None) -> None:
        """
        Every Route lies inside its cluster's networks or hostnames, or is a
        name its proxy node must resolve (and check_resolved then checks);
        the text sent is the text checked; a cluster with a token is reached
        with it, or on its own listener.
        """
        try:
            route = NAMED_ROUTER.route(host, 80, username, password, listener)
        except StreamError:
            return
        chosen = route.cluster
        dest = normalise_host(route.host)
        self.assertEqual(str(dest), route.host)
        if route.resolve:
            self.assertIsInstance(dest, str)
            self.assertTrue(chosen.resolver_command)
        elif isinstance(dest, str):
            self.assertTrue(any(fnmatchcase(dest, p) for p in chosen.hostnames), (host, route))
        else:
            self.assertTrue(any(dest.version == n.version and dest in n for n in chosen.networks), (host, route))
        if listener is not None:
            self.assertIs(chosen, NAMED_ROUTER.lookup(listener))
        elif chosen.token is not None:
            self.assertIs(NAMED_ROUTER.lookup(username or ""), chosen)
            self.assertEqual(password, chosen.token)
