"""
Tests for L{gateway.proxy.http.machine}: the sans-IO HTTP proxy request and response
parsers, the heads they rewrite, and the gateway's own error replies.

Every parse goes through L{requests}/L{response}, which check that feeding
the input whole, byte by byte and in random splits gives the same events
(adjacent body events joined, since how a body is cut depends on the split).
"""

from __future__ import annotations

import base64
import random
import re
import time
from http import HTTPStatus

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from gateway.errors import Reason, StreamError
from gateway.proxy.http.framing import MAX_EMPTY_LINES, MAX_HEADER_SECTION, _Malformed, _parse_field
from gateway.proxy.http.machine import (
    HTTP_STATUS,
    RequestBody,
    RequestEnd,
    RequestError,
    RequestHead,
    RequestParser,
    ResponseBody,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    ResponseParser,
    error_response,
    status_for,
)

_BODY_EVENTS = (RequestBody, ResponseBody)


def coalesce(events: list) -> list:
    """Join adjacent body events: their boundaries follow the input's splits."""
    joined: list = []
    for event in events:
        if joined and isinstance(event, _BODY_EVENTS) and type(joined[-1]) is type(event):
            joined[-1] = type(event)(joined[-1].data + event.data)
        else:
            joined.append(event)
    return joined


def run_requests(chunks: list[bytes]) -> tuple[list, bytes]:
    """
    Feed C{chunks} like the adapter would if every exchange finished at once:
    call next_request() after each RequestEnd, take the leftover after CONNECT.
    """
    parser = RequestParser()
    events: list = []

    def absorb(new: list) -> None:
        while new:
            events.extend(new)
            new = parser.next_request() if isinstance(new[-1], RequestEnd) else []

    for chunk in chunks:
        absorb(parser.receive_data(chunk))
    tunnel = events and isinstance(events[-1], RequestHead) and events[-1].is_connect
    return coalesce(events), parser.take_leftover() if tunnel else b""


def run_response(chunks: list[bytes], method: str = "GET", eof: bool = True, upgrade: bool = False) -> list:
    return run_switching_response(chunks, method, eof, upgrade)[0]


def run_switching_response(
    chunks: list[bytes], method: str = "GET", eof: bool = True, upgrade: bool = True
) -> tuple[list, bytes]:
    """Like L{run_response}; after a 101, also the new protocol's bytes (L{ResponseParser.take_leftover})."""
    parser = ResponseParser(method, upgrade)
    events: list = []
    for chunk in chunks:
        events += parser.receive_data(chunk)
    if eof:
        events += parser.eof_received()
    switched = events and isinstance(events[-1], ResponseHead) and events[-1].status == 101
    return coalesce(events), parser.take_leftover() if switched else b""


def splits(data: bytes, seed: int = 0) -> list[list[bytes]]:
    """The whole input, byte by byte, and a few random cuts."""
    rng = random.Random(seed)
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    for _ in range(5):
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 8))))
        ways.append(cut(data, cuts))
    return ways


def cut(data: bytes, positions: list[int]) -> list[bytes]:
    edges = [0, *sorted(positions), len(data)]
    return [data[start:end] for start, end in zip(edges, edges[1:], strict=False)]


def check_no_trailing_events(testcase: TestCase, events: list) -> None:
    """An error is the last event: nothing is produced after it."""
    for index, event in enumerate(events):
        if isinstance(event, RequestError | ResponseError):
            testcase.assertEqual(index, len(events) - 1, events)


class _SplitMixin:
    def requests(self, data: bytes) -> tuple[list, bytes]:
        whole = run_requests([data])
        for chunks in splits(data):
            self.assertEqual(run_requests(chunks), whole, chunks)
        return whole

    def request_events(self, data: bytes) -> list:
        return self.requests(data)[0]

    def head(self, data: bytes) -> RequestHead:
        event = self.request_events(data)[0]
        self.assertIsInstance(event, RequestHead)
        return event

    def error(self, data: bytes) -> RequestError:
        events = self.request_events(data)
        self.assertIsInstance(events[-1], RequestError, str(events))
        return events[-1]

    def assertStatus(self, data: bytes, status: int) -> RequestError:
        error = self.error(data)
        self.assertEqual(error.status, status, error)
        return error

    def response(self, data: bytes, method: str = "GET", eof: bool = True, upgrade: bool = False) -> list:
        whole = run_response([data], method, eof, upgrade)
        for chunks in splits(data):
            self.assertEqual(run_response(chunks, method, eof, upgrade), whole, chunks)
        return whole

    def switching_response(self, data: bytes, eof: bool = False) -> tuple[list, bytes]:
        whole = run_switching_response([data], eof=eof)
        for chunks in splits(data):
            self.assertEqual(run_switching_response(chunks, eof=eof), whole, chunks)
        return whole


def head(**overrides: object) -> RequestHead:
    """The RequestHead a plain GET would produce, with some fields changed."""
    fields: dict = dict(
        method="GET",
        target="http://example.com/",
        version="HTTP/1.1",
        headers=(),
        host="example.com",
        port=80,
        is_connect=False,
        credentials=None,
        keep_alive=True,
    )
    fields.update(overrides)
    return RequestHead(**fields)


class RequestKindTests(_SplitMixin, TestCase):
    """Each kind of request parses to the same events however it arrives."""

    def test_get_without_port(self) -> None:
        data = b"GET http://example.com/index.html HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"
        self.assertEqual(
            self.request_events(data),
            [
                head(
                    target="http://example.com/index.html",
                    headers=(("Host", "example.com"), ("Accept", "*/*")),
                ),
                RequestEnd(),
            ],
        )

    def test_get_with_port(self) -> None:
        event = self.head(b"GET http://example.com:8080/ HTTP/1.1\r\n\r\n")
        self.assertEqual((event.host, event.port), ("example.com", 8080))

    def test_empty_port_means_default(self) -> None:
        event = self.head(b"GET http://example.com:/ HTTP/1.1\r\n\r\n")
        self.assertEqual((event.host, event.port), ("example.com", 80))

    def test_ipv6_literal(self) -> None:
        event = self.head(b"GET http://[2001:DB8::1]:8080/x HTTP/1.1\r\n\r\n")
        self.assertEqual((event.host, event.port), ("2001:db8::1", 8080))

    def test_ipv4_literal(self) -> None:
        event = self.head(b"GET http://10.0.0.1/ HTTP/1.1\r\n\r\n")
        self.assertEqual((event.host, event.port), ("10.0.0.1", 80))

    def test_host_name_normalised(self) -> None:
        """The destination is what the proxy node can resolve; the Host header keeps the client's spelling."""
        for target in (b"http://Example.COM/", b"http://example.com./", b"http://EXAMPLE.com.:80/"):
            event = self.head(b"GET " + target + b" HTTP/1.1\r\n\r\n")
            self.assertEqual((event.host, event.port), ("example.com", 80), target)
        event = self.head(b"CONNECT API.SVC.TEST.:443 HTTP/1.1\r\n\r\n")
        self.assertEqual((event.host, event.port), ("api.svc.test", 443))
        upstream = self.head(b"GET http://API.Example./ HTTP/1.1\r\n\r\n").upstream_head()
        self.assertIn(b"\r\nHost: API.Example.\r\n", upstream)

    def test_host_of_a_qualified_name(self) -> None:
        """The origin sees the real destination in Host, with the URL's port if it had one."""
        head = self.head(b"GET http://10-0-0-5.cluster-a.gw.internal:8080/x HTTP/1.1\r\nHost: whatever\r\n\r\n")
        upstream = head.upstream_head("10.0.0.5")
        self.assertTrue(upstream.startswith(b"GET /x HTTP/1.1\r\nHost: 10.0.0.5:8080\r\n"), upstream)
        self.assertNotIn(b"gw.internal", upstream)
        head = self.head(b"GET http://fd00--5.cluster-a.gw.internal/ HTTP/1.1\r\n\r\n")
        self.assertIn(b"\r\nHost: [fd00::5]\r\n", head.upstream_head("fd00::5"))
        # the same host: the URL's authority as the client wrote it
        head = self.head(b"GET http://API.Example./ HTTP/1.1\r\n\r\n")
        self.assertIn(b"\r\nHost: API.Example.\r\n", head.upstream_head("api.example"))

    def test_query_string(self) -> None:
        event = self.head(b"GET http://example.com/search?q=a%20b&x HTTP/1.1\r\n\r\n")
        self.assertEqual(event.target, "http://example.com/search?q=a%20b&x")
        self.assertTrue(event.upstream_head().startswith(b"GET /search?q=a%20b&x HTTP/1.1\r\n"))

    def test_scheme_case_insensitive(self) -> None:
        self.assertEqual(self.head(b"GET HTTP://example.com/ HTTP/1.1\r\n\r\n").host, "example.com")

    def test_bare_lf(self) -> None:
        data = b"GET http://example.com/ HTTP/1.1\nHost: example.com\n\n"
        self.assertEqual(self.request_events(data), [head(headers=(("Host", "example.com"),)), RequestEnd()])

    def test_leading_empty_lines_bounded(self) -> None:
        """A few stray empty lines are skipped (RFC 9112 2.2), a stream of them is refused at once."""
        request = b"GET http://example.com/ HTTP/1.1\r\n\r\n"
        empty = b"\r\n\n" * (MAX_EMPTY_LINES // 2)
        self.assertEqual(self.request_events(empty + request), [head(), RequestEnd()])
        self.assertEqual(self.request_events(request + empty + request), [head(), RequestEnd()] * 2)
        error = self.assertStatus(empty + b"\n" + request, 400)
        self.assertEqual(error.detail, "more than 4 empty lines before the start line")
        parser = RequestParser()
        self.assertEqual([type(e) for e in parser.receive_data(b"\r\n" * 1_000_000)], [RequestError])
        self.assertEqual(parser.buffered, 0)

    def test_leading_empty_lines_ignored(self) -> None:
        self.assertEqual(
            self.request_events(b"\r\n\n\r\nGET http://example.com/ HTTP/1.1\r\n\r\n"), [head(), RequestEnd()]
        )

    def test_header_value_whitespace_trimmed(self) -> None:
        event = self.head(b"GET http://example.com/ HTTP/1.1\r\nX-A: \t one two \t\r\nX-B:\r\n\r\n")
        self.assertEqual(event.headers, (("X-A", "one two"), ("X-B", "")))

    def test_connect(self) -> None:
        data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        events, leftover = self.requests(data)
        self.assertEqual(
            events,
            [
                head(
                    method="CONNECT",
                    target="example.com:443",
                    headers=(("Host", "example.com:443"),),
                    port=443,
                    is_connect=True,
                )
            ],
        )
        self.assertEqual(leftover, b"")

    def test_connect_early_payload(self) -> None:
        """Bytes after a CONNECT head are the client's, even if they look like HTTP."""
        payload = b"\x16\x03\x01\x00\x05hello\r\n\r\nGET / HTTP/1.1\r\n\r\n"
        events, leftover = self.requests(b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n" + payload)
        self.assertEqual((events[0].host, events[0].port, len(events)), ("::1", 22, 1))
        self.assertEqual(leftover, payload)

    def test_connect_ignores_body_headers(self) -> None:
        events, leftover = self.requests(b"CONNECT h:1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual((len(events), leftover), (1, b"abc"))

    def test_post_content_length(self) -> None:
        data = b"POST http://example.com/f HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world"
        events = self.request_events(data)
        self.assertEqual(events[1:], [RequestBody(b"hello world"), RequestEnd()])

    def test_content_length_whitespace(self) -> None:
        events = self.request_events(b"POST http://h/ HTTP/1.1\r\nContent-Length: \t3 \r\n\r\nabc")
        self.assertEqual(events[1:], [RequestBody(b"abc"), RequestEnd()])

    def test_zero_content_length(self) -> None:
        events = self.request_events(b"POST http://h/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(events[1:], [RequestEnd()])

    def test_post_chunked_with_extensions_and_trailers(self) -> None:
        body = (
            b"5;name=value\r\nhello\r\n"
            b'1A ; a="quoted;" ;b\r\n' + b"x" * 26 + b"\r\n"
            b"0;last\r\nChecksum: abc\r\nX-Trailer: 1\r\n\r\n"
        )
        data = b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n" + body
        self.assertEqual(self.request_events(data)[1:], [RequestBody(body), RequestEnd()])

    def test_trailers_dropped(self) -> None:
        """
        Proxy credentials, hop-by-hop fields, the head's Connection options
        and framing or routing fields never leave in a trailer.
        """
        dropped = (
            b"Proxy-Authorization: Basic YTpUT0tFTg==\r\n"
            b"proxy-authenticate: Basic\r\n"
            b"Connection: close\r\n"
            b"Keep-Alive: 5\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X\r\n"
            b"Upgrade: websocket\r\n"
            b"Proxy-Connection: close\r\n"
            b"Content-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Host: evil.example\r\n"
            b"X-Hop: 1\r\n"
        )
        kept = b"Checksum: abc\r\nX-Trailer: 1\r\n"
        head = b"POST http://h/ HTTP/1.1\r\nConnection: x-hop\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"3\r\nabc\r\n0\r\n"
        events = self.request_events(head + body + kept[:15] + dropped + kept[15:] + b"\r\n")
        self.assertEqual(events[1:], [RequestBody(body + kept + b"\r\n"), RequestEnd()])
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\n\r\n"
        events = self.response(response + body + dropped + kept + b"\r\n", eof=False)
        self.assertEqual(events[1:], [ResponseBody(body + kept + b"\r\n"), ResponseEnd(True)])

    def test_chunked_without_trailers(self) -> None:
        body = b"3\r\nabc\r\n0\r\n\r\n"
        data = b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        self.assertEqual(self.request_events(data)[1:], [RequestBody(body), RequestEnd()])

    def test_expect_continue_is_a_header(self) -> None:
        event = self.head(b"PUT http://h/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
        self.assertIn(b"\r\nExpect: 100-continue\r\n", event.upstream_head())

    def test_pipelined(self) -> None:
        first = b"GET http://a.example/1 HTTP/1.1\r\n\r\n"
        second = b"POST http://b.example:81/2 HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
        third = b"POST http://a.example/3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n"
        fourth = b"GET http://a.example/4 HTTP/1.1\r\nConnection: close\r\n\r\n"
        events = self.request_events(first + second + third + fourth)
        self.assertEqual(
            [(type(e).__name__, getattr(e, "target", None) or getattr(e, "data", None)) for e in events],
            [
                ("RequestHead", "http://a.example/1"),
                ("RequestEnd", None),
                ("RequestHead", "http://b.example:81/2"),
                ("RequestBody", b"body"),
                ("RequestEnd", None),
                ("RequestHead", "http://a.example/3"),
                ("RequestBody", b"1\r\nz\r\n0\r\n\r\n"),
                ("RequestEnd", None),
                ("RequestHead", "http://a.example/4"),
                ("RequestEnd", None),
            ],
        )
        self.assertFalse(events[-2].keep_alive)

    def test_input_held_until_next_request(self) -> None:
        parser = RequestParser()
        second = b"GET http://h/2 HTTP/1.1\r\n\r\n"
        events = parser.receive_data(b"GET http://h/1 HTTP/1.1\r\n\r\n" + second[:10])
        self.assertEqual([type(e) for e in events], [RequestHead, RequestEnd])
        self.assertEqual(parser.receive_data(second[10:]), [])
        self.assertEqual(parser.buffered, len(second))
        events = parser.next_request()
        self.assertEqual([type(e) for e in events], [RequestHead, RequestEnd])
        self.assertEqual((events[0].target, parser.buffered), ("http://h/2", 0))

    def test_buffered_counts_partial_head(self) -> None:
        parser = RequestParser()
        self.assertEqual(parser.receive_data(b"GET http://h/ HT"), [])
        self.assertEqual(parser.buffered, 16)

    def test_next_request_out_of_turn(self) -> None:
        parser = RequestParser()
        self.assertRaises(RuntimeError, parser.next_request)
        parser.receive_data(b"POST http://h/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
        self.assertRaises(RuntimeError, parser.next_request)

    def test_take_leftover_only_after_connect(self) -> None:
        parser = RequestParser()
        parser.receive_data(b"GET http://h/ HTTP/1.1\r\n\r\n")
        self.assertRaises(RuntimeError, parser.take_leftover)

    def test_finished_after_take_leftover(self) -> None:
        parser = RequestParser()
        parser.receive_data(b"CONNECT h:1 HTTP/1.1\r\n\r\nab")
        self.assertEqual(parser.take_leftover(), b"ab")
        self.assertEqual(parser.receive_data(b"GET http://h/ HTTP/1.1\r\n\r\n"), [])
        self.assertRaises(RuntimeError, parser.take_leftover)


class KeepAliveTests(_SplitMixin, TestCase):
    """RFC 9112 9.3: who wants the client connection kept after the exchange."""

    def keep_alive(self, version: bytes, headers: bytes = b"") -> bool:
        return self.head(b"GET http://h/ " + version + b"\r\n" + headers + b"\r\n").keep_alive

    def test_http11_default(self) -> None:
        self.assertTrue(self.keep_alive(b"HTTP/1.1"))

    def test_http11_close(self) -> None:
        self.assertFalse(self.keep_alive(b"HTTP/1.1", b"Connection: Close\r\n"))
        self.assertFalse(self.keep_alive(b"HTTP/1.1", b"Connection: foo\r\nConnection: keep-alive, close\r\n"))

    def test_http10_default(self) -> None:
        self.assertFalse(self.keep_alive(b"HTTP/1.0"))

    def test_http10_keep_alive(self) -> None:
        self.assertTrue(self.keep_alive(b"HTTP/1.0", b"Connection: Keep-Alive\r\n"))

    def test_http10_keep_alive_and_close(self) -> None:
        self.assertFalse(self.keep_alive(b"HTTP/1.0", b"Connection: keep-alive, close\r\n"))

    def test_proxy_connection(self) -> None:
        self.assertTrue(self.keep_alive(b"HTTP/1.0", b"Proxy-Connection: keep-alive\r\n"))
        self.assertFalse(self.keep_alive(b"HTTP/1.1", b"Proxy-Connection: close\r\n"))


class CredentialsTests(_SplitMixin, TestCase):
    def credentials(self, value: bytes) -> tuple[str, str] | None:
        return self.head(b"GET http://h/ HTTP/1.1\r\nProxy-Authorization: " + value + b"\r\n\r\n").credentials

    def basic(self, text: str) -> bytes:
        return b"Basic " + base64.b64encode(text.encode())

    def test_absent(self) -> None:
        self.assertIsNone(self.head(b"GET http://h/ HTTP/1.1\r\n\r\n").credentials)

    def test_basic(self) -> None:
        self.assertEqual(self.credentials(self.basic("alice:s3cret")), ("alice", "s3cret"))

    def test_password_with_colons_and_utf8(self) -> None:
        self.assertEqual(self.credentials(self.basic("clüster:a:b:")), ("clüster", "a:b:"))

    def test_empty_password(self) -> None:
        self.assertEqual(self.credentials(self.basic("alice:")), ("alice", ""))

    def test_scheme_case_insensitive(self) -> None:
        self.assertEqual(self.credentials(b"basic " + base64.b64encode(b"u:p")), ("u", "p"))

    def test_empty_user_is_no_credentials(self) -> None:
        """Some clients send C{Basic Og==} (":") for "no credentials"; no cluster has an empty name."""
        for text in (":", ":stray"):
            self.assertIsNone(self.credentials(self.basic(text)))

    def test_other_scheme(self) -> None:
        self.assertIsNone(self.credentials(b"Bearer abc.def"))
        self.assertIsNone(self.credentials(b'Digest username="u"'))

    def test_malformed_base64(self) -> None:
        for value in (b"Basic !!!!", b"Basic YWxpY2U6cA", b"Basic", b"Basic \xc3\xa9"):
            self.assertStatus(b"GET http://h/ HTTP/1.1\r\nProxy-Authorization: " + value + b"\r\n\r\n", 400)

    def test_no_colon(self) -> None:
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\nProxy-Authorization: " + self.basic("alice") + b"\r\n\r\n", 400)

    def test_not_utf8(self) -> None:
        value = b"Basic " + base64.b64encode(b"\xff:\xfe")
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\nProxy-Authorization: " + value + b"\r\n\r\n", 400)

    def test_repeated(self) -> None:
        value = self.basic("a:b")
        data = b"GET http://h/ HTTP/1.1\r\nProxy-Authorization: " + value + b"\r\nProxy-Authorization: " + value
        self.assertStatus(data + b"\r\n\r\n", 400)


class UpstreamHeadTests(_SplitMixin, TestCase):
    """The exact head sent through the tunnel."""

    def upstream(self, data: bytes) -> bytes:
        return self.head(data).upstream_head()

    def test_minimal(self) -> None:
        self.assertEqual(
            self.upstream(b"GET http://example.com/ HTTP/1.1\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n",
        )

    def test_hop_by_hop_removed(self) -> None:
        data = (
            b"POST http://example.com:8080/p?q HTTP/1.1\r\n"
            b"User-Agent: t\r\n"
            b"Connection: Keep-Alive, X-Hop, content-length, TE\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"TE: trailers\r\n"
            b"Trailer: Checksum\r\n"
            b"Upgrade: websocket\r\n"
            b"x-hop: secret\r\n"
            b"Content-Length: 2\r\n"
            b"Accept: */*\r\n"
            b"\r\nok"
        )
        self.assertEqual(
            self.upstream(data),
            b"POST /p?q HTTP/1.1\r\n"
            b"Host: example.com:8080\r\n"
            b"User-Agent: t\r\n"
            b"Content-Length: 2\r\n"
            b"Accept: */*\r\n"
            b"Connection: keep-alive\r\n\r\n",
        )

    def test_transfer_encoding_kept(self) -> None:
        data = b"POST http://h/ HTTP/1.1\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assertEqual(
            self.upstream(data),
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        )

    def test_host_from_url_wins(self) -> None:
        data = b"GET http://real.example:81/x HTTP/1.1\r\nAccept: a\r\nHOST: other.example\r\n\r\n"
        self.assertEqual(
            self.upstream(data),
            b"GET /x HTTP/1.1\r\nHost: real.example:81\r\nAccept: a\r\nConnection: keep-alive\r\n\r\n",
        )

    def test_host_added_and_ipv6_kept_bracketed(self) -> None:
        self.assertEqual(
            self.upstream(b"GET http://[::1]:8080 HTTP/1.0\r\n\r\n"),
            b"GET / HTTP/1.0\r\nHost: [::1]:8080\r\nConnection: keep-alive\r\n\r\n",
        )

    def test_query_without_path(self) -> None:
        self.assertTrue(self.upstream(b"GET http://h?x=1 HTTP/1.1\r\n\r\n").startswith(b"GET /?x=1 HTTP/1.1\r\n"))

    def test_options_asterisk(self) -> None:
        """RFC 9112 3.2.4: OPTIONS for the server as a whole becomes C{*}."""
        self.assertTrue(self.upstream(b"OPTIONS http://h HTTP/1.1\r\n\r\n").startswith(b"OPTIONS * HTTP/1.1\r\n"))
        self.assertTrue(self.upstream(b"OPTIONS http://h/ HTTP/1.1\r\n\r\n").startswith(b"OPTIONS / HTTP/1.1\r\n"))

    def test_header_bytes_round_trip(self) -> None:
        data = b"GET http://h/ HTTP/1.1\r\nX-Bin: caf\xe9\t\x80\r\n\r\n"
        self.assertIn(b"\r\nX-Bin: caf\xe9\t\x80\r\n", self.upstream(data))

    def test_connect_has_none(self) -> None:
        self.assertRaises(ValueError, self.head(b"CONNECT h:1 HTTP/1.1\r\n\r\n").upstream_head)


class RequestErrorTests(_SplitMixin, TestCase):
    """Every way a request is refused, and with which status."""

    def test_a_socks5_greeting_is_refused_at_once(self) -> None:
        """
        C{curl --socks5} pointed at the HTTP port sends three bytes and waits for
        the method reply: no request line starts with 0x05 (a method is a token),
        so answer now instead of after the handshake time-out.
        """
        self.assertStatus(b"\x05\x01\x00", 400)
        self.assertStatus(b"\x16\x03\x01", 400)  # a TLS ClientHello sent to a plain listener
        self.assertStatus(b"\r\n\r\n\x05", 400)  # after the empty lines RFC 9112 tolerates

    def test_origin_form(self) -> None:
        error = self.assertStatus(b"GET /index.html HTTP/1.1\r\nHost: h\r\n\r\n", 400)
        self.assertEqual(error.detail, "this is a proxy: use an absolute URL or CONNECT")

    def test_asterisk_form(self) -> None:
        self.assertStatus(b"OPTIONS * HTTP/1.1\r\n\r\n", 400)

    def test_https_url(self) -> None:
        self.assertIn("CONNECT", self.assertStatus(b"GET https://h/ HTTP/1.1\r\n\r\n", 400).detail)

    def test_other_scheme(self) -> None:
        self.assertStatus(b"GET ftp://h/ HTTP/1.1\r\n\r\n", 400)

    def test_not_a_url(self) -> None:
        for target in (b"h:80", b"http:/h/", b"http://", b"http:///x", b"http://h:x/"):
            self.assertStatus(b"GET " + target + b" HTTP/1.1\r\n\r\n", 400)

    def test_userinfo(self) -> None:
        self.assertStatus(b"GET http://user:pw@h/ HTTP/1.1\r\n\r\n", 400)
        self.assertStatus(b"CONNECT user@h:443 HTTP/1.1\r\n\r\n", 400)

    def test_fragment(self) -> None:
        self.assertStatus(b"GET http://h/#top HTTP/1.1\r\n\r\n", 400)

    def test_bad_hosts(self) -> None:
        for target in (b"http://[::1/", b"http://[nope]/", b"http://[::1]x/", b'http://h"/', b"http://::1/"):
            self.assertStatus(b"GET " + target + b" HTTP/1.1\r\n\r\n", 400)

    def test_malformed_request_line(self) -> None:
        for line in (
            b"GET http://h/",
            b"GET  http://h/ HTTP/1.1",
            b"GET http://h/ HTTP/1.1 ",
            b"GET http://h/ http/1.1",
            b"GET http://h/ HTTP/11",
            b"G(T http://h/ HTTP/1.1",
            b"GET http://h/\x7f HTTP/1.1",
            b"GET\thttp://h/ HTTP/1.1",
            b"GET http://h/ HTTP/1.1\r",
            b"\rGET http://h/ HTTP/1.1",
        ):
            self.assertStatus(line + b"\r\n\r\n", 400)

    def test_unsupported_version(self) -> None:
        self.assertStatus(b"GET http://h/ HTTP/2.0\r\n\r\n", 505)
        self.assertStatus(b"GET http://h/ HTTP/1.2\r\n\r\n", 505)
        self.assertStatus(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505)

    def test_request_line_too_long(self) -> None:
        line = b"GET http://h/" + b"a" * 8200 + b" HTTP/1.1"
        self.assertStatus(line + b"\r\n\r\n", 414)
        parser = RequestParser()
        self.assertEqual(parser.receive_data(line[:8191]), [])
        self.assertEqual(parser.receive_data(line[8191:8192]), [RequestError(414, "start line longer than 8192 bytes")])

    def test_request_line_at_limit(self) -> None:
        prefix, suffix = b"GET http://h/", b" HTTP/1.1\r\n"
        line = prefix + b"a" * (8192 - len(prefix) - len(suffix)) + suffix
        self.assertEqual(len(line), 8192)
        self.assertIsInstance(self.request_events(line + b"\r\n")[0], RequestHead)
        self.assertStatus(line.replace(b"/a", b"/aa") + b"\r\n", 414)

    def test_header_section_too_large(self) -> None:
        headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\n" + headers + b"\r\n", 431)
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\nX: " + b"v" * 70000, 431)

    def test_header_section_at_limit(self) -> None:
        line = b"X: " + b"v" * (65534 - 5) + b"\r\n"
        self.assertEqual(len(line + b"\r\n"), 65536)
        self.assertIsInstance(self.request_events(b"GET http://h/ HTTP/1.1\r\n" + line + b"\r\n")[0], RequestHead)
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\n" + line.replace(b"v", b"vv", 1) + b"\r\n", 431)

    def test_too_many_headers(self) -> None:
        hundred = b"".join(b"X-%d: v\r\n" % i for i in range(100))
        self.assertEqual(len(self.head(b"GET http://h/ HTTP/1.1\r\n" + hundred + b"\r\n").headers), 100)
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\n" + hundred + b"X-100: v\r\n\r\n", 431)

    def test_malformed_headers(self) -> None:
        for line in (
            b"NoColon",
            b"Space : before colon",
            b": no name",
            b"Bad(Name): v",
            b"X: nul\x00",
            b"X: bare\rcr",
            b"X: del\x7f",
            b" folded: line",
        ):
            self.assertStatus(b"GET http://h/ HTTP/1.1\r\n" + line + b"\r\n\r\n", 400)

    def test_obsolete_line_folding(self) -> None:
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\nX: a\r\n\tcontinued\r\n\r\n", 400)

    def test_repeated_host(self) -> None:
        self.assertStatus(b"GET http://h/ HTTP/1.1\r\nHost: h\r\nhost: h\r\n\r\n", 400)

    def test_connect_needs_port(self) -> None:
        for target in (b"h", b"h:", b"h:0", b"h:65536", b"h:123456", b"h:-1", b"h:+1", b"[::1]", b"[::1]:", b"[x]:1"):
            self.assertStatus(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n", 400)

    def test_connect_max_port(self) -> None:
        self.assertEqual(self.head(b"CONNECT h:65535 HTTP/1.1\r\n\r\n").port, 65535)

    def test_connect_with_path(self) -> None:
        self.assertStatus(b"CONNECT http://h:443/ HTTP/1.1\r\n\r\n", 400)

    def test_transfer_encoding_and_content_length(self) -> None:
        self.assertStatus(b"POST http://h/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400)

    def test_final_coding_not_chunked(self) -> None:
        for value in (b"gzip", b"chunked, gzip", b"", b"identity"):
            self.assertStatus(b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: " + value + b"\r\n\r\n", 400)

    def test_transfer_encoding_in_http10(self) -> None:
        self.assertStatus(b"POST http://h/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)

    def test_invalid_content_length(self) -> None:
        for value in (b"abc", b"-1", b"+1", b"1 2", b"0x10", b"", b"3, 4", b"1,", b"9" * 19):
            self.assertStatus(b"POST http://h/ HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n", 400)

    def test_differing_content_lengths(self) -> None:
        self.assertStatus(b"POST http://h/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400)

    def test_listed_or_repeated_content_length(self) -> None:
        """Identical lengths too: the value goes on as it came, so it must be the one checked."""
        for headers in (b"Content-Length: 3, 3\r\n", b"Content-Length: 3\r\nContent-Length: 3\r\n"):
            self.assertStatus(b"POST http://h/ HTTP/1.1\r\n" + headers + b"\r\nabc", 400)

    def test_only_spaces_and_tabs_are_whitespace(self) -> None:
        """str.strip() would also remove these, and the raw value would be forwarded."""
        for space in (b"\xa0", b"\x85", b"\x0b", b"\x0c"):
            for value in (space + b"3", b"3" + space):
                self.assertStatus(b"POST http://h/ HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\nabc", 400)
            for value in (space + b"chunked", b"chunked" + space, b"gzip" + space + b", chunked"):
                data = b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n"
                self.assertStatus(data, 400)

    def test_chunked_twice(self) -> None:
        for value in (b"chunked, chunked", b"chunked, gzip, chunked", b"chunked\r\nTransfer-Encoding: chunked"):
            data = b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n"
            self.assertEqual(self.assertStatus(data, 400).detail, "chunked applied more than once")

    def test_invalid_transfer_coding(self) -> None:
        for value in (b"gzip;q=1, chunked", b"g(z)ip, chunked", b"\xe9, chunked"):
            self.assertStatus(b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n", 400)

    def chunked(self, body: bytes) -> list:
        return self.request_events(b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body)

    def test_bad_chunk_size(self) -> None:
        for line in (b"zz", b"", b"-1", b"0x5", b" 5", b"5 x", b"1" * 17, b"5;ext\x00"):
            events = self.chunked(line + b"\r\nhello\r\n0\r\n\r\n")
            self.assertEqual(events[-1].status, 400, line)

    def test_chunk_size_bounded(self) -> None:
        """
        At most 15 hex digits (below 2^60): 2^64-1 would overflow the
        counters of 64-bit parsers further on, which would then see
        another chunk boundary than we do.
        """
        for line in (b"f" * 16, b"0" * 16, b"1" + b"0" * 15, b"F" * 17):
            self.assertEqual(self.chunked(line + b"\r\n")[-1].status, 400, line)
        events = self.chunked(b"F" * 15 + b"\r\nabc")
        self.assertEqual(events[1:], [RequestBody(b"F" * 15 + b"\r\nabc")])

    def test_zone_ids_refused(self) -> None:
        for data in (
            b"GET http://[fe80::1%25eth0]/ HTTP/1.1\r\n\r\n",
            b"GET http://[fe80::1%eth0]:80/ HTTP/1.1\r\n\r\n",
            b"CONNECT [fe80::1%eth0]:443 HTTP/1.1\r\n\r\n",
        ):
            self.assertStatus(data, 400)

    def test_details_escape_and_shorten_client_bytes(self) -> None:
        error = self.assertStatus(b"GET http://h/ HTTP/1.1\r\nX\x1b[2J" + b"y" * 200 + b": v\r\n\r\n", 400)
        self.assertIn("\\x1b[2J", error.detail)
        self.assertNotIn("\x1b", error.detail)
        self.assertLess(len(error.detail), 100)

    def test_chunk_data_without_crlf(self) -> None:
        self.assertEqual(self.chunked(b"3\r\nabcd\r\n0\r\n\r\n")[-1].status, 400)

    def test_chunk_bare_lf(self) -> None:
        self.assertEqual(self.chunked(b"3\nabc\r\n0\r\n\r\n")[-1].status, 400)
        self.assertEqual(self.chunked(b"3\r\nabc\r\n0\r\n\n")[-1].status, 400)

    def test_bad_trailer(self) -> None:
        self.assertEqual(self.chunked(b"0\r\nno colon\r\n\r\n")[-1].status, 400)

    def test_trailers_too_large(self) -> None:
        trailers = b"".join(b"T-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        self.assertEqual(self.chunked(b"0\r\n" + trailers + b"\r\n")[-1].status, 431)

    def test_valid_prefix_forwarded_before_error(self) -> None:
        """Body bytes already checked go out before the error, however the input was split."""
        events = self.chunked(b"5\r\nhello\r\nzz\r\n")
        self.assertEqual(events[1:], [RequestBody(b"5\r\nhello\r\n"), RequestError(400, events[-1].detail)])

    def test_nothing_after_error(self) -> None:
        parser = RequestParser()
        events = parser.receive_data(b"GET /x HTTP/1.1\r\n\r\nGET http://h/ HTTP/1.1\r\n\r\n")
        self.assertEqual([type(e) for e in events], [RequestError])
        self.assertEqual(parser.receive_data(b"GET http://h/ HTTP/1.1\r\n\r\n"), [])
        self.assertEqual(parser.buffered, 0)

    def test_error_after_pipelined_request(self) -> None:
        events = self.request_events(b"GET http://h/ HTTP/1.1\r\n\r\nBROKEN\r\n\r\n")
        self.assertEqual([type(e) for e in events], [RequestHead, RequestEnd, RequestError])


class ResponseTests(_SplitMixin, TestCase):
    def test_content_length(self) -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        parser = ResponseParser("GET")
        self.assertEqual(
            self.response(data),
            [
                ResponseHead(200, "OK", "HTTP/1.1", (("Content-Type", "text/plain"), ("Content-Length", "5"))),
                ResponseBody(b"hello"),
                ResponseEnd(reusable=True),
            ],
        )
        parser.receive_data(data)
        self.assertFalse(parser.close_delimited)

    def test_chunked(self) -> None:
        body = b"4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nExpires: never\r\n\r\n"
        events = self.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        self.assertEqual(events[1:], [ResponseBody(body), ResponseEnd(reusable=True)])

    def test_close_delimited(self) -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
        self.assertEqual(self.response(data)[1:], [ResponseBody(b"until the end"), ResponseEnd(reusable=False)])
        parser = ResponseParser("GET")
        parser.receive_data(data)
        self.assertTrue(parser.close_delimited)
        self.assertEqual(parser.eof_received(), [ResponseEnd(reusable=False)])
        self.assertEqual(parser.receive_data(b"more"), [])

    def test_close_delimited_waits_for_eof(self) -> None:
        events = self.response(b"HTTP/1.0 200 OK\r\n\r\nabc", eof=False)
        self.assertEqual(events[1:], [ResponseBody(b"abc")])

    def test_eof_in_framed_body(self) -> None:
        events = self.response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        self.assertEqual(events[1], ResponseBody(b"short"))
        self.assertIsInstance(events[-1], ResponseError)
        events = self.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
        self.assertIsInstance(events[-1], ResponseError)

    def test_eof_before_or_in_head(self) -> None:
        self.assertIsInstance(self.response(b"")[-1], ResponseError)
        self.assertIsInstance(self.response(b"HTTP/1.1 200 OK\r\nX: y\r\n")[-1], ResponseError)

    def test_eof_after_end(self) -> None:
        parser = ResponseParser("GET")
        parser.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(parser.eof_received(), [])

    def test_head_response(self) -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        self.assertEqual(self.response(data, method="HEAD", eof=False)[1:], [ResponseEnd(reusable=True)])

    def test_no_body_statuses(self) -> None:
        for status in (b"204 No Content", b"304 Not Modified"):
            data = b"HTTP/1.1 " + status + b"\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
            self.assertEqual(self.response(data, eof=False)[1:], [ResponseEnd(reusable=True)])

    def test_continue_then_final(self) -> None:
        data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        self.assertEqual(
            self.response(data, method="POST", eof=False),
            [
                ResponseHead(100, "Continue", "HTTP/1.1", (), interim=True),
                ResponseHead(201, "Created", "HTTP/1.1", (("Content-Length", "0"),)),
                ResponseEnd(reusable=True),
            ],
        )

    def test_early_hints(self) -> None:
        data = (
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        events = self.response(data, eof=False)
        self.assertEqual([getattr(e, "interim", None) for e in events], [True, True, False, None, None])
        self.assertEqual(events[0].headers, (("Link", "</s.css>; rel=preload"),))

    def test_unsolicited_switching_protocols(self) -> None:
        """A 101 to a request that asked for no upgrade is not relayed: the client never agreed."""
        data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n\x00\x01raw bytes"
        events = self.response(data)
        self.assertEqual(events, [ResponseError("upstream: switched protocols without an upgrade request")])

    def test_reusable_flags(self) -> None:
        cases = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
        ]
        for data, reusable in cases:
            self.assertEqual(self.response(data, eof=False)[-1], ResponseEnd(reusable), data)

    def test_http10_transfer_encoding_is_close_delimited(self) -> None:
        data = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        self.assertEqual(self.response(data)[1:], [ResponseBody(b"0\r\n\r\n"), ResponseEnd(reusable=False)])

    def test_final_coding_not_chunked_is_close_delimited(self) -> None:
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz"
        self.assertEqual(self.response(data)[1:], [ResponseBody(b"zz"), ResponseEnd(reusable=False)])

    def test_empty_reason(self) -> None:
        for line in (b"HTTP/1.1 200 ", b"HTTP/1.1 200"):
            head = self.response(line + b"\r\nContent-Length: 0\r\n\r\n", eof=False)[0]
            self.assertEqual((head.status, head.reason), (200, ""))

    def test_data_after_response(self) -> None:
        events = self.response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy", eof=False)
        self.assertEqual([type(e) for e in events], [ResponseHead, ResponseBody, ResponseEnd, ResponseError])

    def test_errors(self) -> None:
        for data in (
            b"HTTP/1.1 OK\r\n\r\n",
            b"HTTP/1.1 99 Low\r\n\r\n",
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nq\r\n",
            b"HTTP/1.1 200 " + b"x" * 9000 + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\xa0\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\x85\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"\r\n" * 5 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ):
            events = self.response(data, eof=False)
            self.assertIsInstance(events[-1], ResponseError, data[:80])
            self.assertTrue(events[-1].detail.startswith("upstream: "))


class ClientHeadTests(TestCase):
    def test_hop_by_hop_removed(self) -> None:
        response = ResponseHead(
            200,
            "OK",
            "HTTP/1.1",
            (
                ("Date", "today"),
                ("Connection", "keep-alive, X-Internal"),
                ("Keep-Alive", "timeout=5"),
                ("X-Internal", "1"),
                ("Transfer-Encoding", "chunked"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "Expires"),
                ("Upgrade", "h2c"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ),
        )
        self.assertEqual(
            response.client_head(keep_alive=True),
            b"HTTP/1.1 200 OK\r\nDate: today\r\nTransfer-Encoding: chunked\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nConnection: keep-alive\r\n\r\n",
        )
        self.assertTrue(response.client_head(keep_alive=False).endswith(b"\r\nConnection: close\r\n\r\n"))

    def test_content_length_protected(self) -> None:
        response = ResponseHead(200, "OK", "HTTP/1.0", (("Connection", "content-length"), ("Content-Length", "3")))
        self.assertEqual(
            response.client_head(keep_alive=False),
            b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
        )

    def test_interim_has_no_connection_header(self) -> None:
        response = ResponseHead(100, "Continue", "HTTP/1.1", (("Connection", "keep-alive"),), interim=True)
        self.assertEqual(response.client_head(keep_alive=False), b"HTTP/1.1 100 Continue\r\n\r\n")

    def test_empty_reason(self) -> None:
        self.assertEqual(
            ResponseHead(204, "", "HTTP/1.1", ()).client_head(keep_alive=True),
            b"HTTP/1.1 204 \r\nConnection: keep-alive\r\n\r\n",
        )

    def test_round_trip_through_parser(self) -> None:
        """What we send the client parses back to the same response."""
        data = b"HTTP/1.1 200 OK\r\nX-A: caf\xe9\r\nContent-Length: 2\r\n\r\nok"
        head = ResponseParser("GET").receive_data(data)[0]
        events = ResponseParser("GET").receive_data(head.client_head(keep_alive=True) + b"ok")
        self.assertEqual(events[0].headers, (*head.headers, ("Connection", "keep-alive")))
        self.assertEqual(events[1:], [ResponseBody(b"ok"), ResponseEnd(reusable=True)])


WEBSOCKET_REQUEST = (
    b"GET http://h/chat HTTP/1.1\r\n"
    b"Host: h\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
WEBSOCKET_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


class UpgradeTests(_SplitMixin, TestCase):
    """WebSocket and other Upgrade requests through absolute-form (RFC 9110 7.8)."""

    def test_request_upgrade(self) -> None:
        event = self.head(WEBSOCKET_REQUEST)
        self.assertEqual(event.upgrade, "websocket")
        self.assertEqual(
            event.upstream_head(),
            b"GET /chat HTTP/1.1\r\nHost: h\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )

    def test_ws_url(self) -> None:
        """
        aiohttp's C{ws_connect(proxy=...)} sends the handshake as C{GET ws://...}: a ws URL
        means what the http URL means (RFC 6455 3, port 80 by default), so it goes the same way.
        """
        data = WEBSOCKET_REQUEST.replace(b"http://h/", b"ws://h:8081/")
        event = self.head(data)
        self.assertEqual((event.host, event.port, event.upgrade), ("h", 8081, "websocket"))
        self.assertTrue(event.upstream_head().startswith(b"GET /chat HTTP/1.1\r\nHost: h:8081\r\n"))
        self.assertEqual(self.head(b"GET WS://h/ HTTP/1.1\r\n\r\n").port, 80)

    def test_wss_url(self) -> None:
        """A wss URL needs TLS to the destination, which only the client can do: CONNECT."""
        self.assertIn("CONNECT", self.assertStatus(b"GET wss://h/ HTTP/1.1\r\n\r\n", 400).detail)

    def test_several_protocols(self) -> None:
        data = b"GET http://h/ HTTP/1.1\r\nUpgrade: h2c, foo/2\r\nUpgrade: bar\r\nConnection: UPGRADE\r\n\r\n"
        self.assertEqual(self.head(data).upgrade, "h2c, foo/2, bar")

    def test_no_upgrade(self) -> None:
        """Upgrade is hop-by-hop: without Connection naming it, or in HTTP/1.0, it is dropped."""
        for data in (
            b"GET http://h/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET http://h/ HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            b"GET http://h/ HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT h:80 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ):
            event = self.head(data)
            self.assertIsNone(event.upgrade, data)
            if not event.is_connect:
                self.assertNotIn(b"Upgrade", event.upstream_head())
                self.assertTrue(event.upstream_head().endswith(b"\r\nConnection: keep-alive\r\n\r\n"))

    def test_malformed_upgrade(self) -> None:
        for value in (b"", b"web socket", b"a/b/c", b"x,", b"\xe9"):
            self.assertStatus(b"GET http://h/ HTTP/1.1\r\nUpgrade: " + value + b"\r\nConnection: upgrade\r\n\r\n", 400)

    def test_bytes_after_the_request_are_held(self) -> None:
        """Byte by byte: after RequestEnd the new protocol's first bytes wait for take_upgrade_leftover."""
        frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
        for chunks in splits(WEBSOCKET_REQUEST + frame):
            parser = RequestParser()
            events = [event for chunk in chunks for event in parser.receive_data(chunk)]
            self.assertEqual([type(e) for e in events], [RequestHead, RequestEnd])
            self.assertEqual(parser.buffered, len(frame))
            self.assertEqual(parser.take_upgrade_leftover(), frame)
            self.assertEqual(parser.receive_data(b"more"), [])
            self.assertRaises(RuntimeError, parser.take_upgrade_leftover)

    def test_refused_upgrade_keeps_http(self) -> None:
        """The upstream answered 200, not 101: the held bytes are the next request."""
        parser = RequestParser()
        events = parser.receive_data(WEBSOCKET_REQUEST + b"GET http://h/ HTTP/1.1\r\n\r\n")
        self.assertEqual([type(e) for e in events], [RequestHead, RequestEnd])
        self.assertEqual([type(e) for e in parser.next_request()], [RequestHead, RequestEnd])

    def test_take_upgrade_leftover_out_of_turn(self) -> None:
        parser = RequestParser()
        self.assertRaises(RuntimeError, parser.take_upgrade_leftover)  # no request yet
        parser.receive_data(WEBSOCKET_REQUEST.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n"))
        self.assertRaises(RuntimeError, parser.take_upgrade_leftover)  # the body is still coming
        parser = RequestParser()
        parser.receive_data(b"GET http://h/ HTTP/1.1\r\n\r\nxyz")
        self.assertRaises(RuntimeError, parser.take_upgrade_leftover)  # no upgrade was asked for
        self.assertEqual(parser.buffered, 3)

    def test_switching_response(self) -> None:
        frame = b"\x81\x05hello"
        events, leftover = self.switching_response(WEBSOCKET_RESPONSE + frame)
        self.assertEqual(
            events,
            [
                ResponseHead(
                    101,
                    "Switching Protocols",
                    "HTTP/1.1",
                    (
                        ("Upgrade", "websocket"),
                        ("Connection", "Upgrade"),
                        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                    ),
                    upgrade="websocket",
                )
            ],
        )
        self.assertEqual(leftover, frame)

    def test_switched_parser_parses_nothing(self) -> None:
        parser = ResponseParser("GET", upgrade=True)
        self.assertEqual(len(parser.receive_data(WEBSOCKET_RESPONSE)), 1)
        self.assertEqual(parser.receive_data(b"HTTP/1.1 200 OK\r\n\r\n"), [])
        self.assertEqual(parser.eof_received(), [])
        self.assertEqual(parser.take_leftover(), b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(parser.receive_data(b"x"), [])
        self.assertRaises(RuntimeError, parser.take_leftover)

    def test_interim_then_switch(self) -> None:
        events, leftover = self.switching_response(b"HTTP/1.1 100 Continue\r\n\r\n" + WEBSOCKET_RESPONSE)
        self.assertEqual([(e.status, e.interim) for e in events], [(100, True), (101, False)])
        self.assertEqual(leftover, b"")

    def test_upgrade_refused_by_upstream(self) -> None:
        """A final response other than 101 to an upgrade request is an ordinary one."""
        data = b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nno"
        events = self.response(data, eof=False, upgrade=True)
        self.assertEqual(events[1:], [ResponseBody(b"no"), ResponseEnd(reusable=True)])
        self.assertIsNone(events[0].upgrade)
        self.assertTrue(events[0].client_head(keep_alive=True).endswith(b"\r\nConnection: keep-alive\r\n\r\n"))

    def test_switch_without_upgrade_header(self) -> None:
        for value in (b"", b"Upgrade: \r\n", b"Upgrade: web socket\r\n"):
            data = b"HTTP/1.1 101 Switching Protocols\r\n" + value + b"\r\n"
            self.assertIsInstance(self.response(data, upgrade=True)[-1], ResponseError, value)

    def test_unsolicited_switch_is_an_error(self) -> None:
        for chunks in splits(WEBSOCKET_RESPONSE + b"\x81\x00"):
            parser = ResponseParser("GET")
            events = [event for chunk in chunks for event in parser.receive_data(chunk)]
            self.assertEqual(events, [ResponseError("upstream: switched protocols without an upgrade request")])
            self.assertRaises(RuntimeError, parser.take_leftover)

    def test_take_leftover_before_switch(self) -> None:
        parser = ResponseParser("GET", upgrade=True)
        self.assertRaises(RuntimeError, parser.take_leftover)
        parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertRaises(RuntimeError, parser.take_leftover)

    def test_client_head_of_a_switch(self) -> None:
        head = ResponseParser("GET", upgrade=True).receive_data(WEBSOCKET_RESPONSE)[0]
        expected = (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        for keep_alive in (True, False):
            self.assertEqual(head.client_head(keep_alive), expected)


class ErrorResponseTests(TestCase):
    def parse(self, data: bytes) -> tuple[ResponseHead, bytes]:
        events = ResponseParser("GET").receive_data(data)
        self.assertEqual([type(e) for e in events], [ResponseHead, ResponseBody, ResponseEnd])
        return events[0], events[1].data

    def test_bytes(self) -> None:
        self.assertEqual(
            error_response(502, "connection refused"),
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 19\r\nConnection: close\r\n\r\nconnection refused\n",
        )

    def test_parses_back(self) -> None:
        head, body = self.parse(error_response(403, "10.1.2.3 is outside cluster “prod”"))
        self.assertEqual((head.status, head.reason, head.version), (403, "Forbidden", "HTTP/1.1"))
        headers = dict(head.headers)
        self.assertEqual(headers["Content-Length"], str(len(body)))
        self.assertEqual(headers["Connection"], "close")
        self.assertEqual(body.decode("utf-8"), "10.1.2.3 is outside cluster “prod”\n")
        self.assertNotIn("Proxy-Authenticate", headers)

    def test_proxy_authenticate(self) -> None:
        head, body = self.parse(error_response(407, "credentials required"))
        self.assertEqual(dict(head.headers)["Proxy-Authenticate"], 'Basic realm="gateway"')
        self.assertEqual(body, b"credentials required\n")

    def test_realm_quoted(self) -> None:
        head, _ = self.parse(error_response(407, "x", realm='a "b" \\c'))
        self.assertEqual(dict(head.headers)["Proxy-Authenticate"], 'Basic realm="a \\"b\\" \\\\c"')

    def test_version(self) -> None:
        head, _ = self.parse(error_response(504, "timed out", version="HTTP/1.0"))
        self.assertEqual((head.version, head.reason), ("HTTP/1.0", "Gateway Timeout"))

    def test_every_status_we_use(self) -> None:
        for status in {*HTTP_STATUS.values(), 400, 413, 414, 431, 505}:
            head, _ = self.parse(error_response(status, "d"))
            self.assertEqual((head.status, head.reason), (status, HTTPStatus(status).phrase))


class StatusForTests(TestCase):
    def test_every_reason_has_a_status(self) -> None:
        self.assertEqual(set(HTTP_STATUS), set(Reason))

    def test_mapping(self) -> None:
        expected = {
            Reason.BAD_REQUEST: 400,
            Reason.AUTH_REQUIRED: 407,
            Reason.AUTH_FAILED: 407,
            Reason.NO_ROUTE: 403,
            Reason.REFUSED: 502,
            Reason.TIMEOUT: 504,
            Reason.UNAVAILABLE: 504,
            Reason.OVERLOADED: 503,
            Reason.UNSUPPORTED_COMMAND: 501,
            Reason.UNSUPPORTED_ADDRESS: 400,
        }
        for reason, status in expected.items():
            self.assertEqual(status_for(StreamError(reason, "x")), status)


# -- properties ---------------------------------------------------------------

VALID_REQUESTS = [
    b"GET http://h/chat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00",
    b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET http://[::1]:8080/a?b=c HTTP/1.0\nConnection: keep-alive\n\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\n\r\n\x16\x03\x01",
    b"POST http://h/f HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET http://h/ HTTP/1.1\r\n\r\n",
    b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"PUT http://h:81/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc\r\n",
    b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
]

VALID_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.0 200 OK\nContent-Type: text/plain\n\nuntil eof",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw",
    b"\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n00A\r\n0123456789\r\n0\r\nTE: x\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    """A valid message with a few bytes deleted, inserted, replaced or repeated."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 8)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "repeat"]))
        if action == "delete":
            del data[start:end]
        elif action == "insert":
            insertions = [b"\r\n", b"\n", b":", b" ", b";", b"0", b"\r", b"\x00", b"\xa0", b"\x85", b","]
            data[start:start] = draw(st.sampled_from(insertions))
        elif action == "replace":
            data[start:end] = draw(st.binary(max_size=8))
        else:
            data[start:start] = data[start:end]
    return bytes(data)


@st.composite
def generated_request(draw: st.DrawFn) -> tuple[bytes, str, int, bytes]:
    """A well-formed request: raw bytes, the host and port it names, its raw body."""
    host, expected_host = draw(
        st.sampled_from([("example.com",) * 2, ("Example.COM.", "example.com"), ("10.0.0.1",) * 2, ("[::1]", "::1")])
    )
    port = draw(st.none() | st.integers(1, 65535))
    authority = host if port is None else f"{host}:{port}"
    path = draw(st.sampled_from(["", "/", "/a/b", "/x?y=1", "?q"]))
    names = st.sampled_from(["Accept", "X-Trace", "User-Agent", "Connection", "Host"])
    values = st.text("abc-, ", max_size=8)
    lines = [f"{name}: {value}" for name, value in draw(st.lists(st.tuples(names, values), max_size=4))]
    lines = [line for line in lines if not line.startswith("Host:")]  # at most one Host line is allowed
    if draw(st.booleans()):
        lines.append(f"Host: {authority}")
    chunks = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3))
    kind = draw(st.sampled_from(["none", "length", "chunked"]))
    if kind == "length":
        body = b"".join(chunks)
        lines.append(f"Content-Length: {len(body)}")
    elif kind == "chunked":
        data = b"".join(b"%x;n=v\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n"
        trailers = draw(st.lists(st.sampled_from([b"T: x\r\n", b"Proxy-Authorization: Basic dTpw\r\n"]), max_size=3))
        sent = data + b"".join(trailers) + b"\r\n"
        body = data + b"".join(t for t in trailers if t.startswith(b"T:")) + b"\r\n"  # what is forwarded
        lines.append("Transfer-Encoding: chunked")
    else:
        body = b""
    head = "\r\n".join([f"POST http://{authority}{path} HTTP/1.1", *lines]) + "\r\n\r\n"
    return head.encode() + (sent if kind == "chunked" else body), expected_host, port or 80, body


@st.composite
def generated_response(draw: st.DrawFn) -> tuple[bytes, int, bytes, bool]:
    """A well-formed response: raw bytes, status, raw body, whether it is reusable."""
    status = draw(st.sampled_from([200, 201, 404, 500]))
    chunks = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3))
    kind = draw(st.sampled_from(["length", "chunked", "close"]))
    close = draw(st.booleans())
    lines = [f"HTTP/1.1 {status} Whatever", "Connection: close" if close else "Server: x"]
    if kind == "length":
        body = b"".join(chunks)
        lines.append(f"Content-Length: {len(body)}")
    elif kind == "chunked":
        body = b"".join(b"%X\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        lines.append("Transfer-Encoding: chunked")
    else:
        body = b"".join(chunks)
    interim = "HTTP/1.1 100 Continue\r\n\r\n" if draw(st.booleans()) else ""
    raw = (interim + "\r\n".join(lines) + "\r\n\r\n").encode() + body
    return raw, status, body, kind != "close" and not close


any_request = st.one_of(st.binary(max_size=300), mutated(VALID_REQUESTS))
any_response = st.one_of(st.binary(max_size=300), mutated(VALID_RESPONSES))


def split_points(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


class PropertyTests(TestCase):
    """Whatever arrives, however it is split: no exception, the same events, nothing after an error."""

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_requests(self, data: st.DataObject) -> None:
        message = data.draw(any_request)
        chunks = cut(message, data.draw(split_points(message)))
        events, leftover = run_requests(chunks)
        self.assertEqual((events, leftover), run_requests([message]))
        check_no_trailing_events(self, events)
        for event in events:
            self.assertIsInstance(event, RequestHead | RequestBody | RequestEnd | RequestError)
            if isinstance(event, RequestHead) and not event.is_connect:
                connection = b"Upgrade" if event.upgrade else b"keep-alive"
                self.assertTrue(event.upstream_head().endswith(b"\r\nConnection: " + connection + b"\r\n\r\n"))
            if isinstance(event, RequestBody):
                # no trailer field of that name (a mutation may make another, "Proxy-Authorizationr")
                self.assertIsNone(re.search(rb"(?:^|\r\n)Proxy-Authorization[ \t]*:", event.data, re.I), event.data)

    @settings(max_examples=200, deadline=None)
    @given(st.data(), st.sampled_from(["GET", "HEAD", "POST"]), st.booleans())
    def test_responses(self, data: st.DataObject, method: str, upgrade: bool) -> None:
        message = data.draw(any_response)
        chunks = cut(message, data.draw(split_points(message)))
        events, leftover = run_switching_response(chunks, method, upgrade=upgrade)
        self.assertEqual((events, leftover), run_switching_response([message], method, upgrade=upgrade))
        check_no_trailing_events(self, events)
        if isinstance(events[-1], ResponseHead):  # switched: the parser reads no further
            self.assertEqual((events[-1].status, upgrade), (101, True))
            self.assertTrue(message.endswith(leftover))
        else:
            self.assertIsInstance(events[-1], ResponseEnd | ResponseError)
        for event in events:
            if isinstance(event, ResponseHead):
                self.assertTrue(event.client_head(keep_alive=False).endswith(b"\r\n\r\n"))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(generated_request(), min_size=1, max_size=3), st.data())
    def test_generated_requests(self, messages: list[tuple[bytes, str, int, bytes]], data: st.DataObject) -> None:
        """Well-formed pipelined requests, however split, give back what was put in."""
        stream = b"".join(raw for raw, _, _, _ in messages)
        events, _ = run_requests(cut(stream, data.draw(split_points(stream))))
        expected = []
        for _, host, port, body in messages:
            expected += [(host, port)] + ([body] if body else []) + [None]
        self.assertEqual(
            [(e.host, e.port) if isinstance(e, RequestHead) else getattr(e, "data", None) for e in events], expected
        )

    @settings(max_examples=200, deadline=None)
    @given(generated_response(), st.data())
    def test_generated_responses(self, message: tuple[bytes, int, bytes, bool], data: st.DataObject) -> None:
        raw, status, body, reusable = message
        events = run_response(cut(raw, data.draw(split_points(raw))))
        if events[0].interim:
            self.assertEqual(events.pop(0).status, 100)
        self.assertEqual(events[0].status, status)
        self.assertEqual(events[1:], ([ResponseBody(body)] if body else []) + [ResponseEnd(reusable)])


def _field_by_the_rules(line: bytes) -> tuple[str, str] | None:
    """RFC 9110 5.5's field line, spelled out: what the one-regex fast path must agree with."""
    name, colon, value = line.partition(b":")
    value = value.strip(b" \t")
    if line[:1] in (b" ", b"\t") or not colon or not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
        return None
    if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value):
        return None
    return name.decode("ascii"), value.decode("latin-1")


class FieldLineTests(TestCase):
    @settings(max_examples=500)
    @given(
        st.lists(
            st.sampled_from([b"X-A", b"a", b":", b" ", b"\t", b"v", b"\x00", b"\x7f", b"\xe9", b"\x1f", b"\r", b"x y"]),
            max_size=8,
        ).map(b"".join)
    )
    def test_the_fast_path_agrees_with_the_rules(self, line: bytes) -> None:
        expected = _field_by_the_rules(line)
        if expected is None:
            self.assertRaises(_Malformed, _parse_field, line)
        else:
            self.assertEqual(_parse_field(line), expected)

    def test_a_line_of_blanks_costs_linear_time(self) -> None:
        # A field line may be as long as the header section: one of blanks
        # that fails at its end must not make the regex try every split of
        # them between the value and the blanks around it (quadratic: ~100 s
        # of a blocked reactor for 64 KiB).  Linear takes well under 10 ms.
        blanks = b" \t" * (MAX_HEADER_SECTION // 8)
        for line in (b"X:" + blanks + b"\x00", b"X:" + blanks + b"\r", b"X:" + blanks + b"a" + blanks + b"\x7f"):
            started = time.process_time()
            self.assertRaises(_Malformed, _parse_field, line)
            self.assertLess(time.process_time() - started, 0.5)
