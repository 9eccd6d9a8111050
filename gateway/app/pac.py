"""
The gateway's PAC provider: what L{gateway.proxy.pac.render_pac} needs,
read off the running service tree.

The script names the addresses a browser must connect to, so they are
the bound addresses of the listeners (a C{tcp:0} port is known only then),
and a listener bound to a wildcard address (C{0.0.0.0}, C{::}) is written
with the host the browser fetched the PAC from: that host reached this
gateway, so it is the one address known to work for that browser.  Unix
socket listeners are not in it (browsers speak TCP).

Rendering is cached per view (cluster, with a request host or without)
until the clusters or their listeners change, so a client fetching the file
in a loop costs a dictionary lookup, not a script.  The request host is the
client's to choose, and a large script takes the reactor a second to
render: so the script is rendered once for every host, with L{_HOST_MARK}
where the host goes, and each request's host replaces the mark.  The cache
holds at most L{CACHE_SIZE} views (API clusters are many).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from gateway.addresses import host_port
from gateway.proxy.pac import MAX_PAC_BYTES, PacCluster, render_pac

if TYPE_CHECKING:
    from gateway.app.service import GatewayService

log = Logger()

#: Views kept rendered at once.
CACHE_SIZE = 64
_WILDCARDS = ("0.0.0.0", "::")
#: Stands for the request host in a rendered script: RFC 6666's discard-only
#: prefix, where no listener is bound, and nothing else in a script is an
#: address in brackets (networks are written without them).
_HOST_MARK = "100::"
_MARKED = f"[{_HOST_MARK}]"
#: The most a request host (a DNS name, an IPv6 address in brackets) adds
#: to the script in place of one mark: the limit leaves that much room.
_HOST_GROWTH = 256


def pac_address(address: IAddress, request_host: str | None) -> str | None:
    """A listener's bound address as the PAC writes it, or None where a browser cannot use it."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    host = address.host
    if host in _WILDCARDS:
        if request_host is None:
            return None
        host = request_host
    return host_port(host, address.port)


class GatewayPac:
    """L{gateway.proxy.pac.PacSource} of a running L{GatewayService}."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service
        #: (with a request host, the cluster of the view) -> the script.
        self._cache: OrderedDict[tuple[bool, str | None], bytes] = OrderedDict()
        self._state: object = None
        self._warned = False

    def pac_file(self, host: str | None, cluster: str | None) -> bytes | None:
        router = self._service.gateway.router
        only = None
        if cluster is not None:
            config = router.lookup(cluster)
            if config is None:
                return None
            only = config.name
        state = (router, self._service.listeners.version)
        if state != self._state:
            self._cache.clear()
            self._state = state
            self._warned = False
        key = (host is not None, only)
        body = self._cache.get(key)
        if body is None:
            body = self._render(None if host is None else _HOST_MARK, only)
            self._cache[key] = body
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if host is None:
            return body
        # The host is canonical (pac_request_host): it cannot add a directive.
        return body.replace(_MARKED.encode("ascii"), host_port(host, 0).rpartition(":")[0].encode("ascii"))

    def _render(self, host: str | None, only: str | None) -> bytes:
        service = self._service
        listeners = service.listeners
        marks = 0

        def addresses(bound: list[IAddress]) -> tuple[str, ...]:
            nonlocal marks
            written = (pac_address(address, host) for address in bound)
            unique = tuple(dict.fromkeys(a for a in written if a is not None))
            marks += sum(1 for a in unique if a.startswith(_MARKED))
            return unique

        clusters = [
            PacCluster(
                name=config.name,
                networks=config.networks,
                hostnames=config.hostnames,
                socks=addresses(listeners.addresses(config.name, "socks")),
                http=addresses(listeners.addresses(config.name, "http")),
                token=config.token is not None,
            )
            for config in service.gateway.router.clusters
        ]
        script = render_pac(
            clusters,
            shared_socks=addresses(service.listening_addresses("socks")),
            shared_http=addresses(service.listening_addresses("http")),
            domain=service.settings.cluster_domain,
            only=only,
            limit=MAX_PAC_BYTES - _HOST_GROWTH * marks,
        )
        if script.too_large and not self._warned:
            self._warned = True
            log.warn(
                "the PAC file would exceed {limit} bytes: it routes qualified names only "
                "(use ?cluster=NAME views, or fewer networks per cluster)",
                limit=MAX_PAC_BYTES,
            )
        return script.body
