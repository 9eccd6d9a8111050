"""
Per-cluster listeners and cluster-qualified names, in-process: the real
service tree and control API on loopback, a fake proxy node, blocking
SOCKS5 and HTTP clients in threads.
"""

from __future__ import annotations

import errno
import gc
import itertools
import json
import os
import socket
from dataclasses import replace
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from gateway.app.clusters import ClusterRegistry
from gateway.app.listeners import KINDS, ClusterListeners, ListenerChange, ListenError
from gateway.app.service import GatewayService
from gateway.config import ClusterConfig, GatewayConfig, GatewaySettings, ListenConfig, parse_cluster
from gateway.control.registry import GatewayControl
from gateway.proxy.frontend import ClientLimit
from gateway.proxy.opener import StreamOpener
from gateway.routing import Router
from gateway.store.file import FileStore
from gateway.testing import DEMO_PAGE
from gateway.testing.keys import generate_key, private_pem, public_line
from tests import test_routing
from tests.support import WEB, WEB2, WEB2_PAGE, capture_events, http_exchange, inline, socks_get
from tests.test_controlplane import ControlPlaneTestCase

LOOPBACK_ANY = "tcp:0:interface=127.0.0.1"


def bound_port(view: dict, kind: str, index: int = 0) -> int:
    return int(view["status"]["listeners"][kind][index].rsplit(":", 1)[1])


class ListenerTests(ControlPlaneTestCase):
    async def put(self, name: str, **more) -> tuple[int, dict]:
        code, content = await self.call("PUT", f"/v1/clusters/{name}", self.body(**more))
        return code, json.loads(content)

    async def view(self, name: str) -> dict:
        code, content = await self.call("GET", f"/v1/clusters/{name}")
        self.assertEqual(code, 200, content)
        return json.loads(content)

    @inline
    async def test_no_credentials(self):
        """The cluster has a token; its own listeners ask none, for SOCKS5 and the HTTP proxy alike."""
        code, content = await self.put("api-1", socks=LOOPBACK_ANY, http=[LOOPBACK_ANY])
        self.assertEqual(code, 201, content)
        await self.harness.cluster_up("api-1")
        view = await self.view("api-1")
        self.assertEqual(view["settings"]["socks"], [LOOPBACK_ANY])
        socks, http = bound_port(view, "socks"), bound_port(view, "http")

        code, page = await deferToThread(socks_get, socks, *WEB)
        self.assertEqual(code, 0)
        self.assertTrue(page.endswith(DEMO_PAGE))
        reply = await deferToThread(
            http_exchange, http, b"GET http://10.99.0.11/ HTTP/1.1\r\nHost: 10.99.0.11\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:100])
        self.assertTrue(reply.endswith(WEB2_PAGE))

        # the shared listener still wants the token for the same destination
        code, _ = await deferToThread(socks_get, self.harness.socks_port, *WEB, username="api-1")
        self.assertNotEqual(code, 0)

    @inline
    async def test_only_its_cluster(self):
        code, content = await self.put("api-1", socks=LOOPBACK_ANY, networks=["10.99.0.10/32"])
        self.assertEqual(code, 201, content)
        await self.harness.cluster_up("api-1")
        socks = bound_port(await self.view("api-1"), "socks")
        code, _ = await deferToThread(socks_get, socks, *WEB2)  # outside api-1's networks
        self.assertEqual(code, 2)  # not allowed by ruleset
        code, _ = await deferToThread(socks_get, socks, "10-99-0-10.demo.gw.internal", 80)
        self.assertEqual(code, 2)  # another cluster's qualified name
        code, _ = await deferToThread(socks_get, socks, *WEB, username="demo")
        self.assertEqual(code, -2)  # credentials naming another cluster

    @inline
    async def test_port_in_use(self):
        taken = await serverFromString(reactor, LOOPBACK_ANY).listen(Factory())
        self.addCleanup(taken.stopListening)
        endpoint = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        code, body = await self.put("api-1", socks=LOOPBACK_ANY, http=[LOOPBACK_ANY, endpoint])
        self.assertEqual(code, 400)
        self.assertEqual(body["field"], "http[1]")
        self.assertIn("Address already in use", body["error"])
        code, _ = await self.call("GET", "/v1/clusters/api-1")
        self.assertEqual(code, 404)  # nothing registered, no port left open
        self.assertEqual(self.harness.service.listeners.bound("api-1"), {"socks": [], "http": []})

    @inline
    async def test_beyond_loopback(self):
        code, body = await self.put("api-1", socks="tcp:0:interface=0.0.0.0")
        self.assertEqual(code, 400)
        self.assertEqual(body["field"], "socks")
        self.assertIn("remote_listeners", body["error"])
        # ... which an API client may not set unless the operator allows it
        code, body = await self.put("api-1", socks="tcp:0:interface=0.0.0.0", remote_listeners=True)
        self.assertEqual((code, body["field"]), (400, "remote_listeners"))
        self.assertIn("api_remote_listeners", body["error"])

    @inline
    async def test_replace_delete(self):
        fixed = await self._free_port()
        code, _ = await self.put("api-1", socks=fixed, http=LOOPBACK_ANY)
        self.assertEqual(code, 201)
        first = await self.view("api-1")
        code, _ = await self.put("api-1", socks=fixed)  # http dropped
        self.assertEqual(code, 200)
        second = await self.view("api-1")
        self.assertEqual(second["status"]["listeners"]["socks"], first["status"]["listeners"]["socks"])
        self.assertEqual(second["status"]["listeners"]["http"], [])
        await self._refused(bound_port(first, "http"))
        await self.harness.cluster_up("api-1")
        code, _ = await deferToThread(socks_get, bound_port(second, "socks"), *WEB)
        self.assertEqual(code, 0)

        code, _ = await self.call("DELETE", "/v1/clusters/api-1")
        self.assertEqual(code, 204)
        await self._refused(bound_port(second, "socks"))

    async def _free_port(self) -> str:
        probe = await serverFromString(reactor, LOOPBACK_ANY).listen(Factory())
        port = probe.getHost().port
        await probe.stopListening()
        return f"tcp:{port}:interface=127.0.0.1"

    async def _refused(self, port: int) -> None:
        def connect() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass

        await self.assertFailure(deferToThread(connect), ConnectionRefusedError)


class QualifiedTests(ControlPlaneTestCase):
    @inline
    async def test_socks5_http(self):
        """HOST.CLUSTER.gw.internal through the shared listeners; Host upstream is the real one."""
        code, page = await deferToThread(socks_get, self.harness.socks_port, "10-99-0-10.demo.gw.internal", 80)
        self.assertEqual(code, 0)
        self.assertTrue(page.endswith(DEMO_PAGE))
        reply = await deferToThread(
            http_exchange,
            self.harness.http_port,
            b"GET http://10-99-0-11.DEMO.gw.internal/ HTTP/1.1\r\nHost: 10-99-0-11.demo.gw.internal\r\n"
            b"Connection: close\r\n\r\n",
        )
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:200])
        self.assertTrue(reply.endswith(WEB2_PAGE))

    @inline
    async def test_token(self):
        code, content = await self.call("PUT", "/v1/clusters/api-1", self.body())
        self.assertEqual(code, 201, content)
        await self.harness.cluster_up("api-1")
        name = "10-99-0-10.net-api.gw.internal"
        code, _ = await deferToThread(socks_get, self.harness.socks_port, name, 80)
        self.assertEqual(code, 2)
        code, _ = await deferToThread(socks_get, self.harness.socks_port, name, 80, username="api-1", password="t1")
        self.assertEqual(code, 0)


class StartupTests(TestCase):
    def test_port_in_use(self):
        """A TOML cluster whose port is taken: one critical line naming file and key, then exit."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        data = {
            "proxies": ["127.0.0.1:1"],
            "user": "u",
            "key": private_pem(generate_key()),
            "insecure_accept_any_host_key": True,
            "networks": ["10.0.0.0/24"],
            "http": endpoint,
        }
        cluster = parse_cluster("a", data, "/etc/gw.toml", "clusters.a")
        config = GatewayConfig(ListenConfig(socks=(), http=(), control=()), {"a": cluster}, "/etc/gw.toml")
        service = GatewayService(config, reactor)
        events = capture_events(self)
        self.assertRaises(SystemExit, service.privilegedStartService)
        [critical] = [e for e in events if e["log_level"].name == "critical"]
        self.assertEqual(
            critical["log_format"].format(**critical),
            f"/etc/gw.toml: clusters.a.http: cannot listen on {endpoint!r}: Address already in use",
        )


class ResolvedNameTests(ControlPlaneTestCase):
    """Names the proxy node resolves: opened to the checked address, refused when any lies outside."""

    @inline
    async def test_inside_and_outside(self):
        self.harness.node.names.update(
            {
                "web.tenant.test": ["10.99.0.10"],
                "evil.tenant.test": ["127.0.0.1"],
                "mixed.tenant.test": ["10.99.0.10", "127.0.0.1"],
            }
        )
        events = capture_events(self)
        port = self.harness.socks_port
        code, page = await deferToThread(socks_get, port, "web.tenant.test", 80, username="demo")
        self.assertEqual(code, 0)
        self.assertTrue(page.endswith(DEMO_PAGE))
        code, page = await deferToThread(socks_get, port, "WEB.tenant.test.demo.gw.internal.", 80)
        self.assertEqual(code, 0)
        for name in ("evil.tenant.test", "mixed.tenant.test"):
            code, _ = await deferToThread(socks_get, port, name, 80, username="demo")
            self.assertEqual(code, 2, name)
        code, _ = await deferToThread(socks_get, port, "nowhere.tenant.test", 80, username="demo")
        self.assertEqual(code, 4)  # host unreachable: not found by the proxy node
        await self.harness.until_no_streams()
        summaries = [e.get("summary", "") for e in events]
        self.assertIn("stream to web.tenant.test:80 (10.99.0.10) via demo closed", " ".join(summaries))
        refused = [e for e in events if e.get("outcome") == "refused"]
        self.assertIn("127.0.0.1, outside cluster 'demo' networks", refused[0]["detail"])


class PacProviderTests(ControlPlaneTestCase):
    """The PAC file the running gateway serves follows its clusters and their bound listeners."""

    async def pac(self, query: str = "") -> bytes:
        request = f"GET /proxy.pac{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        return await deferToThread(http_exchange, self.harness.http_port, request)

    @inline
    async def test_follows_registrations(self):
        reply = await self.pac()
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:200])
        self.assertIn(b"application/x-ns-proxy-autoconfig", reply)
        shared = f"PROXY 127.0.0.1:{self.harness.http_port}; SOCKS5 127.0.0.1:{self.harness.socks_port}"
        self.assertIn(shared.encode(), reply)
        self.assertNotIn(b"api-1", reply)

        code, content = await self.call("PUT", "/v1/clusters/api-1", self.body(socks=LOOPBACK_ANY))
        self.assertEqual(code, 201, content)
        socks = self.harness.service.listeners.bound("api-1")["socks"][0]
        for query in ("", "?cluster=net-api"):
            reply = await self.pac(query)
            self.assertIn(f"SOCKS5 {socks}".encode(), reply, query)
        self.assertNotIn(b'"demo"', await self.pac("?cluster=api-1"))
        self.assertTrue((await self.pac("?cluster=nope")).startswith(b"HTTP/1.1 404"))

        code, _ = await self.call("DELETE", "/v1/clusters/api-1")
        self.assertEqual(code, 204)
        self.assertNotIn(socks.encode(), await self.pac())

    @inline
    async def test_cluster_listener_serves_its_view(self):
        """GET /proxy.pac on a cluster's own HTTP listener: that cluster's view unless asked for another."""
        code, content = await self.call("PUT", "/v1/clusters/api-1", self.body(socks=LOOPBACK_ANY, http=LOOPBACK_ANY))
        self.assertEqual(code, 201, content)
        http = int(self.harness.service.listeners.bound("api-1")["http"][0].rsplit(":", 1)[1])
        request = b"GET /proxy.pac HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        reply = await deferToThread(http_exchange, http, request)
        self.assertIn(b"api-1", reply)
        self.assertNotIn(b'"demo"', reply)
        request = b"GET /proxy.pac?cluster=demo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        self.assertIn(b'"demo"', await deferToThread(http_exchange, http, request))


class RemoteListenerTests(ControlPlaneTestCase):
    """With [gateway] api_remote_listeners, an API cluster may listen beyond loopback."""

    settings = GatewaySettings(api_remote_listeners=True)

    @inline
    async def test_beyond_loopback_allowed(self):
        code, content = await self.call(
            "PUT", "/v1/clusters/api-1", self.body(socks="tcp:0:interface=0.0.0.0", remote_listeners=True)
        )
        self.assertEqual(code, 201, content)

    @inline
    async def test_wildcard_listener_written_with_the_request_host(self):
        code, content = await self.call(
            "PUT", "/v1/clusters/api-1", self.body(socks="tcp:0:interface=0.0.0.0", remote_listeners=True)
        )
        self.assertEqual(code, 201, content)
        port = self.harness.service.listeners.bound("api-1")["socks"][0].rsplit(":", 1)[1]
        request = b"GET /proxy.pac HTTP/1.1\r\nHost: gw.example:3128\r\nConnection: close\r\n\r\n"
        reply = await deferToThread(http_exchange, self.harness.http_port, request)
        self.assertIn(f"SOCKS5 gw.example:{port}".encode(), reply)


# --- in memory ------------------------------------------------------------------------------


@implementer(IListeningPort)
class _Port:
    """A listening port of L{_ListenReactor}: stopping it ends a reactor turn later, as a real TCP port does."""

    def __init__(self, reactor: _ListenReactor, address: IPv4Address | IPv6Address) -> None:
        self._reactor = reactor
        self._address = address

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        return deferLater(self._reactor, 0, self._reactor.bound.discard, self._address.port)

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._address


class _ListenReactor(MemoryReactorClock):
    """listenTCP as the kernel answers it: a port in use (or in C{taken}) is refused, 0 picks a free one."""

    def __init__(self, taken: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.bound: set[int] = set(taken)
        self.factories: dict[int, Any] = {}
        self._ephemeral = itertools.count(40000)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _Port:
        if port in self.bound:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)))
        port = port or next(self._ephemeral)
        self.bound.add(port)
        self.factories[port] = factory
        if ":" in interface:
            return _Port(self, IPv6Address("TCP", interface, port))
        return _Port(self, IPv4Address("TCP", interface or "0.0.0.0", port))


def _config(name: str = "a", **listeners: Any) -> ClusterConfig:
    return replace(test_routing.cluster(name, ("10.0.0.0/24",)), **listeners)


class ClusterListenersTests(SynchronousTestCase):
    """L{ClusterListeners} on a reactor that binds like the kernel, without sockets."""

    def setUp(self) -> None:
        self.reactor = _ListenReactor(taken=(2001,))
        opener = StreamOpener(Router([]), {})
        self.listeners = ClusterListeners(self.reactor, opener, ClientLimit(8))  # type: ignore[arg-type]

    def test_start_up_refusal_after_a_first_listener(self) -> None:
        """
        The second listener's port is taken: start-up stops, naming it, even
        though closing the first one takes a reactor turn.
        """
        self.listeners.want(
            _config(socks=("tcp:0:interface=127.0.0.1",), http=("tcp:2001:interface=127.0.0.1",)), "gw.toml"
        )
        events = capture_events(self)
        self.assertRaises(SystemExit, self.listeners.privilegedStartService)
        [critical] = [e for e in events if e["log_level"].name == "critical"]
        self.assertIn("gw.toml: clusters.a.http: cannot listen", critical["log_format"].format(**critical))
        self.assertEqual((critical["cluster"], critical["outcome"]), ("a", "listen-refused"))
        self.reactor.advance(0)
        self.assertEqual(self.reactor.bound, {2001})  # the first one closed again

    def test_kept_listener_checked_again(self) -> None:
        """
        A replacement that turns remote_listeners off does not keep a listener
        reachable beyond this host (same endpoint string or not).
        """
        self.listeners.startService()
        remote = _config(socks=("tcp6:0:interface=\\:\\:",), remote_listeners=True)
        self.successResultOf(self.listeners.prepare(remote)).commit()
        failure = self.failureResultOf(self.listeners.prepare(replace(remote, remote_listeners=False)), ListenError)
        self.assertEqual(failure.value.key, "socks")
        self.assertIn("reachable beyond this host", failure.value.reason)
        self.assertEqual(len(self.listeners.addresses("a", "socks")), 1)  # nothing changed

    def test_closed_listener_drops_its_idle_clients(self) -> None:
        """
        A listener that closes (dropped by a replacement, or its cluster
        deleted) must not leave its clients a way in: an idle kept-alive
        connection would go on without credentials -- and, once another
        cluster takes the name as an alias, into that cluster.
        """
        self.listeners.startService()
        config = _config(socks=("tcp:0:interface=127.0.0.1",), http=("tcp:0:interface=127.0.0.1",))
        events = capture_events(self)
        self.successResultOf(self.listeners.prepare(config)).commit()
        opened = [(e["cluster"], e["kind"]) for e in events if e.get("outcome") == "listening"]
        self.assertEqual(opened, [("a", "socks"), ("a", "http")])
        clients = {}
        for kind in KINDS:
            [address] = self.listeners.addresses("a", kind)
            protocol = self.reactor.factories[address.port].buildProtocol(address)
            protocol.makeConnection(StringTransport())
            clients[kind] = protocol.transport
        self.successResultOf(self.listeners.prepare(replace(config, http=()))).commit()
        self.assertEqual((clients["http"].disconnecting, clients["socks"].disconnecting), (True, False))
        self.listeners.close("a")
        self.assertTrue(clients["socks"].disconnecting)

    def test_port_that_will_not_close(self) -> None:
        """
        A port whose close fails is logged once, naming its cluster; closing
        the cluster's listeners still succeeds (it is gone either way), and
        no Deferred is left holding the error for the garbage collector to
        report again as "Unhandled error in Deferred".
        """
        self.listeners.startService()
        config = _config(socks=("tcp:0:interface=127.0.0.1",), http=("tcp:0:interface=127.0.0.1",))
        self.successResultOf(self.listeners.prepare(config)).commit()
        self.patch(_Port, "stopListening", lambda port: fail(OSError(errno.EBADF, "Bad file descriptor")))
        events = capture_events(self)
        self.successResultOf(self.listeners.close("a"))
        gc.collect()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        self.assertEqual([e.get("cluster") for e in events if e.get("outcome") == "close-failed"], ["a", "a"])

    def test_error_in_commit_of_a_running_change(self) -> None:
        """
        A cluster added while running (not through the API) whose commit
        fails: the error is logged naming the cluster, not left in a
        Deferred nobody holds.
        """
        self.listeners.startService()
        self.patch(ListenerChange, "commit", lambda change: fail(RuntimeError("bug")))
        events = capture_events(self)
        self.listeners.want(_config(socks=("tcp:0:interface=127.0.0.1",)), "(api)")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e.get("cluster") for e in events if e.get("isError")], ["a"])


class RemoveClusterTests(SynchronousTestCase):
    def test_failure_reported_once(self) -> None:
        """
        Removing a cluster whose connections fail to stop: the caller gets
        the failure, and no Deferred is left holding it for the garbage
        collector to log again ("Unhandled error in Deferred").
        """
        config = GatewayConfig(ListenConfig(socks=(), http=(), control=()), {"a": _config()}, "gw.toml")
        service = GatewayService(config, MemoryReactorClock())  # type: ignore[arg-type]
        self.patch(service.registry, "remove", lambda name: fail(RuntimeError("cannot stop")))
        self.failureResultOf(service.remove_cluster("a"))
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_connection_that_fails_to_stop(self) -> None:
        """The same one level down: the registry's own gathering of a cluster's connections."""
        registry = ClusterRegistry(GatewaySettings(), MemoryReactorClock())  # type: ignore[arg-type]
        connection = registry.add(_config())
        registry.startService()
        self.patch(connection, "stopService", lambda: fail(RuntimeError("cannot stop")))
        self.failureResultOf(registry.remove("a"))
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class _StoreThatFailsAgain:
    """A state file written once, then refused (the disk filled up meanwhile)."""

    def __init__(self) -> None:
        self.saves = 0

    def save(self, clusters: Any) -> None:
        self.saves += 1
        if self.saves > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class PutRollbackTests(SynchronousTestCase):
    def test_new_ports_close_even_when_the_state_file_cannot_be_restored(self) -> None:
        """
        A PUT whose apply fails after the file was saved, and whose restoring
        save fails too: the ports it bound are closed all the same.
        """
        reactor = _ListenReactor()
        config = GatewayConfig(ListenConfig(socks=(), http=(), control=()), {}, "gw.toml")
        service = GatewayService(config, reactor)  # type: ignore[arg-type]
        service.listeners.startService()
        control = GatewayControl(service, FileStore(_StoreThatFailsAgain(), {}), set())  # type: ignore[arg-type]

        def add_cluster(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("cannot add")

        self.patch(service, "add_cluster", add_cluster)
        body = {
            "proxies": ["127.0.0.1:1"],
            "user": "u",
            "key": private_pem(generate_key()),
            "host_keys": [public_line(generate_key())],
            "networks": ["10.0.0.0/24"],
            "socks": LOOPBACK_ANY,
        }
        self.failureResultOf(control.put_cluster("api-1", body), OSError)
        reactor.advance(0)
        self.assertEqual(reactor.bound, set())
