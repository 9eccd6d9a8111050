"""
etcd v3's JSON messages, sans I/O: the requests the store sends to etcd's
HTTP/JSON gateway (C{/v3/kv/range}, C{/v3/kv/txn}, C{/v3/watch}) and what
its answers mean.

The gateway is grpc-gateway over etcd's gRPC API, so the JSON is protobuf's
JSON mapping: keys and values are base64, 64-bit integers are I{strings}
(C{"revision": "42"}), and fields at their default value are left out -- an
event without C{"type"} is a PUT, a txn answer without C{"succeeded"} did
not succeed, a range answer without C{"kvs"} found nothing.  Everything here
reads answers that way and never trusts their shape: a malformed answer is
an L{EtcdProtocolError}, never a C{KeyError} in the caller.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Event",
    "EtcdProtocolError",
    "KeyValue",
    "WatchDecoder",
    "WatchResponse",
    "b64",
    "prefix_end",
    "range_request",
    "revision_of",
    "txn_request",
    "watch_request",
]

#: A watch stream's one message is at most this long: a registry body is a
#: few KiB (a key, known_hosts lines), a response carries a batch of them.
MAX_WATCH_MESSAGE = 16 * 1024 * 1024
_INT64 = re.compile(r"-?[0-9]{1,19}")


class EtcdProtocolError(Exception):
    """An answer from etcd that is not what its API says it sends."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise EtcdProtocolError(f"{what}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdProtocolError(f"{what}: not base64") from None


def _int(value: object, what: str) -> int:
    """
    A protobuf int64 in JSON: a decimal string (or a number), absent meaning
    0.  Only decimal digits: C{int()} alone would also take C{" 7"},
    C{"1_000"} and other scripts' digits.
    """
    if value is None:
        return 0
    if isinstance(value, str) and _INT64.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise EtcdProtocolError(f"{what}: expected an integer")
    return value


def _bool(value: object, what: str) -> bool:
    """A protobuf bool in JSON, absent meaning false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise EtcdProtocolError(f"{what}: expected a boolean")
    return value


def _object(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EtcdProtocolError(f"{what}: expected an object")
    return value


def _list(value: object, what: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise EtcdProtocolError(f"{what}: expected a list")
    return value


def prefix_end(prefix: bytes) -> bytes:
    """
    The C{range_end} that makes a range of every key starting with
    C{prefix}: the prefix with its last byte incremented (trailing 0xff bytes
    dropped first), as etcd's own clients compute it.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def revision_of(answer: Mapping[str, Any], *, required: bool = False) -> int:
    """
    The store revision in an answer's C{header}.  C{required}: etcd's
    revisions start at 1, so an answer of a range or of a write without one
    is no answer of etcd's (and must not read as an empty registry).
    """
    revision = _int(_object(answer.get("header"), "header").get("revision"), "header.revision")
    if required and revision < 1:
        raise EtcdProtocolError("header.revision: expected a revision")
    return revision


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    #: The lease the key is bound to (0: none): it goes when the lease expires.
    lease: int = 0

    @classmethod
    def from_json(cls, data: object) -> KeyValue:
        kv = _object(data, "kv")
        value = kv.get("value")
        return cls(
            key=_unb64(kv.get("key"), "kv.key"),
            value=b"" if value is None else _unb64(value, "kv.value"),
            mod_revision=_int(kv.get("mod_revision"), "kv.mod_revision"),
            lease=_int(kv.get("lease"), "kv.lease"),
        )


def put_request(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return request


def lease_granted(answer: Mapping[str, Any]) -> int:
    """The lease id of a C{/v3/lease/grant} answer."""
    lease = _int(answer.get("ID"), "ID")
    if lease <= 0:
        raise EtcdProtocolError("lease grant: no lease id")
    return lease


def lease_kept(answer: Mapping[str, Any]) -> int:
    """
    The seconds left of a lease a C{/v3/lease/keepalive} renewed; 0 when
    etcd no longer knows it (it expired: its keys are gone).  The answer is
    one message of a stream, as a watch's: C{{"result": {"ID", "TTL"}}}.
    """
    return _int(_object(answer.get("result"), "result").get("TTL"), "TTL")


def range_request(prefix: bytes, *, newest_only: bool = False) -> dict[str, Any]:
    """
    A range over every key under C{prefix}.  C{newest_only}: just the key
    modified last, without values (what a conflicting write waits for).
    """
    request: dict[str, Any] = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
    if newest_only:
        request.update(sort_target="MOD", sort_order="DESCEND", limit="1", keys_only=True)
    return request


def range_kvs(answer: Mapping[str, Any]) -> list[KeyValue]:
    """The key-values of a range answer (C{/v3/kv/range}, or a txn's C{response_range})."""
    return [KeyValue.from_json(kv) for kv in _list(answer.get("kvs"), "kvs")]


def txn_request(prefix: bytes, seen: int, puts: Mapping[bytes, bytes], deletes: Sequence[bytes] = ()) -> dict[str, Any]:
    """
    A write that happens only if nothing under C{prefix} changed after
    revision C{seen} (every key's C{mod_revision} below C{seen + 1}): two
    gateways writing at once cannot both succeed on the same view, so none
    loses the other's update.  When it fails, the answer carries the newest
    key under the prefix, whose revision the loser waits for before trying
    again.
    """
    success: list[dict[str, Any]] = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in puts.items()]
    success += [{"request_delete_range": {"key": b64(k)}} for k in deletes]
    return {
        "compare": [
            {
                "target": "MOD",
                "result": "LESS",
                "key": b64(prefix),
                "range_end": b64(prefix_end(prefix)),
                "mod_revision": str(seen + 1),
            }
        ],
        "success": success,
        "failure": [{"request_range": range_request(prefix, newest_only=True)}],
    }


def txn_outcome(answer: Mapping[str, Any]) -> tuple[bool, int]:
    """
    C{(succeeded, revision)} of a L{txn_request}'s answer: the write's
    revision when it succeeded, else the revision of the newest key under
    the prefix (0 when there is none).
    """
    if _bool(answer.get("succeeded"), "succeeded"):
        return True, revision_of(answer, required=True)
    responses = _list(answer.get("responses"), "responses")
    if not responses:
        return False, 0
    found = range_kvs(_object(_object(responses[0], "responses[0]").get("response_range"), "response_range"))
    return False, max((kv.mod_revision for kv in found), default=0)


def watch_request(prefix: bytes, start_revision: int) -> dict[str, Any]:
    """Watch every key under C{prefix}, from C{start_revision} on (the one after the last seen)."""
    return {
        "create_request": {
            "key": b64(prefix),
            "range_end": b64(prefix_end(prefix)),
            "start_revision": str(start_revision),
        }
    }


@dataclass(frozen=True)
class Event:
    """A change of one key: its new value (C{deleted} False) or its deletion, at C{kv.mod_revision}."""

    deleted: bool
    kv: KeyValue


@dataclass(frozen=True)
class WatchResponse:
    revision: int
    events: tuple[Event, ...] = ()
    created: bool = False
    #: Set when the watch is over: C{compact_revision} non-zero when the
    #: revision asked for was compacted away (re-read everything then).
    canceled: bool = False
    compact_revision: int = 0
    reason: str = ""
    #: Set (with C{canceled}) by the client for a stream it cannot read on (a
    #: message not etcd's, or over L{MAX_WATCH_MESSAGE}): watched again from
    #: the same revision, the same message would come again.
    unreadable: bool = False

    @classmethod
    def from_json(cls, message: object) -> WatchResponse:
        outer = _object(message, "watch message")
        if "error" in outer:
            error = _object(outer["error"], "error")
            message_text = error.get("message")
            return cls(revision=0, canceled=True, reason=str(message_text or "watch error"))
        result = _object(outer.get("result"), "result")
        events = []
        for event in _list(result.get("events"), "events"):
            body = _object(event, "event")
            kind = body.get("type", "PUT")
            if kind not in ("PUT", "DELETE"):
                raise EtcdProtocolError(f"event type {kind!r}")
            events.append(Event(kind == "DELETE", KeyValue.from_json(body.get("kv"))))
        reason = result.get("cancel_reason")
        return cls(
            revision=revision_of(result),
            events=tuple(events),
            created=_bool(result.get("created"), "created"),
            canceled=_bool(result.get("canceled"), "canceled"),
            compact_revision=_int(result.get("compact_revision"), "compact_revision"),
            reason=reason if isinstance(reason, str) else "",
        )


class WatchDecoder:
    """
    Splits a watch stream's bytes into L{WatchResponse}s: grpc-gateway sends
    one JSON object per message, each ended by a newline, in chunks that cut
    anywhere.
    """

    def __init__(self, limit: int = MAX_WATCH_MESSAGE) -> None:
        self._buffer = bytearray()
        self._limit = limit
        #: How much of the buffer holds no newline: a long message arriving in
        #: small chunks is searched once, not again at every chunk.
        self._searched = 0

    def feed(self, data: bytes) -> list[WatchResponse]:
        """The messages C{data} completes; L{EtcdProtocolError} for a bad or huge one."""
        self._buffer += data
        messages = []
        while True:
            end = self._buffer.find(b"\n", self._searched)
            if end < 0:
                self._searched = len(self._buffer)
                break
            self._searched = 0
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(line) > self._limit:  # arrived whole in one chunk
                raise EtcdProtocolError(f"a watch message over {self._limit} bytes")
            if line.strip():
                messages.append(WatchResponse.from_json(_decode(line)))
        if len(self._buffer) > self._limit:
            raise EtcdProtocolError(f"a watch message over {self._limit} bytes")
        return messages


def _decode(data: bytes) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deeply
        raise EtcdProtocolError("not JSON") from None


def decode_answer(data: bytes) -> Mapping[str, Any]:
    """A unary call's answer (range, txn, authenticate) as a JSON object (C{null} is none: not an empty one)."""
    answer = _decode(data)
    if answer is None:
        raise EtcdProtocolError("answer: expected an object")
    return _object(answer, "answer")


def is_error_answer(data: bytes) -> bool:
    """Whether C{data} is an error answer of etcd's own (C{"code"}: a gRPC code), not some other server's page."""
    try:
        answer = decode_answer(data)
    except EtcdProtocolError:
        return False
    code = answer.get("code")
    return type(code) is int and code > 0


def error_message(data: bytes) -> str:
    """The reason of an error answer (C{{"error": ..., "message": ..., "code": N}}), for logs and 503s."""
    try:
        answer = decode_answer(data)
    except EtcdProtocolError:
        return "an answer that is not JSON"
    message = answer.get("message") or answer.get("error")
    return str(message) if message else "an error without a message"
