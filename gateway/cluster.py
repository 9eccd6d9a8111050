"""
One cluster's SSH connection, kept up for as long as the cluster is configured.

L{ClusterConnection} is a service: started, it connects to the first proxy
candidate; when that fails or the connection is lost it backs off (0.5 s
doubling to 30 s, with jitter) and tries the next candidate.  Its state is a
small, logged vocabulary (C{connecting}, C{up}, C{backoff}, C{stopped}) that
status and metrics read.

Clients never wait forever: L{ClusterConnection.open_stream} waits at most
C{connect_timeout} for a connection, and as long again for the proxy node to
open the channel, then fails with a L{StreamError} that says why.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import ClusterConfig, ProxyAddress
from gateway.errors import Reason, StreamError
from gateway.ssh.channel import TunnelChannel
from gateway.ssh.client import (
        GatewayClientTransport,
    SSHConnectError,
    TunnelConnection,
    client_factory,
)
from gateway.ssh.hostkeys import HostKeyPolicy

log = Logger()

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0


def backoff_delay(failures: int, jitter: Callable[[], float] = random.random) -> float:
    """
    Seconds to wait after C{failures} consecutive failed attempts.

    Doubling from L{INITIAL_BACKOFF} up to L{MAX_BACKOFF}, then scaled by a
    random factor in [0.5, 1.0) so that many clusters behind one broken
    network do not reconnect in lock-step.
    """
    delay = min(MAX_BACKOFF, INITIAL_BACKOFF * 2 ** max(0, failures - 1))
    return delay * (0.5 + jitter() / 2)


def host_key_policy(config: ClusterConfig) -> HostKeyPolicy:
    return HostKeyPolicy(
        known_hosts=config.known_hosts,
        pinned=config.host_keys,
        accept_any=config.insecure_accept_any_host_key,
    )


Connector = Callable[[ProxyAddress, Factory], Deferred]


class ClusterConnection(Service):
    """Keeps one SSH connection to one of a cluster's proxy nodes."""

    def __init__(
        self,
        config: ClusterConfig,
        reactor: IReactorTime,
        connector: Connector | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.name = config.name
        self._reactor = reactor
        self._connector = connector or self._tcp_connector
        self._jitter = jitter
        self._host_keys = host_key_policy(config)
        self.state = "stopped"
        self.last_error: str | None = None
        self.proxy: ProxyAddress | None = None
        self._candidate = 0
        self._failures = 0
        self._connection: TunnelConnection | None = None
        self._transport: GatewayClientTransport | None = None
        self._attempt: Deferred | None = None
        self._retry: IDelayedCall | None = None
        self._waiters: list[Deferred[TunnelConnection]] = []
        self.open_streams = 0

    def _tcp_connector(
        self, proxy: ProxyAddress, factory: Factory
    ) -> Deferred[GatewayClientTransport]:
        timeout = self.config.connect_timeout
        endpoint: IStreamClientEndpoint
        if isIPAddress(proxy.host):
            endpoint = TCP4ClientEndpoint(self._reactor, proxy.host, proxy.port, timeout)
        elif isIPv6Address(proxy.host):
            endpoint = TCP6ClientEndpoint(self._reactor, proxy.host, proxy.port, timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, proxy.host, proxy.port, timeout)
        return endpoint.connect(factory)

    # -- lifecycle -------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._set_state("stopped")
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self._fail_waiters(StreamError(Reason.UNAVAILABLE, "gateway is shutting down"))
        transport = self._transport
        if transport is None:
            return succeed(None)
        lost = Deferred()
        transport.lost.addBoth(lambda _: lost.callback(None))
        transport.loseConnection()
        return lost

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            log.info(
                "cluster {cluster} {state}",
                cluster=self.name,
                state=state,
                proxy=str(self.proxy) if self.proxy else None,
                last_error=self.last_error,
            )

    def _connect(self) -> None:
        self._retry = None
        proxy = self.config.proxies[self._candidate % len(self.config.proxies)]
        self.proxy = proxy
        self._set_state("connecting")
        factory = client_factory(
            proxy.host,
            proxy.port,
            self.config.user,
            self.config.private_key,
            self._host_keys,
            self._reactor,
        )
        attempt = self._connector(proxy, factory)
        self._attempt = attempt

        def connected(transport: GatewayClientTransport) -> Deferred:
            self._transport = transport
            timer = self._reactor.callLater(
                self.config.connect_timeout, transport.transport.abortConnection
            )

            def settled(result):
                if timer.active():
                    timer.cancel()
                return result

            transport.lost.addCallback(lambda _: self._lost(transport))
            return transport.ready.addBoth(settled)

        attempt.addCallback(connected)
        attempt.addCallbacks(self._up, self._failed)

    def _up(self, connection: TunnelConnection) -> None:
        self._attempt = None
        self._connection = connection
        self._failures = 0
        self.last_error = None
        self._set_state("up")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(connection)

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self.running:
            return
        error = failure.value
        if isinstance(error, SSHConnectError):
            self.last_error = str(error)
        else:
            self.last_error = f"cannot connect to {self.proxy}: {failure.getErrorMessage()}"
        log.warn(
            "cluster {cluster}: {error}", cluster=self.name, error=self.last_error
        )
        self._schedule_retry()

    def _lost(self, transport: GatewayClientTransport) -> None:
        if transport is not self._transport:
            return
        self._transport = None
        if self._connection is None:
            return  # never came up: _failed handles it
        self._connection = None
        if not self.running:
            return
        self.last_error = f"connection to {self.proxy} lost"
        log.warn("cluster {cluster}: {error}", cluster=self.name, error=self.last_error)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._failures += 1
        self._candidate += 1
        delay = backoff_delay(self._failures, self._jitter)
        self._set_state("backoff")
        self._retry = self._reactor.callLater(delay, self._connect)

    # -- streams ---------------------------------------------------------

    def _fail_waiters(self, error: StreamError) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def connection(self) -> Deferred[TunnelConnection]:
        """The SSH connection, waiting up to C{connect_timeout} for one."""
        if self._connection is not None:
            return succeed(self._connection)
        if not self.running:
            return fail(
                StreamError(Reason.UNAVAILABLE, f"cluster {self.name!r} is not running")
            )
        waiter: Deferred[TunnelConnection] = Deferred(
            lambda d: self._waiters.remove(d)
        )
        self._waiters.append(waiter)
        timeout = self.config.connect_timeout

        def timed_out(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                raise StreamError(
                    Reason.UNAVAILABLE,
                    f"no SSH connection to cluster {self.name!r} within {timeout:g} s"
                    + (f" ({self.last_error})" if self.last_error else ""),
                )
            return failure

        waiter.addTimeout(timeout, self._reactor)
        return waiter.addErrback(timed_out)

    def open_stream(
        self, host: str, port: int, origin: tuple[str, int]
    ) -> Deferred[TunnelChannel]:
        """
        Open a tunnel to C{host:port} through this cluster's proxy node.

        Fails with L{StreamError}: C{UNAVAILABLE} when no connection comes up
        in time, C{TIMEOUT} when the proxy node does not answer the open in
        time, or the proxy node's own reason.
        """
        timeout = self.config.connect_timeout

        def opened(channel: TunnelChannel) -> TunnelChannel:
            self.open_streams += 1
            channel.closed_hooks.append(self._stream_closed)
            return channel

        def open_on(connection: TunnelConnection) -> Deferred[TunnelChannel]:
            opening = connection.open_tunnel(host, port, origin, self.config.window_size)
            result: Deferred[TunnelChannel] = Deferred()
            timer = self._reactor.callLater(
                timeout,
                lambda: result.errback(
                    StreamError(
                        Reason.TIMEOUT,
                        f"proxy node did not open {host}:{port} within {timeout:g} s",
                    )
                ),
            )

            def settle(outcome: TunnelChannel | Failure) -> None:
                if timer.active():
                    timer.cancel()
                    if isinstance(outcome, Failure):
                        result.errback(outcome)
                    else:
                        result.callback(outcome)
                elif not isinstance(outcome, Failure):
                    outcome.close()  # opened after the client gave up

            opening.addBoth(settle)
            return result

        return self.connection().addCallback(open_on).addCallback(opened)

    def _stream_closed(self) -> None:
        self.open_streams -= 1
