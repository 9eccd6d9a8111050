"""
An in-process stand-in for a cluster: a Conch SSH server playing the proxy
node, and a small web service that only that server can reach.

Used by the embedded demo (C{twistd -n gateway --demo}), by the in-process
tests, and available to anyone who wants to exercise the gateway without
root or a network.  The fake proxy node behaves like OpenSSH where the
gateway can tell the difference: it answers C{direct-tcpip} opens only after
connecting to the destination (so "connection refused" is an open failure
with code 2), answers code 1 for destinations it is told to prohibit, and
carries half-close in both directions.  Like an OpenSSH server it also runs
C{nc HOST PORT} in C{session} channels (exec), the way the gateway reaches
destinations through nodes configured with C{AllowTcpForwarding no}
(C{FakeProxyNode(allow_tcp_forwarding=False)}), with netcat-openbsd's
stderr and exit status on failure.

Destinations are virtual: the node maps C{(host, port)} pairs to client
endpoint strings, e.g. C{("10.99.0.10", 80)} to a unix socket in a private
directory, so the "internal network" exists only behind the fake proxy node.

The package, one concern a module (everything public is importable from
C{gateway.testing} itself, which downstream tests use):

 - L{keys}: throwaway Ed25519 keys, as PEM and as public lines;
 - L{node}: L{FakeProxyNode}, the Conch server; L{channels}: its server
   side of C{direct-tcpip} and C{session} channels;
 - L{memory}: L{MemoryNetwork}, nodes and destinations reached in memory;
 - L{demo}: L{DemoCluster}, L{demo_web_site} and the C{DEMO_*} addresses.
"""

from gateway.testing.demo import DEMO_API_WEB, DEMO_NETWORK, DEMO_PAGE, DEMO_WEB, DemoCluster, demo_web_site
from gateway.testing.keys import generate_key, private_pem, public_line
from gateway.testing.memory import MemoryNetwork
from gateway.testing.node import DEMO_USER, FakeProxyNode

__all__ = [
    "DEMO_API_WEB",
    "DEMO_NETWORK",
    "DEMO_PAGE",
    "DEMO_USER",
    "DEMO_WEB",
    "DemoCluster",
    "FakeProxyNode",
    "MemoryNetwork",
    "demo_web_site",
    "generate_key",
    "private_pem",
    "public_line",
]
