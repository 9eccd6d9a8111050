"""
L{gateway.store.etcd.client}: a call that gets no answer from a member, for
whatever transport reason, moves on to the next member and, when none
answered, fails as L{EtcdUnavailable} naming the last one.

Found running a fleet against a real etcd by hand: after all of etcd was
stopped and started again, a POST on a pooled connection that etcd had
closed failed with C{RequestGenerationFailed} (Twisted's C{FileBodyProducer}
stopped before it started: C{AttributeError: _task}), which no caller
expected, so the call did not try the next member.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.store.etcd.client import EtcdClient, EtcdUnavailable

ENDPOINTS = ["http://127.0.0.1:2379", "http://127.0.0.1:22379", "http://127.0.0.1:32379"]


class _CutBody:
    """A 200 answer whose body breaks off: the connection is lost mid-answer."""

    code = 200
    length = UNKNOWN_LENGTH

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))


class _Members:
    """Stands for treq's client: every call to member N gets C{answers[N]} (an exception, or a response)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def post(self, url: str, data: bytes, headers: Any = None) -> Deferred[Any]:
        member = url.rsplit("/v3/", 1)[0]
        self.asked.append(member)
        answer = self.answers[ENDPOINTS.index(member)]
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


class NoAnswerTests(SynchronousTestCase):
    def every_member_fails(self, answers: list[Any], **kwargs: Any) -> EtcdUnavailable:
        client = EtcdClient(MemoryReactorClock(), ENDPOINTS, timeout=2, **kwargs)
        members = _Members(answers)
        client._http = members  # type: ignore[assignment]
        error = self.failureResultOf(client.range(b"/gateway/"), EtcdUnavailable).value
        self.assertEqual(list(dict.fromkeys(members.asked)), ENDPOINTS)
        return error

    def test_request_not_sent(self) -> None:
        """A stale pooled connection (the request's generation or transmission failed), a name not found."""
        error = self.every_member_fails(
            [
                RequestGenerationFailed(
                    [Failure(AttributeError("'FileBodyProducer' object has no attribute '_task'"))]
                ),
                RequestTransmissionFailed([Failure(ConnectionLost())]),
                DNSLookupError("etcd-3.example"),
            ]
        )
        self.assertTrue(str(error).startswith("http://127.0.0.1:32379: "), error)

    def test_stale_connection_named(self) -> None:
        """What the operator reads in last_error: the connection, not Twisted's producer."""
        stale = RequestGenerationFailed([Failure(AttributeError("'FileBodyProducer' object has no attribute '_task'"))])
        error = self.every_member_fails([stale, stale, stale])
        self.assertEqual(str(error), "http://127.0.0.1:32379: the connection failed while the request was sent")

    def test_stale_connection_tried_once_more(self) -> None:
        """A request that went out on a connection closed under it is sent again, once, to the same member."""
        stale = RequestGenerationFailed([Failure(ConnectionLost())])
        self.every_member_fails([stale, ConnectionRefusedError(), stale])
        client = EtcdClient(MemoryReactorClock(), ENDPOINTS, timeout=2)
        members = _Members([stale, stale, stale])
        client._http = members  # type: ignore[assignment]
        self.failureResultOf(client.range(b"/gateway/"), EtcdUnavailable)
        self.assertEqual(members.asked, [e for e in ENDPOINTS for _ in (1, 2)])

    def test_answer_cut_off(self) -> None:
        """A body that breaks off is a member that did not answer, not an exception nobody expects."""
        error = self.every_member_fails([_CutBody(), _CutBody(), _CutBody()])
        self.assertEqual(str(error), "http://127.0.0.1:32379: the connection failed mid-answer")

    def test_authentication_not_sent(self) -> None:
        """So is an authentication whose request could not be sent."""
        stale = RequestGenerationFailed([Failure(ConnectionLost())])
        self.every_member_fails([stale, stale, ConnectionRefusedError()], user="gateway", password="pw")
