"""
C{twistd gateway --demo}: an in-process demo cluster named C{demo}.

Imported only for C{--demo}: it brings a Conch SSH server and a web server
(L{gateway.testing}) that a production gateway never needs.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.app.clusters import IGatewayReactor
from gateway.app.service import GatewayService
from gateway.config import parse_cluster
from gateway.testing import DEMO_API_WEB, DemoCluster

log = Logger()


class DemoService(Service):
    """Runs the in-process demo cluster and registers it as cluster C{demo}."""

    def __init__(self, gateway: GatewayService, reactor: IGatewayReactor) -> None:
        self._gateway = gateway
        self._demo = DemoCluster(reactor)

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._start()).addErrback(lambda f: log.failure("demo cluster failed to start", f))

    async def _start(self) -> None:
        await self._demo.start()
        cluster = parse_cluster("demo", self._demo.cluster_settings(), "(demo)", "clusters.demo")
        self._gateway.add_cluster(cluster)
        log.info("\n".join(self._instructions()))

    def _instructions(self) -> list[str]:
        socks = self._gateway.listening_address("socks")
        http = self._gateway.listening_address("http")
        lines = ["demo cluster ready; fetch its internal web page with:"]
        if socks:
            lines.append(f"  curl --socks5-hostname {socks} http://10.99.0.10/")
        if http:
            lines.append(f"  curl --proxy http://{http} http://10.99.0.10/")
        if socks:
            qualified = f"10-99-0-10.demo.{self._gateway.settings.cluster_domain}"
            lines.append(f"  curl --socks5-hostname {socks} http://{qualified}/   (a cluster-qualified name)")
        if http:
            lines += [
                "a browser, which sends no proxy credentials, with the gateway's PAC file (docs/browsers.md):",
                f"  chromium --proxy-pac-url=http://{http}/proxy.pac http://10.99.0.10/",
            ]
        control = self._gateway.listening_address("control")
        if control:
            cluster_file = self._demo.write_cluster_file()
            lines += [
                "register another cluster at runtime (same proxy node, with a token) and use it:",
                f"  .venv/bin/gateway-ctl --url http://{control} add demo-api --file {cluster_file}",
                f"  .venv/bin/gateway-ctl --url http://{control} list",
                f"  curl --socks5-hostname {socks} -U demo-api:demo-token http://{DEMO_API_WEB[0]}/",
            ]
        return lines

    def stopService(self) -> Deferred[None]:
        """Stop the demo's proxy node once the gateway has drained its streams (demo ones too)."""
        super().stopService()
        stopped = self._gateway.registry.when_stopped()
        return stopped.addCallback(lambda _: Deferred.fromCoroutine(self._demo.stop()))
