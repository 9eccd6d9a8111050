"""
The control plane end to end in-process: the real API resource on loopback
(treq), the real GatewayControl on a running gateway, the state file, and
streams through SOCKS to clusters registered at runtime.
"""

from __future__ import annotations

import json
import os
import socket

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from gateway.config import GatewaySettings
from gateway.control.bodies import validate_body
from gateway.control.http import control_site
from gateway.control.registry import GatewayControl
from gateway.store.file import FileStore
from gateway.store.statefile import StateFile
from gateway.testing import DEMO_PAGE
from tests.support import WEB, GatewayHarness, inline, recv_all, sleep, socks5_open, socks_get

TOKEN = "control-token"


def fetch(port: int, user: str, password: str = "") -> tuple[int, bytes]:
    """C{GET /} of the web server through SOCKS5, as the cluster or alias C{user} names."""
    return socks_get(port, *WEB, username=user, password=password)


def metric(text: bytes, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class ControlPlaneTestCase(TestCase):
    """A running gateway with its control API on loopback (with C{settings})."""

    settings = GatewaySettings()

    @inline
    async def setUp(self):
        self.harness = GatewayHarness(self, self.settings)
        await self.harness.start()
        self.state_file = os.path.join(self.harness.dir, "state", "clusters.json")
        await self._start_control()

    async def _start_control(self) -> None:
        self.store = StateFile(self.state_file)
        bodies = self.store.load()
        for name, body in bodies.items():
            self.harness.service.add_cluster(validate_body(name, body))
        self.control = GatewayControl(self.harness.service, FileStore(self.store, bodies), {"demo"})
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            control_site(self.control, TOKEN, self.settings)
        )
        self.addCleanup(port.stopListening)
        self.control_port = port.getHost().port
        self.url = f"http://127.0.0.1:{self.control_port}"

    def body(self, **more) -> dict:
        body = self.harness.cluster_settings(**{"aliases": ["net-api"], "token": "t1", **more})
        body.pop("connect_timeout")
        return body

    async def call(self, method: str, path: str, body=None, token: str = TOKEN):
        headers = {"Authorization": f"Bearer {token}"}
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(
            method, self.url + path, data=data, headers=headers, pool=HTTPConnectionPool(reactor, persistent=False)
        )
        content = await response.content()
        return response.code, content


class ControlPlaneTests(ControlPlaneTestCase):
    @inline
    async def test_register_use_inspect_delete(self):
        code, content = await self.call("PUT", "/v1/clusters/api-1", self.body())
        self.assertEqual(code, 201, content)
        await self.harness.cluster_up("api-1")

        code, page = await deferToThread(fetch, self.harness.socks_port, "net-api", "t1")
        self.assertEqual(code, 0)
        self.assertTrue(page.endswith(DEMO_PAGE))
        await self.harness.until_no_streams(cluster="api-1")  # bytes are counted at the stream's close

        code, content = await self.call("GET", "/v1/clusters/api-1")
        view = json.loads(content)
        self.assertEqual(view["source"], "api")
        self.assertEqual(view["status"]["state"], "up")
        self.assertEqual(view["status"]["streams_opened"], 1)
        self.assertGreater(view["status"]["bytes_down"], 0)
        self.assertTrue(view["settings"]["token_set"])
        self.assertNotIn(b"PRIVATE KEY", content)
        self.assertNotIn(b't1"', content.replace(b'"token_set"', b""))

        code, content = await self.call("GET", "/v1/clusters")
        self.assertEqual([c["name"] for c in json.loads(content)["clusters"]], ["api-1", "demo"])

        # The state file holds the body, mode 0600.
        self.assertEqual(os.stat(self.state_file).st_mode & 0o777, 0o600)
        self.assertIn("api-1", json.load(open(self.state_file))["clusters"])

        code, _ = await self.call("DELETE", "/v1/clusters/api-1")
        self.assertEqual(code, 204)
        code, _ = await deferToThread(fetch, self.harness.socks_port, "net-api", "t1")
        self.assertNotEqual(code, 0)
        self.assertEqual(json.load(open(self.state_file))["clusters"], {})

    @inline
    async def test_proxy_command_is_off_for_api_clusters(self):
        code, content = await self.call("PUT", "/v1/clusters/pc", self.body(proxy_command="nc {host} {port}"))
        self.assertEqual(code, 400)
        self.assertEqual(json.loads(content)["field"], "proxy_command")

    @inline
    async def test_no_confused_deputy(self):
        """
        An API body cannot borrow another cluster's connection (jump) nor a
        file of the gateway's host: 400 naming the key, nothing registered.
        """
        for field, value in (
            ("jump", "demo"),
            ("key_file", "/etc/ssh/ssh_host_ed25519_key"),
            ("known_hosts", "/etc/ssh/ssh_known_hosts"),
            ("token_file", "/etc/gateway/token"),
        ):
            body = self.body(**{field: value})
            body.pop({"key_file": "key", "known_hosts": "host_keys", "token_file": "token"}.get(field, "-"), None)
            code, content = await self.call("PUT", "/v1/clusters/deputy", body)
            self.assertEqual(code, 400, content)
            error = json.loads(content)
            self.assertEqual(error["field"], field)
            self.assertNotIn("/etc", error["error"])  # a file key is refused before the path is looked at
        self.assertNotIn("deputy", self.harness.service.clusters)
        self.assertFalse(os.path.exists(self.state_file))

    @inline
    async def test_config_clusters_are_read_only(self):
        code, content = await self.call("PUT", "/v1/clusters/demo", self.body())
        self.assertEqual(code, 409)
        code, _ = await self.call("DELETE", "/v1/clusters/demo")
        self.assertEqual(code, 409)

    @inline
    async def test_invalid_body_names_the_field(self):
        code, content = await self.call("PUT", "/v1/clusters/bad", self.body(networks=["10.0.0.1/24"]))
        self.assertEqual(code, 400)
        error = json.loads(content)
        self.assertEqual(error["field"], "networks[0]")
        self.assertIn("host bits set", error["error"])
        self.assertFalse(os.path.exists(self.state_file))

    @inline
    async def test_an_unwritable_state_file_is_a_503(self):
        """The state file's directory is a file now: nothing can be kept, nothing changes."""
        self.store.path = os.path.join(self.harness.dir, "blocker", "clusters.json")
        with open(os.path.dirname(self.store.path), "w"):
            pass
        code, content = await self.call("PUT", "/v1/clusters/api-1", self.body())
        self.assertEqual(code, 503, content)
        self.assertIn("cannot create directory", json.loads(content)["error"])
        code, _ = await self.call("GET", "/v1/clusters/api-1")
        self.assertEqual(code, 404)

    @inline
    async def test_registry_survives_a_restart(self):
        code, _ = await self.call("PUT", "/v1/clusters/api-2", self.body())
        self.assertEqual(code, 201)
        # A new control (as after a gateway restart) loads the same clusters.
        await self.harness.service.remove_cluster("api-2")
        await self._start_control()
        await self.harness.cluster_up("api-2")
        code, page = await deferToThread(fetch, self.harness.socks_port, "api-2", "t1")
        self.assertEqual(code, 0)

    @inline
    async def test_fifty_concurrent_puts_and_deletes_stay_consistent(self):
        names = [f"c{i}" for i in range(25)]
        calls = [self.call("PUT", f"/v1/clusters/{n}", self.body(aliases=[f"alias-{n}"])) for n in names]
        calls += [self.call("DELETE", f"/v1/clusters/{n}") for n in names[::2]]
        calls = [Deferred.fromCoroutine(call) for call in calls]
        results = await gatherResults(calls)
        self.assertTrue(all(code in (200, 201, 204, 404) for code, _ in results), results)
        persisted = set(json.load(open(self.state_file))["clusters"])
        running = set(self.harness.service.clusters) - {"demo"}
        self.assertEqual(persisted, running)
        code, content = await self.call("GET", "/v1/clusters")
        listed = {c["name"] for c in json.loads(content)["clusters"]} - {"demo"}
        self.assertEqual(listed, running)

    @inline
    async def test_metrics_move_with_streams(self):
        code, before = await self.call("GET", "/metrics")
        self.assertEqual(code, 200)
        await deferToThread(fetch, self.harness.socks_port, "demo")
        await deferToThread(fetch, self.harness.socks_port, "nobody", "x")  # refused at authentication
        sock, refused = await deferToThread(socks5_open, self.harness.socks_port, "10.99.0.10", 81)
        sock.close()
        code, after = await self.call("GET", "/metrics")
        self.assertEqual(
            metric(after, "gateway_streams_opened_total", cluster="demo"),
            1 + metric(before, "gateway_streams_opened_total", cluster="demo"),
        )
        self.assertEqual(metric(after, "gateway_streams_failed_total", cluster="demo", reason="refused"), 1)
        self.assertEqual(metric(after, "gateway_cluster_up", cluster="demo"), 1)
        self.assertGreater(metric(after, "gateway_bytes_total", cluster="demo", direction="down"), 0)

    @inline
    async def test_health_and_auth(self):
        code, content = await self.call("GET", "/v1/health")
        self.assertEqual((code, json.loads(content)["clusters"]), (200, {"up": 1, "down": 0}))
        code, _ = await self.call("GET", "/v1/health", token="wrong")
        self.assertEqual(code, 401)

    @inline
    async def test_health_of_a_running_gateway(self):
        """Its name, its bound listeners, ready while they listen; not ready once a listener is gone."""
        code, content = await self.call("GET", "/v1/health")
        health = json.loads(content)
        service = self.harness.service
        self.assertEqual((health["gateway"], health["ready"], health["not_ready"]), (self.settings.name, True, []))
        self.assertEqual(health["listeners"]["socks"], [f"127.0.0.1:{self.harness.socks_port}"])
        self.assertEqual(
            health["store"], {"backend": "file", "path": self.state_file, "state": "synced", "synced": True}
        )
        code, content = await self.call("GET", "/v1/health/ready", token="")
        self.assertEqual((code, json.loads(content)["ready"]), (200, True))

        http = next(child for child in service if getattr(child, "kind", None) == "http")
        port, http.port = http.port, None  # as if it had not bound
        self.addCleanup(setattr, http, "port", port)
        code, content = await self.call("GET", "/v1/health/ready", token="")
        self.assertEqual((code, json.loads(content)["ready"]), (503, False))
        code, content = await self.call("GET", "/v1/health")
        health = json.loads(content)
        self.assertEqual(health["status"], "not-ready")
        self.assertIn("http listener", health["not_ready"][0])

    @inline
    async def test_proxy_pac_from_the_gateway(self):
        class Pac:
            def pac_file(self, host, cluster):
                return b"pac " + repr((host, cluster)).encode() if cluster != "nope" else None

        self.harness.service.gateway.pac = Pac()
        self.assertEqual(
            await self.call("GET", "/v1/proxy.pac?cluster=demo", token=""), (200, b"pac ('127.0.0.1', 'demo')")
        )
        self.assertEqual((await self.call("GET", "/v1/proxy.pac?cluster=nope", token=""))[0], 404)
        self.harness.service.gateway.pac = None
        self.assertEqual((await self.call("GET", "/v1/proxy.pac", token=""))[0], 404)

    @inline
    async def test_replace_keeps_open_streams_and_routes_new_ones(self):
        code, _ = await self.call("PUT", "/v1/clusters/api-r", self.body())
        self.assertEqual(code, 201)
        await self.harness.cluster_up("api-r")
        old = self.harness.service.clusters["api-r"]
        sock, opened = await deferToThread(socks5_open, self.harness.socks_port, "10.99.0.10", 7, "api-r", "t1")
        self.addCleanup(sock.close)
        self.assertEqual(opened, 0)

        code, content = await self.call("PUT", "/v1/clusters/api-r", self.body(token="t2"))
        self.assertEqual(code, 200, content)
        new = self.harness.service.clusters["api-r"]
        self.assertIsNot(new, old)
        self.assertTrue(old.running)  # still carrying the open stream
        await self.harness.cluster_up("api-r")
        code, page = await deferToThread(fetch, self.harness.socks_port, "api-r", "t2")
        self.assertEqual(code, 0)
        code, _ = await deferToThread(fetch, self.harness.socks_port, "api-r", "t1")
        self.assertNotEqual(code, 0)  # the old token no longer works

        def finish():
            sock.sendall(b"still here")
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)

        self.assertEqual(await deferToThread(finish), b"still herebye")
        for _ in range(100):
            if not old.running:
                break
            await sleep(0.05)
        self.assertFalse(old.running)  # retired once its stream ended
        code, _ = await self.call("DELETE", "/v1/clusters/api-r")
        self.assertEqual(code, 204)


class JumpAllowedTests(ControlPlaneTestCase):
    """With [gateway] api_jump = true: jumps between API clusters, but no cycle."""

    settings = GatewaySettings(api_jump=True)

    @inline
    async def test_jump_cycle_refused(self):
        code, content = await self.call("PUT", "/v1/clusters/j1", self.body(aliases=[]))
        self.assertEqual(code, 201, content)
        code, content = await self.call("PUT", "/v1/clusters/j2", self.body(aliases=["net-j2"], jump="j1"))
        self.assertEqual(code, 201, content)
        code, content = await self.call("PUT", "/v1/clusters/j1", self.body(aliases=[], jump="net-j2"))
        self.assertEqual(code, 400, content)
        self.assertEqual(json.loads(content), {"error": "jump cycle j1 -> j2 -> j1", "field": "jump"})
        self.assertIsNone(self.harness.service.clusters["j1"].config.jump_cluster)
        self.assertNotIn("jump", json.load(open(self.state_file))["clusters"]["j1"])
        code, content = await self.call("PUT", "/v1/clusters/j3", self.body(aliases=[], jump="demo"))
        self.assertEqual(code, 201, content)


class ControlCapTests(ControlPlaneTestCase):
    """The control listener's cap is its own: API clients over it do not touch the proxies."""

    settings = GatewaySettings(control_max_clients=3)

    @inline
    async def test_over_the_cap_closed_at_once_proxies_served(self):
        def hold() -> list[socket.socket]:
            held = []
            for _ in range(3):
                held.append(socket.create_connection(("127.0.0.1", self.control_port), timeout=5))
            return held

        held = await deferToThread(hold)
        self.addCleanup(lambda: [s.close() for s in held])

        def over_the_cap() -> bytes:
            with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as sock:
                try:
                    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    return sock.recv(100)
                except ConnectionResetError:  # closed before (or while) the request arrived
                    return b""

        self.assertEqual(await deferToThread(over_the_cap), b"")
        code, page = await deferToThread(fetch, self.harness.socks_port, "demo")
        self.assertEqual(code, 0)
        self.assertTrue(page.endswith(DEMO_PAGE))
        held.pop().close()
        for _ in range(100):  # the server notices the close on a later turn
            code, _ = await self.call("GET", "/v1/health")
            if code == 200:
                break
            await sleep(0.05)
        self.assertEqual(code, 200)
