"""
What the HTTP forwarder (L{gateway.proxy.http.upstream}) knows of one
absolute-form exchange and of the tunnel it travels: plain state, so the
forwarder's event handlers read as the protocol's steps.
"""

from __future__ import annotations

from gateway.addresses import host_port
from gateway.proxy.http.events import RequestHead
from gateway.proxy.http.machine import ResponseParser
from gateway.proxy.opener import StreamRequest
from gateway.ssh.channel import TunnelChannel

#: Methods that may be sent again on a new tunnel when a reused one closed
#: before any answer: idempotent (RFC 9110 9.2.2), and only without a body.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

UpstreamKey = tuple[str, int, tuple[str, str] | None]


class Upstream:
    """An open tunnel used for absolute-form requests, and what it is for."""

    __slots__ = ("key", "channel")

    def __init__(self, key: UpstreamKey, channel: TunnelChannel) -> None:
        self.key = key
        self.channel = channel


class Exchange:
    """One absolute-form request and its response."""

    __slots__ = (
        "head",
        "request",
        "response",
        "keep_alive",
        "request_done",
        "response_done",
        "answered",
        "heard",
        "reused",
        "replay",
    )

    def __init__(self, head: RequestHead, upstream_head: bytes, request: StreamRequest) -> None:
        self.head = head
        #: The stream it asks for (each tunnel opened for it, each reuse checked).
        self.request = request
        self.response = ResponseParser(head.method, upgrade=head.upgrade is not None)
        #: The client connection stays for another request after this one:
        #: until the client, its response's framing or a drain says otherwise.
        self.keep_alive = head.keep_alive
        self.request_done = False
        self.response_done = False
        #: A final response head went to the client: a failure now is a reset.
        self.answered = False
        #: The upstream sent something for this request.
        self.heard = False
        #: It went over a tunnel that had carried an earlier request.
        self.reused = False
        #: The bytes to send again on a new tunnel, while that is allowed.
        self.replay: bytes | None = upstream_head if head.method in RETRYABLE_METHODS else None

    @property
    def destination(self) -> str:
        return host_port(self.head.host, self.head.port)
