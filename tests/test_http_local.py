"""
The HTTP proxy listener answering requests addressed to itself (origin-form
C{GET /proxy.pac}, L{gateway.proxy.http.local}), in memory: the PAC file from a
stub L{PacSource}, its headers and keep-alive, and every refusal.
"""

from __future__ import annotations

import functools

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gateway.config import GatewaySettings
from gateway.proxy.http.machine import RequestEnd, RequestError, RequestHead, RequestParser
from gateway.proxy.http.protocol import HttpProxyFactory
from tests.support import MemoryClient, MemoryProxyNode, capture_events

PAC = b'function FindProxyForURL(url, host) { return "DIRECT"; }\n'
GET_PAC = b"GET /proxy.pac HTTP/1.1\r\nHost: gw.example:3128\r\n\r\n"
FORWARD = b"GET http://10.0.0.5/x HTTP/1.1\r\nHost: 10.0.0.5\r\n\r\n"


class StubPac:
    """A L{gateway.proxy.pac.PacSource} that knows the clusters C{alpha} and C{beta}."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str | None]] = []
        self.broken = False

    def pac_file(self, host: str | None, cluster: str | None) -> bytes | None:
        self.calls.append((host, cluster))
        if self.broken:
            raise RuntimeError("provider bug")
        return PAC if cluster in (None, "alpha", "beta") else None


def head_and_body(data: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


class LocalTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.node = MemoryProxyNode(self.clock, GatewaySettings(keepalive_timeout=20))
        self.pac = StubPac()
        self.node.pac = self.pac
        self.client = MemoryClient(HttpProxyFactory, self.node, self.clock)
        self.events = capture_events(self)

    def closed(self) -> bool:
        return bool(self.client.transport.disconnecting)

    def local_outcomes(self) -> list[str]:
        return [e["outcome"] for e in self.events if e.get("log_namespace") == "gateway.proxy.http.local"]


class PacFileTests(LocalTestCase):
    def test_get_answers_the_pac_file_and_keeps_the_connection(self) -> None:
        self.client.send(GET_PAC)
        lines, body = head_and_body(self.client.output())
        self.assertEqual(
            lines,
            [
                b"HTTP/1.1 200 OK",
                b"Content-Type: application/x-ns-proxy-autoconfig",
                b"Content-Length: %d" % len(PAC),
                b"Cache-Control: no-cache",
                b"Connection: keep-alive",
            ],
        )
        self.assertEqual(body, PAC)
        self.assertFalse(self.closed())
        self.assertEqual(self.pac.calls, [("gw.example", None)])  # the Host header without port
        self.assertEqual(self.node.requests, [])  # no tunnel, no route
        self.assertEqual(self.local_outcomes(), ["pac"])

    def test_the_connection_goes_on_with_proxy_requests(self) -> None:
        self.client.send(GET_PAC + FORWARD)  # pipelined
        self.assertTrue(self.client.output().endswith(PAC))
        (channel,) = self.node.channels
        self.assertTrue(self.node.received(channel).startswith(b"GET /x HTTP/1.1\r\n"))
        self.node.reply(channel, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.client.output().endswith(b"ok"))
        self.client.send(GET_PAC)  # and back: the kept-alive tunnel stays for the next proxy request
        self.assertTrue(self.client.output().endswith(PAC))
        self.client.send(FORWARD)
        self.assertEqual(len(self.node.channels), 1)

    def test_idle_after_the_pac_file_is_closed_at_the_keep_alive_deadline(self) -> None:
        self.client.send(GET_PAC)
        self.clock.advance(19.9)
        self.assertFalse(self.closed())
        self.clock.advance(0.1)
        self.assertTrue(self.closed())
        self.assertEqual(self.node.handshake_errors["http"], 0)

    def test_cluster_view(self) -> None:
        self.client.send(b"GET /proxy.pac?cluster=beta HTTP/1.1\r\nHost: [::1]:3128\r\n\r\n")
        self.assertTrue(self.client.output().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(self.pac.calls, [("::1", "beta")])

    def test_a_cluster_listener_logs_its_cluster(self) -> None:
        factory = functools.partial(HttpProxyFactory, cluster="beta")
        MemoryClient(factory, self.node, self.clock).send(GET_PAC)
        self.assertEqual(self.pac.calls, [("gw.example", "beta")])
        self.assertEqual([e["cluster"] for e in self.events if e.get("outcome") == "pac"], ["beta"])

    def test_head(self) -> None:
        self.client.send(b"HEAD /proxy.pac HTTP/1.1\r\nHost: h\r\n\r\n")
        lines, body = head_and_body(self.client.output())
        self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
        self.assertIn(b"Content-Length: %d" % len(PAC), lines)
        self.assertEqual(body, b"")
        self.assertFalse(self.closed())

    def test_http_10_and_connection_close_end_the_connection(self) -> None:
        for request in (b"GET /proxy.pac HTTP/1.0\r\n\r\n", b"GET /proxy.pac HTTP/1.1\r\nConnection: close\r\n\r\n"):
            client = MemoryClient(HttpProxyFactory, self.node, self.clock)
            client.send(request)
            lines, body = head_and_body(client.output())
            self.assertIn(b"Connection: close", lines)
            self.assertEqual(body, PAC)
            self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.pac.calls, [(None, None), (None, None)])


class RefusalTests(LocalTestCase):
    def assertRefused(self, request: bytes, status: bytes) -> list[bytes]:
        self.client.send(request)
        lines, body = head_and_body(self.client.output())
        self.assertEqual(lines[0].split(b" ", 2)[1], status, lines)
        self.assertIn(b"Connection: close", lines)
        self.assertTrue(self.closed())
        self.assertEqual(self.node.requests, [])
        return lines

    def test_unknown_cluster_is_404(self) -> None:
        self.assertRefused(b"GET /proxy.pac?cluster=gamma HTTP/1.1\r\n\r\n", b"404")
        self.assertEqual(self.local_outcomes(), ["pac-refused"])

    def test_invalid_cluster_name_is_404_without_asking(self) -> None:
        self.assertRefused(b"GET /proxy.pac?cluster=a%2Fb HTTP/1.1\r\n\r\n", b"404")
        self.assertEqual(self.pac.calls, [])

    def test_no_provider_is_404(self) -> None:
        self.node.pac = None
        self.assertRefused(GET_PAC, b"404")

    def test_other_queries_are_400(self) -> None:
        self.assertRefused(b"GET /proxy.pac?x=1 HTTP/1.1\r\n\r\n", b"400")
        self.assertIn("(other query)", [e for e in self.events if e.get("outcome") == "pac-refused"][0]["view"])

    def test_other_methods_are_405(self) -> None:
        lines = self.assertRefused(b"POST /proxy.pac HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405")
        self.assertIn(b"Allow: GET, HEAD", lines)

    def test_a_body_is_400_and_not_read(self) -> None:
        self.assertRefused(b"GET /proxy.pac HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"400")
        self.client.protocol.dataReceived(FORWARD)
        self.assertEqual(self.node.requests, [])

    def test_a_chunked_body_is_400(self) -> None:
        self.assertRefused(b"GET /proxy.pac HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400")

    def test_a_provider_error_is_500_and_logged(self) -> None:
        self.pac.broken = True
        self.assertRefused(GET_PAC, b"500")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_origin_form_paths_are_still_400(self) -> None:
        for path in (b"/", b"/index.html", b"/proxy.pac/x", b"/PROXY.PAC", b"/proxy.pac#x"):
            client = MemoryClient(HttpProxyFactory, self.node, self.clock)
            client.send(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
            answer = client.output()
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (path, answer))
            self.assertTrue(answer.endswith(b"this is a proxy: use an absolute URL or CONNECT\n"))
        self.assertEqual(self.node.handshake_errors["http"], 5)
        self.assertEqual(self.pac.calls, [])


class LocalHeadTests(TestCase):
    """What the request parser makes of a request for the listener itself."""

    def head(self, data: bytes) -> RequestHead:
        events = RequestParser().receive_data(data)
        self.assertIsInstance(events[-1], RequestEnd)
        head = events[0]
        assert isinstance(head, RequestHead)
        return head

    def test_a_local_head(self) -> None:
        head = self.head(b"GET /proxy.pac?cluster=a HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
        self.assertEqual((head.local, head.host, head.port, head.upgrade), (True, "", 0, None))
        self.assertRaises(ValueError, head.upstream_head)

    def test_only_the_pac_path_is_local(self) -> None:
        self.assertFalse(self.head(FORWARD).local)
        self.assertIsInstance(RequestParser().receive_data(b"GET /x HTTP/1.1\r\n\r\n")[0], RequestError)
        self.assertIsInstance(RequestParser().receive_data(b"CONNECT /proxy.pac HTTP/1.1\r\n\r\n")[0], RequestError)
