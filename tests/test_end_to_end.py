"""
In-process tests: the whole gateway (listeners, routing, Conch client) against
a Conch SSH server playing the proxy node, on loopback.
"""

from __future__ import annotations

import base64
import os
import socket
import time

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from gateway.errors import StreamError
from gateway.testing import DEMO_PAGE, generate_key, public_line
from tests.support import (
    ECHO,
    FLOOD,
    FLOOD_BYTES,
    PROHIBITED,
    WEB,
    WEB2_PAGE,
    GatewayHarness,
    capture_events,
    http_exchange,
    inline,
    recv_all,
    sleep,
    socks5_open,
    socks_get,
)


class _NeverReads(Protocol):
    """A destination that accepts a connection and never reads from it."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.factory.connections.append(self)


class SocksEndToEndTests(TestCase):
    @inline
    async def setUp(self):
        self.harness = GatewayHarness(self)
        await self.harness.start()

    def _get(self, host, port, **kw) -> tuple[int, bytes]:
        return socks_get(self.harness.socks_port, host, port, **kw)

    @inline
    async def test_fetch_page(self):
        code, body = await deferToThread(self._get, *WEB)
        self.assertEqual(code, 0)
        self.assertTrue(body.endswith(DEMO_PAGE), body)

    @inline
    async def test_one_structured_event_per_stream(self):
        events = capture_events(self)
        await deferToThread(self._get, *WEB)
        # The client has its EOF before the channel's close handshake ends
        # (and the stream's event is written): wait for it, for a fixed order.
        await self.harness.until_no_streams()
        await deferToThread(self._get, "10.98.0.10", 80)
        streams = [e for e in events if e.get("log_namespace") == "gateway.proxy.opener"]
        self.assertEqual([e["outcome"] for e in streams], ["closed", "refused"])
        closed, refused = streams
        self.assertEqual(
            (closed["cluster"], closed["destination"], closed["frontend"]), ("demo", "10.99.0.10:80", "socks5")
        )
        self.assertGreater(closed["bytes_down"], len(DEMO_PAGE))
        self.assertEqual(closed["bytes_up"], len(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"))
        self.assertRegex(
            formatEvent(closed),
            rf"^stream to 10\.99\.0\.10:80 via demo closed: 27 bytes up, {closed['bytes_down']} down, \d+\.\d{{3}} s$",
        )
        self.assertEqual((refused["reason"], refused["cluster"]), ("no-route", None))
        self.assertEqual(formatEvent(refused), "stream to 10.98.0.10:80 refused: no-route")

    @inline
    async def test_half_close_both_ways(self):
        def run():
            sock, code = socks5_open(self.harness.socks_port, *ECHO)
            with sock:
                sock.sendall(b"hello")
                sock.shutdown(socket.SHUT_WR)
                return code, recv_all(sock)

        code, data = await deferToThread(run)
        self.assertEqual((code, data), (0, b"hellobye"))

    @inline
    async def test_prohibited_maps_to_0x02(self):
        """With mode = "direct-tcpip" a refusal is final (auto would try exec)."""
        harness = GatewayHarness(self, mode="direct-tcpip")
        await harness.start()
        sock, code = await deferToThread(socks5_open, harness.socks_port, *PROHIBITED)
        sock.close()
        self.assertEqual(code, 0x02)

    @inline
    async def test_refused_maps_to_0x05(self):
        code, _ = await deferToThread(self._get, "10.99.0.10", 81)
        self.assertEqual(code, 0x05)

    @inline
    async def test_outside_networks_is_not_allowed(self):
        code, _ = await deferToThread(self._get, "10.98.0.10", 80)
        self.assertEqual(code, 0x02)

    @inline
    async def test_unknown_cluster_fails_authentication(self):
        code, _ = await deferToThread(self._get, *WEB, username="nope", password="x")
        self.assertEqual(code, -2)

    @inline
    async def test_socks4a_with_user_id(self):
        def run():
            sock = socket.create_connection(("127.0.0.1", self.harness.socks_port), timeout=10)
            with sock:
                sock.sendall(b"\x04\x01\x00\x50\x00\x00\x00\x01demo\x0010.99.0.10\x00")
                reply = sock.recv(8)
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return reply, recv_all(sock)

        reply, body = await deferToThread(run)
        self.assertEqual(reply[:2], b"\x00\x5a")
        self.assertTrue(body.endswith(DEMO_PAGE))

    @inline
    async def test_slow_reader_bounds_gateway_buffering(self):
        """
        A client that stops reading pauses the channel: the gateway holds at
        most about one window, however much the destination could send.
        """
        sock, code = await deferToThread(socks5_open, self.harness.socks_port, *FLOOD)
        self.addCleanup(sock.close)
        self.assertEqual(code, 0)
        await sleep(1.0)
        cluster = self.harness.service.clusters["demo"]
        (channel,) = [c for link in cluster.links for c in link.connection.channels.values() if c.port == FLOOD[1]]
        received_before = channel.bytes_down
        await sleep(0.5)
        # Stalled: no more data is accepted once the window is used up ...
        self.assertEqual(channel.bytes_down, received_before)
        self.assertLess(channel.bytes_down, FLOOD_BYTES // 2)
        # ... and what the gateway itself buffers is bounded by one window
        # plus one transport buffer (the rest sits in kernel socket buffers).
        transport = channel._peer._transport
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        self.assertLessEqual(buffered, channel.localWindowSize + 256 * 1024)
        self.assertLessEqual(channel.localWindowLeft, channel.localWindowSize // 2)

        # Reading again drains everything.
        data = await deferToThread(recv_all, sock)
        self.assertEqual(len(data), FLOOD_BYTES)

    @inline
    async def test_slow_destination_bounds_proxy_node_buffering(self):
        """
        The upload direction: a destination that stops reading must stop the
        client, through the proxy node's window, as real sshd does.  The fake
        node (the --demo cluster too, inside the gateway process) grants window
        for whatever arrives, so an upload piles up in its memory instead.
        """
        sink = ("10.99.0.10", 9)
        path = os.path.join(self.harness.dir, "sink.sock")
        factory = Factory.forProtocol(_NeverReads)
        factory.connections = []
        port = await serverFromString(reactor, f"unix:{path}").listen(factory)
        self.addCleanup(port.stopListening)
        # The sink will not read what the node holds for it: reset it, then let the stream end.
        self.addCleanup(self.harness.until_no_streams)
        self.addCleanup(lambda: [sink.transport.abortConnection() for sink in factory.connections])
        self.harness.node.routes[sink] = f"unix:{path}"
        sock, code = await deferToThread(socks5_open, self.harness.socks_port, *sink)
        self.addCleanup(sock.close)
        self.assertEqual(code, 0)

        def send_until_stalled(limit: int = 32 << 20) -> int:
            sock.settimeout(1.0)
            sent, block = 0, b"u" * 65536
            try:
                while sent < limit:
                    sent += sock.send(block)
            except TimeoutError:
                pass
            return sent

        sent = await deferToThread(send_until_stalled)
        cluster = self.harness.service.clusters["demo"]
        (channel,) = [c for link in cluster.links for c in link.connection.channels.values() if c.port == sink[1]]
        # Stalled well before the limit (kernel socket buffers hold a few MiB) ...
        self.assertLess(sent, 32 << 20)
        # ... with about one proxy-node window taken off the gateway, not all of it.
        self.assertLessEqual(channel.bytes_up, 4 << 20)


class HttpEndToEndTests(TestCase):
    @inline
    async def setUp(self):
        self.harness = GatewayHarness(self, token="s3cret")
        await self.harness.start()

    def _auth(self, user="demo", password="s3cret") -> bytes:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return f"Proxy-Authorization: Basic {token}\r\n".encode()

    @inline
    async def test_absolute_form_keep_alive_over_one_connection(self):
        request = b"GET http://10.99.0.10/ HTTP/1.1\r\nHost: 10.99.0.10\r\n" + self._auth() + b"\r\n"
        last = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        data = await deferToThread(http_exchange, self.harness.http_port, request * 2 + last)
        self.assertEqual(data.count(b"HTTP/1.1 200"), 3, data)
        self.assertEqual(data.count(DEMO_PAGE), 3)

    @inline
    async def test_several_upstream_hosts_on_one_client_connection(self):
        auth = self._auth()
        requests = b"".join(
            b"GET http://%s/ HTTP/1.1\r\nHost: x\r\n%s\r\n" % (host, auth)
            for host in (b"10.99.0.10", b"10.99.0.11", b"10.99.0.10:80")
        )
        requests += b"GET http://10.99.0.11/ HTTP/1.1\r\nConnection: close\r\n" + auth + b"\r\n"
        data = await deferToThread(http_exchange, self.harness.http_port, requests)
        self.assertEqual(data.count(DEMO_PAGE), 2, data)
        self.assertEqual(data.count(WEB2_PAGE), 2, data)
        self.assertLess(data.index(DEMO_PAGE), data.index(WEB2_PAGE))

    @inline
    async def test_post_bodies_content_length_and_chunked(self):
        auth = self._auth()
        body = b"POST http://10.99.0.10/ HTTP/1.1\r\nContent-Length: 5\r\n" + auth + b"\r\nhello"
        chunked = (
            b"POST http://10.99.0.10/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            + auth
            + b"\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        data = await deferToThread(http_exchange, self.harness.http_port, body + chunked)
        # twisted.web answers POST to a GET-only resource with 405 -- after reading
        # each body, so two framed responses prove both bodies were forwarded whole.
        self.assertEqual(data.count(b"HTTP/1.1 405"), 2, data)

    @inline
    async def test_connect_after_keep_alive_requests(self):
        auth = self._auth()

        def run():
            sock = socket.create_connection(("127.0.0.1", self.harness.http_port), timeout=10)
            with sock:
                sock.sendall(b"GET http://10.99.0.10/ HTTP/1.1\r\n" + auth + b"\r\n")
                first = b""
                while not first.endswith(DEMO_PAGE):
                    first += sock.recv(65536)
                sock.sendall(b"CONNECT 10.99.0.10:7 HTTP/1.1\r\n" + auth + b"\r\nping")
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock)

        data = await deferToThread(run)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 Connection established"), data)
        self.assertTrue(data.endswith(b"pingbye"), data)
        await self.harness.until_no_streams()

    @inline
    async def test_idle_upstream_closed_by_origin_is_not_reused(self):
        auth = self._auth()
        request = b"GET http://10.99.0.12/ HTTP/1.1\r\n" + auth + b"\r\n"

        def run():
            sock = socket.create_connection(("127.0.0.1", self.harness.http_port), timeout=10)
            with sock:
                answers = []
                for _ in range(2):
                    sock.sendall(request)
                    data = b""
                    while not data.endswith(DEMO_PAGE):
                        data += sock.recv(65536)
                    answers.append(data.split(b" ", 2)[1])
                    time.sleep(0.6)  # longer than the origin's keep-alive time-out
                return answers

        self.assertEqual(await deferToThread(run), [b"200", b"200"])

    @inline
    async def test_connect(self):
        request = b"CONNECT 10.99.0.10:7 HTTP/1.1\r\n" + self._auth() + b"\r\n"

        def run():
            sock = socket.create_connection(("127.0.0.1", self.harness.http_port), timeout=10)
            with sock:
                sock.sendall(request + b"ping")
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock)

        data = await deferToThread(run)
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
        self.assertTrue(data.endswith(b"\r\n\r\npingbye"), data)

    async def _status(self, request: bytes) -> tuple[int, bytes]:
        data = await deferToThread(http_exchange, self.harness.http_port, request)
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), head + b"\r\n\r\n" + body

    @inline
    async def test_missing_credentials_is_407(self):
        status, data = await self._status(b"GET http://10.99.0.10/ HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(status, 407)
        self.assertIn(b"Proxy-Authenticate: Basic", data)

    @inline
    async def test_wrong_token_is_407_and_never_echoed(self):
        request = b"GET http://10.99.0.10/ HTTP/1.1\r\n" + self._auth(password="guess") + b"\r\n"
        status, data = await self._status(request)
        self.assertEqual(status, 407)
        self.assertNotIn(b"guess", data)
        self.assertNotIn(b"s3cret", data)

    @inline
    async def test_refused_is_502_with_reason(self):
        request = b"GET http://10.99.0.10:81/ HTTP/1.1\r\n" + self._auth() + b"\r\n"
        status, data = await self._status(request)
        self.assertEqual(status, 502)
        self.assertIn(b"Connection refused", data)

    @inline
    async def test_outside_networks_is_403(self):
        request = b"GET http://192.0.2.1/ HTTP/1.1\r\n" + self._auth() + b"\r\n"
        status, data = await self._status(request)
        self.assertEqual(status, 403)

    @inline
    async def test_malformed_request_is_400(self):
        status, _ = await self._status(b"HELLO\r\n\r\n")
        self.assertEqual(status, 400)


class HostKeyTests(TestCase):
    @inline
    async def test_wrong_host_key_refuses_and_clients_get_unavailable(self):
        harness = GatewayHarness(self, connect_timeout=1.0)
        wrong = public_line(generate_key())
        harness.cluster_overrides["host_keys"] = [wrong]
        with self.assertRaises(StreamError):
            await harness.start()
        cluster = harness.service.clusters["demo"]
        self.assertIn("SHA256:", cluster.last_error)
        self.assertIn("not one of the pinned host_keys", cluster.last_error)
        sock, code = await deferToThread(socks5_open, harness.socks_port, *WEB)
        sock.close()
        self.assertEqual(code, 0x04)
