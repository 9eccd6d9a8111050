"""
Tests for L{gateway.proxy.socks.machine}, the sans-IO SOCKS4/4a/5 handshake.

Expected reply bytes are spelled out literally rather than computed with the
module's own helpers, so a wrong encoding cannot agree with itself.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import struct
from collections.abc import Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.errors import Reason, StreamError
from gateway.proxy.socks.machine import (
    SOCKS5_REPLY,
    ConnectRequest,
    Event,
    Rejected,
    Send,
    SocksMachine,
)
from gateway.proxy.socks.replies import SOCKS5_REPLY_TEXT

GREET_NOAUTH = b"\x05\x01\x00"
GREET_USERPASS = b"\x05\x01\x02"
CHOSE_NOAUTH = Send(b"\x05\x00")
CHOSE_USERPASS = Send(b"\x05\x02")
AUTH_OK = Send(b"\x01\x00")
AUTH_FAIL = b"\x01\x01"
NO_METHOD = b"\x05\xff"
V4_FAIL = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
# Leaves room above the largest message (RFC 1929: 3 + 255 + 255 bytes).
BUFFER_LIMIT = 600
#: The longest host name (253 characters), and with a trailing dot the longest valid field.
LONGEST_NAME = ".".join(["a" * 63] * 3 + ["a" * 61])


def v5_fail(code: int) -> bytes:
    return bytes([0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0])


def v5_request(atyp: int, address: bytes, port: int, cmd: int = 1, rsv: int = 0) -> bytes:
    return bytes([0x05, cmd, rsv, atyp]) + address + struct.pack("!H", port)


def v5_ip(host: str, port: int, cmd: int = 1) -> bytes:
    address = ipaddress.ip_address(host)
    return v5_request(1 if address.version == 4 else 4, address.packed, port, cmd)


def v5_domain(name: bytes, port: int) -> bytes:
    return v5_request(3, bytes([len(name)]) + name, port)


def userpass(username: bytes, password: bytes, version: int = 1) -> bytes:
    return bytes([version, len(username)]) + username + bytes([len(password)]) + password


def v4_request(ip: str, port: int, userid: bytes = b"", domain: bytes | None = None, cd: int = 1) -> bytes:
    head = struct.pack("!BBH", 4, cd, port) + ipaddress.IPv4Address(ip).packed
    return head + userid + b"\0" + (b"" if domain is None else domain + b"\0")


def check_credentials(username: str, password: str) -> bool:
    return (username, password) == ("cluster", "s3cret")


def feed(
    chunks: list[bytes],
    authenticate: Callable[[str, str], bool] | None = None,
    is_cluster: Callable[[str], bool] | None = None,
) -> tuple[list[Event], SocksMachine]:
    server = SocksMachine(authenticate, is_cluster)
    events: list[Event] = []
    for chunk in chunks:
        events += server.receive_data(chunk)
    return events, server


def pending(data: bytes) -> SocksMachine:
    """A server holding the ConnectRequest that C{data} completes."""
    events, server = feed([data])
    assert isinstance(events[-1], ConnectRequest), events
    return server


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """C{data} split at C{points} (clamped and sorted; empty chunks allowed)."""
    bounds = [0, *sorted(min(p, len(data)) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def splittings(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and a few reproducible random splits."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(data)
    for _ in range(20):
        points = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 8))]
        yield cut(data, points)


IPV4_REQUEST = v5_ip("192.0.2.10", 80)
NOAUTH_FLOWS: list[tuple[str, bytes, ConnectRequest]] = [
    (
        "v5-ipv4",
        GREET_NOAUTH + IPV4_REQUEST,
        ConnectRequest(5, "192.0.2.10", 80, None, None),
    ),
    (
        "v5-ipv6",
        GREET_NOAUTH + v5_ip("2001:db8:0:0:0:0:0:1", 443),
        ConnectRequest(5, "2001:db8::1", 443, None, None),
    ),
    (
        "v5-domain",
        GREET_NOAUTH + v5_domain(b"db.cluster.example", 5432),
        ConnectRequest(5, "db.cluster.example", 5432, None, None),
    ),
    (
        "v5-domain-normalised",
        GREET_NOAUTH + v5_domain(b"DB.Cluster.Example.", 5432),
        ConnectRequest(5, "db.cluster.example", 5432, None, None),
    ),
]
SOCKS4_FLOWS: list[tuple[str, bytes, ConnectRequest]] = [
    (
        "v4",
        v4_request("10.1.2.3", 22),
        ConnectRequest(4, "10.1.2.3", 22, None, None),
    ),
    (
        "v4-userid",
        v4_request("10.1.2.3", 22, b"cluster"),
        ConnectRequest(4, "10.1.2.3", 22, "cluster", None),
    ),
    (
        "v4-token",
        v4_request("10.1.2.3", 22, b"cluster:s3cret"),
        ConnectRequest(4, "10.1.2.3", 22, "cluster", "s3cret"),
    ),
    (
        "v4a",
        v4_request("0.0.0.1", 8080, b"cluster:s3cret", b"web.example"),
        ConnectRequest(4, "web.example", 8080, "cluster", "s3cret"),
    ),
]
USERPASS_OK = GREET_USERPASS + userpass(b"cluster", b"s3cret") + IPV4_REQUEST
USERPASS_BAD = GREET_USERPASS + userpass(b"cluster", b"wrong") + IPV4_REQUEST
# Every successful handshake, for the property tests to mutate.
VALID_HANDSHAKES = [data for _, data, _ in NOAUTH_FLOWS + SOCKS4_FLOWS] + [USERPASS_OK]


class FlowTests(unittest.TestCase):
    """Complete handshakes give the same events however the bytes arrive."""

    def assertFlow(
        self,
        data: bytes,
        expected: list[Event],
        authenticate: Callable[[str, str], bool] | None = None,
    ) -> None:
        for chunks in splittings(data):
            events, server = feed(chunks, authenticate)
            self.assertEqual(events, expected, chunks)
            self.assertTrue(server.done)
            self.assertEqual(server.leftover, b"")

    def test_socks5_no_auth(self) -> None:
        for name, data, request in NOAUTH_FLOWS:
            with self.subTest(name):
                self.assertFlow(data, [CHOSE_NOAUTH, request])

    def test_socks4(self) -> None:
        for name, data, request in SOCKS4_FLOWS:
            with self.subTest(name):
                self.assertFlow(data, [request])

    def test_userpass_accepted(self) -> None:
        request = ConnectRequest(5, "192.0.2.10", 80, "cluster", "s3cret")
        self.assertFlow(USERPASS_OK, [CHOSE_USERPASS, AUTH_OK, request], check_credentials)

    def test_userpass_rejected(self) -> None:
        for chunks in splittings(USERPASS_BAD):
            events, server = feed(chunks, check_credentials)
            self.assertEqual(events[:2], [CHOSE_USERPASS, Send(AUTH_FAIL)])
            self.assertEqual(len(events), 3)
            self.assertEqual(events[2].reason, Reason.AUTH_FAILED)
            self.assertNotIn("wrong", events[2].detail)
            self.assertTrue(server.done)

    def test_userpass_without_authenticator(self) -> None:
        """With no callback, any credentials pass and are reported."""
        data = GREET_USERPASS + userpass(b"anyone", b"anything") + IPV4_REQUEST
        request = ConnectRequest(5, "192.0.2.10", 80, "anyone", "anything")
        self.assertFlow(data, [CHOSE_USERPASS, AUTH_OK, request])

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_any_split(self, data: st.DataObject) -> None:
        handshake = data.draw(st.sampled_from(VALID_HANDSHAKES + [USERPASS_BAD]))
        points = data.draw(st.lists(st.integers(0, len(handshake))))
        whole, _ = feed([handshake], check_credentials)
        split, _ = feed(cut(handshake, points), check_credentials)
        self.assertEqual(split, whole)


class Socks5ErrorTests(unittest.TestCase):
    """Each SOCKS5 failure sends its exact reply, then Rejected."""

    def assertRejected(
        self,
        data: bytes,
        sends: list[bytes],
        reason: Reason,
        authenticate: Callable[[str, str], bool] | None = None,
    ) -> Rejected:
        for chunks in splittings(data):
            events, server = feed(chunks, authenticate)
            self.assertEqual(events[:-1], [Send(s) for s in sends], chunks)
            self.assertIsInstance(events[-1], Rejected)
            self.assertEqual(events[-1].reason, reason)
            self.assertTrue(server.done)
            self.assertEqual(server.receive_data(IPV4_REQUEST), [])
            self.assertEqual(server.leftover, b"")
        return events[-1]

    def test_no_methods(self) -> None:
        self.assertRejected(b"\x05\x00", [NO_METHOD], Reason.BAD_REQUEST)

    def test_no_acceptable_method(self) -> None:
        """GSSAPI and private methods only: we need 0x00 or 0x02."""
        self.assertRejected(b"\x05\x02\x01\x80", [NO_METHOD], Reason.AUTH_REQUIRED)

    def test_prefers_userpass(self) -> None:
        events, _ = feed([b"\x05\x02\x00\x02"])
        self.assertEqual(events, [CHOSE_USERPASS])

    def test_no_auth_among_others(self) -> None:
        events, server = feed([b"\x05\x03\x01\x80\x00"])
        self.assertEqual(events, [CHOSE_NOAUTH])
        self.assertFalse(server.done)

    def test_incomplete_greeting_waits(self) -> None:
        events, server = feed([b"\x05\x03\x00\x01"])
        self.assertEqual(events, [])
        self.assertFalse(server.done)

    def test_userpass_bad_version(self) -> None:
        data = GREET_USERPASS + userpass(b"cluster", b"s3cret", version=5)
        sends = [b"\x05\x02", AUTH_FAIL]
        self.assertRejected(data, sends, Reason.BAD_REQUEST, check_credentials)

    def test_userpass_invalid_utf8(self) -> None:
        calls: list[tuple[str, str]] = []

        def authenticate(username: str, password: str) -> bool:
            calls.append((username, password))
            return True

        for username, password in [(b"clu\xffster", b"s3cret"), (b"cluster", b"\xc3")]:
            data = GREET_USERPASS + userpass(username, password) + IPV4_REQUEST
            sends = [b"\x05\x02", AUTH_FAIL]
            self.assertRejected(data, sends, Reason.BAD_REQUEST, authenticate)
        self.assertEqual(calls, [])

    def test_userpass_failure_hides_password(self) -> None:
        data = GREET_USERPASS + userpass(b"cluster", b"hunter2") + IPV4_REQUEST
        sends = [b"\x05\x02", AUTH_FAIL]
        rejected = self.assertRejected(data, sends, Reason.AUTH_FAILED, lambda u, p: False)
        self.assertNotIn("hunter2", repr(rejected))

    def test_authenticator_may_choose_reason(self) -> None:
        def authenticate(username: str, password: str) -> bool:
            raise StreamError(Reason.AUTH_REQUIRED, "cluster needs a token")

        sends = [b"\x05\x02", AUTH_FAIL]
        self.assertRejected(USERPASS_OK, sends, Reason.AUTH_REQUIRED, authenticate)

    def test_empty_credentials(self) -> None:
        """
        curl sends PLEN=0 for socks5h://user@host; empty becomes None.  An
        empty username is no credentials at all: it is not checked (no
        cluster has an empty name) and the destination picks the cluster.
        """
        calls: list[tuple[str, str]] = []

        def authenticate(username: str, password: str) -> bool:
            calls.append((username, password))
            return username == "cluster"

        for username, password, expected in [
            (b"cluster", b"", ("cluster", None)),
            (b"", b"", (None, None)),
            (b"", b"stray", (None, None)),
        ]:
            data = GREET_USERPASS + userpass(username, password) + IPV4_REQUEST
            events, _ = feed([data], authenticate)
            request = ConnectRequest(5, "192.0.2.10", 80, *expected)
            self.assertEqual(events, [CHOSE_USERPASS, AUTH_OK, request])
        self.assertEqual(calls, [("cluster", "")])

    def test_refused_username_is_not_echoed(self) -> None:
        """A SOCKS4-style "cluster:token" username: the detail shows the cluster part only."""
        for username, shown in [
            (b"cluster:s3cret-token", "username 'cluster:...'"),
            (b"s3cret token", "a username of 12 bytes"),
        ]:
            data = GREET_USERPASS + userpass(username, b"s3cret-password")
            rejected = self.assertRejected(data, [b"\x05\x02", AUTH_FAIL], Reason.AUTH_FAILED, check_credentials)
            self.assertEqual(rejected.detail, f"{shown} not accepted")

    def test_token_in_the_username_field_is_not_echoed(self) -> None:
        """A username naming no cluster may be a token typed into the wrong field: shown by size, shape or not."""
        for username, shown in [(b"Zm9vYmFyVG9rZW4", "a username of 15 bytes"), (b"cluster", "username 'cluster'")]:
            data = GREET_USERPASS + userpass(username, b"wrong")
            events, _ = feed([data], check_credentials, is_cluster=lambda name: name == "cluster")
            self.assertIsInstance(events[-1], Rejected)
            self.assertEqual(events[-1].detail, f"{shown} not accepted")

    def test_utf8_credentials(self) -> None:
        name = "clüster"
        data = GREET_USERPASS + userpass(name.encode(), "pässwörd".encode())
        events, _ = feed([data + IPV4_REQUEST])
        self.assertEqual(events[-1].username, name)
        self.assertEqual(events[-1].password, "pässwörd")

    def test_request_bad_version(self) -> None:
        data = GREET_NOAUTH + b"\x04" + IPV4_REQUEST[1:]
        self.assertRejected(data, [b"\x05\x00", v5_fail(1)], Reason.BAD_REQUEST)

    def test_unsupported_commands(self) -> None:
        for cmd, word in [(2, "BIND"), (3, "UDP ASSOCIATE"), (0, "0x00"), (9, "0x09")]:
            data = GREET_NOAUTH + v5_ip("192.0.2.10", 80, cmd=cmd)
            sends = [b"\x05\x00", v5_fail(7)]
            rejected = self.assertRejected(data, sends, Reason.UNSUPPORTED_COMMAND)
            self.assertIn(word, rejected.detail)

    def test_command_rejected_early(self) -> None:
        """BIND is refused as soon as the command byte arrives."""
        events, server = feed([GREET_NOAUTH + b"\x05\x02"])
        self.assertEqual(events[:2], [CHOSE_NOAUTH, Send(v5_fail(7))])
        self.assertTrue(server.done)

    def test_unsupported_address_types(self) -> None:
        for atyp in [0, 2, 5, 0xFF]:
            data = GREET_NOAUTH + v5_request(atyp, b"\x7f\0\0\x01", 80)
            sends = [b"\x05\x00", v5_fail(8)]
            self.assertRejected(data, sends, Reason.UNSUPPORTED_ADDRESS)

    def test_bad_domains(self) -> None:
        bad = [b"", b"a\0b", b"has space", b"tab\t", b"line\n", b"del\x7f", b"\xc3", b"\xe2\x98\x83"]
        for name in bad:
            data = GREET_NOAUTH + v5_domain(name, 80)
            sends = [b"\x05\x00", v5_fail(1)]
            self.assertRejected(data, sends, Reason.BAD_REQUEST)

    def test_utf8_domain(self) -> None:
        """A name sent as UTF-8 is encoded as the A-label a resolver understands."""
        events, _ = feed([GREET_NOAUTH + v5_domain("Bücher.example".encode(), 80)])
        self.assertEqual(events[-1], ConnectRequest(5, "xn--bcher-kva.example", 80, None, None))

    def test_longest_domain(self) -> None:
        name = LONGEST_NAME.encode() + b"."
        events, _ = feed([GREET_NOAUTH + v5_domain(name, 80)])
        self.assertEqual(events[-1], ConnectRequest(5, LONGEST_NAME, 80, None, None))
        self.assertRejected(GREET_NOAUTH + v5_domain(b"b" + name, 80), [b"\x05\x00", v5_fail(1)], Reason.BAD_REQUEST)

    def test_domain_normalised(self) -> None:
        """Case and one trailing dot are the resolver's business, not the destination's."""
        for name, host in [(b"API.SVC.TEST.", "api.svc.test"), (b"Db", "db")]:
            for request in (GREET_NOAUTH + v5_domain(name, 80), v4_request("0.0.0.1", 80, domain=name)):
                events, _ = feed([request])
                self.assertEqual(events[-1].host, host)

    def test_zone_id_refused(self) -> None:
        """An IPv6 zone id names an interface of whoever reads it: it must not reach the proxy node."""
        for name in (b"fe80::1%eth0", b"fe80::1%1"):
            data = GREET_NOAUTH + v5_domain(name, 80)
            self.assertRejected(data, [b"\x05\x00", v5_fail(1)], Reason.BAD_REQUEST)
            self.assertRejected(v4_request("0.0.0.1", 80, domain=name), [V4_FAIL], Reason.BAD_REQUEST)

    def test_bad_domain_shown_escaped_and_short(self) -> None:
        name = b"\x1b[31mred" + b"x" * 200
        rejected = self.assertRejected(
            GREET_NOAUTH + v5_domain(name, 80), [b"\x05\x00", v5_fail(1)], Reason.BAD_REQUEST
        )
        self.assertIn("\\x1b[31m", rejected.detail)
        self.assertNotIn("\x1b", rejected.detail)
        self.assertLess(len(rejected.detail), 80)

    def test_domain_ip_literal_normalised(self) -> None:
        for name, host in [
            (b"127.0.0.1", "127.0.0.1"),
            (b"2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
            (b"::1", "::1"),
        ]:
            events, _ = feed([GREET_NOAUTH + v5_domain(name, 80)])
            self.assertEqual(events[-1].host, host)

    def test_port_zero(self) -> None:
        for request in [
            v5_ip("192.0.2.1", 0),
            v5_ip("2001:db8::1", 0),
            v5_domain(b"example.com", 0),
        ]:
            data = GREET_NOAUTH + request
            sends = [b"\x05\x00", v5_fail(1)]
            self.assertRejected(data, sends, Reason.BAD_REQUEST)

    def test_reserved_byte_ignored(self) -> None:
        data = GREET_NOAUTH + v5_request(1, b"\xc0\0\x02\x0a", 80, rsv=0xAB)
        events, _ = feed([data])
        self.assertEqual(events[-1], ConnectRequest(5, "192.0.2.10", 80, None, None))

    def test_unknown_version(self) -> None:
        """No protocol to answer in: Rejected alone, without a Send."""
        for data in [b"\x00", b"\x06", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01"]:
            self.assertRejected(data, [], Reason.BAD_REQUEST)

    def test_java_username_without_password_is_no_credentials(self) -> None:
        """
        Java's SOCKS client offers no-auth and username/password, and answers the latter with its user.name
        and an empty password: a username that names no cluster, without a password, is no credentials.
        """
        clusters = {"cluster"}
        java_greeting = b"\x05\x02\x00\x02"
        request = v5_request(1, ipaddress.IPv4Address("10.0.0.1").packed, 80)
        for username, password, expected in [
            (b"root", b"", (None, None)),
            (b"cluster", b"", ("cluster", None)),  # a claim the router checks
            (b"root", b"token", ("root", "token")),
        ]:
            events, _ = feed(
                [java_greeting + userpass(username, password) + request],
                authenticate=lambda u, p: True,
                is_cluster=clusters.__contains__,
            )
            self.assertEqual(events[-1], ConnectRequest(5, "10.0.0.1", 80, *expected), username)
        # without the exemption, the shared listener refused Java outright
        events, _ = feed(
            [java_greeting + userpass(b"root", b"")], authenticate=lambda u, p: False, is_cluster=clusters.__contains__
        )
        self.assertEqual(events[-1], AUTH_OK)


class Socks4ErrorTests(unittest.TestCase):
    """SOCKS4 answers every failure with 0x5B."""

    def assertRejected(self, data: bytes, reason: Reason) -> None:
        for chunks in splittings(data):
            events, server = feed(chunks)
            self.assertEqual(events[:-1], [Send(V4_FAIL)], chunks)
            self.assertEqual(events[-1].reason, reason)
            self.assertTrue(server.done)

    def test_unsupported_commands(self) -> None:
        for cd in [0, 2, 3]:
            self.assertRejected(v4_request("10.0.0.1", 80, cd=cd), Reason.UNSUPPORTED_COMMAND)

    def test_bind_rejected_early(self) -> None:
        events, server = feed([b"\x04\x02"])
        self.assertEqual(events[0], Send(V4_FAIL))
        self.assertTrue(server.done)

    def test_port_zero(self) -> None:
        self.assertRejected(v4_request("10.0.0.1", 0), Reason.BAD_REQUEST)
        self.assertRejected(v4_request("0.0.0.1", 0, domain=b"x.example"), Reason.BAD_REQUEST)

    def test_userid_length(self) -> None:
        events, _ = feed([v4_request("10.0.0.1", 80, b"u" * 255)])
        self.assertEqual(events[-1].username, "u" * 255)
        self.assertRejected(v4_request("10.0.0.1", 80, b"u" * 256), Reason.BAD_REQUEST)

    def test_userid_overflow_detected_without_nul(self) -> None:
        """A user id that never ends is refused once it exceeds 255 bytes."""
        head = v4_request("10.0.0.1", 80)[:8]
        events, server = feed([head + b"u" * 255])
        self.assertEqual(events, [])
        self.assertEqual(server.receive_data(b"u")[0], Send(V4_FAIL))

    def test_userid_invalid_utf8(self) -> None:
        self.assertRejected(v4_request("10.0.0.1", 80, b"\xff"), Reason.BAD_REQUEST)

    def test_userid_forms(self) -> None:
        for userid, username, password in [
            (b"", None, None),
            (b"cluster", "cluster", None),
            (b"cluster:token", "cluster", "token"),
            (b":token", None, None),
            (b"cluster:", "cluster", None),
            (b"a:b:c", "a", "b:c"),
        ]:
            events, _ = feed([v4_request("10.0.0.1", 80, userid)])
            self.assertEqual(events, [ConnectRequest(4, "10.0.0.1", 80, username, password)])

    def test_userid_naming_no_cluster_is_no_credentials(self) -> None:
        """
        socat always sends $USER (or "anonymous"): a user id that names no
        cluster and carries no token lets the destination choose, as with
        no user id.  Anything with a token stays a claim the router checks.
        """
        clusters = {"cluster", "alias"}
        for userid, username, password in [
            (b"anonymous", None, None),
            (b"root", None, None),
            (b"anonymous:", None, None),
            (b"cluster", "cluster", None),
            (b"alias", "alias", None),
            (b"cluster:wrong", "cluster", "wrong"),
            (b"nocluster:token", "nocluster", "token"),
        ]:
            events, _ = feed([v4_request("10.0.0.1", 80, userid)], is_cluster=clusters.__contains__)
            self.assertEqual(events, [ConnectRequest(4, "10.0.0.1", 80, username, password)], userid)

    def test_socks4a_domains(self) -> None:
        events, _ = feed([v4_request("0.0.0.255", 80, domain=LONGEST_NAME.encode())])
        self.assertEqual(events[-1].host, LONGEST_NAME)
        events, _ = feed([v4_request("0.0.0.9", 80, domain=b"10.9.8.7")])
        self.assertEqual(events[-1].host, "10.9.8.7")
        for domain in [b"", b"d" * 256, b"bad name", b"ctl\x01"]:
            self.assertRejected(v4_request("0.0.0.1", 80, domain=domain), Reason.BAD_REQUEST)

    def test_zero_address_is_not_socks4a(self) -> None:
        """0.0.0.0 is a (useless) IPv4 address; only 0.0.0.x, x != 0, means 4a."""
        events, server = feed([v4_request("0.0.0.0", 80) + b"payload\0"])
        self.assertEqual(events, [ConnectRequest(4, "0.0.0.0", 80, None, None)])
        self.assertEqual(server.leftover, b"payload\0")


class LeftoverTests(unittest.TestCase):
    """Payload sent before the reply is kept for the adapter to forward."""

    PAYLOAD = b"GET / HTTP/1.1\r\nHost: web.example\r\n\r\n"

    def test_payload_in_same_segment(self) -> None:
        for _, data, request in NOAUTH_FLOWS + SOCKS4_FLOWS:
            for chunks in splittings(data + self.PAYLOAD):
                events, server = feed(chunks)
                self.assertEqual(events[-1], request)
                self.assertEqual(server.leftover, self.PAYLOAD)

    def test_later_data_accumulates(self) -> None:
        server = pending(GREET_NOAUTH + IPV4_REQUEST + b"one")
        self.assertEqual(server.receive_data(b"two"), [])
        self.assertEqual(server.leftover, b"onetwo")
        server.accept()
        self.assertEqual(server.leftover, b"onetwo")

    def test_reject_discards(self) -> None:
        server = pending(GREET_NOAUTH + IPV4_REQUEST + b"one")
        server.reject(Reason.REFUSED)
        self.assertEqual(server.receive_data(b"two"), [])
        self.assertEqual(server.leftover, b"")


EXPECTED_SOCKS5_CODES = {
    Reason.PROHIBITED: 0x02,
    Reason.NOT_ALLOWED: 0x02,
    Reason.NO_ROUTE: 0x02,
    Reason.AMBIGUOUS: 0x02,
    Reason.AUTH_REQUIRED: 0x02,
    Reason.AUTH_FAILED: 0x02,
    Reason.REFUSED: 0x05,
    Reason.HOST_UNREACHABLE: 0x04,
    Reason.UNAVAILABLE: 0x04,
    Reason.NETWORK_UNREACHABLE: 0x03,
    Reason.TIMEOUT: 0x06,
    Reason.UNSUPPORTED_COMMAND: 0x07,
    Reason.UNSUPPORTED_ADDRESS: 0x08,
    Reason.OVERLOADED: 0x01,
    Reason.BAD_REQUEST: 0x01,
    Reason.GENERAL: 0x01,
}


class ReplyTests(unittest.TestCase):
    """accept() and reject() bytes, and the reply tables."""

    def test_socks5_accept(self) -> None:
        for args, reply in [
            ((), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
            (("192.0.2.7", 8080), b"\x05\x00\x00\x01\xc0\x00\x02\x07\x1f\x90"),
            (
                ("2001:db8::7", 443),
                b"\x05\x00\x00\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x07\x01\xbb",
            ),
        ]:
            server = pending(GREET_NOAUTH + IPV4_REQUEST)
            self.assertEqual(server.accept(*args), reply)

    def test_socks4_accept(self) -> None:
        for args, reply in [
            ((), b"\x00\x5a\x00\x00\x00\x00\x00\x00"),
            (("192.0.2.7", 8080), b"\x00\x5a\x1f\x90\xc0\x00\x02\x07"),
            (("2001:db8::7", 443), b"\x00\x5a\x01\xbb\x00\x00\x00\x00"),
        ]:
            server = pending(v4_request("10.0.0.1", 80))
            self.assertEqual(server.accept(*args), reply)

    def test_socks5_reply_table(self) -> None:
        self.assertEqual(SOCKS5_REPLY, EXPECTED_SOCKS5_CODES)
        self.assertEqual(set(SOCKS5_REPLY), set(Reason))

    def test_socks5_reject_every_reason(self) -> None:
        for reason, code in EXPECTED_SOCKS5_CODES.items():
            server = pending(GREET_NOAUTH + IPV4_REQUEST)
            self.assertEqual(server.reject(reason), v5_fail(code), reason)

    def test_socks4_reject_every_reason(self) -> None:
        for reason in Reason:
            server = pending(v4_request("10.0.0.1", 80))
            self.assertEqual(server.reject(reason), V4_FAIL, reason)

    def test_reply_text(self) -> None:
        self.assertEqual(
            SOCKS5_REPLY_TEXT,
            {
                0: "succeeded",
                1: "general SOCKS server failure",
                2: "connection not allowed by ruleset",
                3: "network unreachable",
                4: "host unreachable",
                5: "connection refused",
                6: "TTL expired",
                7: "command not supported",
                8: "address type not supported",
            },
        )

    def test_reply_only_when_pending(self) -> None:
        fresh = SocksMachine()
        self.assertRaises(RuntimeError, fresh.accept)
        self.assertRaises(RuntimeError, fresh.reject, Reason.GENERAL)
        accepted = pending(GREET_NOAUTH + IPV4_REQUEST)
        accepted.accept()
        self.assertRaises(RuntimeError, accepted.accept)
        self.assertRaises(RuntimeError, accepted.reject, Reason.GENERAL)
        _, failed = feed([b"\x05\x00"])
        self.assertRaises(RuntimeError, failed.accept)

    def test_bad_bound_host_keeps_request_pending(self) -> None:
        server = pending(GREET_NOAUTH + IPV4_REQUEST)
        self.assertRaises(ValueError, server.accept, "not-an-ip")
        self.assertEqual(server.accept(), b"\x05\x00\x00\x01" + bytes(6))

    def test_done(self) -> None:
        server = SocksMachine()
        self.assertFalse(server.done)
        server.receive_data(GREET_NOAUTH + IPV4_REQUEST[:5])
        self.assertFalse(server.done)
        server.receive_data(IPV4_REQUEST[5:])
        self.assertTrue(server.done)
        server.accept()
        self.assertTrue(server.done)


class BufferTests(unittest.TestCase):
    """Memory per unauthenticated connection stays small."""

    def assertBounded(self, data: bytes) -> list[Event]:
        server = SocksMachine()
        events: list[Event] = []
        for i in range(len(data)):
            events += server.receive_data(data[i : i + 1])
            self.assertLessEqual(len(server._buffer), BUFFER_LIMIT)
        return events

    def test_largest_socks5_handshake(self) -> None:
        greeting = b"\x05\xff" + bytes(range(255))
        auth = userpass(b"u" * 255, b"p" * 255)
        request = v5_domain(b"d" * 255, 80)
        events = self.assertBounded(greeting + auth + request)
        self.assertEqual(events[-1].reason, Reason.BAD_REQUEST)  # 255 bytes is no host name
        request = v5_domain(LONGEST_NAME.encode() + b".", 80)
        events = self.assertBounded(greeting + auth + request)
        self.assertEqual(events[-1], ConnectRequest(5, LONGEST_NAME, 80, "u" * 255, "p" * 255))

    def test_largest_socks4a_handshake(self) -> None:
        events = self.assertBounded(v4_request("0.0.0.1", 80, b"u" * 255, b"d" * 255))
        self.assertEqual(events[-1].reason, Reason.BAD_REQUEST)
        events = self.assertBounded(v4_request("0.0.0.1", 80, b"u" * 255, LONGEST_NAME.encode() + b"."))
        self.assertEqual(events[-1], ConnectRequest(4, LONGEST_NAME, 80, "u" * 255, None))

    def test_endless_garbage(self) -> None:
        """A request that never ends is refused, not buffered."""
        events = self.assertBounded(v4_request("0.0.0.1", 80)[:9] + b"x" * 2000)
        self.assertEqual(events[-1].reason, Reason.BAD_REQUEST)


@st.composite
def mutated_handshakes(draw: st.DrawFn) -> bytes:
    """A valid handshake with a few bytes flipped, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(VALID_HANDSHAKES)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "replace", "insert", "delete"]))
        position = draw(st.integers(0, len(data) - 1))
        if operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "replace":
            data[position] = draw(st.integers(0, 255))
        elif operation == "insert":
            data.insert(position, draw(st.integers(0, 255)))
        elif len(data) > 1:
            del data[position]
    return bytes(data)


prefixed_noise = st.sampled_from([b"", b"\x04", b"\x05", b"\x04\x01", GREET_NOAUTH, GREET_USERPASS]).flatmap(
    lambda prefix: st.binary(max_size=700).map(lambda tail: prefix + tail)
)


class PropertyTests(unittest.TestCase):
    """Whatever arrives, the machine never raises and ends cleanly."""

    def assertWellBehaved(self, data: bytes, points: list[int], checked: bool) -> None:
        authenticate = check_credentials if checked else None
        is_cluster = {"cluster"}.__contains__ if checked else None
        whole, reference = feed([data], authenticate, is_cluster)
        server = SocksMachine(authenticate, is_cluster)
        events: list[Event] = []
        for chunk in cut(data, points):
            new = server.receive_data(chunk)
            if events and not isinstance(events[-1], Send):
                self.assertEqual(new, [])  # nothing after the end
            events += new
            self.assertLessEqual(len(server._buffer), BUFFER_LIMIT)
        self.assertEqual(events, whole)
        self.assertEqual(server.leftover, reference.leftover)

        *sends, last = events or [None]
        self.assertTrue(all(isinstance(event, Send) for event in sends), events)
        if isinstance(last, ConnectRequest):
            self.assertTrue(server.done)
            self.assertTrue(data.endswith(server.leftover))
            server.accept()
        elif isinstance(last, Rejected):
            self.assertTrue(server.done)
            self.assertEqual(server.leftover, b"")
            self.assertEqual(server.receive_data(data), [])
        else:
            self.assertFalse(server.done)  # waiting for more input
            self.assertEqual(server.leftover, b"")

    @settings(max_examples=200, deadline=None)
    @given(
        data=st.one_of(st.binary(max_size=700), prefixed_noise),
        points=st.lists(st.integers(0, 1500), max_size=12),
        checked=st.booleans(),
    )
    def test_arbitrary_bytes(self, data: bytes, points: list[int], checked: bool) -> None:
        self.assertWellBehaved(data, points, checked)

    @settings(max_examples=200, deadline=None)
    @given(
        data=mutated_handshakes(),
        points=st.lists(st.integers(0, 600), max_size=12),
        checked=st.booleans(),
    )
    def test_mutated_handshakes(self, data: bytes, points: list[int], checked: bool) -> None:
        self.assertWellBehaved(data, points, checked)
