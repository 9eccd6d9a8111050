"""
The embedded demo's cluster (C{twistd -n gateway --demo}): a L{FakeProxyNode}
on loopback and a web service that only that node can reach.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gateway.testing.keys import generate_key, private_pem, public_line
from gateway.testing.node import DEMO_USER, FakeProxyNode

DEMO_NETWORK = "10.99.0.0/24"
DEMO_WEB = ("10.99.0.10", 80)
#: The same web server under a name, for the cluster the demo registers
#: through the API: a name of its own, so the two clusters never overlap.
DEMO_API_WEB = ("web.demo-api.internal", 80)
DEMO_PAGE = b"Hello from 10.99.0.10, a web server inside the demo cluster.\n"


class _Page(Resource):
    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self._page


def demo_web_site(page: bytes = DEMO_PAGE) -> Site:
    """The demo cluster's internal web service: one plain-text page."""
    site = Site(_Page(page))
    site.noisy = False
    site.displayTracebacks = False
    return site


class DemoCluster:
    """
    The embedded demo: a fake proxy node on loopback and a web service on a
    unix socket in a private directory, reachable only through that node.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.client_key = generate_key()
        self._dir = tempfile.mkdtemp(prefix="gateway-demo-")
        os.chmod(self._dir, 0o700)
        self.web_socket = os.path.join(self._dir, "web.sock")
        self.node = FakeProxyNode(
            reactor,
            [self.client_key],
            routes={DEMO_WEB: f"unix:{self.web_socket}", DEMO_API_WEB: f"unix:{self.web_socket}"},
        )
        self._ports: list[IListeningPort] = []
        self._files: list[str] = []
        self.ssh_port: int | None = None

    async def start(self) -> None:
        web = serverFromString(self.reactor, f"unix:{self.web_socket}:mode=600")
        self._ports.append(await web.listen(demo_web_site()))
        ssh = await self.node.listen()
        self._ports.append(ssh)
        address = ssh.getHost()
        assert isinstance(address, IPv4Address)
        self.ssh_port = address.port

    async def stop(self) -> None:
        for port in self._ports:
            await defer.maybeDeferred(port.stopListening)
        self._ports.clear()
        for path in [self.web_socket, *self._files]:
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(self._dir)

    def write_cluster_file(self, name: str = "demo-api", token: str = "demo-token") -> str:
        """
        A cluster file for C{gateway-ctl add}: the same proxy node under
        another name, with a token (mode 0600: it holds the private key).
        It reaches the web server by name (L{DEMO_API_WEB}), not through the
        demo cluster's network: two clusters on one network would make the
        demo's own tokenless commands ambiguous.
        """
        settings = {**self.cluster_settings(), "aliases": [f"net-{name}"], "token": token}
        del settings["networks"]
        settings["hostnames"] = [DEMO_API_WEB[0]]
        lines = [f"[clusters.{name}]"]
        for key, value in settings.items():
            if key == "key":
                lines.append(f'key = """\n{value}"""')
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        path = os.path.join(self._dir, f"{name}.toml")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._files.append(path)
        return path

    def cluster_settings(self) -> dict[str, Any]:
        """The demo cluster as a C{[clusters.demo]} table would give it."""
        return {
            "proxies": [f"127.0.0.1:{self.ssh_port}"],
            "user": DEMO_USER,
            "key": private_pem(self.client_key),
            "host_keys": [public_line(self.node.host_key)],
            "networks": [DEMO_NETWORK],
        }
