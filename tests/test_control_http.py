"""
Tests for L{gateway.control.http}: real HTTP over loopback, with treq, against the
control API in front of an in-memory L{FakeControl}.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from typing import Any

import treq
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from gateway.config import GatewaySettings
from gateway.control.contract import ClusterView, ControlError
from gateway.control.http import IDLE_TIMEOUT, MAX_BODY_BYTES, TOKEN_ENV, control_site, control_token
from tests.support import capture_events

TOKEN = "tok-3f9a1c77e2b04d5a"
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-a-real-key\n-----END OPENSSH PRIVATE KEY-----\n"
)
JSON = "application/json"
METRICS = b'# TYPE gateway_clusters gauge\ngateway_clusters{state="up"} 1\n'
PAC = b'function FindProxyForURL(url, host) { return "DIRECT"; }\n'


def status(state: str = "up", proxy: str | None = "10.250.1.2:22", last_error: str | None = None) -> dict[str, Any]:
    return {
        "state": state,
        "proxy": proxy,
        "connected_since": "2026-01-02T03:04:05Z" if proxy else None,
        "open_streams": 2,
        "streams_opened": 10,
        "streams_failed": {"timeout": 1},
        "bytes_up": 100,
        "bytes_down": 2000,
        "last_error": last_error,
    }


def cluster_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "proxies": ["10.250.2.2:22"],
        "user": "root",
        "key": PRIVATE_KEY,
        "insecure_accept_any_host_key": True,
        "networks": ["10.252.0.0/24"],
    }
    body.update(overrides)
    return body


class FakeControl:
    """
    An in-memory L{gateway.control.contract.ClusterControl}: C{cluster-a} comes from
    the TOML file (put/delete answer 409), API clusters are kept as their
    bodies.  C{failure}, when set, is raised by every method; a PUT of the
    cluster C{slow} waits for the test to fire C{pending}.
    """

    KEYS = {"proxies", "user", "key", "insecure_accept_any_host_key", "networks", "aliases", "token"}

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterView] = {
            "cluster-a": ClusterView(
                "cluster-a",
                "config",
                {"proxies": ["10.250.1.2:22"], "networks": ["10.251.0.0/24"], "token_set": True},
                status(),
            )
        }
        self.bodies: dict[str, Mapping[str, Any]] = {}
        self.failure: Exception | None = None
        self.put_started: Deferred[None] = Deferred()
        self.pending: Deferred[bool] | None = None
        self.pac_calls: list[tuple[str | None, str | None]] = []
        self.ready = True

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def list_clusters(self) -> list[ClusterView]:
        self._check()
        return [self.clusters[name] for name in sorted(self.clusters)]

    def get_cluster(self, name: str) -> ClusterView:
        self._check()
        try:
            return self.clusters[name]
        except KeyError:
            raise ControlError(404, f"no cluster {name!r}") from None

    def _validate(self, body: Mapping[str, Any]) -> None:
        for key in body:
            if key not in self.KEYS:
                raise ControlError(400, "unknown key", key)
        proxies = body.get("proxies")
        if not isinstance(proxies, list) or not proxies:
            raise ControlError(400, "required: a non-empty array of proxy addresses", "proxies")
        networks = body.get("networks", [])
        if not isinstance(networks, list):
            raise ControlError(400, "must be an array of CIDR strings", "networks")
        for index, network in enumerate(networks):
            try:
                ipaddress.ip_network(network)
            except (TypeError, ValueError):
                raise ControlError(400, "not a network", f"networks[{index}]") from None

    def put_cluster(self, name: str, body: Mapping[str, Any]) -> Deferred[bool]:
        self._check()
        existing = self.clusters.get(name)
        if existing is not None and existing.source == "config":
            return fail(ControlError(409, f"cluster {name!r} is defined in the configuration file"))
        self._validate(body)
        created = existing is None
        self.bodies[name] = body
        settings = {key: value for key, value in body.items() if key not in ("key", "token")}
        self.clusters[name] = ClusterView(name, "api", settings, status("connecting", None))
        if name == "slow":
            self.pending = Deferred()
            self.put_started.callback(None)
            return self.pending
        return task.deferLater(reactor, 0, lambda: created)  # answered later, as the gateway does

    def delete_cluster(self, name: str) -> Deferred[None]:
        self._check()
        view = self.clusters.get(name)
        if view is None:
            return fail(ControlError(404, f"no cluster {name!r}"))
        if view.source == "config":
            return fail(ControlError(409, f"cluster {name!r} is defined in the configuration file"))
        del self.clusters[name]
        del self.bodies[name]
        return succeed(None)

    def health(self) -> Mapping[str, Any]:
        self._check()
        up = sum(1 for view in self.clusters.values() if view.status.get("state") == "up")
        reasons = [] if self.ready else ["http listener 'tcp:3128' is not listening"]
        return {
            "status": "ok" if self.ready else "not-ready",
            "gateway": "gw-a",
            "live": True,
            "ready": self.ready,
            "not_ready": reasons,
            "clusters": {"up": up, "down": len(self.clusters) - up},
        }

    def metrics(self) -> bytes:
        self._check()
        return METRICS

    def proxy_pac(self, host: str | None, cluster: str | None) -> bytes | None:
        self._check()
        self.pac_calls.append((host, cluster))
        return PAC if cluster in (None, "cluster-a") else None


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of unknown length: the agent sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for start in range(0, len(self.data), 65536):
            consumer.write(self.data[start : start + 65536])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class RawClient(Protocol):
    """Sends C{request} as is and collects the answer until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(self.received)


class ApiTestCase(TestCase):
    """A control API on loopback in front of a fresh L{FakeControl}."""

    token: str | None = None

    async def setUp(self) -> None:
        self.control = FakeControl()
        site = control_site(self.control, self.token)
        self.server_lost: list[Deferred[None]] = []
        build = site.buildProtocol

        def track(addr: Any) -> Any:
            protocol = build(addr)
            lost: Deferred[None] = Deferred()
            self.server_lost.append(lost)
            connection_lost = protocol.connectionLost

            def on_lost(reason: Any) -> None:
                connection_lost(reason)
                lost.callback(None)

            protocol.connectionLost = on_lost
            return protocol

        site.buildProtocol = track
        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.events: list[dict[str, Any]] = capture_events(self)
        self.addCleanup(self._close)

    async def _close(self) -> None:
        await self.pool.closeCachedConnections()
        await self.port.stopListening()
        for lost in self.server_lost:
            await lost

    def request(
        self,
        method: str,
        path: str,
        body: bytes | IBodyProducer | None = None,
        headers: dict[str, str] | None = None,
        authorize: bool = True,
    ) -> Deferred[Any]:
        """A request, with the right token unless C{authorize} is false or C{headers} has one."""
        headers = dict(headers or {})
        if authorize and self.token is not None and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        return treq.request(method, self.url + path, data=body, headers=headers, pool=self.pool)

    async def call(self, method: str, path: str, body: object = None, **kwargs: Any) -> tuple[Any, Any]:
        """A request; the response and its decoded JSON body (None when empty)."""
        if isinstance(body, dict | list):
            body = json.dumps(body).encode("utf-8")
        response = await self.request(method, path, body, **kwargs)
        content = await treq.content(response)
        if not content:
            return response, None
        self.assertEqual(response.headers.getRawHeaders("content-type"), [JSON])
        value = json.loads(content)
        # compact, sorted keys, one trailing newline
        self.assertEqual(content, json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        return response, value

    async def raw(self, data: bytes) -> bytes:
        """Send C{data} over a fresh connection; all the server answered before closing."""
        client = RawClient(data)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        protocol = await connectProtocol(endpoint, client)
        answer = await client.closed
        protocol.transport.loseConnection()
        return answer

    def assertError(self, pair: tuple[Any, Any], status: int, field: str | None = None) -> str:
        response, body = pair
        self.assertEqual(response.code, status, body)
        self.assertEqual(set(body), {"error", "field"})
        self.assertEqual(body["field"], field)
        self.assertIsInstance(body["error"], str)
        return body["error"]

    def mutation_logs(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "gateway.control.http" and "status" in e]


class RouteTests(ApiTestCase):
    async def test_list(self) -> None:
        response, body = await self.call("GET", "/v1/clusters")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            body,
            {
                "clusters": [
                    {
                        "name": "cluster-a",
                        "source": "config",
                        "state": "up",
                        "proxy": "10.250.1.2:22",
                        "open_streams": 2,
                        "last_error": None,
                    }
                ]
            },
        )

    async def test_show(self) -> None:
        response, body = await self.call("GET", "/v1/clusters/cluster-a")
        self.assertEqual(response.code, 200)
        self.assertEqual(set(body), {"name", "source", "settings", "status"})
        self.assertEqual(body["name"], "cluster-a")
        self.assertEqual(body["source"], "config")
        self.assertEqual(body["settings"]["token_set"], True)
        self.assertEqual(body["status"], status())

    async def test_show_unknown(self) -> None:
        error = self.assertError(await self.call("GET", "/v1/clusters/nope"), 404)
        self.assertIn("nope", error)

    async def test_create_then_replace(self) -> None:
        response, body = await self.call("PUT", "/v1/clusters/cluster-b", cluster_body())
        self.assertEqual((response.code, body), (201, {"name": "cluster-b", "created": True}))
        self.assertEqual(response.headers.getRawHeaders("location"), ["/v1/clusters/cluster-b"])
        self.assertEqual(self.control.bodies["cluster-b"], cluster_body())

        response, body = await self.call("PUT", "/v1/clusters/cluster-b", cluster_body(user="admin"))
        self.assertEqual((response.code, body), (200, {"name": "cluster-b", "created": False}))
        self.assertEqual(self.control.bodies["cluster-b"]["user"], "admin")

        _, body = await self.call("GET", "/v1/clusters")
        self.assertEqual([c["name"] for c in body["clusters"]], ["cluster-a", "cluster-b"])
        self.assertEqual(body["clusters"][1]["source"], "api")
        _, body = await self.call("GET", "/v1/clusters/cluster-b")
        self.assertNotIn(PRIVATE_KEY, json.dumps(body))

    async def test_delete(self) -> None:
        await self.call("PUT", "/v1/clusters/cluster-b", cluster_body())
        response, body = await self.call("DELETE", "/v1/clusters/cluster-b")
        self.assertEqual(response.code, 204)
        self.assertIsNone(body)
        self.assertIsNone(response.headers.getRawHeaders("content-type"))
        self.assertNotIn("cluster-b", self.control.clusters)
        self.assertError(await self.call("DELETE", "/v1/clusters/cluster-b"), 404)

    async def test_config_cluster_conflict(self) -> None:
        error = self.assertError(await self.call("PUT", "/v1/clusters/cluster-a", cluster_body()), 409)
        self.assertIn("configuration file", error)
        self.assertError(await self.call("DELETE", "/v1/clusters/cluster-a"), 409)
        self.assertEqual(self.control.clusters["cluster-a"].source, "config")

    async def test_invalid_body_field(self) -> None:
        pair = await self.call("PUT", "/v1/clusters/cluster-b", cluster_body(networks=["10.252.0.0/24", "nonsense"]))
        self.assertEqual(self.assertError(pair, 400, "networks[1]"), "not a network")
        self.assertError(await self.call("PUT", "/v1/clusters/cluster-b", cluster_body(proxies=[])), 400, "proxies")
        self.assertNotIn("cluster-b", self.control.clusters)

    async def test_name_percent_decoded(self) -> None:
        response, body = await self.call("PUT", "/v1/clusters/net%2Eb", cluster_body())
        self.assertEqual((response.code, body), (201, {"name": "net.b", "created": True}))
        self.assertIn("net.b", self.control.clusters)
        response, body = await self.call("GET", "/v1/clusters/net.b")
        self.assertEqual(body["name"], "net.b")

    async def test_invalid_names(self) -> None:
        for path in ["a%20b", "a%2Fb", "%FF", "x" * 65, "bad!", "%00", "", "%2E", "%2e%2E"]:
            pair = await self.call("PUT", "/v1/clusters/" + path, cluster_body())
            self.assertError(pair, 400, "name")
            self.assertError(await self.call("GET", "/v1/clusters/" + path), 400, "name")
            self.assertError(await self.call("DELETE", "/v1/clusters/" + path), 400, "name")
        response, _ = await self.call("PUT", "/v1/clusters/" + "x" * 64, cluster_body())
        self.assertEqual(response.code, 201)

    async def test_bad_json(self) -> None:
        error = self.assertError(await self.call("PUT", "/v1/clusters/b", b'{"proxies": ["a",'), 400)
        self.assertIn("line 1 column 18", error)
        self.assertError(await self.call("PUT", "/v1/clusters/b", b""), 400)
        self.assertError(await self.call("PUT", "/v1/clusters/b", b'{"user": NaN}'), 400)
        self.assertError(await self.call("PUT", "/v1/clusters/b", b'{"user": "a", "user": "b"}'), 400)
        self.assertError(await self.call("PUT", "/v1/clusters/b", b"[" * 100000), 400)
        self.assertEqual(self.control.bodies, {})

    async def test_bad_json_not_echoed(self) -> None:
        body = json.dumps(cluster_body()).encode()[:-1]  # the key, then truncated
        response, value = await self.call("PUT", "/v1/clusters/b", body)
        self.assertEqual(response.code, 400)
        self.assertNotIn("OPENSSH", json.dumps(value))

    async def test_not_an_object(self) -> None:
        for body in [b"[1, 2]", b'"text"', b"null", b"42"]:
            error = self.assertError(await self.call("PUT", "/v1/clusters/b", body), 400)
            self.assertIn("JSON object", error)

    async def test_bad_utf8(self) -> None:
        error = self.assertError(await self.call("PUT", "/v1/clusters/b", b'{"user": "r\xffoot"}'), 400)
        self.assertIn("UTF-8", error)

    async def test_method_not_allowed(self) -> None:
        for method, path, allow in [
            ("POST", "/v1/clusters", "GET"),
            ("DELETE", "/v1/clusters", "GET"),
            ("PATCH", "/v1/clusters/cluster-a", "GET, PUT, DELETE"),
            ("POST", "/v1/clusters/cluster-a", "GET, PUT, DELETE"),
            ("PUT", "/v1/health", "GET"),
            ("POST", "/metrics", "GET"),
        ]:
            pair = await self.call(method, path, b"{}")
            self.assertError(pair, 405)
            self.assertEqual(pair[0].headers.getRawHeaders("allow"), [allow], (method, path))

    async def test_unknown_path(self) -> None:
        for path in ["/", "/v1", "/v2/clusters", "/v1/clusters/a/b", "/v1/clusters/cluster-a/", "/metrics/x"]:
            self.assertError(await self.call("GET", path), 404)

    async def test_health(self) -> None:
        response, body = await self.call("GET", "/v1/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.control.health())

    async def test_metrics(self) -> None:
        response = await self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; version=0.0.4; charset=utf-8"])
        self.assertEqual(await treq.content(response), METRICS)

    async def test_query_string_ignored(self) -> None:
        response, body = await self.call("GET", "/v1/health?verbose=1")
        self.assertEqual(response.code, 200)


class BodySizeTests(ApiTestCase):
    async def test_content_length_checked_up_front(self) -> None:
        """A too large Content-Length is answered at once: the body is never sent."""
        answer = await self.raw(
            b"PUT /v1/clusters/big HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertNotIn(b"100 Continue", head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(json.loads(body)["field"], None)
        self.assertNotIn("big", self.control.clusters)

    async def test_too_large_with_content_length(self) -> None:
        body = b"{" + b" " * MAX_BODY_BYTES + b"}"
        self.assertError(await self.call("PUT", "/v1/clusters/big", body), 413)
        self.assertNotIn("big", self.control.clusters)
        # the client's pool carries on
        response, _ = await self.call("GET", "/v1/health")
        self.assertEqual(response.code, 200)

    async def test_too_large_chunked(self) -> None:
        """Without Content-Length, the size actually received counts."""
        body = ChunkedBody(b"{" + b" " * MAX_BODY_BYTES + b"}")
        self.assertError(await self.call("PUT", "/v1/clusters/big", body), 413)
        self.assertNotIn("big", self.control.clusters)
        response, _ = await self.call("GET", "/v1/health")
        self.assertEqual(response.code, 200)

    async def test_largest_body(self) -> None:
        data = json.dumps(cluster_body()).encode()
        data += b" " * (MAX_BODY_BYTES - len(data))
        response, _ = await self.call("PUT", "/v1/clusters/big", data)
        self.assertEqual(response.code, 201)
        response, _ = await self.call("PUT", "/v1/clusters/big", ChunkedBody(data))
        self.assertEqual(response.code, 200)


class FailureTests(ApiTestCase):
    async def test_unexpected_exception(self) -> None:
        self.control.failure = RuntimeError("secret detail 42")
        for method, path, body in [
            ("GET", "/v1/clusters", None),
            ("GET", "/v1/clusters/cluster-a", None),
            ("PUT", "/v1/clusters/b", cluster_body()),
            ("DELETE", "/v1/clusters/b", None),
            ("GET", "/v1/health", None),
            ("GET", "/metrics", None),
        ]:
            response = await self.request(method, path, json.dumps(body).encode() if body else None)
            self.assertEqual(response.code, 500, path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), [JSON])
            self.assertEqual(await treq.content(response), b'{"error":"internal error"}\n')
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 6)

    async def test_asynchronous_failure(self) -> None:
        self.control.put_cluster = lambda name, body: task.deferLater(  # type: ignore[method-assign]
            reactor, 0, lambda: 1 / 0
        )
        response, body = await self.call("PUT", "/v1/clusters/b", cluster_body())
        self.assertEqual((response.code, body), (500, {"error": "internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    async def test_control_error_with_bad_status(self) -> None:
        self.control.failure = ControlError(200, "not an error status")
        response, body = await self.call("GET", "/v1/clusters")
        self.assertEqual((response.code, body), (500, {"error": "internal error"}))
        self.flushLoggedErrors()

    async def test_client_disconnects(self) -> None:
        """A client gone before the gateway answers: no error, the mutation is still logged."""
        request = self.request("PUT", "/v1/clusters/slow", json.dumps(cluster_body()).encode())
        await self.control.put_started
        outcome: list[object] = []
        request.addBoth(outcome.append)
        request.cancel()
        self.assertIsInstance(outcome[0], Failure)
        for lost in self.server_lost:
            await lost
        assert self.control.pending is not None
        self.control.pending.callback(True)
        await task.deferLater(reactor, 0, lambda: None)
        [event] = self.mutation_logs()
        self.assertEqual((event["method"], event["status"], event["disconnected"]), ("PUT", 201, True))


class LogTests(ApiTestCase):
    async def test_mutations_logged_without_bodies(self) -> None:
        await self.call("GET", "/v1/clusters")
        await self.call("PUT", "/v1/clusters/cluster-b", cluster_body(token="sekrit-token"))
        await self.call("PUT", "/v1/clusters/cluster-b", cluster_body(networks=["bad"]))
        await self.call("DELETE", "/v1/clusters/cluster-b")
        await self.call("DELETE", "/v1/clusters/cluster-a")
        logged = [(e["method"], e["path"], e["status"], e["cluster"]) for e in self.mutation_logs()]
        self.assertEqual(
            logged,
            [
                ("PUT", "/v1/clusters/cluster-b", 201, "cluster-b"),
                ("PUT", "/v1/clusters/cluster-b", 400, "cluster-b"),
                ("DELETE", "/v1/clusters/cluster-b", 204, "cluster-b"),
                ("DELETE", "/v1/clusters/cluster-a", 409, "cluster-a"),
            ],
        )
        self.assertEqual(formatEvent(self.mutation_logs()[0]), "control API: PUT /v1/clusters/cluster-b -> 201")
        refused = formatEvent(self.mutation_logs()[1])
        self.assertTrue(refused.startswith("control API: PUT /v1/clusters/cluster-b -> 400: "), refused)
        self.assertEqual(self.mutation_logs()[1]["refusal"], refused.split(" -> 400: ", 1)[1])
        everything = repr(self.events) + "".join(formatEvent(e) for e in self.events)
        self.assertNotIn("OPENSSH", everything)
        self.assertNotIn("sekrit-token", everything)


class TokenTests(ApiTestCase):
    token = TOKEN

    async def test_with_token(self) -> None:
        for path in ["/v1/clusters", "/v1/clusters/cluster-a", "/v1/health", "/metrics"]:
            response = await self.request("GET", path)
            self.assertEqual(response.code, 200, path)
            await treq.content(response)
        response, _ = await self.call("PUT", "/v1/clusters/b", cluster_body())
        self.assertEqual(response.code, 201)

    async def test_scheme_case_insensitive(self) -> None:
        response, _ = await self.call("GET", "/v1/health", headers={"Authorization": f"bearer {TOKEN}"})
        self.assertEqual(response.code, 200)

    async def assertUnauthorized(self, method: str, path: str, headers: dict[str, str], body: object = None) -> None:
        response, value = await self.call(method, path, body, headers=headers, authorize=False)
        self.assertError((response, value), 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="gateway"'])
        for sent in headers.values():
            self.assertNotIn(sent.split()[-1], json.dumps(value))

    async def test_missing_or_wrong_token(self) -> None:
        wrong = [
            {},
            {"Authorization": "Bearer wrong-guess-1234"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer"},
        ]
        for headers in wrong:
            for path in ["/v1/clusters", "/v1/health", "/metrics", "/no/such/path"]:
                await self.assertUnauthorized("GET", path, headers)
            await self.assertUnauthorized("PUT", "/v1/clusters/b", headers, cluster_body())
            await self.assertUnauthorized("DELETE", "/v1/clusters/cluster-a", headers)
        self.assertEqual(self.control.bodies, {})
        self.assertIn("cluster-a", self.control.clusters)

    async def test_chunked_body_without_token(self) -> None:
        """A chunked body from a client without the token is not read: answered before its end."""
        answer = await self.raw(
            b"PUT /v1/clusters/b HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
        self.assertIn(b"Connection: close", head)
        self.assertNotIn(b"wrong", body)
        self.assertNotIn("b", self.control.clusters)
        response = await self.request("PUT", "/v1/clusters/b", ChunkedBody(b"{}"), authorize=False)
        self.assertEqual(response.code, 401)
        await treq.content(response)

    async def test_too_large_without_token(self) -> None:
        answer = await self.raw(b"PUT /v1/clusters/big HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer)


class ControlTokenTests(SynchronousTestCase):
    def token_file(self, content: bytes, mode: int = 0o600) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def test_file(self) -> None:
        path = self.token_file(f"  {TOKEN}\n".encode())
        self.assertEqual(control_token(path, {}), TOKEN)

    def test_file_wins_over_environment(self) -> None:
        path = self.token_file(TOKEN.encode(), 0o400)
        self.assertEqual(control_token(path, {TOKEN_ENV: "other"}), TOKEN)

    def test_environment(self) -> None:
        self.assertEqual(control_token(None, {TOKEN_ENV: f"{TOKEN}\n"}), TOKEN)

    def test_neither(self) -> None:
        self.assertIsNone(control_token(None, {}))

    def test_mode(self) -> None:
        for mode in (0o640, 0o604, 0o644, 0o660):
            path = self.token_file(TOKEN.encode(), mode)
            error = self.assertRaises(ValueError, control_token, path, {})
            self.assertIn(path, str(error))
            self.assertIn(f"mode {mode:04o}", str(error))
            self.assertNotIn(TOKEN, str(error))

    def test_missing_file(self) -> None:
        path = self.mktemp()
        error = self.assertRaises(ValueError, control_token, path, {TOKEN_ENV: TOKEN})
        self.assertIn(path, str(error))

    def test_empty(self) -> None:
        self.assertRaises(ValueError, control_token, self.token_file(b" \n"), {})
        self.assertRaises(ValueError, control_token, None, {TOKEN_ENV: ""})

    def test_not_header_safe(self) -> None:
        error = self.assertRaises(ValueError, control_token, self.token_file(b"two words"), {})
        self.assertNotIn("words", str(error))
        self.assertRaises(ValueError, control_token, None, {TOKEN_ENV: "caf\u00e9"})


class HostHeaderTests(ApiTestCase):
    """Without a token only this host may talk to the API (DNS rebinding)."""

    async def test_foreign_host_header_is_refused(self) -> None:
        answer = await self.raw(b"GET /v1/health HTTP/1.1\r\nHost: evil.example:8765\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403"), answer)

    async def test_loopback_names_are_served(self) -> None:
        for host in (b"localhost:8765", b"127.0.0.1", b"[::1]:8765"):
            answer = await self.raw(b"GET /v1/health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200"), (host, answer))


class HostHeaderWithTokenTests(ApiTestCase):
    token = "t0k"

    async def test_any_host_with_the_token(self) -> None:
        answer = await self.raw(
            b"GET /v1/health HTTP/1.1\r\nHost: gateway.example\r\nAuthorization: Bearer t0k\r\n"
            b"Connection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)


class ProxyPacTests(ApiTestCase):
    """GET /v1/proxy.pac: no token (browsers send none), every other route still needs one."""

    token = TOKEN

    async def test_served_without_the_token(self) -> None:
        response = await self.request("GET", "/v1/proxy.pac", authorize=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ns-proxy-autoconfig"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-cache"])
        self.assertEqual(await treq.content(response), PAC)
        self.assertEqual(response.length, len(PAC))  # Content-Length (the client takes it out of the headers)
        self.assertEqual(self.control.pac_calls, [("127.0.0.1", None)])  # the Host header without port

    async def test_cluster_view_and_host(self) -> None:
        answer = await self.raw(
            b"GET /v1/proxy.pac?cluster=cluster-a HTTP/1.1\r\nHost: Gateway.Example:8765\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertTrue(answer.endswith(PAC))
        self.assertEqual(self.control.pac_calls, [("gateway.example", "cluster-a")])

    async def test_head(self) -> None:
        answer = await self.raw(b"HEAD /v1/proxy.pac HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nContent-Length: %d" % len(PAC), head)
        self.assertEqual(body, b"")

    async def test_unknown_cluster_and_bad_query(self) -> None:
        self.assertError(await self.call("GET", "/v1/proxy.pac?cluster=nope", authorize=False), 404)
        self.assertError(await self.call("GET", "/v1/proxy.pac?cluster=a/b", authorize=False), 404)
        self.assertError(await self.call("GET", "/v1/proxy.pac?x=1", authorize=False), 400)
        self.assertEqual(self.control.pac_calls, [("127.0.0.1", "nope")])  # an invalid name is not asked for

    async def test_only_reads_of_the_pac_file_are_public(self) -> None:
        for method, path in [
            ("PUT", "/v1/proxy.pac"),
            ("POST", "/v1/proxy.pac"),
            ("GET", "/v1/proxy.pac/x"),
            ("GET", "/v1//proxy.pac"),
            ("GET", "/v1/proxy%2epac"),
            ("GET", "/v1/health"),
        ]:
            response, body = await self.call(method, path, authorize=False)
            self.assertError((response, body), 401)
        response, body = await self.call("POST", "/v1/proxy.pac")
        self.assertError((response, body), 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertEqual(self.control.pac_calls, [])

    async def test_a_failing_gateway_is_a_500(self) -> None:
        self.control.failure = RuntimeError("secret detail 42")
        response, body = await self.call("GET", "/v1/proxy.pac", authorize=False)
        self.assertEqual((response.code, body), (500, {"error": "internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class HealthCheckTests(ApiTestCase):
    """GET /v1/health/live and /ready: for load balancers, without the token; /v1/health still needs it."""

    token = TOKEN

    async def test_live_and_ready_without_the_token(self) -> None:
        for path, answer in (
            ("/v1/health/live", {"gateway": "gw-a", "live": True}),
            ("/v1/health/ready", {"gateway": "gw-a", "ready": True}),
        ):
            response = await self.request("GET", path, authorize=False)
            self.assertEqual((response.code, json.loads(await treq.content(response))), (200, answer), path)
        response = await self.request("GET", "/v1/health", authorize=False)
        self.assertEqual(response.code, 401)
        await treq.content(response)

    async def test_not_ready_is_a_503_without_the_reasons(self) -> None:
        self.control.ready = False
        response = await self.request("GET", "/v1/health/ready", authorize=False)
        body = await treq.content(response)
        self.assertEqual((response.code, json.loads(body)), (503, {"gateway": "gw-a", "ready": False}))
        self.assertNotIn(b"3128", body)  # why is for token holders: GET /v1/health
        response = await self.request("GET", "/v1/health/live", authorize=False)
        self.assertEqual(response.code, 200)
        await treq.content(response)

    async def test_head_and_other_methods(self) -> None:
        answer = await self.raw(b"HEAD /v1/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        answer = await self.raw(b"POST /v1/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer)  # only reads are public


class ProxyPacWithoutTokenTests(ApiTestCase):
    async def test_any_host_may_read_the_pac_file(self) -> None:
        """The Host check keeps DNS-rebinding pages off the API; the PAC file is public anyway."""
        answer = await self.raw(b"GET /v1/proxy.pac HTTP/1.1\r\nHost: gateway.example\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        answer = await self.raw(b"GET /v1/health HTTP/1.1\r\nHost: gateway.example\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)


class MemoryConnection:
    """One client connection of a control site, in memory."""

    def __init__(self, site: Any, port: int) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.channel = site.buildProtocol(self.transport.getPeer())
        if self.channel is not None:
            self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        """The connection is gone (what the reactor does after a close)."""
        self.channel.connectionLost(Failure(ConnectionDone()))


class ListenerLimitTests(SynchronousTestCase):
    """
    The control listener's own limits, in memory: a cap on connections, a
    deadline for each request head, an idle time-out for a body, and the
    token checked before any body is read.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.control = FakeControl()
        self.settings = GatewaySettings(control_max_clients=2, control_head_timeout=10.0, control_body_timeout=5.0)
        self.site = control_site(self.control, TOKEN, self.settings, reactor=self.clock)
        self.events: list[dict[str, Any]] = capture_events(self)
        self.ports = iter(range(40000, 41000))

    def connect(self) -> MemoryConnection:
        return MemoryConnection(self.site, next(self.ports))

    def head(
        self, method: bytes = b"GET", path: bytes = b"/v1/health", token: str = TOKEN, extra: bytes = b""
    ) -> bytes:
        return (
            method + b" " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n" + extra + b"\r\n"
        )

    def outcomes(self) -> list[str]:
        ours = [e for e in self.events if e.get("log_namespace") == "gateway.control.listener"]
        return [e["outcome"] for e in ours if "outcome" in e]

    def test_connection_cap(self) -> None:
        """Beyond control_max_clients a connection gets no protocol: Twisted closes it at once."""
        first, second = self.connect(), self.connect()
        self.assertIsNotNone(first.channel)
        self.assertIsNotNone(second.channel)
        self.assertIsNone(self.connect().channel)
        first.lose()
        third = self.connect()
        self.assertIsNotNone(third.channel)
        third.send(self.head())
        self.assertTrue(third.answer().startswith(b"HTTP/1.1 200 "), third.answer())
        self.assertIsNone(self.connect().channel)

    def test_cap_counts_connections_closed_by_the_server(self) -> None:
        """A slot is freed whichever side closes, time-outs included."""
        for _ in range(5):
            connections = [self.connect(), self.connect()]
            self.clock.advance(self.settings.control_head_timeout)
            for connection in connections:
                self.assertTrue(connection.closed)
                connection.lose()
        self.assertIsNotNone(self.connect().channel)

    def test_head_deadline(self) -> None:
        """One byte every 3 s keeps Twisted's idle time-out away, not the head's deadline."""
        connection = self.connect()
        for byte in self.head()[:3]:
            connection.send(bytes([byte]))
            self.clock.advance(3)
        self.assertFalse(connection.closed)
        self.clock.advance(1)
        self.assertTrue(connection.closed)
        self.assertTrue(connection.transport.disconnected)  # aborted, not waiting for the client
        self.assertEqual(connection.answer(), b"")
        self.assertEqual(self.outcomes(), ["head-timeout"])

    def test_silent_connection(self) -> None:
        connection = self.connect()
        self.clock.advance(9.9)
        self.assertFalse(connection.closed)
        self.clock.advance(0.1)
        self.assertTrue(connection.closed)

    def test_slow_head_in_time(self) -> None:
        connection = self.connect()
        for byte in self.head():
            connection.send(bytes([byte]))
            self.clock.advance(0.1)
        self.assertTrue(connection.answer().startswith(b"HTTP/1.1 200 "), connection.answer())
        self.assertFalse(connection.closed)

    def test_keep_alive(self) -> None:
        """
        Between requests only the idle time-out runs; the next request's
        first byte starts its head's deadline.
        """
        connection = self.connect()
        connection.send(self.head())
        self.assertTrue(connection.answer().startswith(b"HTTP/1.1 200 "))
        connection.transport.clear()
        self.clock.advance(30)
        self.assertFalse(connection.closed)
        connection.send(b"G")
        self.clock.advance(9.9)
        self.assertFalse(connection.closed)
        self.clock.advance(0.1)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.answer(), b"")

    def test_idle_keep_alive_ends(self) -> None:
        connection = self.connect()
        connection.send(self.head())
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(connection.closed)

    def test_pipelined_requests(self) -> None:
        connection = self.connect()
        connection.send(self.head() * 3)
        self.assertEqual(connection.answer().count(b"HTTP/1.1 200 "), 3)
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(connection.closed)

    def test_body_idle_time_out(self) -> None:
        """A body may pause up to control_body_timeout between bytes, not longer."""
        connection = self.connect()
        connection.send(self.head(b"PUT", b"/v1/clusters/b", extra=b"Content-Length: 100\r\n"))
        connection.send(b"{")
        for _ in range(3):  # past the head's deadline, which no longer runs
            self.clock.advance(4.9)
            connection.send(b" ")
        self.assertFalse(connection.closed)
        self.clock.advance(5)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.answer(), b"")
        self.assertEqual(self.outcomes(), ["body-timeout"])
        self.assertEqual(self.control.bodies, {})

    def test_chunked_body_idle_time_out(self) -> None:
        connection = self.connect()
        connection.send(self.head(b"PUT", b"/v1/clusters/b", extra=b"Transfer-Encoding: chunked\r\n"))
        connection.send(b"2\r\n{")
        self.clock.advance(5)
        self.assertTrue(connection.closed)

    def test_body_in_time(self) -> None:
        """A slow body within the idle time-out is read and answered (here by a synchronous 400)."""
        connection = self.connect()
        data = json.dumps(cluster_body(colour="blue")).encode()
        connection.send(self.head(b"PUT", b"/v1/clusters/b", extra=b"Content-Length: %d\r\n" % len(data)))
        for start in range(0, len(data), 100):
            self.clock.advance(4)
            connection.send(data[start : start + 100])
        head, _, body = connection.answer().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertEqual(json.loads(body)["field"], "colour")
        self.assertFalse(connection.closed)

    def test_token_checked_before_the_body(self) -> None:
        """
        A missing or wrong token is answered 401 as soon as the head is
        complete: a 1 MiB body is neither waited for nor kept.
        """
        for token in ("wrong", ""):
            connection = self.connect()
            length = b"Content-Length: %d\r\n" % MAX_BODY_BYTES
            connection.send(self.head(b"PUT", b"/v1/clusters/b", token=token, extra=length))
            head, _, body = connection.answer().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
            self.assertIn(b"Connection: close", head)
            self.assertEqual(json.loads(body)["error"], "missing or invalid bearer token")
            self.assertTrue(connection.closed)
            self.assertEqual(connection.channel.requests, [])
            connection.lose()
        self.assertEqual(self.control.bodies, {})

    def test_foreign_host_refused_before_the_body(self) -> None:
        site = control_site(self.control, None, self.settings, reactor=self.clock)
        connection = MemoryConnection(site, 1)
        connection.send(b"PUT /v1/clusters/b HTTP/1.1\r\nHost: 127.0.0.1.nip.io\r\nContent-Length: 100\r\n\r\n")
        self.assertTrue(connection.answer().startswith(b"HTTP/1.1 403 "), connection.answer())
        self.assertTrue(connection.closed)


class HostHeaderParsingTests(SynchronousTestCase):
    """Without a token, the Host header must name this host exactly (DNS rebinding)."""

    def status(self, *hosts: bytes) -> bytes:
        site = control_site(FakeControl(), None, reactor=MemoryReactorClock())
        connection = MemoryConnection(site, 1)
        headers = b"".join(b"Host: " + host + b"\r\n" for host in hosts)
        connection.send(b"GET /v1/health HTTP/1.1\r\n" + headers + b"\r\n")
        return connection.answer()[9:12]

    def test_bypasses_refused(self) -> None:
        for host in [
            b"127.attacker.example",
            b"127.0.0.1.nip.io",
            b"127.0.0.1.nip.io:8765",
            b"127.0.0.1.",
            b"127.1",
            b"0x7f.0.0.1",
            b"2130706433",
            b"localhost.attacker.example",
            b"localhost:8765.attacker.example",
            b"localhost:80:80",
            b"localhost:abc",
            b"127.0.0.1:80@evil.example",
            b"[::1].evil.example",
            b"[::1]evil.example",
            b"[::1",
            b"[127.0.0.1]",
            b"[localhost]",
            b"::1",
            b"10.0.0.1",
            b"[::2]:8765",
            b"",
            b"\xff\xfe",
        ]:
            self.assertEqual(self.status(host), b"403", host)

    def test_two_host_headers_refused(self) -> None:
        self.assertEqual(self.status(b"localhost", b"evil.example"), b"403")

    def test_loopback_accepted(self) -> None:
        for host in [
            b"localhost",
            b"LocalHost:8765",
            b"localhost.",
            b"localhost.:8765",
            b"localhost:",
            b"ip6-localhost:8765",
            b"127.0.0.1",
            b"127.1.2.3:8765",
            b"[::1]",
            b"[::1]:8765",
            b"[::ffff:127.0.0.1]:8765",
        ]:
            self.assertEqual(self.status(host), b"200", host)
