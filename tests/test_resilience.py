"""
In-process resilience tests: keepalive and dead-peer detection, failover and
failback between proxy candidates, limits, rekeying and draining -- with Conch
proxy nodes on loopback and short timers, seen from a client of the
listeners.  (The cluster alone, in memory with a fake clock, is in
tests/test_cluster.py; against real OpenSSH in namespaces, in
tests/system/test_faults.py.)
"""

from __future__ import annotations

import socket
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from gateway.cluster import connection as cluster_module
from gateway.config import GatewaySettings, parse_cluster
from gateway.testing import DEMO_PAGE
from tests.support import ECHO, FLOOD, FLOOD_BYTES, WEB, GatewayHarness, inline, recv_all, socks5_open

INTERVAL = 0.2
COUNT = 3


def fetch(port: int) -> bytes:
    sock, code = socks5_open(port, *WEB)
    with sock:
        if code != 0:
            return b"<reply %d>" % code
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return recv_all(sock)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout: float, step: float = 0.05) -> float:
    """Wait until C{predicate()} is true; return how long it took (bounded)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(step)
    return time.monotonic() - started


class KeepaliveFailoverTests(TestCase):
    @inline
    async def setUp(self):
        self.harness = GatewayHarness(self, keepalive_interval=INTERVAL, keepalive_count_max=COUNT, connect_timeout=2.0)
        await self.harness.start(nodes=2)
        self.cluster = self.harness.service.clusters["demo"]
        self.first = f"127.0.0.1:{self.harness.ports[0].getHost().port}"
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @inline
    async def test_silent_peer_detected_streams_end_and_second_candidate_serves(self):
        sock, code = await deferToThread(socks5_open, self.harness.socks_port, *ECHO)
        self.addCleanup(sock.close)
        self.assertEqual(code, 0)
        port = self.harness.ports[0].getHost().port
        started = time.monotonic()
        await self.harness.take_down(0)

        # The in-flight stream ends -- reset, not a polite EOF, so the client
        # cannot take the cut for a complete answer -- instead of hanging.
        await deferToThread(self.assertRaises, ConnectionResetError, recv_all, sock)
        detected = time.monotonic() - started
        self.assertLessEqual(detected, INTERVAL * COUNT + INTERVAL + 0.5)

        # New streams succeed through the second candidate.
        await until(lambda: self.cluster.state == "up", 3.0)
        self.assertEqual(str(self.cluster.proxy), f"127.0.0.1:{self.harness.ports[1].getHost().port}")
        body = await deferToThread(fetch, self.harness.socks_port)
        self.assertTrue(body.endswith(DEMO_PAGE), body)
        self.assertLessEqual(time.monotonic() - started, INTERVAL * COUNT + 2.0)
        self.assertTrue(any("answered no keepalive" in str(e.get("error")) for e in self.events), self.events)

        # The first candidate comes back: the cluster returns to it, and the
        # fallback link is retired once idle.
        await self.harness.bring_back(0, port)
        await until(lambda: str(self.cluster.proxy) == self.first, 10.0)
        await until(lambda: len(self.cluster.links) == 1, 5.0)
        body = await deferToThread(fetch, self.harness.socks_port)
        self.assertTrue(body.endswith(DEMO_PAGE), body)

    @inline
    async def test_waiting_stream_fails_with_0x04_when_no_candidate_answers(self):
        await self.harness.take_down(0)
        await self.harness.take_down(1)
        for link in list(self.cluster.links):
            link.abort()
        sock, code = await deferToThread(socks5_open, self.harness.socks_port, *WEB)
        sock.close()
        self.assertEqual(code, 0x04)


class LimitTests(TestCase):
    @inline
    async def test_max_streams_per_cluster(self):
        harness = GatewayHarness(self, max_streams=1)
        await harness.start()
        first, code = await deferToThread(socks5_open, harness.socks_port, *ECHO)
        self.addCleanup(first.close)
        self.assertEqual(code, 0)
        second, code = await deferToThread(socks5_open, harness.socks_port, *ECHO)
        second.close()
        self.assertEqual(code, 0x01)
        # Once the first stream ends, there is room again.
        first.close()
        await until(lambda: harness.service.clusters["demo"].open_streams == 0, 5.0)
        third, code = await deferToThread(socks5_open, harness.socks_port, *ECHO)
        third.close()
        self.assertEqual(code, 0)

    @inline
    async def test_a_full_ssh_connection_refuses_instead_of_overrunning_sshd(self):
        # OpenSSH ends a connection past 16384 channels; here the cap is 1.
        self.patch(cluster_module, "MAX_CHANNELS_PER_CONNECTION", 1)
        harness = GatewayHarness(self)
        await harness.start()
        first, code = await deferToThread(socks5_open, harness.socks_port, *ECHO)
        self.addCleanup(first.close)
        self.assertEqual(code, 0)
        second, code = await deferToThread(socks5_open, harness.socks_port, *ECHO)
        second.close()
        self.assertEqual(code, 0x01)
        failed = harness.service.clusters["demo"].stats.streams_failed
        self.assertEqual(failed["overloaded"], 1)

    @inline
    async def test_client_cap_refuses_extra_connections(self):
        harness = GatewayHarness(self, settings=GatewaySettings(max_clients=2))
        await harness.start()

        def run():
            held = [socket.create_connection(("127.0.0.1", harness.socks_port), timeout=5) for _ in range(2)]
            extra = socket.create_connection(("127.0.0.1", harness.socks_port), timeout=5)
            refused = extra.recv(1) == b""
            for sock in [*held, extra]:
                sock.close()
            return refused

        self.assertTrue(await deferToThread(run))
        clients = harness.service.settings.max_clients
        self.assertEqual(clients, 2)


class RekeyTests(TestCase):
    @inline
    async def test_rekey_by_volume_during_a_transfer(self):
        harness = GatewayHarness(self, rekey_bytes="1M")
        await harness.start()

        def run():
            sock, code = socks5_open(harness.socks_port, *FLOOD)
            with sock:
                data = recv_all(sock)
            return code, data

        code, data = await deferToThread(run)
        self.assertEqual(code, 0)
        self.assertEqual(len(data), FLOOD_BYTES)
        self.assertEqual(data.count(b"x"), FLOOD_BYTES)
        (link,) = harness.service.clusters["demo"].links
        # About one key exchange per MiB (data keeps flowing while one runs).
        self.assertGreaterEqual(link.transport.rekeys, FLOOD_BYTES // (1 << 20) // 3)


class DrainTests(TestCase):
    @inline
    async def test_stop_refuses_new_clients_and_waits_for_open_streams(self):
        harness = GatewayHarness(self, settings=GatewaySettings(drain_timeout=5.0))
        await harness.start()
        port = harness.socks_port
        sock, code = await deferToThread(socks5_open, port, *ECHO)
        self.assertEqual(code, 0)
        stopping = harness.service.stopService()
        await sleep(0.2)
        self.assertNoResult(stopping)
        with self.assertRaises(OSError):
            await deferToThread(socket.create_connection, ("127.0.0.1", port), 2)

        def finish():
            with sock:
                sock.sendall(b"last words")
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock)

        self.assertEqual(await deferToThread(finish), b"last wordsbye")
        await stopping

    @inline
    async def test_drain_timeout_cuts_idle_streams(self):
        harness = GatewayHarness(self, settings=GatewaySettings(drain_timeout=0.5))
        await harness.start()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sock, code = await deferToThread(socks5_open, harness.socks_port, *ECHO)
        self.addCleanup(sock.close)
        started = time.monotonic()
        await harness.service.stopService()
        self.assertLess(time.monotonic() - started, 3.0)
        await deferToThread(self.assertRaises, ConnectionResetError, recv_all, sock)
        (stream,) = [e for e in events if e.get("log_namespace") == "gateway.proxy.opener"]
        self.assertEqual((stream["outcome"], stream["reason"]), ("failed", "cut at the drain time-out"))

    @inline
    async def test_idle_keep_alive_http_client_does_not_hold_the_drain(self):
        """
        A kept-alive HTTP client between requests (every browser, requests
        session and Node agent pool holds some) has nothing in flight: on
        stop it is closed at once, politely, instead of holding the shutdown
        for the whole drain_timeout and being logged as a cut stream.
        """
        harness = GatewayHarness(self, settings=GatewaySettings(drain_timeout=5.0))
        await harness.start()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sock = await deferToThread(socket.create_connection, ("127.0.0.1", harness.http_port), 5)
        self.addCleanup(sock.close)

        def one_response() -> bytes:
            sock.sendall(b"GET http://%s/ HTTP/1.1\r\nHost: x\r\n\r\n" % WEB[0].encode())
            data = b""
            while not data.endswith(DEMO_PAGE):
                data += sock.recv(65536)
            return data

        self.assertIn(b"\r\nConnection: keep-alive\r\n", await deferToThread(one_response))
        started = time.monotonic()
        await harness.service.stopService()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(await deferToThread(recv_all, sock), b"")  # a FIN, not a reset
        outcomes = [e["outcome"] for e in events if e.get("log_namespace") == "gateway.proxy.opener"]
        self.assertEqual(outcomes, ["closed"])


class JumpCarrierTests(TestCase):
    @inline
    async def test_a_carrier_channel_is_no_stream(self):
        """The channel a jumping cluster's connection runs in counts nowhere as a client stream."""
        harness = GatewayHarness(self, settings=GatewaySettings(drain_timeout=5.0))
        await harness.start()
        jump_target = ("10.99.0.20", 22)
        harness.node.routes[jump_target] = f"tcp:127.0.0.1:{harness.ssh_port}"
        inner = parse_cluster(
            "inner",
            harness.cluster_settings(proxies=["10.99.0.20:22"], jump="demo", networks=["10.98.0.0/24"]),
            "(test)",
            "clusters.inner",
            known_clusters={"demo": "demo", "inner": "inner"},
        )
        harness.service.add_cluster(inner)
        await harness.cluster_up("inner")
        demo = harness.service.clusters["demo"]
        self.assertEqual(sum(link.open_channels for link in demo.links), 1)
        self.assertEqual((demo.open_streams, harness.service.open_streams()), (0, 0))
        started = time.monotonic()
        await harness.service.stopService()  # nothing to drain: no waiting for drain_timeout
        self.assertLess(time.monotonic() - started, 2.0)
