"""
How a cluster reaches a proxy candidate, and how it checks the node's host key.

A L{Connector} turns a candidate address and a protocol factory into a
connected protocol (or a failure): the cluster does not care whether the
bytes go over TCP, a proxy command's pipes, another SSH connection's channel
or an in-memory pipe in a test (L{gateway.testing.MemoryNetwork}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory

from gateway.config import ClusterConfig, ProxyAddress
from gateway.ssh.hostkeys import HostKeyPolicy

Connector = Callable[[ProxyAddress, Factory], Deferred]


class IConnectingReactor(IReactorTCP, IReactorTime):
    """
    A reactor that connects over TCP and keeps time: what a cluster needs
    when it connects straight to its proxy nodes (the TCP endpoints need
    both; the cluster itself only the clock).

    Every real reactor and C{MemoryReactorClock} provide both interfaces but
    declare none that unites them, so this one names the combination for
    the type checker; nothing checks it at run time.
    """


def host_key_policy(config: ClusterConfig) -> HostKeyPolicy:
    """The host keys a cluster's proxy nodes may present."""
    return HostKeyPolicy(
        known_hosts=config.known_hosts,
        pinned=config.host_keys,
        accept_any=config.insecure_accept_any_host_key,
        ca_keys=config.host_ca_keys,
        allow_sha1_signatures=config.allow_sha1_signatures,
    )


def tcp_connector(reactor: IConnectingReactor, timeout: float) -> Connector:
    """Connect straight to the proxy candidate over TCP."""

    def connect(proxy: ProxyAddress, factory: Factory) -> Deferred:
        endpoint: IStreamClientEndpoint
        if isIPAddress(proxy.host):
            endpoint = TCP4ClientEndpoint(reactor, proxy.host, proxy.port, timeout)
        elif isIPv6Address(proxy.host):
            endpoint = TCP6ClientEndpoint(reactor, proxy.host, proxy.port, timeout)
        else:
            endpoint = HostnameEndpoint(reactor, proxy.host, proxy.port, timeout)
        return endpoint.connect(factory)

    return connect
