"""
The control API's answers as plain values: what the listener's early refusal
(L{gateway.control.listener}) and the REST resource (L{gateway.control.http})
both send, so a refused head and a routed request are written the same way.

Every JSON answer is compact with sorted keys and ends with a newline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from dataclasses import dataclass

from twisted.web import http

JSON_TYPE = b"application/json"


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Set):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_bytes(value: object) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)
    return text.encode("ascii") + b"\n"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes | None = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, status: int, value: object, *headers: tuple[bytes, bytes]) -> Response:
        return cls(status, json_bytes(value), JSON_TYPE, headers)

    @classmethod
    def error(cls, status: int, reason: str, field: str | None = None, *headers: tuple[bytes, bytes]) -> Response:
        return cls.json(status, {"error": reason, "field": field}, *headers)


INTERNAL_ERROR = Response.json(http.INTERNAL_SERVER_ERROR, {"error": "internal error"})
