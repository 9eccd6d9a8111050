"""
The PAC file (proxy auto-config, C{FindProxyForURL(url, host)}) that lets a
browser reach clusters without proxy credentials: pure, no Twisted, no I/O.

L{render_pac} writes the script from plain inputs (L{PacCluster}, the shared
listeners, the qualified-name domain); a L{PacSource} (the gateway's
provider) calls it and serves the bytes; L{fetch_pac} is what both servers of
the file (the HTTP proxy listener's C{/proxy.pac}, the control API's
C{/v1/proxy.pac}) do with a request's query and C{Host} header.

What the script decides, in order:

  1. C{HOST.CLUSTER.DOMAIN} (qualified names, any case) -> the shared
     listeners, which pick the cluster from the name.
  2. Per cluster, in name order: a cluster with per-cluster listeners gets
     its networks and hostnames sent there; where two such clusters'
     networks or patterns overlap the first listed wins (a comment names the
     C{?cluster=NAME} view that gives the other).  A cluster without one gets
     its networks and patterns sent to the shared listeners, which route by
     destination -- also those another cluster overlaps (AMBIGUOUS there)
     and those of a cluster with a token (browsers cannot send it), each
     with a comment: the gateway's refusal is a page that says why, where
     C{DIRECT} would send a cluster's address to the browser's own network
     (Firefox did, before this rule).
  3. Everything else C{DIRECT}.

Rules the script keeps, for browsers as they are (Chromium's
C{net/proxy_resolution}, read 2026):

  - It decides by host only: Chromium hands C{https://} and C{wss://} URLs to
    C{FindProxyForURL} with path and query stripped.
  - It never resolves a name: C{isInNet} resolves a host that is not a dotted
    quad, so it is only called after a dotted-quad test; IPv6 literals are
    tested by the script's own functions (L{_IPV6_HELPERS}), as Firefox has
    no C{isInNetEx}.  Host name patterns apply to names only, IP networks to
    addresses only, as the router matches them.
  - A host name glob is tested as the router's fnmatch reads it: with
    C{shExpMatch} when that reads it the same, else (classes, brackets) with a
    regular expression of its own (L{gateway.proxy.globs}).
  - No C{DIRECT} after the proxies: a gateway that is down must not send a
    cluster's addresses to whatever network the browser is on.
  - It is ASCII (a PAC without charset is read as Latin-1) and below 1 MB
    (Chromium's limit, ERR_FILE_TOO_BIG beyond it): past L{MAX_PAC_BYTES}
    only the qualified-name rule stays, and L{PacScript.too_large} says so.
"""

from __future__ import annotations

import ipaddress
import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl

from gateway.config import is_valid_name
from gateway.config.model import Network
from gateway.destinations import DEFAULT_CLUSTER_DOMAIN, canonical_host
from gateway.errors import StreamError
from gateway.proxy.globs import GlobIndex, glob_test

__all__ = [
    "MAX_PAC_BYTES",
    "PAC_CONTENT_TYPE",
    "PacCluster",
    "PacRefused",
    "PacScript",
    "PacSource",
    "fetch_pac",
    "pac_request_host",
    "render_pac",
]

PAC_CONTENT_TYPE = b"application/x-ns-proxy-autoconfig"

#: Chromium refuses a PAC script above this many bytes (kDefaultMaxResponseBytes).
MAX_PAC_BYTES = 1024 * 1024

#: A PAC proxy address: host or [IPv6] and a port; nothing that could add a directive.
_ADDRESS_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}")
#: The alphabet of hostnames globs (L{gateway.config.names.parse_pattern}'s).
_GLOB_RE = re.compile(r"[a-z0-9._*?\[\]!-]+")
_DOMAIN_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


@dataclass(frozen=True)
class PacCluster:
    """
    One cluster as the PAC sees it.  C{socks} and C{http} are its per-cluster
    listeners as PAC addresses (C{"127.0.0.1:10801"}, C{"[::1]:10801"}), empty
    when it has none; C{hostnames} its fnmatch globs (as the config parsed them).
    """

    name: str
    networks: tuple[Network, ...] = ()
    hostnames: tuple[str, ...] = ()
    socks: tuple[str, ...] = ()
    http: tuple[str, ...] = ()
    token: bool = False

    @property
    def has_listener(self) -> bool:
        return bool(self.socks or self.http)


@dataclass(frozen=True)
class PacScript:
    """The script, and whether its cluster rules were dropped to stay under the size limit."""

    text: str
    too_large: bool = False

    @property
    def body(self) -> bytes:
        return self.text.encode("ascii")


class PacSource(Protocol):
    """What serves the PAC file: the gateway's provider, built from the running clusters."""

    def pac_file(self, host: str | None, cluster: str | None) -> bytes | None:
        """
        The PAC file for a client that fetched it from C{host} (the C{Host}
        header without port, canonical; None without one) -- the provider
        writes it into listener addresses bound to a wildcard address --, in
        the view of C{cluster} (the C{?cluster=} name or alias; None: all).
        None for an unknown cluster.
        """


# -- the script ----------------------------------------------------------------------


def render_pac(
    clusters: Sequence[PacCluster],
    *,
    shared_socks: Sequence[str] = (),
    shared_http: Sequence[str] = (),
    domain: str = DEFAULT_CLUSTER_DOMAIN,
    only: str | None = None,
    limit: int = MAX_PAC_BYTES,
) -> PacScript:
    """
    The PAC script for C{clusters} (any order: the script lists them by name),
    or only for the cluster named C{only}.  Deterministic: the same inputs give
    the same bytes.

    @raise ValueError: for an address, pattern or domain that cannot be
        written safely, or an C{only} that is none of C{clusters}.
    """
    ordered = sorted(clusters, key=lambda c: c.name)
    if only is not None and only not in {c.name for c in ordered}:
        raise ValueError(f"no cluster {only!r} to render")
    domain = domain.lower().strip(".")
    if not _DOMAIN_RE.fullmatch(domain):
        raise ValueError(f"invalid cluster domain {domain!r}")
    shared = _directives(shared_socks, shared_http)
    view = "all clusters" if only is None else f"cluster {_quoted(only)} (?cluster={only})"
    head = [
        "// Proxy auto-config of the cluster tunnel gateway, generated: do not edit.",
        _comment(f"View: {view}."),
        "// It decides by host alone and never resolves a name. No DIRECT after the proxies:",
        "// with the gateway down, cluster addresses must not go to the local network.",
    ]
    top = [f"var shared = {json.dumps(shared)};"] if shared else []
    start = [
        "function FindProxyForURL(url, host) {",
        '  var h = host.toLowerCase().replace(/^\\[(.*)\\]$/, "$1").replace(/\\.$/, "");',
    ]
    if shared:
        start.append(f"  if (dnsDomainIs(h, {json.dumps('.' + domain)})) return shared;")
    else:
        start.append(_comment("No shared listener: qualified names are not routed.", "  "))
    variables, rules = _cluster_rules(ordered, only, shared)
    end = ['  return "DIRECT";', "}"]
    probes = _probes(rules)
    helpers = _IPV6_HELPERS if any(line.startswith("  var v6") for line in probes) else []
    script = PacScript("\n".join(head + top + variables + helpers + start + probes + rules + end) + "\n")
    if len(script.body) < limit:
        return script
    dropped = _comment(
        f"The network and hostname rules would make this file larger than browsers accept "
        f"({limit} bytes): only qualified names (HOST.CLUSTER.{domain}) are routed.",
        "  ",
    )
    return PacScript("\n".join(head + top + start + [dropped] + end) + "\n", too_large=True)


def _cluster_rules(ordered: Sequence[PacCluster], only: str | None, shared: str) -> tuple[list[str], list[str]]:
    """The variables (one proxy list per cluster with listeners) and the rules of the view."""
    variables: list[str] = []
    rules: list[str] = []
    overlaps = _Overlaps(ordered)
    earlier: set[str] = set()  # clusters with listeners already listed
    for cluster in ordered:
        if only is not None and cluster.name != only:
            continue
        label = f"cluster {_quoted(cluster.name)}"
        if cluster.has_listener:
            variable = f"c{len(variables)}"
            directives = _directives(cluster.socks, cluster.http)
            variables.append(f"var {variable} = {json.dumps(directives)};  {_comment(label)}")
            rules.append(_comment(f"{label}: its per-cluster listeners", "  "))
            for route in (*cluster.networks, *cluster.hostnames):
                rule = _pattern_rule(route, variable) if isinstance(route, str) else _network_rule(route, variable)
                rules.append(rule + _first_wins(cluster, overlaps.owners(route) & earlier if earlier else set()))
            earlier.add(cluster.name)
        elif not shared:
            rules.append(_comment(f"{label} is left out: no per-cluster or shared listener.", "  "))
        else:
            # The shared listeners choose by destination.  What they cannot
            # serve a browser -- a token, a destination another cluster also
            # holds (AMBIGUOUS) -- still goes there: the gateway's refusal is
            # a page that says why, where DIRECT would send a cluster address
            # to whatever network the browser is on.
            why = "its token is needed there" if cluster.token else "the shared listeners, which route by destination"
            rules.append(_comment(f"{label}: {why}", "  "))
            for route in (*cluster.networks, *cluster.hostnames):
                rule = _pattern_rule(route, "shared") if isinstance(route, str) else _network_rule(route, "shared")
                if not cluster.token and overlaps.owners(route) - {cluster.name}:
                    rule += "  " + _comment("other clusters overlap: refused as ambiguous (use qualified names)")
                rules.append(rule)
    return variables, rules


#: What kind of host C{h} is, for the rules to test: only an IPv4 literal
#: may reach isInNet (it resolves names).  Variable, and the line defining it.
_PROBES = (
    ("v4", "  var v4 = /^[0-9]{1,3}(\\.[0-9]{1,3}){3}$/.test(h);"),
    ("v6", "  var v6 = gwV6(h);"),
    ("name", '  var name = !v4 && h.indexOf(":") < 0;'),
)


#: IPv6 literals tested by the script itself: browsers' isInNetEx is
#: Microsoft's extension, which Chromium has and Firefox has not.  String
#: work only (never a lookup): C{gwV6} gives the eight groups of an IPv6
#: literal (C{::}, an embedded IPv4 tail) or null, C{gwInNet6} tests a prefix.
_IPV6_HELPERS = [
    "function gwV6(h) {",
    '  if (h.indexOf(":") < 0 || !/^[0-9a-f:.]+$/.test(h)) return null;',
    "  var m = /^(.*:)([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})$/.exec(h);",
    '  if (m) h = m[1] + ((m[2] << 8) | m[3]).toString(16) + ":" + ((m[4] << 8) | m[5]).toString(16);',
    '  var halves = h.split("::");',
    "  if (halves.length > 2) return null;",
    '  var head = halves[0] ? halves[0].split(":") : [];',
    '  var tail = halves.length == 2 && halves[1] ? halves[1].split(":") : [];',
    "  var n = head.length + tail.length;",
    "  if (halves.length == 1 ? n != 8 : n > 7) return null;",
    "  var g = head.slice(0);",
    '  for (var i = n; i < 8; i++) g.push("0");',
    "  g = g.slice(0, 8 - tail.length).concat(tail);",
    "  for (var j = 0; j < 8; j++) {",
    "    if (!/^[0-9a-f]{1,4}$/.test(g[j])) return null;",
    "    g[j] = parseInt(g[j], 16);",
    "  }",
    "  return g;",
    "}",
    "function gwInNet6(a, net, len) {",
    "  for (var i = 0; i < 8 && len > 0; i++, len -= 16) {",
    "    var mask = len >= 16 ? 0xffff : (0xffff << (16 - len)) & 0xffff;",
    "    if ((a[i] & mask) != (net[i] & mask)) return false;",
    "  }",
    "  return true;",
    "}",
]


def _probes(rules: Sequence[str]) -> list[str]:
    """The lines of the L{_PROBES} that C{rules} test (C{name} is written with C{v4}), no others."""
    used = {variable for variable, _ in _PROBES if any(rule.startswith(f"  if ({variable} && ") for rule in rules)}
    if "name" in used:
        used.add("v4")
    return [line for variable, line in _PROBES if variable in used]


def _directives(socks: Iterable[str], http: Iterable[str]) -> str:
    """
    C{"PROXY b; SOCKS5 a"}, each once.  The HTTP proxy first: it sends an
    origin the real destination in C{Host} (a SOCKS5 or CONNECT stream
    carries the browser's own head, with the qualified name), and a refusal
    there is a page the browser shows, where Chromium takes a refused SOCKS5
    stream for a broken proxy, retries it through the next entry and avoids
    that listener for minutes.
    """
    entries = [f"PROXY {_address(a)}" for a in http] + [f"SOCKS5 {_address(a)}" for a in socks]
    return "; ".join(dict.fromkeys(entries))


def _address(address: str) -> str:
    if not _ADDRESS_RE.fullmatch(address):
        raise ValueError(f"invalid PAC proxy address {address!r}")
    return address


def _network_rule(network: Network, proxies: str) -> str:
    if isinstance(network, ipaddress.IPv4Network):
        where = f"v4 && isInNet(h, {json.dumps(str(network.network_address))}, {json.dumps(str(network.netmask))})"
    else:
        groups = ",".join(str(int(network.network_address) >> (16 * (7 - i)) & 0xFFFF) for i in range(8))
        where = f"v6 && gwInNet6(v6, [{groups}], {network.prefixlen})"
    return f"  if ({where}) return {proxies};"


def _pattern_rule(pattern: str, proxies: str) -> str:
    if not _GLOB_RE.fullmatch(pattern):  # so nothing else can reach the script
        raise ValueError(f"invalid host name pattern {pattern!r}")
    return f"  if (name && {glob_test(pattern, 'h')}) return {proxies};"


def _first_wins(cluster: PacCluster, earlier: set[str]) -> str:
    """For a later cluster's network or pattern that C{earlier} clusters overlap: who wins."""
    if not earlier:
        return ""
    first = ", ".join(_quoted(name) for name in sorted(earlier))
    return "  " + _comment(f"overlaps {first}, listed first: use ?cluster={cluster.name}")


class _Overlaps:
    """
    Which clusters' networks or patterns overlap a network or pattern.  Two
    CIDR blocks overlap only when one holds the other, so a network's
    overlaps are its supernets (one lookup per shorter prefix length) and the
    blocks starting inside it (a range of a sorted list); a pattern's are
    found by literal suffix (L{GlobIndex}): thousands of networks or
    patterns cost milliseconds, not a comparison of every pair.
    """

    def __init__(self, clusters: Iterable[PacCluster]) -> None:
        self._blocks: dict[tuple[int, int, int], set[str]] = {}  # (version, prefix length, first address)
        self._starts: dict[int, list[tuple[int, str]]] = {4: [], 6: []}
        self._lengths: dict[int, set[int]] = {4: set(), 6: set()}  # the prefix lengths there are
        self._pattern_owners: dict[str, set[str]] = {}
        for cluster in clusters:
            for net in cluster.networks:
                first = int(net.network_address)
                self._blocks.setdefault((net.version, net.prefixlen, first), set()).add(cluster.name)
                self._starts[net.version].append((first, cluster.name))
                self._lengths[net.version].add(net.prefixlen)
            for pattern in cluster.hostnames:
                self._pattern_owners.setdefault(pattern, set()).add(cluster.name)
        for starts in self._starts.values():
            starts.sort()
        self._patterns = GlobIndex(self._pattern_owners)

    def owners(self, route: Network | str) -> set[str]:
        """The clusters (C{route}'s own among them) with a network or pattern overlapping C{route}."""
        if isinstance(route, str):
            return {owner for pattern in self._patterns.overlapping(route) for owner in self._pattern_owners[pattern]}
        bits = route.max_prefixlen
        first = int(route.network_address)
        last = first | ((1 << (bits - route.prefixlen)) - 1)
        found: set[str] = set()
        for length in self._lengths[route.version]:
            if length <= route.prefixlen:
                found |= self._blocks.get((route.version, length, first >> (bits - length) << (bits - length)), set())
        starts = self._starts[route.version]
        low, high = bisect_left(starts, (first, "")), bisect_right(starts, (last, "\U0010ffff"))
        found.update(owner for _, owner in starts[low:high])
        return found


def _quoted(name: str) -> str:
    return json.dumps(name)


def _comment(text: str, indent: str = "") -> str:
    """A one-line JS comment: printable ASCII only, whatever C{text} holds."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text).replace("*/", "* /")
    return f"{indent}// {safe}"


# -- serving ---------------------------------------------------------------------------


class PacRefused(Exception):
    """A PAC request answered with C{status} (400, 404) and C{reason} (safe to show)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def pac_request_host(value: str | None) -> str | None:
    """
    The host of a C{Host} header without its port, canonical (lower case,
    IPv6 without brackets), or None for a missing or malformed one: the
    provider may write it into the script, so nothing else gets through.
    """
    if value is None:
        return None
    text = value.strip(" \t")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not re.fullmatch(r"(?::[0-9]{0,5})?", rest) or ":" not in host:
            return None
    else:
        host, _, port = text.partition(":")
        if not re.fullmatch(r"[0-9]{0,5}", port):
            return None
    try:
        return canonical_host(host)
    except StreamError:
        return None


def fetch_pac(
    pac_file: Callable[[str | None, str | None], bytes | None] | None,
    query: str,
    host: str | None,
    view: str | None = None,
) -> bytes:
    """
    The PAC file for a request with C{query} (the URL's query, without C{?})
    and C{Host} header C{host}, from C{pac_file} (a L{PacSource}'s, or the
    control API's C{proxy_pac}: same arguments).  Without C{?cluster=}, the
    view of cluster C{view} (a per-cluster listener's), or of all.

    @raise PacRefused: 404 without C{pac_file} or for an unknown cluster, 400
        for a query other than C{cluster=NAME}.
    """
    cluster = view
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, errors="strict")
        except ValueError:
            pairs = []
        if len(pairs) != 1 or pairs[0][0] != "cluster":
            raise PacRefused(400, "the PAC file takes one query parameter: cluster=NAME")
        cluster = pairs[0][1]
        if not is_valid_name(cluster):
            raise PacRefused(404, "no such cluster")
    if pac_file is None:
        raise PacRefused(404, "this gateway serves no PAC file")
    body = pac_file(pac_request_host(host), cluster)
    if body is None:
        raise PacRefused(404, f"no cluster named {cluster!r}" if cluster else "no PAC file")
    return body
