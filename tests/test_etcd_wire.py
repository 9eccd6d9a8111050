"""
Tests for L{gateway.store.etcd.wire}: the etcd v3 JSON gateway's messages.

The answers below are etcd 3.4.23's own bytes (captured with curl from a
single member on loopback in a namespace of its own), trimmed only where a
test needs a variant: int64s are strings, bytes are base64, and fields at
their default value (a PUT event's C{type}, a failed txn's C{succeeded}, an
empty range's C{kvs}) are left out.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gateway.store.etcd.wire import (
    EtcdProtocolError,
    Event,
    KeyValue,
    WatchDecoder,
    WatchResponse,
    b64,
    decode_answer,
    error_message,
    is_error_answer,
    prefix_end,
    range_kvs,
    range_request,
    revision_of,
    txn_outcome,
    txn_request,
    watch_request,
)

HEADER = '{"cluster_id":"2037210783374497686","member_id":"13195394291058371180","revision":"7","raft_term":"2"}'
KEY_A = b"/gateway/clusters/a"
KEY_B = b"/gateway/clusters/b"
LAST_WRITE = b"/gateway/meta/last-write"

RANGE = (
    '{"header":' + HEADER + ',"kvs":['
    '{"key":"L2dhdGV3YXkvY2x1c3RlcnMvYQ==","create_revision":"2","mod_revision":"2","version":"1",'
    '"value":"eyJ1c2VyIjoicm9vdCJ9"},'
    '{"key":"L2dhdGV3YXkvbWV0YS9sYXN0LXdyaXRl","create_revision":"3","mod_revision":"3","version":"1"}],'
    '"count":"2"}'
)
#: A range that found nothing: no "kvs", no "count".
EMPTY_RANGE = '{"header":' + HEADER + "}"
TXN_WON = (
    '{"header":{"cluster_id":"2037210783374497686","member_id":"13195394291058371180","revision":"4",'
    '"raft_term":"2"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"4"}}},'
    '{"response_delete_range":{"header":{"revision":"4"}}}]}'
)
#: A compare that failed: no "succeeded"; the failure op's range (newest key only, keys_only).
TXN_LOST = (
    '{"header":' + HEADER + ',"responses":[{"response_range":{"header":{"revision":"7"},'
    '"kvs":[{"key":"L2dhdGV3YXkvY2x1c3RlcnMvYg==","create_revision":"4","mod_revision":"6","version":"1"}],'
    '"more":true,"count":"3"}}]}'
)
WATCH_CREATED = '{"result":{"header":' + HEADER + ',"created":true}}'
WATCH_EVENTS = (
    '{"result":{"header":' + HEADER + ',"events":['
    '{"kv":{"key":"L2dhdGV3YXkvY2x1c3RlcnMvYQ==","create_revision":"2","mod_revision":"2","version":"1",'
    '"value":"eyJ1c2VyIjoicm9vdCJ9"}},'
    '{"kv":{"key":"L2dhdGV3YXkvbWV0YS9sYXN0LXdyaXRl","create_revision":"3","mod_revision":"3","version":"1"}},'
    '{"type":"DELETE","kv":{"key":"L2dhdGV3YXkvY2x1c3RlcnMvYg==","mod_revision":"7"}}]}}'
)
#: A start_revision below the compacted one: no revision in this header.
WATCH_COMPACTED = (
    '{"result":{"header":{"cluster_id":"2037210783374497686","member_id":"13195394291058371180",'
    '"raft_term":"2"},"canceled":true,"compact_revision":"5"}}'
)
#: A watch refused for its token: 200, and this (test_etcdlab.AuthTests).
WATCH_UNAUTHENTICATED = (
    '{"result":{"header":' + HEADER + ',"watch_id":"-1","created":true,"canceled":true,'
    '"cancel_reason":"rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"}}'
)
#: grpc-gateway's error in a stream (a member that lost its quorum, with the hasleader header).
WATCH_NO_LEADER = (
    '{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}'
)
#: The error answer of a unary call.
BAD_BASE64 = '{"error":"illegal base64 data at input byte 0","message":"illegal base64 data at input byte 0","code":3}'
STREAM = "\n".join((WATCH_CREATED, WATCH_EVENTS, WATCH_COMPACTED)).encode() + b"\n"


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def kv_json(**fields: Any) -> dict[str, Any]:
    """A kv as etcd sends it, with C{fields} replaced (None: left out)."""
    kv: dict[str, Any] = {"key": b64(KEY_A), "create_revision": "2", "mod_revision": "9", "value": b64(b"v")}
    kv.update(fields)
    return {k: v for k, v in kv.items() if v is not None}


class PrefixEndTests(SynchronousTestCase):
    def test_last_byte_incremented(self) -> None:
        self.assertEqual(prefix_end(b"/gateway/"), b"/gateway0")
        self.assertEqual(prefix_end(b"a"), b"b")
        self.assertEqual(prefix_end(b"\x00"), b"\x01")
        self.assertEqual(prefix_end(b"a\xfe"), b"a\xff")

    def test_trailing_ff_dropped(self) -> None:
        """As clientv3's GetPrefixRangeEnd: 0xff cannot be incremented, the byte before it is."""
        self.assertEqual(prefix_end(b"a\xff"), b"b")
        self.assertEqual(prefix_end(b"a\xff\xff"), b"b")
        self.assertEqual(prefix_end(b"/g\xfe\xff"), b"/g\xff")

    def test_every_key(self) -> None:
        """Nothing to increment: "\\0", which etcd reads as "every key from the start key on"."""
        self.assertEqual(prefix_end(b""), b"\0")
        self.assertEqual(prefix_end(b"\xff"), b"\0")
        self.assertEqual(prefix_end(b"\xff\xff\xff"), b"\0")

    @settings(max_examples=300, deadline=None)
    @given(prefix=st.binary(min_size=1, max_size=8), suffix=st.binary(max_size=8))
    def test_bounds_the_prefix(self, prefix: bytes, suffix: bytes) -> None:
        """Every key starting with the prefix is in [prefix, end); a key above the prefix's range is not."""
        end = prefix_end(prefix)
        if end == b"\0":
            return  # all 0xff: every key from prefix on
        self.assertTrue(prefix <= prefix + suffix < end)
        self.assertFalse(end.startswith(prefix))


class KeyValueTests(SynchronousTestCase):
    def test_from_range(self) -> None:
        kvs = range_kvs(json.loads(RANGE))
        self.assertEqual(
            kvs,
            [KeyValue(KEY_A, b'{"user":"root"}', 2), KeyValue(LAST_WRITE, b"", 3)],
        )

    def test_absent_fields(self) -> None:
        """An empty value and a zero revision are left out by etcd: they read as b"" and 0."""
        self.assertEqual(KeyValue.from_json(kv_json(value=None, mod_revision=None)), KeyValue(KEY_A, b"", 0))
        self.assertEqual(KeyValue.from_json(kv_json(value="")).value, b"")

    def test_int64_forms(self) -> None:
        """int64s come as strings; a number is read too (etcdctl -w json prints them so)."""
        self.assertEqual(KeyValue.from_json(kv_json(mod_revision="9223372036854775807")).mod_revision, 2**63 - 1)
        self.assertEqual(KeyValue.from_json(kv_json(mod_revision=42)).mod_revision, 42)

    def test_malformed(self) -> None:
        """Every malformed kv is an EtcdProtocolError naming the field (never KeyError, TypeError, binascii.Error)."""
        cases: list[tuple[object, str]] = [
            (None, "kv.key"),
            ([], "kv"),
            ("kv", "kv"),
            (kv_json(key=None), "kv.key"),
            (kv_json(key=7), "kv.key"),
            (kv_json(key="L2dhd"), "kv.key"),  # truncated: bad padding
            (kv_json(key="L2dh d2F5"), "kv.key"),  # whitespace
            (kv_json(key="L2dh-_"), "kv.key"),  # the URL-safe alphabet is not what etcd sends
            (kv_json(key="é"), "kv.key"),
            (kv_json(value=["dg=="]), "kv.value"),
            (kv_json(value="!!"), "kv.value"),
            (kv_json(mod_revision="seven"), "kv.mod_revision"),
            (kv_json(mod_revision=""), "kv.mod_revision"),
            (kv_json(mod_revision=1.5), "kv.mod_revision"),
            (kv_json(mod_revision=True), "kv.mod_revision"),
            (kv_json(mod_revision={}), "kv.mod_revision"),
            (kv_json(mod_revision="1_000"), "kv.mod_revision"),  # int() would take these
            (kv_json(mod_revision=" 9"), "kv.mod_revision"),
            (kv_json(mod_revision="٩"), "kv.mod_revision"),
            (kv_json(mod_revision=str(2**63)), "kv.mod_revision"),  # over int64
            (kv_json(mod_revision=2**63), "kv.mod_revision"),
        ]
        for data, field in cases:
            e = self.assertRaises(EtcdProtocolError, KeyValue.from_json, data)
            self.assertTrue(str(e).startswith(field + ":"), (data, str(e)))

    def test_range_kvs_malformed(self) -> None:
        self.assertEqual(range_kvs(json.loads(EMPTY_RANGE)), [])
        self.assertRaises(EtcdProtocolError, range_kvs, {"kvs": {"key": "YQ=="}})
        self.assertRaises(EtcdProtocolError, range_kvs, {"kvs": [7]})

    def test_revision_of(self) -> None:
        self.assertEqual(revision_of(json.loads(RANGE)), 7)
        self.assertEqual(revision_of({}), 0)
        self.assertRaises(EtcdProtocolError, revision_of, {"header": "7"})
        self.assertRaises(EtcdProtocolError, revision_of, {"header": {"revision": [7]}})


class RequestTests(SynchronousTestCase):
    def test_range(self) -> None:
        self.assertEqual(range_request(b"/gateway/"), {"key": "L2dhdGV3YXkv", "range_end": "L2dhdGV3YXkw"})

    def test_range_newest_only(self) -> None:
        """The newest key by mod revision, without values: int64 limit as a string, as protobuf's JSON has it."""
        self.assertEqual(
            range_request(b"/gateway/", newest_only=True),
            {
                "key": "L2dhdGV3YXkv",
                "range_end": "L2dhdGV3YXkw",
                "sort_target": "MOD",
                "sort_order": "DESCEND",
                "limit": "1",
                "keys_only": True,
            },
        )

    def test_txn(self) -> None:
        """
        The compare covers the whole prefix (range_end) and holds while
        every key's mod_revision is below seen + 1; a failure reads the
        newest key.
        """
        request = txn_request(b"/gateway/", 41, {KEY_A: b"body", LAST_WRITE: b"m"}, [KEY_B])
        self.assertEqual(
            request["compare"],
            [
                {
                    "target": "MOD",
                    "result": "LESS",
                    "key": b64(b"/gateway/"),
                    "range_end": b64(b"/gateway0"),
                    "mod_revision": "42",
                }
            ],
        )
        self.assertEqual(
            request["success"],
            [
                {"request_put": {"key": b64(KEY_A), "value": b64(b"body")}},
                {"request_put": {"key": b64(LAST_WRITE), "value": b64(b"m")}},
                {"request_delete_range": {"key": b64(KEY_B)}},
            ],
        )
        self.assertEqual(request["failure"], [{"request_range": range_request(b"/gateway/", newest_only=True)}])
        json.dumps(request)  # JSON as it stands: no bytes left in it

    def test_txn_from_nothing(self) -> None:
        """Revision 0 (an empty prefix seen): mod_revision < 1 holds only for keys that do not exist."""
        self.assertEqual(txn_request(b"/g/", 0, {b"/g/a": b""})["compare"][0]["mod_revision"], "1")
        self.assertEqual(txn_request(b"/g/", 0, {b"/g/a": b""})["success"][0]["request_put"]["value"], "")

    def test_watch(self) -> None:
        self.assertEqual(
            watch_request(b"/gateway/", 8),
            {"create_request": {"key": "L2dhdGV3YXkv", "range_end": "L2dhdGV3YXkw", "start_revision": "8"}},
        )


class TxnOutcomeTests(SynchronousTestCase):
    def test_succeeded(self) -> None:
        """The write's revision: the header's."""
        self.assertEqual(txn_outcome(json.loads(TXN_WON)), (True, 4))

    def test_failed(self) -> None:
        """No "succeeded": the newest mod_revision in the failure's range."""
        self.assertEqual(txn_outcome(json.loads(TXN_LOST)), (False, 6))

    def test_failed_several_kvs(self) -> None:
        answer = {
            "responses": [
                {"response_range": {"kvs": [kv_json(mod_revision="5"), kv_json(mod_revision="11"), kv_json()]}}
            ]
        }
        self.assertEqual(txn_outcome(answer), (False, 11))

    def test_failed_empty(self) -> None:
        """A failure without kvs (or without responses at all) waits for nothing: revision 0."""
        for answer in (
            {"header": {"revision": "9"}},
            {"header": {"revision": "9"}, "succeeded": False, "responses": []},
            {"responses": [{"response_range": {"header": {"revision": "9"}}}]},
            {"responses": [{}]},
        ):
            self.assertEqual(txn_outcome(answer), (False, 0), answer)

    def test_malformed(self) -> None:
        for answer in (
            {"responses": {"response_range": {}}},
            {"responses": ["range"]},
            {"responses": [{"response_range": []}]},
            {"responses": [{"response_range": {"kvs": [{"key": 1}]}}]},
            {"succeeded": True, "header": {"revision": "four"}},
            {"succeeded": True, "header": []},
            # A write has a revision (etcd's start at 1): one without is no answer of etcd's.
            {"succeeded": True},
            {"succeeded": True, "header": {"revision": "0"}},
            # A "succeeded" that is no boolean is not read as a lost race.
            {"succeeded": "true", "header": {"revision": "4"}},
            {"succeeded": 1, "header": {"revision": "4"}},
        ):
            self.assertRaises(EtcdProtocolError, txn_outcome, answer)


def watch(text: str) -> WatchResponse:
    return WatchResponse.from_json(json.loads(text))


def feed(decoder: WatchDecoder, chunks: list[bytes]) -> list[WatchResponse]:
    """Every message the chunks complete, in turn."""
    return [message for chunk in chunks for message in decoder.feed(chunk)]


class WatchResponseTests(SynchronousTestCase):
    def test_created(self) -> None:
        self.assertEqual(watch(WATCH_CREATED), WatchResponse(revision=7, created=True))

    def test_events(self) -> None:
        """A PUT has no "type" (its zero value); a DELETE's kv has only key and mod_revision."""
        self.assertEqual(
            watch(WATCH_EVENTS),
            WatchResponse(
                revision=7,
                events=(
                    Event(False, KeyValue(KEY_A, b'{"user":"root"}', 2)),
                    Event(False, KeyValue(LAST_WRITE, b"", 3)),
                    Event(True, KeyValue(KEY_B, b"", 7)),
                ),
            ),
        )

    def test_explicit_put(self) -> None:
        message = {"result": {"events": [{"type": "PUT", "kv": kv_json()}]}}
        self.assertEqual(WatchResponse.from_json(message).events, (Event(False, KeyValue(KEY_A, b"v", 9)),))

    def test_compacted(self) -> None:
        """Canceled with the compacted revision: the header has no revision then."""
        self.assertEqual(watch(WATCH_COMPACTED), WatchResponse(revision=0, canceled=True, compact_revision=5))

    def test_canceled_with_reason(self) -> None:
        response = watch(WATCH_UNAUTHENTICATED)
        self.assertEqual((response.created, response.canceled, response.compact_revision), (True, True, 0))
        self.assertIn("invalid auth token", response.reason)

    def test_error(self) -> None:
        """A stream's error message ends the watch with etcd's reason."""
        expected = WatchResponse(revision=0, canceled=True, reason="etcdserver: no leader")
        self.assertEqual(watch(WATCH_NO_LEADER), expected)
        self.assertEqual(WatchResponse.from_json({"error": {}}).reason, "watch error")
        self.assertEqual(WatchResponse.from_json({"error": {"message": ""}}).reason, "watch error")

    def test_empty_result(self) -> None:
        self.assertEqual(WatchResponse.from_json({"result": {}}), WatchResponse(revision=0))
        self.assertEqual(WatchResponse.from_json({}), WatchResponse(revision=0))

    def test_malformed(self) -> None:
        """Every malformed message is an EtcdProtocolError."""
        event = {"kv": kv_json()}
        for message in (
            [],
            "result",
            {"error": "no leader"},
            {"result": []},
            {"result": {"events": {}}},
            {"result": {"events": ["PUT"]}},
            {"result": {"events": [{"type": "EXPIRE", "kv": kv_json()}]}},
            {"result": {"events": [{"type": 1, "kv": kv_json()}]}},
            {"result": {"events": [{"type": "DELETE"}]}},  # no kv: no key
            {"result": {"events": [event, {"kv": kv_json(key="!")}]}},
            {"result": {"header": {"revision": "x"}, "events": [event]}},
            {"result": {"canceled": True, "compact_revision": "five"}},
            {"result": {"canceled": "true"}},
            {"result": {"created": 1}},
        ):
            self.assertRaises(EtcdProtocolError, WatchResponse.from_json, message)


class WatchDecoderTests(SynchronousTestCase):
    EXPECTED = [watch(WATCH_CREATED), watch(WATCH_EVENTS), watch(WATCH_COMPACTED)]

    def test_one_chunk(self) -> None:
        self.assertEqual(WatchDecoder().feed(STREAM), self.EXPECTED)

    def test_every_offset(self) -> None:
        """Cut in two at every byte offset: the same messages, each once, as soon as its newline is in."""
        for cut in range(len(STREAM) + 1):
            decoder = WatchDecoder()
            first = decoder.feed(STREAM[:cut])
            self.assertEqual(first, self.EXPECTED[: STREAM[:cut].count(b"\n")], cut)
            self.assertEqual(first + decoder.feed(STREAM[cut:]), self.EXPECTED, cut)

    def test_byte_by_byte(self) -> None:
        chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
        self.assertEqual(feed(WatchDecoder(), chunks), self.EXPECTED)

    @settings(max_examples=300, deadline=None)
    @given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
    def test_any_chunks(self, cuts: list[int]) -> None:
        bounds = [0, *sorted(cuts), len(STREAM)]
        chunks = [STREAM[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
        self.assertEqual(feed(WatchDecoder(), chunks), self.EXPECTED)

    def test_blank_lines(self) -> None:
        """Blank lines (and CRLF line ends) between messages are no messages."""
        stream = b"\n\r\n  \n" + WATCH_CREATED.encode() + b"\r\n\n" + WATCH_EVENTS.encode() + b"\n\n"
        self.assertEqual(WatchDecoder().feed(stream), self.EXPECTED[:2])
        self.assertEqual(WatchDecoder().feed(b"\n\n\n"), [])

    def test_incomplete(self) -> None:
        """A message without its newline waits for it."""
        decoder = WatchDecoder()
        self.assertEqual(decoder.feed(WATCH_CREATED.encode()), [])
        self.assertEqual(decoder.feed(b"\n"), self.EXPECTED[:1])

    def test_over_limit(self) -> None:
        """A message over the limit is refused however it arrives: cut anywhere, or whole in one chunk."""
        stream = WATCH_EVENTS.encode() + b"\n"
        limit = len(stream) - 2
        for cut in (0, 1, limit, limit + 1, len(stream)):
            chunks = [stream[:cut], stream[cut:]]
            e = self.assertRaises(EtcdProtocolError, feed, WatchDecoder(limit=limit), chunks)
            self.assertEqual(str(e), f"a watch message over {limit} bytes")

    def test_a_long_message_in_small_chunks_is_searched_once(self) -> None:
        """
        4 MiB in 64-byte chunks (a member that streams without newlines, or
        a big catch-up cut small): searched again from its start at every
        chunk, it took seconds of the reactor's time; now well under one.
        """
        decoder = WatchDecoder(limit=4 * 1024 * 1024)
        chunk = b" " * 64
        started = time.process_time()
        for _ in range(4 * 1024 * 1024 // 64 - 1):
            decoder.feed(chunk)
        self.assertEqual(decoder.feed(b"\n"), [])
        self.assertLess(time.process_time() - started, 0.5)

    def test_at_limit(self) -> None:
        line = WATCH_EVENTS.encode()
        decoder = WatchDecoder(limit=len(line))
        self.assertEqual(decoder.feed(line), [])
        self.assertEqual(decoder.feed(b"\n"), self.EXPECTED[1:2])

    def test_not_json(self) -> None:
        for line in (b"{", b"<html>503</html>", b"\xff\xfe{}", b"NaN-ish", b"[" * 100_000, b"{}}"):
            e = self.assertRaises(EtcdProtocolError, WatchDecoder().feed, line + b"\n")
            self.assertEqual(str(e), "not JSON")

    def test_not_an_object(self) -> None:
        for line in (b"[]", b"7", b'"result"'):
            self.assertRaises(EtcdProtocolError, WatchDecoder().feed, line + b"\n")


class AnswerTests(SynchronousTestCase):
    def test_decode_answer(self) -> None:
        self.assertEqual(revision_of(decode_answer(RANGE.encode())), 7)
        for data in (b"", b"[]", b"null", b"{" * 50_000, b"\x80"):
            self.assertRaises(EtcdProtocolError, decode_answer, data)

    def test_error_message(self) -> None:
        self.assertEqual(error_message(BAD_BASE64.encode()), "illegal base64 data at input byte 0")
        self.assertEqual(error_message(b'{"error":"etcdserver: no leader","code":14}'), "etcdserver: no leader")
        self.assertEqual(error_message(b'{"message":"permission denied"}'), "permission denied")
        self.assertEqual(error_message(b'{"code":2}'), "an error without a message")
        self.assertEqual(error_message(b'{"message":""}'), "an error without a message")
        for data in (b"<html>502 Bad Gateway</html>", b"", b"[1]", b"[" * 100_000):
            self.assertEqual(error_message(data), "an answer that is not JSON")

    def test_is_error_answer(self) -> None:
        """etcd's own errors carry a gRPC code; another server's page (a proxy's, a 404) does not."""
        self.assertTrue(is_error_answer(BAD_BASE64.encode()))
        self.assertTrue(is_error_answer(b'{"error":"etcdserver: permission denied","code":7}'))
        for data in (b"<html>502 Bad Gateway</html>", b"404 page not found\n", b"{}", b'{"code":"7"}', b'{"code":0}'):
            self.assertFalse(is_error_answer(data), data)

    def test_a_revision_is_required_of_ranges_and_writes(self) -> None:
        self.assertEqual(revision_of({}), 0)  # a compacted watch's cancel message has none
        for answer in ({}, {"header": {}}, {"header": {"revision": "0"}}):
            self.assertRaises(EtcdProtocolError, revision_of, answer, required=True)
