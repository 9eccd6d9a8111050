"""
The gateway's one vocabulary of stream failures.

A failure is decided once, where it happens (the router, the SSH layer, a
time-out), as a L{Reason} plus human-readable detail.  The edges translate it:
SOCKS reply codes in L{gateway.socks}, HTTP status codes in
L{gateway.httpproxy}, exit codes in C{gateway-connect}, and log events.  Keeping
the vocabulary small and shared is what lets a SOCKS client and an HTTP client
see the same story for the same fault.
"""

from __future__ import annotations

import enum


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


class StreamError(Exception):
    """
    A stream could not be opened (or was ended) for C{reason}.

    C{detail} is shown to the client (HTTP error body, gateway-connect's
    stderr) and logged, so it must never contain key material or tokens.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail or reason.value

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"
