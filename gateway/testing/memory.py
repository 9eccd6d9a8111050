"""
The in-memory test tier: fake proxy nodes and their destinations joined to the
gateway's real SSH client over C{twisted.test.iosim}, on one
C{MemoryReactorClock}.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.test.iosim import IOPump

from gateway.config import ProxyAddress
from gateway.testing.node import FakeProxyNode

#: The client protocol L{MemoryNetwork} joins to a server, handed back as it came.
_Client = TypeVar("_Client")


class MemoryNetwork:
    """
    Fake proxy nodes and their destinations, reached in memory.

    The tier below the real sockets, like Conch's C{test_endpoints} and
    C{treq.testing}: L{connect} is a cluster's C{Connector} that wires the
    gateway's real SSH client (L{GatewayClientTransport} and
    L{TunnelConnection}) to a L{FakeProxyNode}'s Conch server through
    C{twisted.test.iosim}, and each node reaches L{destinations} the same
    way.  Everything runs on one C{MemoryReactorClock}: a test calls
    L{advance} (time passes, then the bytes it caused are delivered) and
    needs no sleep and no socket.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.nodes: dict[tuple[str, int], FakeProxyNode] = {}
        #: Route target -> factory of the service there; None: a destination
        #: that never answers (a firewall dropping the SYN).
        self.destinations: dict[str, Factory | None] = {}
        self.down: set[tuple[str, int]] = set()
        #: (clock time, "host:port") of every connection attempt to a node.
        self.attempts: list[tuple[float, str]] = []
        self._pumps: list[IOPump] = []

    def add_node(self, host: str, port: int, authorized_keys: Iterable[keys.Key], **options: Any) -> FakeProxyNode:
        """A proxy node at C{host:port}; C{options} as for L{FakeProxyNode}."""
        node = FakeProxyNode(self.clock, authorized_keys, dial=self._dial, **options)
        node.factory.doStart()  # what listening would do: SSHFactory reads its moduli there
        self.nodes[(host, port)] = node
        return node

    def connect(self, proxy: ProxyAddress, factory: Factory) -> defer.Deferred:
        """A cluster's C{Connector}: refused for an unknown or downed node."""
        address = (proxy.host, proxy.port)
        self.attempts.append((self.clock.seconds(), f"{proxy.host}:{proxy.port}"))
        node = self.nodes.get(address)
        if node is None or address in self.down:
            return defer.fail(ConnectionRefusedError(proxy.host, proxy.port))
        peer = IPv4Address("TCP", *address)
        client = factory.buildProtocol(peer)
        assert client is not None, "a cluster's SSH client factory builds a protocol for every connection"
        return defer.succeed(self._join(client, node.factory, peer))

    def _dial(self, target: str, protocol: Protocol) -> defer.Deferred:
        if target not in self.destinations:
            return defer.fail(ConnectionRefusedError())
        service = self.destinations[target]
        if service is None:
            return defer.Deferred()
        return defer.succeed(self._join(protocol, service, IPv4Address("TCP", "127.0.0.1", 0)))

    def _join(self, client: _Client, server_factory: Factory, address: IPv4Address) -> _Client:
        server = server_factory.buildProtocol(address)
        self._pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
                clock=self.clock,
            )
        )
        return client

    def take_down(self, host: str, port: int) -> None:
        """The node at C{host:port} crashes: its connections drop, new ones are refused."""
        self.down.add((host, port))
        node = self.nodes[(host, port)]
        for pump in self._pumps:
            if pump.server.factory is node.factory:
                pump.serverIO.abortConnection()

    def bring_back(self, host: str, port: int) -> None:
        """The node at C{host:port} accepts connections again."""
        self.down.discard((host, port))

    def flush(self) -> None:
        """Deliver bytes (and disconnects) until nothing moves."""
        for _ in range(10_000):
            moved = [pump for pump in list(self._pumps) if pump.pump()]
            self._pumps = [p for p in self._pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)]
            if not moved:
                return
        raise AssertionError("the in-memory network never went quiet")

    def advance(self, seconds: float = 0.0) -> None:
        """
        Let C{seconds} pass, delivering what each timer causes before the
        next one is due -- as a running reactor would: one jump of the clock
        would fire a keepalive once, late, and find its answers missing.
        """
        end = self.clock.seconds() + seconds
        self.flush()
        for _ in range(100_000):
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= end]
            step_to = min(due, default=end)
            self.clock.advance(max(0.0, step_to - self.clock.seconds()))
            self.flush()
            if not due:
                return
        raise AssertionError("timers kept firing without the clock reaching its end")
