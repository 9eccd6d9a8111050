"""
The gateway's PAC provider: what L{gateway.proxy.pac.render_pac} needs,
read off the running service tree.

The script names the addresses a browser must connect to, so they are
the bound addresses of the listeners (a C{tcp:0} port is known only then),
and a listener bound to a wildcard address (C{0.0.0.0}, C{::}) is written
with the host the browser fetched the PAC from: that host reached this
gateway, so it is the one address known to work for that browser.  Unix
socket listeners are not in it (browsers speak TCP).

Rendering is cached per view (cluster, request host) until the clusters or
their listeners change, so a client fetching the file in a loop costs a
dictionary lookup, not a script; the cache holds at most L{CACHE_SIZE}
views, as the request host is the client's to choose.
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
        self._cache: OrderedDict[tuple[str | None, str | None], bytes] = OrderedDict()
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
        key = (host, only)
        body = self._cache.get(key)
        if body is None:
            body = self._render(host, only)
            self._cache[key] = body
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return body

    def _render(self, host: str | None, only: str | None) -> bytes:
        service = self._service
        listeners = service.listeners

        def addresses(bound: list[IAddress]) -> tuple[str, ...]:
            written = (pac_address(address, host) for address in bound)
            return tuple(dict.fromkeys(a for a in written if a is not None))

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
        )
        if script.too_large and not self._warned:
            self._warned = True
            log.warn(
                "the PAC file would exceed {limit} bytes: it routes qualified names only "
                "(use ?cluster=NAME views, or fewer networks per cluster)",
                limit=MAX_PAC_BYTES,
            )
        return script.body
