"""
Tests for L{gateway.proxy.pac}: the generated script evaluated by a real
JavaScript engine (Node, with the PAC helpers of tests/pac_eval.js, whose
dnsResolve fails the case), one Node process per test class.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Sequence
from fnmatch import fnmatchcase
from itertools import product
from types import SimpleNamespace
from typing import Any, ClassVar

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.trial.unittest import SynchronousTestCase

import gateway.app.pac
import gateway.proxy.globs
import gateway.proxy.pac
from gateway.app.pac import CACHE_SIZE, GatewayPac
from gateway.config import GatewaySettings
from gateway.config.names import parse_pattern
from gateway.proxy.globs import globs_overlap
from gateway.proxy.pac import (
    MAX_PAC_BYTES,
    PacCluster,
    PacRefused,
    PacScript,
    _Overlaps,
    fetch_pac,
    pac_request_host,
    render_pac,
)
from gateway.routing import Router
from tests import test_routing

NODE = shutil.which("node") or "/usr/bin/node"
HARNESS = os.path.join(os.path.dirname(__file__), "pac_eval.js")
NODE_MISSING = None if os.access(NODE, os.X_OK) else f"{NODE} not found: install Debian's nodejs (make test does)"

N = ipaddress.ip_network
ALPHA = PacCluster(
    "alpha",
    (N("10.0.0.0/24"), N("fd00:a::/64")),
    ("*.alpha.internal", "web[0-9].alpha"),
    socks=("127.0.0.1:10801",),
    http=("127.0.0.1:31281",),
)
BETA = PacCluster("beta", (N("10.0.0.0/24"),), ("*.beta.internal", "node[!0-4].beta"), socks=("[::1]:10802",))
GAMMA = PacCluster("gamma", (N("10.1.0.0/16"), N("10.0.0.0/8")), ("*.gamma.test", "*.internal"))
TOKEN = PacCluster("tok", (N("10.2.0.0/16"),), ("*.tok.test",), token=True)
CLUSTERS = (TOKEN, GAMMA, BETA, ALPHA)  # any order: the script lists them by name
SHARED = {"shared_socks": ("127.0.0.1:1080",), "shared_http": ("127.0.0.1:3128", "127.0.0.1:3128")}

TO_ALPHA = "PROXY 127.0.0.1:31281; SOCKS5 127.0.0.1:10801"
TO_BETA = "SOCKS5 [::1]:10802"
TO_SHARED = "PROXY 127.0.0.1:3128; SOCKS5 127.0.0.1:1080"
DIRECT = "DIRECT"

Case = tuple[str, str]  # (url, host) as the browser passes them


def evaluate(jobs: Sequence[tuple[str, Sequence[Case], bool]]) -> list[list[str]]:
    """FindProxyForURL of each (script, cases, with isInNetEx) job, in one Node process."""
    data = json.dumps([{"pac": pac, "cases": list(cases), "isInNetEx": ex} for pac, cases, ex in jobs])
    done = subprocess.run([NODE, HARNESS], input=data, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"node failed ({done.returncode}): {done.stderr}")
    results: list[list[str]] = json.loads(done.stdout)
    return results


def url_of(host: str, scheme: str = "http") -> Case:
    shown = f"[{host}]" if ":" in host else host
    return (f"{scheme}://{shown}/path?q=1" if scheme == "http" else f"{scheme}://{shown}/", host)


class PacTableTestCase(SynchronousTestCase):
    """
    Each subclass names views (script, with isInNetEx) and a table of
    host -> expected answer per view; the first test of the class evaluates
    them all at once (trial has no setUpClass).
    """

    skip = NODE_MISSING
    views: ClassVar[dict[str, tuple[PacScript, bool]]] = {}
    tables: ClassVar[dict[str, dict[str, str]]] = {}
    _answers: ClassVar[dict[str, dict[str, str]]]

    @classmethod
    def answers(cls) -> dict[str, dict[str, str]]:
        if "_answers" not in cls.__dict__:
            names = list(cls.tables)
            jobs = []
            for name in names:
                script, ex = cls.views[name]
                jobs.append((script.text, [url_of(host) for host in cls.tables[name]], ex))
            cls._answers = {
                name: dict(zip(cls.tables[name], results, strict=True))
                for name, results in zip(names, evaluate(jobs), strict=True)
            }
        return cls._answers

    def check(self, view: str) -> None:
        answers = self.answers()[view]
        wrong = {host: (answers[host], want) for host, want in self.tables[view].items() if answers[host] != want}
        self.assertEqual(wrong, {}, f"host: (answer, expected) in view {view!r}:\n{self.views[view][0].text}")


class DefaultViewTests(PacTableTestCase):
    """All clusters: two on 10.0.0.0/24 with listeners, one without a listener or token, one with a token."""

    views = {
        "all": (render_pac(CLUSTERS, **SHARED), True),
        "no-isInNetEx": (render_pac(CLUSTERS, **SHARED), False),
    }
    tables = {
        "all": {
            # qualified names, any case, with the trailing dot of an FQDN
            "10-0-0-5.alpha.gw.internal": TO_SHARED,
            "10-0-0-5.Alpha.GW.Internal": TO_SHARED,
            "api.svc.BETA.gw.internal.": TO_SHARED,
            "fd00--1.gamma.gw.internal": TO_SHARED,
            "gw.internal": TO_SHARED,  # not qualified, but gamma's *.internal holds it
            "gw.internal.example": DIRECT,
            # overlapping per-cluster networks: the first in name order wins
            "10.0.0.5": TO_ALPHA,
            "10.0.0.255": TO_ALPHA,
            # the cluster without listener or token: what nobody else has goes to the shared listeners
            "10.1.2.3": TO_SHARED,
            # its 10.0.0.0/8 overlaps 10.0.0.0/24: the shared listeners refuse it as ambiguous, with a
            # page that says so -- never DIRECT, which would send a cluster address to the browser's network
            "10.3.0.1": TO_SHARED,
            "10.2.0.1": TO_SHARED,  # the cluster with a token and no listener: the gateway asks for it
            "x.tok.test": TO_SHARED,
            # IPv6
            "fd00:a::5": TO_ALPHA,
            "FD00:A:0:0::5": TO_ALPHA,
            "fd00:b::1": DIRECT,
            # host name globs, * ? and [...] as fnmatch reads them
            "api.alpha.internal": TO_ALPHA,
            "API.ALPHA.INTERNAL": TO_ALPHA,
            "api.alpha.internal.": TO_ALPHA,
            "web3.alpha": TO_ALPHA,
            "weba.alpha": DIRECT,
            "web3xalpha": DIRECT,  # the dot is literal
            "web33.alpha": DIRECT,
            "node7.beta": TO_BETA,
            "node3.beta": DIRECT,
            "x.beta.internal": TO_BETA,
            "foo.gamma.test": TO_SHARED,
            "other.internal": TO_SHARED,  # gamma's *.internal overlaps alpha's and beta's: refused there
            # everything else, and never a DNS lookup (dnsResolve fails the case)
            "example.com": DIRECT,
            "8.8.8.8": DIRECT,
            "10.0.0.5.nip.io": DIRECT,
            "1234.0.0.1": DIRECT,
            "10.0.0": DIRECT,
            "localhost": DIRECT,
            "": DIRECT,
        },
        "no-isInNetEx": {
            # a browser without Microsoft's IPv6 extension (Firefox): the script tests IPv6 itself
            "fd00:a::5": TO_ALPHA,
            "fd00:a:0:0:0:0:0:5": TO_ALPHA,
            "fd00:a::10.0.0.5": TO_ALPHA,
            "fd00:a:0:1::5": DIRECT,
            "fd00:a:::5": DIRECT,
            "10.0.0.5": TO_ALPHA,
            "api.alpha.internal": TO_ALPHA,
        },
    }

    def test_default_view(self) -> None:
        self.check("all")

    def test_without_isInNetEx(self) -> None:
        self.check("no-isInNetEx")


def _ipv6_table() -> tuple[PacScript, dict[str, str]]:
    """
    The script's own IPv6 test against Python's ipaddress: random networks
    of many prefix lengths, and an address inside and one outside each,
    written compressed, exploded and with an IPv4 tail.
    """
    rng = random.Random(12)
    clusters = []
    texts: set[str] = set()
    for i in range(24):
        length = rng.choice([8, 16, 17, 31, 32, 48, 63, 64, 65, 96, 112, 127, 128])
        network = ipaddress.IPv6Network((rng.getrandbits(128) >> (128 - length) << (128 - length), length))
        clusters.append(PacCluster(f"v6-{i:02}", (network,), socks=(f"127.0.0.1:{20000 + i}",)))
        inside = ipaddress.IPv6Address(int(network.network_address) | rng.getrandbits(128 - length))
        outside = ipaddress.IPv6Address(int(network.network_address) ^ (1 << (128 - length)))
        for address in (inside, outside):
            tail = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            texts |= {address.compressed, address.exploded, f"{address.exploded[:30]}{tail}"}
    table = {}
    for text in texts:  # the first cluster by name that holds it, as the script lists them
        holders = [c for c in sorted(clusters, key=lambda c: c.name) if ipaddress.IPv6Address(text) in c.networks[0]]
        table[text] = f"SOCKS5 {holders[0].socks[0]}" if holders else DIRECT
    return render_pac(clusters), table


class IPv6Tests(PacTableTestCase):
    """The script tests IPv6 prefixes itself (Firefox has no isInNetEx), agreeing with ipaddress."""

    _script, _table = _ipv6_table()
    views = {"random": (_script, False)}
    tables = {"random": _table}

    def test_agrees_with_ipaddress(self) -> None:
        self.check("random")


class ClusterViewTests(PacTableTestCase):
    """?cluster=NAME: that cluster's rules and the qualified names only."""

    views = {name: (render_pac(CLUSTERS, only=name, **SHARED), True) for name in ("beta", "gamma", "tok")}
    tables = {
        "beta": {
            "10.0.0.5": TO_BETA,
            "node7.beta": TO_BETA,
            "api.alpha.internal": DIRECT,
            "fd00:a::5": DIRECT,
            "10.1.2.3": DIRECT,
            "10-0-0-5.alpha.gw.internal": TO_SHARED,
        },
        "gamma": {
            "10.1.2.3": TO_SHARED,
            "foo.gamma.test": TO_SHARED,
            "10.0.0.5": TO_SHARED,  # in gamma's 10.0.0.0/8 too
            "10.3.0.1": TO_SHARED,  # ambiguous at the shared listeners: refused there, not sent DIRECT
            "x.gamma.gw.internal": TO_SHARED,
        },
        "tok": {"10.2.0.1": TO_SHARED, "x.tok.test": TO_SHARED, "x.tok.gw.internal": TO_SHARED},
    }

    def test_view_of_a_cluster_with_listeners(self) -> None:
        self.check("beta")

    def test_view_of_a_cluster_without_listener(self) -> None:
        self.check("gamma")

    def test_view_of_a_cluster_with_a_token(self) -> None:
        self.check("tok")


#: Over 1 MB of rules: 70000 /32 networks of one cluster with a listener.
HUGE = PacCluster(
    "huge",
    tuple(ipaddress.IPv4Network((0x0A000000 + i, 32)) for i in range(70000)),
    socks=("127.0.0.1:10801",),
)


class EdgeTests(PacTableTestCase):
    """No shared listener; rules too large for browsers; names that are not nice."""

    big = render_pac([HUGE], **SHARED)
    odd = PacCluster('we"ird\n*/name\u2028', (N("192.0.2.0/24"),), socks=("127.0.0.1:10809",))
    views = {
        "no-shared": (render_pac(CLUSTERS), True),
        "too-large": (big, True),
        "odd-name": (render_pac([odd], **SHARED), True),
    }
    tables = {
        "no-shared": {
            "10-0-0-5.alpha.gw.internal": DIRECT,
            "10.0.0.5": TO_ALPHA,
            "10.1.2.3": DIRECT,
            "foo.gamma.test": DIRECT,
        },
        "too-large": {"10.0.0.5": DIRECT, "x.huge.gw.internal": TO_SHARED},
        "odd-name": {"192.0.2.1": "SOCKS5 127.0.0.1:10809", "example.com": DIRECT},
    }

    def test_no_shared_listener(self) -> None:
        self.check("no-shared")
        self.assertIn("// No shared listener", self.views["no-shared"][0].text)

    def test_over_one_megabyte_keeps_the_qualified_names_only(self) -> None:
        self.assertTrue(self.big.too_large)
        self.assertLess(len(self.big.body), 4096)
        self.assertIn("larger than browsers accept", self.big.text)
        self.assertGreater(len(render_pac([HUGE], limit=10**8).body), MAX_PAC_BYTES)
        self.check("too-large")

    def test_names_cannot_break_out_of_comments_or_strings(self) -> None:
        self.check("odd-name")
        text = self.views["odd-name"][0].text
        self.assertTrue(text.isascii())
        self.assertNotIn("*/", text)
        self.assertEqual(text.count("\n"), len(text.splitlines()))


def _random_globs() -> tuple[list[str], list[str]]:
    """Patterns from the config's glob alphabet (brackets of every kind) and names to match them with."""
    rng = random.Random(12)
    pieces = ["a", "b", "0", ".", "-", "_", "*", "?", "[ab]", "[!a]", "[a-c]", "[!.-9]", "[]a]", "[!]]", "[", "]"]
    patterns = {"".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(300)}
    names = {"".join(rng.choice("ab0.-_c9") for _ in range(rng.randint(1, 6))) for _ in range(120)}
    usable = set()
    for pattern in patterns:
        try:
            usable.add(parse_pattern(pattern))  # as the config holds it
        except ValueError:
            pass
    return sorted(usable), sorted(names)


GLOBS, GLOB_NAMES = _random_globs()


class GlobTests(PacTableTestCase):
    """The script's reading of every glob is fnmatch's, the router's: shExpMatch or a translated regex."""

    views = {p: (render_pac([PacCluster("g", hostnames=(p,), socks=("127.0.0.1:1",))]), True) for p in GLOBS}
    # as the router matches: the name without its trailing dot
    tables = {
        p: {n: "SOCKS5 127.0.0.1:1" if fnmatchcase(n.removesuffix("."), p) else DIRECT for n in GLOB_NAMES}
        for p in GLOBS
    }

    def test_every_glob_reads_as_fnmatch_reads_it(self) -> None:
        wrong = [p for p in GLOBS if self.answers()[p] != self.tables[p]]
        self.assertEqual(wrong, [])

    def test_classes_become_regular_expressions(self) -> None:
        self.assertIn(
            'shExpMatch(h, "web?.*")', render_pac([PacCluster("g", hostnames=("web?.*",), socks=("h:1",))]).text
        )
        self.assertIn(
            "/^web[0-9]\\x2ea$/.test(h)", render_pac([PacCluster("g", hostnames=("web[0-9].a",), socks=("h:1",))]).text
        )


class OverlapTests(SynchronousTestCase):
    """Whether two globs share a host name, against a brute-force search."""

    def test_against_brute_force(self) -> None:
        pieces = ["a", "b", ".", "*", "?", "[ab]", "[!a]"]
        patterns = ["".join(p) for k in range(1, 4) for p in product(pieces, repeat=k)]
        names = ["".join(p) for k in range(0, 7) for p in product("ab.c", repeat=k)]
        rng = random.Random(5)
        for a, b in (rng.sample(patterns, 2) for _ in range(1500)):
            expected = any(fnmatchcase(n, a) and fnmatchcase(n, b) for n in names)
            self.assertEqual(globs_overlap(a, b), expected, (a, b))

    def test_examples(self) -> None:
        self.assertTrue(globs_overlap("*.internal", "*.alpha.internal"))
        self.assertTrue(globs_overlap("web*", "*.a"))
        self.assertFalse(globs_overlap("*.a", "*.b"))
        self.assertFalse(globs_overlap("[!a-z0-9._-]x", "*"))  # nothing a host name can hold


class PatternOverlapTests(SynchronousTestCase):
    def test_index_against_every_pair(self) -> None:
        """The suffix index finds exactly the clusters whose patterns overlap."""
        rng = random.Random(11)
        pieces = ["a", "b", ".", "*", "?", "[ab]", ".a", ".b.a", "x"]

        def pattern() -> str:
            return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))

        clusters = [PacCluster(f"c{i}", hostnames=tuple(pattern() for _ in range(20))) for i in range(8)]
        index = _Overlaps(clusters)
        for query in [pattern() for _ in range(400)] + [p for c in clusters for p in c.hostnames]:
            expected = {c.name for c in clusters if any(globs_overlap(query, p) for p in c.hostnames)}
            self.assertEqual(index.owners(query), expected, query)

    def test_not_every_pair(self) -> None:
        """
        Thousands of patterns (a cluster's own suffix each, as usual) are not
        compared pairwise: that took the reactor 4 s for 100 clusters of 20.
        """
        calls = 0
        real = gateway.proxy.globs.globs_overlap

        def counting(a: str, b: str) -> bool:
            nonlocal calls
            calls += 1
            return real(a, b)

        for module in (gateway.proxy.globs, gateway.proxy.pac):
            if hasattr(module, "globs_overlap"):
                self.patch(module, "globs_overlap", counting)
        clusters = [
            PacCluster(f"c{i}", hostnames=tuple(f"*.h{k}.c{i}.internal" for k in range(20)), socks=("h:1",))
            for i in range(50)
        ]
        render_pac([*clusters, PacCluster("wide", hostnames=("*.internal",), socks=("h:2",))])
        self.assertLess(calls, 10 * 1001)


class NetworkOverlapTests(SynchronousTestCase):
    def test_index_against_every_pair(self) -> None:
        """The supernet / start-range index finds exactly the clusters whose networks overlap."""
        rng = random.Random(7)

        def network(version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
            bits = 32 if version == 4 else 128
            length = rng.randint(bits - 10, bits)  # within 1024 addresses: many overlaps and shared edges
            address = (0x0A000000 if version == 4 else 0xFD << 120) + rng.randrange(1 << 10)
            return ipaddress.ip_network((address >> (bits - length) << (bits - length), length))

        clusters = [PacCluster(f"c{i}", tuple(network(rng.choice((4, 6))) for _ in range(30))) for i in range(8)]
        index = _Overlaps(clusters)
        queries = [network(rng.choice((4, 6))) for _ in range(400)] + [n for c in clusters for n in c.networks]
        for query in queries:
            expected = {
                c.name for c in clusters if any(n.version == query.version and n.overlaps(query) for n in c.networks)
            }
            self.assertEqual(index.owners(query), expected, query)

    def test_edges(self) -> None:
        index = _Overlaps([PacCluster("last", (N("10.0.0.3/32"),)), PacCluster("next", (N("10.0.0.4/32"),))])
        self.assertEqual(index.owners(N("10.0.0.0/30")), {"last"})
        self.assertEqual(index.owners(N("10.0.0.0/8")), {"last", "next"})
        self.assertEqual(index.owners(N("::/0")), set())


class RenderTests(SynchronousTestCase):
    def test_deterministic_whatever_the_order(self) -> None:
        self.assertEqual(render_pac(CLUSTERS, **SHARED), render_pac(list(reversed(CLUSTERS)), **SHARED))

    def test_overlap_comment_names_the_view(self) -> None:
        text = render_pac(CLUSTERS, **SHARED).text
        self.assertIn('overlaps "alpha", listed first: use ?cluster=beta', text)
        self.assertIn('cluster "tok": its token is needed there', text)
        self.assertIn("other clusters overlap: refused as ambiguous (use qualified names)", text)

    def test_only_the_host_tests_the_rules_use(self) -> None:
        """No dead JavaScript: a host test is written only where a rule reads it (C{name} reads C{v4})."""
        names = PacCluster("n", hostnames=("*.n.test",), socks=("h:1",))
        v4 = PacCluster("f", (N("10.0.0.0/8"),), socks=("h:1",))
        for clusters, expected in (
            ([], []),
            ([v4], ["v4"]),
            ([names], ["v4", "name"]),
            ([ALPHA], ["v4", "v6", "name"]),
        ):
            text = render_pac(clusters, **SHARED).text
            self.assertEqual(re.findall(r"var (v4|v6|name) =", text), expected, text)

    def test_each_address_once_http_first(self) -> None:
        pac = render_pac([], shared_http=("127.0.0.1:3128", "[::1]:3128", "127.0.0.1:3128"), shared_socks=("h:1",))
        self.assertIn('var shared = "PROXY 127.0.0.1:3128; PROXY [::1]:3128; SOCKS5 h:1";', pac.text)

    def test_refuses_what_it_cannot_write_safely(self) -> None:
        for address in ("127.0.0.1:1; DIRECT", "127.0.0.1", 'a"b:1', "h:1\n"):
            self.assertRaises(ValueError, render_pac, [], shared_socks=(address,))
        self.assertRaises(ValueError, render_pac, [PacCluster("x", hostnames=("a/b",), socks=("h:1",))])
        self.assertRaises(ValueError, render_pac, [], domain='gw"; alert(1); "')
        self.assertRaises(ValueError, render_pac, [ALPHA], only="beta")

    def test_domain_case_and_dots(self) -> None:
        self.assertIn('dnsDomainIs(h, ".corp.example")', render_pac([], domain=".Corp.Example.", **SHARED).text)


class StubSource:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str | None]] = []

    def pac_file(self, host: str | None, cluster: str | None) -> bytes | None:
        self.calls.append((host, cluster))
        return None if cluster == "nope" else b"pac"


class FetchTests(SynchronousTestCase):
    def test_views(self) -> None:
        source = StubSource()
        self.assertEqual(fetch_pac(source.pac_file, "", "gw.example:3128"), b"pac")
        self.assertEqual(fetch_pac(source.pac_file, "cluster=beta", None), b"pac")
        self.assertEqual(fetch_pac(source.pac_file, "cluster=a%2Db", "[::1]:1"), b"pac")
        self.assertEqual(source.calls, [("gw.example", None), (None, "beta"), ("::1", "a-b")])

    def refused(self, source: StubSource | None, query: str) -> int:
        with self.assertRaises(PacRefused) as caught:
            fetch_pac(source and source.pac_file, query, None)
        return caught.exception.status

    def test_refusals(self) -> None:
        source = StubSource()
        self.assertEqual(self.refused(source, "cluster=nope"), 404)
        self.assertEqual(self.refused(source, "cluster=a/b"), 404)
        self.assertEqual(self.refused(source, "cluster="), 404)
        self.assertEqual(self.refused(None, ""), 404)
        for query in ("x=1", "cluster=a&cluster=b", "cluster", "cluster=%ff", "cluster=a&x=1"):
            self.assertEqual(self.refused(source, query), 400, query)
        self.assertEqual(source.calls, [(None, "nope")])

    def test_request_host(self) -> None:
        cases = {
            "GW.Example.:3128": "gw.example",
            "127.0.0.1": "127.0.0.1",
            "[::1]:3128": "::1",
            "[::FFFF:127.0.0.1]": "127.0.0.1",
            "[fe80::1%25eth0]": None,
            "[127.0.0.1]": None,
            "gw.example:x": None,
            "a b": None,
            "a;b": None,
            "": None,
        }
        self.assertEqual({value: pac_request_host(value) for value in cases}, cases)
        self.assertIsNone(pac_request_host(None))


class _StubListeners:
    """The per-cluster listeners a L{GatewayPac} reads: C{bound[(cluster, kind)]}."""

    def __init__(self, bound: dict[tuple[str, str], list[IAddress]]) -> None:
        self.bound = bound
        self.version = 0

    def addresses(self, name: str, kind: str) -> list[IAddress]:
        return self.bound.get((name, kind), [])


class _StubService:
    """What L{GatewayPac} reads off the running gateway."""

    def __init__(self, shared: dict[str, list[IAddress]], listeners: _StubListeners, clusters: list[str]) -> None:
        self._shared = shared
        self.listeners = listeners
        self.settings = GatewaySettings()
        self.gateway = SimpleNamespace(
            router=Router([test_routing.cluster(name, ("10.0.0.0/24",)) for name in clusters])
        )

    def listening_addresses(self, kind: str) -> list[IAddress]:
        return self._shared.get(kind, [])


class ProviderTests(SynchronousTestCase):
    """L{GatewayPac}: the script of the running gateway, cached."""

    def setUp(self) -> None:
        self.renders = 0
        real = gateway.app.pac.render_pac

        def counting(*args: Any, **kwargs: Any) -> PacScript:
            self.renders += 1
            return real(*args, **kwargs)

        self.patch(gateway.app.pac, "render_pac", counting)
        wildcard = {"socks": [IPv4Address("TCP", "0.0.0.0", 1080)], "http": [IPv4Address("TCP", "127.0.0.1", 3128)]}
        own = _StubListeners({("a", "socks"): [IPv6Address("TCP", "::", 10801)]})
        self.pac = GatewayPac(_StubService(wildcard, own, ["a", "b"]))  # type: ignore[arg-type]

    def test_one_render_for_every_request_host(self) -> None:
        """
        A wildcard listener is written with each request's host, yet the
        script is rendered once: an unauthenticated client sending a new Host
        each time must not make the reactor render a large file per request.
        """
        for i in range(3 * CACHE_SIZE):
            body = self.pac.pac_file(f"gw-{i}.example", None)
            assert body is not None
            self.assertIn(f'"PROXY 127.0.0.1:3128; SOCKS5 gw-{i}.example:1080"'.encode(), body)
            self.assertIn(f'"SOCKS5 gw-{i}.example:10801"'.encode(), body)
        body = self.pac.pac_file("fd00::1", None)
        assert body is not None
        self.assertIn(b'"PROXY 127.0.0.1:3128; SOCKS5 [fd00::1]:1080"', body)
        self.assertEqual(self.renders, 1)
        self.assertEqual(self.pac.pac_file(None, None), self.pac.pac_file(None, None))
        self.assertNotIn(b":1080", self.pac.pac_file(None, None) or b"")  # no host: no wildcard address
        self.assertEqual(self.renders, 2)

    def test_long_hosts_stay_under_the_limit(self) -> None:
        """The room a host takes in place of the mark is kept free: a long Host cannot push the file past the limit."""
        size = len(self.pac.pac_file("h", None) or b"")
        self.patch(gateway.app.pac, "MAX_PAC_BYTES", size + 100)
        self.pac._service.listeners.version += 1
        host = ".".join(["x" * 63] * 3) + ".example"
        body = self.pac.pac_file(host, None) or b""
        self.assertLessEqual(len(body), size + 100)
        self.assertIn(f'"PROXY 127.0.0.1:3128; SOCKS5 {host}:1080"'.encode(), body)  # qualified names still go
