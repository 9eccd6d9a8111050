"""
C{twistd gateway}: command-line options and C{makeService}.

Everything that can be wrong with the configuration is found in
L{Options.postOptions}, before any service exists, and reported as one line
naming the file, the key and the reason, with exit status 1: nothing starts
half-way.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from twisted.application.service import IService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gateway.config import ConfigError, GatewayConfig, ListenConfig, load_config, parse_cluster
from gateway.service import GatewayService
from gateway.testing import DemoCluster

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE] [--socks ENDPOINT] [--http ENDPOINT] [--demo]"
    longdesc = (
        "Keep one SSH connection per cluster to its proxy node and expose "
        "SOCKS5 and HTTP proxy listeners that reach the clusters' internal "
        "addresses.  See docs/configuration.md."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["socks", None, None, "SOCKS listener endpoint, overriding [listen] socks (\"\" disables)."],
        ["http", None, None, "HTTP proxy listener endpoint, overriding [listen] http (\"\" disables)."],
    ]
    optFlags = [
        ["demo", None, "Also run an in-process demo cluster named 'demo' (no root, no network)."],
    ]

    def postOptions(self) -> None:
        if not self["config"] and not self["demo"]:
            raise usage.UsageError("give --config FILE, or --demo to try the gateway")
        try:
            self.gateway_config = self._load()
        except ConfigError as e:
            sys.exit(f"gateway: {e}")

    def _load(self) -> GatewayConfig:
        if self["config"]:
            config = load_config(self["config"])
        else:
            config = GatewayConfig(listen=ListenConfig(), clusters={}, source="(demo)")
        listen = config.listen
        for kind in ("socks", "http"):
            if self[kind] is not None:
                listen = replace(listen, **{kind: (self[kind],) if self[kind] else ()})
        from twisted.internet import reactor

        for kind in ("socks", "http"):
            for description in getattr(listen, kind):
                try:
                    serverFromString(reactor, description)
                except Exception as e:  # the parser raises many kinds
                    raise ConfigError(
                        config.source, f"listen.{kind}", f"bad endpoint {description!r}: {e}"
                    ) from None
        if self["demo"] and "demo" in config.clusters:
            raise ConfigError(config.source, "clusters.demo", "--demo adds a cluster of that name")
        return replace(config, listen=listen)


class DemoService(Service):
    """Runs the in-process demo cluster and registers it as cluster C{demo}."""

    def __init__(self, gateway: GatewayService, reactor) -> None:
        self._gateway = gateway
        self._reactor = reactor
        self._demo = DemoCluster(reactor)

    def startService(self) -> None:
        super().startService()
        from twisted.internet.defer import Deferred

        Deferred.fromCoroutine(self._start()).addErrback(
            lambda f: log.failure("demo cluster failed to start", f)
        )

    async def _start(self) -> None:
        await self._demo.start()
        cluster = parse_cluster("demo", self._demo.cluster_settings(), "(demo)", "clusters.demo")
        self._gateway.add_cluster(cluster)
        socks = self._gateway.listening_address("socks")
        http = self._gateway.listening_address("http")
        lines = ["demo cluster ready; fetch its internal web page with:"]
        if socks:
            lines.append(f"  curl --socks5-hostname {socks} http://10.99.0.10/")
        if http:
            lines.append(f"  curl --proxy http://{http} http://10.99.0.10/")
        log.info("\n".join(lines))

    def stopService(self):
        super().stopService()
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._demo.stop())


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    service = GatewayService(options.gateway_config, reactor)
    if options["demo"]:
        DemoService(service, reactor).setServiceParent(service)
    return service
