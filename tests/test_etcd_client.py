"""
L{gateway.store.etcd.client}: a call that gets no answer from a member, for
whatever transport reason, moves on to the next member and, when none
answered, fails as L{EtcdUnavailable} naming the last one.

Found running a fleet against a real etcd by hand: after all of etcd was
stopped and started again, a POST on a pooled connection that etcd had
closed failed with C{RequestGenerationFailed} (Twisted's C{FileBodyProducer}
stopped before it started: C{AttributeError: _task}), which no caller
expected, so the call did not try the next member.

And a member that answers, but not as etcd does (another server on its
port, a proxy's error page, JSON without a revision), is passed over too;
those members are C{treq.testing.StubTreq} resources, told apart by the
request's host, their time-outs on a fake clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestGenerationFailed, RequestTransmissionFailed, ResponseDone, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gateway.store.etcd.client import EtcdClient, EtcdError, EtcdUnavailable, _Stream
from gateway.store.etcd.wire import WatchResponse

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


#: How each member answers: (HTTP status, body), or None for never.
Answer = Callable[[bytes], tuple[int, bytes] | None]

RANGE = json.dumps({"header": {"revision": "7"}}).encode()


class _Sites(Resource):
    isLeaf = True

    def __init__(self, answers: dict[str, Answer]) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []

    def render_POST(self, request: Request) -> bytes | int:
        host = (request.getHeader("host") or "").split(":")[0]
        self.asked.append(host)
        answer = self.answers[host](request.path)
        if answer is None:
            return NOT_DONE_YET
        request.setResponseCode(answer[0])
        return answer[1]


class SiteTestCase(SynchronousTestCase):
    def client(self, user: str | None = None, password: str | None = None, **answers: Answer) -> EtcdClient:
        self.clock = Clock()
        endpoints = [f"http://{host}:2379" for host in answers]
        client = EtcdClient(self.clock, endpoints, timeout=2.0, user=user, password=password)
        self.members = _Sites(answers)
        self.stub = StubTreq(self.members)
        client._http = self.stub  # type: ignore[assignment]
        return client


def etcd(path: bytes) -> tuple[int, bytes]:
    return 200, RANGE


class FailOverTests(SiteTestCase):
    def test_an_answer_that_is_not_etcds_tries_the_next_member(self) -> None:
        """A member answering 200 with something else (another service on its port) is passed over."""
        client = self.client(m1=lambda path: (200, b"<html>welcome</html>"), m2=etcd)
        d = client.range(b"/gw/")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), (7, []))
        self.assertEqual(self.members.asked, ["m1", "m2"])
        self.assertEqual(client.endpoint, "http://m2:2379")

    def test_an_answer_without_a_revision_is_not_etcds(self) -> None:
        """A JSON object that is no range answer (no header revision) must not read as an empty registry."""
        client = self.client(m1=lambda path: (200, b"{}"), m2=etcd)
        d = client.range(b"/gw/")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), (7, []))

    def test_an_error_that_is_not_etcds_tries_the_next_member(self) -> None:
        """A 404 or 502 page (no JSON gateway there, a proxy in front) is no refusal of etcd's."""
        client = self.client(m1=lambda path: (404, b"404 page not found\n"), m2=lambda path: (502, b"<h1>Bad"), m3=etcd)
        d = client.range(b"/gw/")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), (7, []))

    def test_every_member_foreign(self) -> None:
        client = self.client(m1=lambda path: (200, b"nope"), m2=lambda path: (404, b"no"))
        d = client.range(b"/gw/")
        self.stub.flush()
        failure = self.failureResultOf(d, EtcdUnavailable)
        self.assertIn("http://m2:2379: an answer that is not JSON", str(failure.value))

    def test_etcds_own_refusal_is_final(self) -> None:
        denied = json.dumps(
            {"error": "etcdserver: permission denied", "message": "etcdserver: permission denied", "code": 7}
        )
        client = self.client(m1=lambda path: (403, denied.encode()), m2=etcd)
        d = client.range(b"/gw/")
        self.stub.flush()
        failure = self.failureResultOf(d, EtcdError)
        self.assertIn("permission denied", str(failure.value))
        self.assertEqual(self.members.asked, ["m1"])

    def test_authentication_answered_by_another_server_tries_the_next_member(self) -> None:
        token = json.dumps({"header": {"revision": "7"}, "token": "tok.12"}).encode()

        def member(path: bytes) -> tuple[int, bytes]:
            return (200, token) if path == b"/v3/auth/authenticate" else (200, RANGE)

        client = self.client("gw", "pw", m1=lambda path: (200, b"<html>"), m2=member)
        d = client.range(b"/gw/")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), (7, []))
        self.assertEqual(self.members.asked, ["m1", "m2", "m2"])

    def test_a_refused_password_is_final(self) -> None:
        refused = json.dumps(
            {"error": "etcdserver: authentication failed, invalid user ID or password", "code": 3}
        ).encode()
        client = self.client("gw", "s3cret", m1=lambda path: (400, refused), m2=etcd)
        d = client.range(b"/gw/")
        self.stub.flush()
        failure = self.failureResultOf(d, EtcdError)
        self.assertIn("cannot authenticate as 'gw'", str(failure.value))
        self.assertNotIn("s3cret", str(failure.value))


class SilentMemberTests(SiteTestCase):
    def test_a_member_that_never_answers_is_given_up_after_timeout(self) -> None:
        """
        Once: the request given up fails like one on a kept connection
        that was closed, which is sent once more; a member that does not
        answer must cost one timeout, not two (measured by hand against a
        socket that accepts and never answers: 1.00 s for timeout 0.5).
        """
        client = self.client(m1=lambda path: None, m2=etcd)
        d = client.range(b"/gw/")
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), (7, []))
        self.assertEqual(self.members.asked, ["m1", "m2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_member_answers(self) -> None:
        client = self.client(m1=lambda path: None, m2=lambda path: None)
        d = client.range(b"/gw/")
        for _ in range(2):
            self.stub.flush()
            self.clock.advance(2.0)
        failure = self.failureResultOf(d, EtcdUnavailable)
        self.assertEqual(str(failure.value), "http://m2:2379: no answer within 2 s")


class StreamTests(SynchronousTestCase):
    def test_a_message_it_cannot_read_ends_the_watch_saying_so(self) -> None:
        """The store must hear why: watched again from the same revision, the same bytes would come again."""
        received: list[WatchResponse] = []
        stream = _Stream(received.append, lambda: None)
        transport = StringTransport()
        stream.makeConnection(transport)
        stream.dataReceived(b'{"result":{"header":{"revision":"3"},"created":true}}\n')
        stream.dataReceived(b'<html>\n{"result":{}}\n')
        self.assertEqual(len(received), 2)
        self.assertTrue(received[0].created)
        self.assertEqual((received[1].canceled, received[1].unreadable, received[1].reason), (True, True, "not JSON"))
        self.assertEqual(transport.producerState, "stopped")
        stream.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(stream.ended), "bad watch message: not JSON")
