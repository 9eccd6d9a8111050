"""
A sans-IO SOCKS server handshake: bytes in, events out.

L{SocksMachine} knows nothing of sockets or Twisted.  The adapter feeds it what
the client sent and acts on the events: write L{Send} bytes, open a stream for a
L{ConnectRequest} then answer with L{SocksMachine.accept} or
L{SocksMachine.reject}, or log and close on L{Rejected}.  Keeping the protocol
pure makes every byte-level edge case testable without a reactor.

One connection may speak SOCKS5 (RFC 1928: CONNECT only; "no authentication"
or RFC 1929 username/password), SOCKS4 or SOCKS4a; the first byte decides.
Each parsing state waits for more bytes, consumes one complete message, or
fails.  Decisions depend only on the bytes seen so far, so any split of the
input gives the same events; every message has a small maximum size, so at
most ~520 unparsed bytes are kept between calls.

A failure is a L{StreamError}; its reply follows from the state it happened in
(greeting C{05 FF}, RFC 1929 C{01 01}, a request the version's error reply).
Choices the RFCs leave open:

  - An unknown first byte has no protocol to answer in: L{Rejected} comes
    without a L{Send}.
  - The SOCKS5 reserved byte is ignored; strictness would only break odd
    clients.
  - A domain name must be 1..255 bytes of printable ASCII without spaces
    (clients send IDNA names encoded) that L{canonical_host} accepts.
    Anything else is a malformed request, L{Reason.BAD_REQUEST} (C{0x01} /
    C{0x5B}), not "host unreachable": no lookup was tried.  The request
    carries canonical_host's text: an IP literal's canonical form, a name in
    lower case without its trailing dot.
  - RFC 1929 fields may be empty (curl sends an empty password for
    C{socks5h://user@host}).  Empty usernames and passwords, from any
    version, are reported as C{None}; an empty username means no
    credentials at all, so its password is dropped too.
  - A SOCKS4 user id is often not chosen by the user (socat sends C{$USER}
    or C{anonymous}): one that names no cluster (asked through
    C{is_cluster}) and carries no C{:token} is no credentials, and the
    destination picks the cluster.  A cluster with a token still needs it,
    and C{name:token} is always a claim the router checks.  The same holds
    for an RFC 1929 username with an empty password: Java's SOCKS client
    sends its C{user.name} so when the server picks username/password.
  - Details never echo a credential, and client bytes only as
    L{gateway.errors.shown} renders them: they are logged.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from gateway.destinations import canonical_host
from gateway.errors import Reason, StreamError, shown
from gateway.routing import show_username

#: How each failure is told to a SOCKS5 client (RFC 1928 section 6).
SOCKS5_REPLY: dict[Reason, int] = {
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

_NO_AUTH = 0x00
_USERPASS = 0x02
_NO_ACCEPTABLE_METHOD = b"\x05\xff"
_USERPASS_VERSION = 0x01
_USERPASS_FAILED = b"\x01\x01"
_CONNECT = 0x01
_COMMAND_NAMES = {0x02: "BIND", 0x03: "UDP ASSOCIATE"}
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 0x01, 0x03, 0x04
_SOCKS4_GRANTED, _SOCKS4_REJECTED = 0x5A, 0x5B
_MAX_FIELD = 255


@dataclass(frozen=True)
class ConnectRequest:
    """The client wants a stream to C{host}:C{port}; answer with accept/reject."""

    version: int
    host: str
    port: int
    username: str | None
    password: str | None


@dataclass(frozen=True)
class Send:
    """Bytes the adapter must write to the client."""

    data: bytes


@dataclass(frozen=True)
class Rejected:
    """
    The handshake failed.  The error reply, if the protocol has one, was the
    L{Send} just before; the adapter logs C{reason}/C{detail} and closes.
    """

    reason: Reason
    detail: str


Event = ConnectRequest | Send | Rejected


class _State(enum.IntEnum):
    # IntEnum, not Enum: the states key a dict looked up for every message,
    # and an Enum member's hash is a Python call (int's is not).
    VERSION = enum.auto()  # nothing parsed; the first byte picks the protocol
    SOCKS4_REQUEST = enum.auto()
    SOCKS5_GREETING = enum.auto()
    SOCKS5_AUTH = enum.auto()  # RFC 1929 subnegotiation
    SOCKS5_REQUEST = enum.auto()
    REQUESTED = enum.auto()  # ConnectRequest emitted; awaiting accept/reject
    ACCEPTED = enum.auto()
    REJECTED = enum.auto()


_FINISHED = frozenset({_State.REQUESTED, _State.ACCEPTED, _State.REJECTED})


class _Incomplete(Exception):
    """A parsing step needs more bytes; it has changed nothing yet."""


@functools.lru_cache(maxsize=64)  # a few codes, almost always the unspecified address
def _socks5_reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    address = ipaddress.ip_address(host)
    atyp = _ATYP_IPV4 if address.version == 4 else _ATYP_IPV6
    return bytes([0x05, code, 0x00, atyp]) + address.packed + struct.pack("!H", port)


@functools.lru_cache(maxsize=64)
def _socks4_reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    # SOCKS4 cannot carry an IPv6 address; clients ignore it for CONNECT.
    address = ipaddress.ip_address(host)
    packed = address.packed if address.version == 4 else bytes(4)
    return struct.pack("!BBH", 0x00, code, port) + packed


def _malformed(detail: str) -> StreamError:
    return StreamError(Reason.BAD_REQUEST, detail)


def _domain_host(raw: bytes) -> str:
    """Validate a client-supplied name; the destination as L{canonical_host} writes it."""
    if not raw:
        raise _malformed("empty domain name")
    if any(byte <= 0x20 or byte == 0x7F for byte in raw):
        raise _malformed(f"invalid domain name {shown(raw)}")
    try:
        # Most clients send A-labels; some send UTF-8, which canonical_host encodes.
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"invalid domain name {shown(raw)}") from None
    return canonical_host(name)


def _text(raw: bytes, what: str) -> str:
    """Strict UTF-8: a mangled credential must not match anything by luck."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not valid UTF-8") from None


class SocksMachine:
    """One client connection's SOCKS handshake."""

    __slots__ = ("_authenticate", "_is_cluster", "_state", "_version", "_buffer", "_leftover", "_username", "_password")

    def __init__(
        self,
        authenticate: Callable[[str, str], bool] | None = None,
        is_cluster: Callable[[str], bool] | None = None,
    ) -> None:
        """
        @param authenticate: called as C{authenticate(username, password)} for
            RFC 1929 credentials; C{False} fails the handshake, as does raising
            L{StreamError} (with its own reason).  C{None} accepts anything
            here, leaving the decision to whoever handles the request.
        @param is_cluster: whether a name is a cluster's name or alias, to
            tell a SOCKS4 user id that means a cluster from one that means
            nothing.  C{None} takes every user id as a cluster name.
        """
        self._authenticate = authenticate
        self._is_cluster = is_cluster
        self._state = _State.VERSION
        self._version = 0
        self._buffer = b""
        self._leftover = b""
        self._username: str | None = None
        self._password: str | None = None

    @property
    def done(self) -> bool:
        """The handshake produced a ConnectRequest or was rejected."""
        return self._state in _FINISHED

    @property
    def leftover(self) -> bytes:
        """Bytes after the request (early payload); forward them after accept()."""
        return self._leftover

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what the client sent.  Never raises for any input."""
        if self._state is _State.REJECTED:
            return []
        if self.done:
            # Unbounded by design: the adapter pauses reading until it replies.
            self._leftover += data
            return []
        self._buffer += data
        events: list[Event] = []
        try:
            while not self.done:
                events += _STEPS[self._state](self)
        except _Incomplete:
            pass
        except StreamError as failure:
            reply = self._failure_reply(failure.reason)
            if reply:
                events.append(Send(reply))
            events.append(Rejected(failure.reason, failure.detail))
            self._state = _State.REJECTED
            self._buffer = b""
        if self._state is _State.REQUESTED:
            self._leftover, self._buffer = self._buffer, b""
        return events

    def accept(self, bound_host: str = "0.0.0.0", bound_port: int = 0) -> bytes:
        """The success reply for the pending request; C{bound_host} is an IP."""
        self._expect_pending()
        if self._version == 4:
            reply = _socks4_reply(_SOCKS4_GRANTED, bound_host, bound_port)
        else:
            reply = _socks5_reply(0x00, bound_host, bound_port)
        self._state = _State.ACCEPTED
        return reply

    def reject(self, reason: Reason) -> bytes:
        """The failure reply for the pending request; later input is ignored."""
        self._expect_pending()
        reply = self._failure_reply(reason)
        self._state = _State.REJECTED
        self._leftover = b""
        return reply

    def _expect_pending(self) -> None:
        if self._state is not _State.REQUESTED:
            raise RuntimeError(f"no pending SOCKS request (state {self._state.name})")

    def _failure_reply(self, reason: Reason) -> bytes:
        if self._state is _State.VERSION:
            return b""
        if self._state is _State.SOCKS5_GREETING:
            return _NO_ACCEPTABLE_METHOD
        if self._state is _State.SOCKS5_AUTH:
            return _USERPASS_FAILED
        if self._version == 4:
            return _socks4_reply(_SOCKS4_REJECTED)
        return _socks5_reply(SOCKS5_REPLY[reason])

    def _need(self, count: int) -> bytes:
        """The buffer, once it holds C{count} bytes."""
        if len(self._buffer) < count:
            raise _Incomplete()
        return self._buffer

    def _nul_terminated(self, start: int, what: str) -> tuple[bytes, int]:
        """The NUL-terminated field at C{start} and the offset after it."""
        end = self._buffer.find(b"\0", start, start + _MAX_FIELD + 1)
        if end < 0:
            self._need(start + _MAX_FIELD + 1)  # or the NUL may still come
            raise _malformed(f"{what} longer than {_MAX_FIELD} bytes")
        return self._buffer[start:end], end + 1

    def _check_command(self, command: int) -> None:
        if command != _CONNECT:
            name = _COMMAND_NAMES.get(command, f"command 0x{command:02x}")
            raise StreamError(Reason.UNSUPPORTED_COMMAND, f"{name} is not supported")

    def _connect(self, host: str, port: int, length: int) -> list[Event]:
        """Consume the C{length}-byte request and ask for the stream."""
        if port == 0:
            raise _malformed("destination port 0")
        self._buffer = self._buffer[length:]
        self._state = _State.REQUESTED
        return [ConnectRequest(self._version, host, port, self._username, self._password)]

    def _read_version(self) -> list[Event]:
        version = self._need(1)[0]
        if version not in (4, 5):
            raise _malformed(f"not SOCKS (first byte 0x{version:02x})")
        self._version = version
        self._state = _State.SOCKS4_REQUEST if version == 4 else _State.SOCKS5_GREETING
        return []

    def _read_socks4_request(self) -> list[Event]:
        # VN CD DSTPORT(2) DSTIP(4) USERID NUL [DOMAIN NUL]   (SOCKS4a)
        self._check_command(self._need(2)[1])
        buf = self._need(8)
        port = int.from_bytes(buf[2:4], "big")
        raw_userid, end = self._nul_terminated(8, "SOCKS4 user id")
        if buf[4:7] == b"\0\0\0" and buf[7] != 0:  # SOCKS4a: 0.0.0.x, then a name
            raw_host, end = self._nul_terminated(end, "SOCKS4a domain name")
            host = _domain_host(raw_host)
        else:
            host = socket.inet_ntoa(buf[4:8])  # ipaddress's text, without its Python cost
        # "cluster:token" carries both halves of SOCKS5's username/password.
        user, _, token = _text(raw_userid, "SOCKS4 user id").partition(":")
        if user and not token and self._is_cluster is not None and not self._is_cluster(user):
            user = ""  # socat's $USER: no credentials, the destination decides
        self._username, self._password = (user, token or None) if user else (None, None)
        return self._connect(host, port, end)

    def _read_socks5_greeting(self) -> list[Event]:
        # VER NMETHODS METHODS...
        count = self._need(2)[1]
        if count == 0:
            raise _malformed("SOCKS5 greeting offers no methods")
        methods = self._need(2 + count)[2 : 2 + count]
        self._buffer = self._buffer[2 + count :]
        if _USERPASS in methods:
            self._state = _State.SOCKS5_AUTH
            return [Send(bytes([0x05, _USERPASS]))]
        if _NO_AUTH in methods:
            self._state = _State.SOCKS5_REQUEST
            return [Send(bytes([0x05, _NO_AUTH]))]
        raise StreamError(Reason.AUTH_REQUIRED, f"no usable method in {methods.hex()}")

    def _read_socks5_auth(self) -> list[Event]:
        # VER ULEN UNAME PLEN PASSWD   (RFC 1929)
        version = self._need(1)[0]
        if version != _USERPASS_VERSION:
            raise _malformed(f"bad RFC 1929 version 0x{version:02x}")
        user_end = 2 + self._need(2)[1]
        end = user_end + 1 + self._need(user_end + 1)[user_end]
        buf = self._need(end)
        username = _text(buf[2:user_end], "username")
        password = _text(buf[user_end + 1 : end], "password")
        self._buffer = buf[end:]
        if username and not password and self._is_cluster is not None and not self._is_cluster(username):
            # Java's SOCKS client (socksProxyHost, JDBC drivers) answers the
            # username/password method with the user.name property and no
            # password: like a SOCKS4 user id, no credentials.
            username = ""
        if username:
            if self._authenticate and not self._authenticate(username, password):
                raise StreamError(Reason.AUTH_FAILED, f"{show_username(username, self._is_cluster)} not accepted")
            self._username, self._password = username, password or None
        self._state = _State.SOCKS5_REQUEST
        return [Send(b"\x01\x00")]

    def _read_socks5_request(self) -> list[Event]:
        # VER CMD RSV ATYP DST.ADDR DST.PORT(2)
        version = self._need(1)[0]
        if version != 0x05:
            raise _malformed(f"bad SOCKS5 request version 0x{version:02x}")
        self._check_command(self._need(2)[1])
        atyp = self._need(4)[3]
        if atyp == _ATYP_IPV4:
            start, end = 4, 8
        elif atyp == _ATYP_IPV6:
            start, end = 4, 20
        elif atyp == _ATYP_DOMAIN:
            start, end = 5, 5 + self._need(5)[4]
        else:
            raise StreamError(Reason.UNSUPPORTED_ADDRESS, f"address type 0x{atyp:02x}")
        buf = self._need(end + 2)
        if atyp == _ATYP_DOMAIN:
            host = _domain_host(buf[start:end])
        elif atyp == _ATYP_IPV4:
            host = socket.inet_ntoa(buf[start:end])  # ipaddress's text, without its Python cost
        else:
            host = str(ipaddress.IPv6Address(buf[start:end]))
        return self._connect(host, int.from_bytes(buf[end : end + 2], "big"), end + 2)


#: The parsing step of each state that reads a message (a table shared by
#: every machine, not bound methods built per connection).
_STEPS: dict[_State, Callable[[SocksMachine], list[Event]]] = {
    _State.VERSION: SocksMachine._read_version,
    _State.SOCKS4_REQUEST: SocksMachine._read_socks4_request,
    _State.SOCKS5_GREETING: SocksMachine._read_socks5_greeting,
    _State.SOCKS5_AUTH: SocksMachine._read_socks5_auth,
    _State.SOCKS5_REQUEST: SocksMachine._read_socks5_request,
}
