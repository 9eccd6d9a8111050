"""
The grammar of a destination host: what a client may ask for, and the one
text of it that is matched, logged and sent to the proxy node.

Pure functions (no Twisted, no I/O), shared by both front ends (they
canonicalise while parsing) and the router:

  - L{normalise_host}: an IP address (IPv4-mapped IPv6 as IPv4, C{[v6]}
    accepted, zone ids refused) or a host name in lower case without its
    trailing dot, internationalised names as IDNA A-labels (UTS 46, as
    browsers encode them), numeric look-alikes refused.
  - L{split_qualified}: a cluster-qualified name C{HOST.CLUSTER.<domain>}
    (C{[gateway] cluster_domain}, default C{gw.internal}) as the cluster label
    and the destination C{HOST}: an IPv4 address with dashes for dots
    (C{10-0-0-5}), an IPv6 address with dashes for colons (C{fd00--5}), or a
    name.  Such names let a client that cannot send proxy credentials -- a
    browser -- pick a cluster even where tenant networks overlap.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

import idna

from gateway.errors import Reason, StreamError, shown

__all__ = [
    "DEFAULT_CLUSTER_DOMAIN",
    "IPAddress",
    "QualifiedName",
    "canonical_host",
    "normalise_host",
    "split_qualified",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The suffix of cluster-qualified names: C{.internal} is reserved for
#: private use (ICANN, 2024), so no public name can collide with it.
DEFAULT_CLUSTER_DOMAIN = "gw.internal"

_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_DASHED_IPV4_RE = re.compile(r"[0-9]{1,3}(-[0-9]{1,3}){3}")


@functools.lru_cache(maxsize=4096)
def normalise_host(host: str) -> IPAddress | str:
    """
    Parse a destination host.

    Cached: clients ask for the same few destinations again and again, and
    parsing an address with C{ipaddress} is a noticeable part of a short
    stream's CPU.  Refusals raise, and are not cached.

    @return: an IP address (IPv4-mapped IPv6 addresses as IPv4, C{[v6]}
        brackets accepted) or the host name in lower case, without trailing
        dot, non-ASCII labels as IDNA A-labels: the text a resolver and the
        C{hostnames} patterns see.
    @raise StreamError: C{BAD_REQUEST} if C{host} is neither, or an IPv6
        address with a zone id (C{fe80::1%eth0}): a zone names an interface
        of whoever reads it, and must not reach the proxy node.
    """
    if not isinstance(host, str) or not host:
        raise StreamError(Reason.BAD_REQUEST, "empty destination host")
    text = host
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed:
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if bracketed or ":" in text:
            raise StreamError(
                Reason.BAD_REQUEST,
                f"{shown(host)} is not a valid IPv6 address or host name",
            ) from None
    else:
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id is not None:
                raise StreamError(Reason.BAD_REQUEST, f"{shown(host)}: IPv6 zone ids are not accepted")
            if address.ipv4_mapped:
                return address.ipv4_mapped
        elif bracketed:
            raise StreamError(Reason.BAD_REQUEST, f"{shown(host)}: only IPv6 addresses go in brackets")
        return address
    name = _ascii_name(host, text.removesuffix("."))
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise StreamError(Reason.BAD_REQUEST, f"{shown(host)} is not a valid host name")
    # Resolvers read "10.1", "0x0a000001" or "167772161" as IPv4 addresses;
    # such a "name" must not slip past the networks check.
    if name.rsplit(".", 1)[-1].isdigit() or _inet_aton_accepts(name):
        raise StreamError(
            Reason.BAD_REQUEST,
            f"{shown(host)} looks like a numeric address: write IPv4 addresses as a.b.c.d",
        )
    return name


def _ascii_name(host: str, name: str) -> str:
    """C{name} in lower case, its non-ASCII labels as IDNA A-labels (UTS 46 mapping, as browsers do)."""
    if name.isascii():
        return name.lower()
    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError:
        raise StreamError(Reason.BAD_REQUEST, f"{shown(host)} is not a valid internationalised name") from None


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """
    The one text of a destination host that is matched, logged and sent to
    the proxy node: an IP address's canonical form, or the host name as
    L{normalise_host} writes it.  Both front ends call it while parsing
    (cached like L{normalise_host}: it is on every request's path).

    @raise StreamError: C{BAD_REQUEST}, as L{normalise_host}.
    """
    return str(normalise_host(host))


def _inet_aton_accepts(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class QualifiedName:
    """One reading of C{HOST.CLUSTER.<domain>}: the cluster labels and C{HOST} as written."""

    #: The labels between C{HOST} and the domain (a cluster name may hold dots).
    cluster: str
    host: str

    def destination(self) -> IPAddress | str:
        """
        C{HOST} as the destination: C{10-0-0-5} as 10.0.0.5, C{fd00--5} as
        fd00::5, anything else as the name it is (L{normalise_host}).

        @raise StreamError: C{BAD_REQUEST}, as L{normalise_host}.
        """
        host = self.host
        if _DASHED_IPV4_RE.fullmatch(host):
            try:
                return ipaddress.IPv4Address(host.replace("-", "."))
            except ValueError:
                pass
        elif "-" in host and "." not in host:
            try:
                address = ipaddress.IPv6Address(host.replace("-", ":"))
            except ValueError:
                pass
            else:
                return address.ipv4_mapped or address
        return normalise_host(host)


def split_qualified(name: str, domain: str) -> list[QualifiedName]:
    """
    The readings of C{name} (a normalised host name) as C{HOST.CLUSTER.<domain>}:
    none when it does not end in C{.<domain>}, otherwise one per way of
    cutting the labels before the domain into C{HOST} and C{CLUSTER} (a
    cluster name may contain dots: C{a.b.net-a.gw.internal} is host C{a} of
    cluster C{b.net-a} or host C{a.b} of cluster C{net-a}); the router keeps
    those that name a cluster, and only then reads C{HOST}.

    @raise StreamError: C{BAD_REQUEST} for a name with nothing before the
        cluster label.
    """
    suffix = "." + domain
    if not name.endswith(suffix):
        return []
    labels = name[: -len(suffix)].split(".")
    if len(labels) < 2:
        raise StreamError(
            Reason.BAD_REQUEST, f"{shown(name, 80)}: write HOST.CLUSTER.{domain} (an address with dashes, or a name)"
        )
    return [QualifiedName(".".join(labels[cut:]), ".".join(labels[:cut])) for cut in range(1, len(labels))]
