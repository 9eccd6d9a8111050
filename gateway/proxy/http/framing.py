"""
HTTP/1.x message framing, sans-IO: lines, header fields, heads and bodies.

The pieces L{gateway.proxy.http.machine}'s parsers are built from.  Each
reads from a C{bytearray} buffer, consumes what is complete and says whether
it is done, so any split of the input decides alike; a limit check on a
partial line predicts exactly what the complete line will give.  Limits,
counting line endings: start line 8 KiB, header or trailer section 64 KiB and
100 fields, at most 4 empty lines before a start line (RFC 9112 2.2 asks to
skip "at least one"; a stream of nothing but CRLF must not cost a parse step
per two bytes for ever), a chunk size of at most 15 hex digits (below 2^60
bytes: a bigger one overflows the 64-bit counters of parsers further on, which
would then disagree with us on where the chunk ends).

Framing fields are validated exactly as forwarded, never after a looser
clean-up: only spaces and tabs are optional whitespace (C{str.strip} would also
eat C{\\xa0} and C{\\x85}, and the raw value would go on).  Content-Length
is one field with one decimal value (a list such as C{3, 3}, which RFC 9110 8.6
lets a recipient reject, is refused); a transfer coding is a token, and
chunked is applied at most once.  Trailer fields are forwarded except the
ones a trailer must not carry or a proxy must not pass on: hop-by-hop and
proxy-credential fields, the fields the message's Connection names, and
framing and routing fields (Content-Length, Transfer-Encoding, Host).

Choices the RFCs leave open:

  - Transfer-Encoding with Content-Length is refused (400, or an upstream
    error) rather than "chunked wins": the RFC would force a close anyway, and
    refusing cannot turn into request smuggling.  Transfer-Encoding in an
    HTTP/1.0 request is refused too (RFC 9112 6.1).
  - Bare LF ends head lines (RFC 9112 2.2) but not chunked framing lines: those
    are forwarded raw, and a stricter upstream must see the same boundaries.
  - Obsolete line folding is refused (RFC 9112 5.2).
  - A Connection option cannot remove Host, Content-Length or
    Transfer-Encoding: that would desynchronise framing with the upstream.
"""

from __future__ import annotations

import enum
import functools
import re

from gateway.errors import shown

MAX_START_LINE = 8 * 1024
MAX_HEADER_SECTION = 64 * 1024
MAX_FIELDS = 100
MAX_EMPTY_LINES = 4
MAX_CHUNK_SIZE_DIGITS = 15
_START_LINE_TOO_LONG = (414, f"start line longer than {MAX_START_LINE} bytes")
_SECTION_TOO_LONG = (431, f"header section longer than {MAX_HEADER_SECTION} bytes")

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate"}
    | {"te", "trailer", "upgrade"}
)
#: Headers that a Connection option must not remove: framing depends on them.
_PROTECTED = frozenset({"host", "content-length", "transfer-encoding"})

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: The bytes a request's first line can begin with: a method's (a token), or an empty line's.
_REQUEST_START = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
_MALFORMED_REQUEST_LINE = "malformed request line"
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_FIELD_NAME = re.compile(_TOKEN)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,%d})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?" % MAX_CHUNK_SIZE_DIGITS)
_LENGTH = re.compile(r"[0-9]{1,18}")
_CODING = re.compile(_TOKEN.decode())
#: An Upgrade value: protocol[/version] items (RFC 9110 7.8), comma-separated.
_UPGRADE = re.compile(r"{0}(?:/{0})?(?:[ \t]*,[ \t]*{0}(?:/{0})?)*".format(_TOKEN.decode()))

Headers = tuple[tuple[str, str], ...]


class _Malformed(Exception):
    """Internal: the input breaks the protocol; becomes an error event."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


# -- lines, fields and heads -------------------------------------------------


def _take_line(buffer: bytearray, limit: int, too_long: tuple[int, str], *, strict: bool = False) -> bytes | None:
    """
    Remove one line from the front of C{buffer} and return it without its
    ending, or C{None} if it is incomplete.  C{limit} counts the ending too, so
    an incomplete line that already reaches it is an error right away.
    """
    end = buffer.find(b"\n", 0, limit)
    if end < 0:
        if len(buffer) >= limit:
            raise _Malformed(*too_long)
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    if line.endswith(b"\r"):
        return line[:-1]
    if strict:
        raise _Malformed(400, "chunked framing line not ended by CRLF")
    return line


#: A well-formed field line in one match (name, value without its surrounding
#: blanks): the common case costs one regex; anything else is checked
#: piece by piece below, for its error.  The leading blanks are possessive
#: (C{*+}): else a line of blanks that fails at its end is retried at every
#: split of them between those blanks and the value, quadratic in its length.
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*+((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*")


def _parse_field(line: bytes) -> tuple[str, str]:
    match = _FIELD_LINE.fullmatch(line)
    if match is not None:
        return match[1].decode("ascii"), match[2].decode("latin-1")
    if line[:1] in (b" ", b"\t"):
        raise _Malformed(400, "obsolete line folding in header section")
    name, colon, value = line.partition(b":")
    value = value.strip(b" \t")
    if not colon:  # the line is not echoed: it may hold a credential
        raise _Malformed(400, "header line without a colon")
    if not _FIELD_NAME.fullmatch(name):
        raise _Malformed(400, f"invalid header name {shown(name)}")
    if not _FIELD_VALUE.fullmatch(value):
        raise _Malformed(400, f"control character in header {name.decode('ascii')}")
    return name.decode("ascii"), value.decode("latin-1")


class _FieldSection:
    """Field lines up to an empty line (headers or trailers), within the limits."""

    def __init__(self, *, strict: bool, dropped: frozenset[str] = frozenset()) -> None:
        self.fields: list[tuple[str, str]] = []
        self._strict = strict
        self._dropped = dropped
        self._size = 0

    def read(self, buffer: bytearray, out: bytearray | None = None) -> bool:
        """
        Consume complete lines; C{True} once the empty line was read.  Trailers
        pass C{out}: their lines are strict, so each one whose field is not
        C{dropped} is forwarded as line+CRLF, and so is the empty line.
        """
        while True:
            before = len(buffer)
            line = _take_line(buffer, MAX_HEADER_SECTION - self._size, _SECTION_TOO_LONG, strict=self._strict)
            if line is None:
                return False
            self._size += before - len(buffer)
            if line:
                if len(self.fields) == MAX_FIELDS:
                    raise _Malformed(431, f"more than {MAX_FIELDS} header fields")
                self.fields.append(_parse_field(line))
            if out is not None and (not line or self.fields[-1][0].lower() not in self._dropped):
                out += line + b"\r\n"
            if not line:
                return True


class _HeadReader:
    """A start line (after a few stray empty lines, RFC 9112 2.2) and its header section."""

    def __init__(self, start_bytes: frozenset[int] | None = None) -> None:
        self._start_line: bytes | None = None
        self._fields = _FieldSection(strict=False)
        self._empty_lines = 0
        self._start_bytes = start_bytes

    def read(self, buffer: bytearray) -> tuple[bytes, Headers] | None:
        while self._start_line is None:
            if self._start_bytes is not None and buffer and buffer[0] not in self._start_bytes:
                # No start line can begin so (a SOCKS greeting, TLS sent to a
                # plain listener): say so now, not when a line end comes --
                # such a client waits for our answer, not the other way round.
                # Checked before anything else, so any split decides alike.
                raise _Malformed(400, _MALFORMED_REQUEST_LINE)
            line = _take_line(buffer, MAX_START_LINE, _START_LINE_TOO_LONG)
            if line is None:
                return None
            if line:
                self._start_line = line
            elif self._empty_lines == MAX_EMPTY_LINES:
                raise _Malformed(400, f"more than {MAX_EMPTY_LINES} empty lines before the start line")
            else:
                self._empty_lines += 1
        if not self._fields.read(buffer):
            return None
        return self._start_line, tuple(self._fields.fields)


@functools.lru_cache(maxsize=64)
def _by_name(headers: Headers) -> dict[str, tuple[str, ...]]:
    """The values of C{headers} by lower-case field name, in order: built once per head (asked ~11 times)."""
    index: dict[str, list[str]] = {}
    for field, value in headers:
        index.setdefault(field.lower(), []).append(value)
    return {name: tuple(values) for name, values in index.items()}


def _values(headers: Headers, name: str) -> tuple[str, ...]:
    return _by_name(headers).get(name, ())


def _single(headers: Headers, name: str) -> str | None:
    """The value of a header that must not be repeated (ambiguity invites smuggling)."""
    values = _values(headers, name)
    if len(values) > 1:
        raise _Malformed(400, f"repeated {name} header")
    return values[0] if values else None


def _items(headers: Headers, name: str) -> list[str]:
    """
    The elements of a comma-separated list header, in order, without empty
    ones.  Only spaces and tabs are whitespace here (RFC 9110 5.6.1):
    C{str.strip()} would also remove C{\\xa0} and C{\\x85}, which an
    upstream reading the raw value would not.
    """
    return [item.strip(" \t") for value in _values(headers, name) for item in value.split(",") if item.strip(" \t")]


def _tokens(headers: Headers, name: str) -> list[str]:
    """The lower-cased elements of a comma-separated list header, in order."""
    return [item.lower() for item in _items(headers, name)]


def _end_to_end(headers: Headers) -> list[tuple[str, str]]:
    dropped = _HOP_BY_HOP | (set(_tokens(headers, "connection")) - _PROTECTED)
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def _upgrade_lines(upgrade: str) -> list[str]:
    return [f"Upgrade: {upgrade}", "Connection: Upgrade"]


def _upgrade(headers: Headers) -> str | None:
    """The Upgrade value (its fields joined), checked, or C{None} if there is none."""
    values = _values(headers, "upgrade")
    if not values:
        return None
    value = ", ".join(values)
    if not _UPGRADE.fullmatch(value):
        raise _Malformed(400, f"malformed Upgrade header {shown(value)}")
    return value


def _persistent(version: str, options: set[str]) -> bool:
    """RFC 9112 9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive"."""
    return "close" not in options and (version == "HTTP/1.1" or "keep-alive" in options)


def _head_bytes(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- bodies -------------------------------------------------------------------


class _Fixed:
    """A Content-Length body (length 0 for messages without a body)."""

    def __init__(self, length: int) -> None:
        self._remaining = length

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def read(self, buffer: bytearray, out: bytearray) -> None:
        size = min(self._remaining, len(buffer))
        out += buffer[:size]
        del buffer[:size]
        self._remaining -= size


class _UntilClose:
    """A body that runs until the upstream closes (RFC 9112 6.3, rule 8)."""

    done = False

    def read(self, buffer: bytearray, out: bytearray) -> None:
        out += buffer
        buffer.clear()


class _ChunkState(enum.Enum):
    SIZE = "size"  # expecting a chunk-size line
    DATA = "data"  # inside chunk data
    DATA_END = "data-end"  # expecting the CRLF after chunk data
    TRAILERS = "trailers"  # after the last chunk: trailer fields up to an empty line


class _Chunked:
    """
    Chunked framing (RFC 9112 7.1), checked as it passes and forwarded
    unchanged, but for the C{dropped} trailer fields.
    """

    def __init__(self, dropped: frozenset[str]) -> None:
        self._state = _ChunkState.SIZE
        self._remaining = 0
        self._trailers = _FieldSection(strict=True, dropped=dropped)
        self.done = False

    def read(self, buffer: bytearray, out: bytearray) -> None:
        """Consume framing and data; only bytes found valid go to C{out}."""
        while not self.done:
            if self._state is _ChunkState.SIZE:
                line = _take_line(buffer, MAX_START_LINE, (400, "chunk size line too long"), strict=True)
                if line is None:
                    return
                match = _CHUNK_LINE.fullmatch(line)
                if not match:
                    raise _Malformed(400, "malformed chunk size line")
                out += line + b"\r\n"
                self._remaining = int(match[1], 16)
                self._state = _ChunkState.DATA if self._remaining else _ChunkState.TRAILERS
            elif self._state is _ChunkState.DATA:
                if not buffer:
                    return
                size = min(self._remaining, len(buffer))
                out += buffer[:size]
                del buffer[:size]
                self._remaining -= size
                if not self._remaining:
                    self._state = _ChunkState.DATA_END
            elif self._state is _ChunkState.DATA_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise _Malformed(400, "chunk data not followed by CRLF")
                out += b"\r\n"
                del buffer[:2]
                self._state = _ChunkState.SIZE
            elif not self._trailers.read(buffer, out):
                return
            else:
                self.done = True


def _content_length(headers: Headers) -> int | None:
    """
    One field, one decimal value: a repeated field or a list (even of
    identical lengths, which RFC 9110 8.6 lets a recipient reject) is
    refused, since the value goes on as it came and must be the one checked.
    """
    value = _single(headers, "content-length")
    if value is None:
        return None
    if not _LENGTH.fullmatch(value):
        raise _Malformed(400, f"invalid Content-Length {shown(value)}")
    return int(value)


def _trailers_dropped(headers: Headers) -> frozenset[str]:
    """The trailer fields not forwarded (see the module docstring)."""
    return _HOP_BY_HOP | _PROTECTED | set(_tokens(headers, "connection"))


def _message_body(headers: Headers, version: str, *, request: bool) -> _Fixed | _Chunked | _UntilClose:
    """How the body is delimited (RFC 9112 6.3), for messages that may have one."""
    length = _content_length(headers)
    if not _values(headers, "transfer-encoding"):
        if length is not None:
            return _Fixed(length)
        return _Fixed(0) if request else _UntilClose()
    if length is not None:
        raise _Malformed(400, "both Transfer-Encoding and Content-Length: ambiguous framing")
    codings = _tokens(headers, "transfer-encoding")
    for coding in codings:
        if not _CODING.fullmatch(coding):
            raise _Malformed(400, f"invalid transfer coding {shown(coding)}")
    if codings.count("chunked") > 1:
        raise _Malformed(400, "chunked applied more than once")
    if version == "HTTP/1.1" and codings[-1:] == ["chunked"]:
        return _Chunked(_trailers_dropped(headers))
    if request:
        raise _Malformed(400, "a request body needs HTTP/1.1 and chunked as the final transfer coding")
    return _UntilClose()
