"""
The gateway's one vocabulary of stream failures.

A failure is decided once, where it happens (the router, the SSH layer, a
time-out), as a L{Reason} plus human-readable detail.  The edges translate it:
SOCKS reply codes in L{gateway.proxy.socks.machine}, HTTP status codes in
L{gateway.proxy.http.machine}, exit codes in C{gateway-connect}, and log events.  Keeping
the vocabulary small and shared is what lets a SOCKS client and an HTTP client
see the same story for the same fault.
"""

from __future__ import annotations

import enum

#: How many characters of untrusted input a detail may show (see L{shown}).
SHOWN_LIMIT = 32


class Reason(enum.Enum):
    """Why a stream could not be opened."""

    #: The client's request could not be parsed.
    BAD_REQUEST = "bad-request"
    #: The request needs credentials (the cluster has a token) and had none.
    AUTH_REQUIRED = "auth-required"
    #: Credentials named no cluster, or the token did not match.
    AUTH_FAILED = "auth-failed"
    #: No cluster's networks contain the destination.
    NO_ROUTE = "no-route"
    #: The destination lies in several clusters' networks and nothing chose one.
    AMBIGUOUS = "ambiguous"
    #: The destination is outside the chosen cluster's networks / hostnames.
    NOT_ALLOWED = "not-allowed"
    #: The proxy node's sshd refused the channel (AllowTcpForwarding, PermitOpen).
    PROHIBITED = "prohibited"
    #: The destination actively refused the TCP connection.
    REFUSED = "refused"
    #: The destination host (or its name) could not be reached or resolved.
    HOST_UNREACHABLE = "host-unreachable"
    #: The destination network could not be reached.
    NETWORK_UNREACHABLE = "network-unreachable"
    #: Something took longer than its time-out.
    TIMEOUT = "timeout"
    #: The cluster has no SSH connection up (connecting, backing off, failed).
    UNAVAILABLE = "unavailable"
    #: A limit (streams per cluster, client connections) was reached.
    OVERLOADED = "overloaded"
    #: SOCKS BIND / UDP ASSOCIATE or an HTTP method we do not proxy.
    UNSUPPORTED_COMMAND = "unsupported-command"
    #: A SOCKS address type we do not know.
    UNSUPPORTED_ADDRESS = "unsupported-address"
    #: Anything else; the detail says what.
    GENERAL = "general"


def shown(raw: bytes | str, limit: int = SHOWN_LIMIT) -> str:
    """
    Untrusted input (client or peer bytes, a rejected name) in the one form
    details may carry: quoted, every non-printable or non-ASCII character
    escaped (no log line can be forged or broken), and cut after C{limit}
    characters with the full size said, so a long field cannot flood a log or
    carry a whole credential into it.
    """
    head = raw[:limit]
    text = repr(head)[1:] if isinstance(head, bytes) else ascii(head)
    if len(raw) > limit:
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        return f"{text}... ({size} bytes)"
    return text


class StreamError(Exception):
    """
    A stream could not be opened (or was ended) for C{reason}.

    C{detail} is shown to the client (HTTP error body, gateway-connect's
    stderr); C{log_detail}, by default the same, is what the log says, and
    may say more than a client that has not authenticated may learn (which
    clusters exist, their networks).  Neither may contain key material,
    tokens or unescaped client bytes (see L{shown}).
    """

    def __init__(self, reason: Reason, detail: str = "", *, log_detail: str | None = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail or reason.value
        self.log_detail = log_detail or self.detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


#: How much of a peer's own text (a DISCONNECT description, a channel-open failure, a command's stderr) is shown.
PEER_TEXT_LIMIT = 200


def peer_text(data: bytes, limit: int = PEER_TEXT_LIMIT) -> str:
    """
    Text a peer sent, fit for a log line or C{last_error}: decoded (bad UTF-8
    replaced), control and other unprintable characters escaped, at most
    C{limit} characters.  Only for text the protocol defines as a message
    to show; raw protocol bytes are never turned into error text.
    """
    text = data.decode("utf-8", "replace")
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return escaped + "..." if len(text) > limit else escaped
