"""
Whether an address is reachable only from this host.

The control API without a token trusts only this host: its listener must be
bound to loopback or to a unix socket with a path (whose file permissions
decide who connects), and each request's Host header must name loopback.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

_LOOPBACK_NAMES = {"localhost"}


def is_loopback_host(host: str) -> bool:
    """C{localhost} or a loopback address (C{127.0.0.0/8}, C{::1}, C{::ffff:127.0.0.1})."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_local_address(address: IAddress) -> bool:
    """
    Whether a listening port bound to C{address} takes connections from this
    host only: TCP on a loopback address, or a unix socket with a path.  A
    Linux abstract socket (C{"\\0name"}) has no file permissions: every
    process of its network namespace, whatever its user, reaches it.  Any
    other kind of address is not known to be local.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return is_loopback_host(address.host)
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        return name is not None and name != "" and not name.startswith("\0")
    return False
