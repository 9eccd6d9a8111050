"""
Self-test of the etcd lab (tests/system/etcdlab.py) against Debian's real
etcd 3.4, and the facts of etcd's v3 HTTP/JSON gateway the store backend
relies on (the shapes listed at the top of etcdlab.py).  The root-namespace
clusters listen on 127.0.0.1 only; the namespace test needs root.  Skipped
with the reason when etcd is not installed.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.trial.unittest import SkipTest, TestCase

from tests.system.etcdlab import NS_BASE_PORT, EtcdCluster, EtcdLabError, etcd_skip_reason
from tests.system.netlab import Lab
from tests.system.support import shared_etcd, shared_lab

#: A new leader within this many seconds of the old one's death (election timeout 500 ms).
ELECTION_BOUND = 3.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str) -> str:
    return base64.b64decode(b64).decode()


def _connection(endpoint: str, timeout: float, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    """http.client, not urllib: no proxy from the environment, ever (loopback only)."""
    url = urlsplit(endpoint)
    assert url.hostname == "127.0.0.1", endpoint
    if url.scheme == "https":
        return http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout, context=context)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def post(
    endpoint: str,
    path: str,
    body: dict[str, Any] | bytes,
    *,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    """One JSON POST to etcd's gateway (C{body} as is when bytes): the HTTP status and the decoded answer."""
    conn = _connection(endpoint, timeout, context)
    try:
        conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body), _headers(token))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = token
    return headers


class Watch:
    """A streamed POST /v3/watch: one JSON object a line, read with a bound."""

    def __init__(self, endpoint: str, create: dict[str, Any], *, token: str | None = None, **headers: str) -> None:
        self.conn = _connection(endpoint, 5, None)
        self.conn.request("POST", "/v3/watch", json.dumps({"create_request": create}), _headers(token) | headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.status

    def next(self) -> Any:
        """The next message; AssertionError at the end of the stream."""
        line = self.response.readline()
        assert line, "watch stream ended"
        return json.loads(line)

    def close(self) -> None:
        self.conn.close()


def watch_prefix(
    endpoint: str, prefix: str, *, token: str | None = None, headers: dict[str, str] | None = None, **create: Any
) -> Watch:
    """A watch of every key under C{prefix}; C{create} adds to its create_request."""
    range_end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return Watch(
        endpoint, {"key": _b64(prefix), "range_end": _b64(range_end), **create}, token=token, **(headers or {})
    )


def refused(endpoint: str) -> bool:
    """True if nothing listens on C{endpoint}'s port (root namespace only)."""
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class SharedClusterTest(TestCase):
    """Tests of the shared three-member cluster; each leaves every member running."""

    cluster: EtcdCluster

    def setUp(self) -> None:
        self.cluster = shared_etcd("etcd_lab", "etcd lab tests")
        self.addCleanup(self.cluster.start_members)  # those a test stopped; then all healthy


class EtcdClusterTests(SharedClusterTest):
    def test_three_members_share_writes(self) -> None:
        cluster = self.cluster
        self.assertEqual(len(set(cluster.endpoints)), 3)
        self.assertTrue(all(e.startswith("http://127.0.0.1:") for e in cluster.endpoints))
        self.assertIn(cluster.leader(), range(3))
        done = cluster.etcdctl("put", "/lab/share/one", "1", endpoints=cluster.endpoints[:1])
        self.assertEqual(done.returncode, 0, done.stderr)
        for endpoint in cluster.endpoints:
            done = cluster.etcdctl("get", "--print-value-only", "/lab/share/one", endpoints=[endpoint])
            self.assertEqual(done.stdout, b"1\n")
        value = bytes(range(256))
        revision = cluster.put("/lab/share/binary", value)
        self.assertEqual(cluster.get("/lab/share/binary"), value)
        self.assertIsNone(cluster.get("/lab/share/nothing"))
        self.assertEqual(cluster.items("/lab/share/"), {"/lab/share/one": b"1", "/lab/share/binary": value})
        self.assertGreaterEqual(cluster.revision(), revision)
        self.assertTrue("serving client traffic" in cluster.member_log(0), "member_log(0) is not m0's log")

    def test_leader_killed(self) -> None:
        cluster = self.cluster
        old = cluster.leader()
        cluster.put("/lab/before", "x")
        cluster.kill(old)
        started = time.monotonic()
        new = cluster.leader(timeout=ELECTION_BOUND)
        elapsed = time.monotonic() - started
        self.assertNotEqual(new, old)
        self.assertLess(elapsed, ELECTION_BOUND)
        cluster.put("/lab/after", "y")
        cluster.start_member(old)
        done = cluster.etcdctl("get", "--print-value-only", "/lab/after", endpoints=[cluster.endpoints[old]])
        self.assertEqual(done.stdout, b"y\n")

    def test_stop_all_then_start_again(self) -> None:
        cluster = self.cluster
        cluster.put("/lab/kept", "kept")
        cluster.stop_members()
        self.assertTrue(all(refused(e) for e in cluster.endpoints))
        cluster.start_members()
        self.assertEqual(cluster.get("/lab/kept"), b"kept")
        self.assertIn(cluster.leader(), range(3))

    def test_compact(self) -> None:
        cluster = self.cluster
        first = cluster.put("/lab/compacted", "one")
        second = cluster.put("/lab/compacted", "two")
        self.assertEqual(cluster.compact(second), second)
        done = cluster.etcdctl("get", f"--rev={first}", "/lab/compacted")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(b"required revision has been compacted", done.stderr)
        cluster.put("/lab/compacted", "three")
        self.assertEqual(cluster.compact(), cluster.revision())
        with self.assertRaises(EtcdLabError):
            cluster.compact(first)


class GatewayJSONTests(SharedClusterTest):
    """etcd 3.4's v3 HTTP/JSON gateway, as the store backend talks to it."""

    def test_put_range_txn(self) -> None:
        endpoint = self.cluster.endpoints[0]
        status, put = post(endpoint, "/v3/kv/put", {"key": _b64("/gw/a"), "value": _b64("v1")})
        self.assertEqual(status, 200)
        revision = put["header"]["revision"]
        self.assertIsInstance(revision, str)  # int64s are strings
        status, found = post(endpoint, "/v3/kv/range", {"key": _b64("/gw/"), "range_end": _b64("/gw0")})
        self.assertEqual((status, found["count"]), (200, "1"))
        kv = found["kvs"][0]
        self.assertEqual((_text(kv["key"]), _text(kv["value"]), kv["mod_revision"]), ("/gw/a", "v1", revision))
        _, nothing = post(endpoint, "/v3/kv/range", {"key": _b64("/nothing/")})
        self.assertNotIn("kvs", nothing)
        self.assertNotIn("count", nothing)  # zero is omitted

        def txn(below: str) -> Any:
            compare = {"target": "MOD", "result": "LESS", "key": _b64("/gw/"), "range_end": _b64("/gw0")}
            body = {
                "compare": [{**compare, "mod_revision": below}],
                "success": [{"request_put": {"key": _b64("/gw/b"), "value": _b64("vb")}}],
                "failure": [{"request_range": {"key": _b64("/gw/"), "range_end": _b64("/gw0")}}],
            }
            status, answer = post(endpoint, "/v3/kv/txn", body)
            self.assertEqual(status, 200)
            return answer

        above = str(int(revision) + 1)
        won = txn(above)  # every key under /gw/ was last written before `above`
        self.assertIs(won["succeeded"], True)
        self.assertIn("revision", won["responses"][0]["response_put"]["header"])
        lost = txn(above)  # /gw/b has mod_revision `above` now
        self.assertNotIn("succeeded", lost)
        self.assertEqual(lost["responses"][0]["response_range"]["count"], "2")

    def test_watch_events(self) -> None:
        cluster = self.cluster
        start = cluster.revision() + 1
        watch = watch_prefix(cluster.endpoints[1], "/gw-watch/", start_revision=str(start), prev_kv=True)
        self.addCleanup(watch.close)
        self.assertIs(watch.next()["result"]["created"], True)
        cluster.put("/gw-watch/k", "v")
        cluster.etcdctl("del", "/gw-watch/k")
        events: list[Any] = []
        while len(events) < 2:  # bounded: each read times out after 5 s
            events += watch.next()["result"]["events"]
        put, delete = events
        self.assertNotIn("type", put)  # PUT is the zero value: omitted
        self.assertEqual((_text(put["kv"]["key"]), put["kv"]["mod_revision"]), ("/gw-watch/k", str(start)))
        self.assertEqual(delete["type"], "DELETE")
        self.assertEqual(delete["kv"]["mod_revision"], str(start + 1))
        self.assertEqual(_text(delete["prev_kv"]["value"]), "v")

    def test_compacted(self) -> None:
        cluster = self.cluster
        endpoint = cluster.endpoints[0]
        old = cluster.put("/gw-compact/k", "1")
        compacted = cluster.compact(cluster.put("/gw-compact/k", "2"))
        watch = watch_prefix(endpoint, "/gw-compact/", start_revision=str(old))
        self.addCleanup(watch.close)
        self.assertIs(watch.next()["result"]["created"], True)
        canceled = watch.next()["result"]
        self.assertEqual((canceled["canceled"], canceled["compact_revision"]), (True, str(compacted)))
        status, error = post(endpoint, "/v3/kv/range", {"key": _b64("/gw-compact/k"), "revision": str(old)})
        self.assertEqual((status, error["code"]), (400, 11))
        self.assertIn("required revision has been compacted", error["error"])

    def test_errors(self) -> None:
        endpoint = self.cluster.endpoints[0]
        for bad in (b"{nope", b'{"key": "!!"}'):
            status, error = post(endpoint, "/v3/kv/range", bad)
            self.assertEqual((status, error["code"]), (400, 3))
        status, error = post(endpoint, "/v3/kv/put", {"value": _b64("no key")})
        self.assertEqual((status, error["code"], error["error"]), (400, 3, "etcdserver: key is not provided"))
        future = str(self.cluster.revision() + 100)
        status, error = post(endpoint, "/v3/kv/range", {"key": _b64("/gw/"), "revision": future})
        self.assertEqual((status, error["code"]), (400, 11))
        self.assertIn("is a future revision", error["error"])
        status, error = post(endpoint, "/v3/lease/revoke", {"ID": "12345"})
        self.assertEqual((status, error["code"]), (404, 5))

    def test_watch_ends_with_its_member(self) -> None:
        """A killed member's watch ends; a member without quorum ends it only with the hasleader header."""
        cluster = self.cluster
        leader = cluster.leader()
        follower, other = (i for i in range(3) if i != leader)
        gone = watch_prefix(cluster.endpoints[leader], "/gw-lost/")
        stays = watch_prefix(cluster.endpoints[follower], "/gw-lost/", headers={"Grpc-Metadata-Hasleader": "true"})
        for watch in (gone, stays):
            self.addCleanup(watch.close)
            watch.next()
        cluster.kill(leader)
        self.assertEqual(gone.response.readline(), b"")
        cluster.kill(other)
        error = stays.next()["error"]  # about 2 s: three election timeouts without a leader
        self.assertEqual((error["http_code"], error["message"]), (503, "etcdserver: no leader"))
        self.assertEqual(stays.response.readline(), b"")


class OwnClusterTest(TestCase):
    def start(self, members: int = 1, **options: Any) -> EtcdCluster:
        reason = etcd_skip_reason()
        if reason:
            raise SkipTest(reason)
        cluster = EtcdCluster(self.mktemp(), members, **options)
        self.addCleanup(cluster.stop)
        cluster.start()
        return cluster


class AuthTests(OwnClusterTest):
    def test_enable_auth(self) -> None:
        cluster = self.start()
        cluster.enable_auth("gw", "gw-password", "/gw/")
        cluster.put("/gw/a", "1")  # the lab's etcdctl is root now
        self.assertNotEqual(cluster.etcdctl("--user=", "get", "/gw/a").returncode, 0)
        endpoint = cluster.endpoints[0]
        key = {"key": _b64("/gw/a")}
        status, error = post(endpoint, "/v3/auth/authenticate", {"name": "gw", "password": "wrong"})
        self.assertEqual((status, error["code"]), (400, 3))
        self.assertIn("authentication failed", error["error"])
        status, answer = post(endpoint, "/v3/auth/authenticate", {"name": "gw", "password": "gw-password"})
        token = answer["token"]
        status, found = post(endpoint, "/v3/kv/range", key, token=token)
        self.assertEqual((status, _text(found["kvs"][0]["value"])), (200, "1"))
        status, error = post(endpoint, "/v3/kv/range", key)
        self.assertEqual((status, error["code"], error["error"]), (400, 3, "etcdserver: user name is empty"))
        status, error = post(endpoint, "/v3/kv/range", {"key": _b64("/elsewhere")}, token=token)
        self.assertEqual((status, error["code"]), (403, 7))
        for wrong in ("made-up.1", f"Bearer {token}"):
            status, error = post(endpoint, "/v3/kv/range", key, token=wrong)
            self.assertEqual((status, error["code"], error["error"]), (401, 16, "etcdserver: invalid auth token"))
        watch = watch_prefix(endpoint, "/gw/", token="made-up.1")
        self.addCleanup(watch.close)
        canceled = watch.next()["result"]
        self.assertEqual((canceled["canceled"], canceled["watch_id"]), (True, "-1"))
        self.assertIn("Unauthenticated", canceled["cancel_reason"])


class TLSTests(OwnClusterTest):
    def test_client_certificates(self) -> None:
        cluster = self.start(client_certs=True)
        files = cluster.tls_files
        assert files is not None
        self.assertTrue(cluster.endpoints[0].startswith("https://127.0.0.1:"))
        cluster.put("/gw/tls", "over TLS")
        self.assertEqual(cluster.get("/gw/tls"), b"over TLS")
        context = ssl.create_default_context(cafile=files.ca_file)
        context.load_cert_chain(files.cert_file, files.key_file)
        status, found = post(cluster.endpoints[0], "/v3/kv/range", {"key": _b64("/gw/tls")}, context=context)
        self.assertEqual((status, found["count"]), (200, "1"))
        anonymous = ssl.create_default_context(cafile=files.ca_file)
        with self.assertRaises((ssl.SSLError, ConnectionResetError)):
            post(cluster.endpoints[0], "/v3/kv/range", {"key": _b64("/gw/tls")}, context=anonymous)
        self.assertEqual(os.stat(files.key_file).st_mode & 0o777, 0o600)

    def test_server_certificate_only(self) -> None:
        cluster = self.start(tls=True)
        files = cluster.tls_files
        assert files is not None
        context = ssl.create_default_context(cafile=files.ca_file)
        status, _ = post(cluster.endpoints[0], "/v3/kv/range", {"key": _b64("/gw/")}, context=context)
        self.assertEqual(status, 200)
        self.assertEqual(cluster.etcdctl("get", "/gw/").returncode, 0)


def _etcd_in_lab(lab: Lab, workdir: str) -> EtcdCluster:
    cluster = EtcdCluster(os.path.join(workdir, "etcd"), lab=lab)
    cluster.start()
    return cluster


class NamespaceTests(TestCase):
    """The cluster inside a namespace lab's ctl namespace, where the gateways of the system tests run."""

    def test_in_ctl_namespace(self) -> None:
        reason = etcd_skip_reason()
        if reason:
            raise SkipTest(reason)
        lab, cluster, _ = shared_lab("etcd_ns", "etcd namespace tests", _etcd_in_lab)
        ports = [NS_BASE_PORT, NS_BASE_PORT + 10, NS_BASE_PORT + 20]
        self.assertEqual(cluster.endpoints, [f"http://127.0.0.1:{p}" for p in ports])
        in_ns = lab.ns_pids(lab.ctl_ns)
        self.assertTrue(all(m.proc is not None and m.proc.pid in in_ns for m in cluster.members))
        cluster.put("/gw/ns", "inside")
        leader = cluster.leader()
        cluster.kill(leader)
        self.assertNotEqual(cluster.leader(timeout=ELECTION_BOUND), leader)
        self.assertEqual(cluster.get("/gw/ns"), b"inside")
        self.assertEqual(lab.probe_tcp(lab.ctl_ns, "127.0.0.1", ports[leader]), "ECONNREFUSED")
        cluster.start_member(leader)
        self.assertEqual(lab.probe_tcp(lab.ctl_ns, "127.0.0.1", ports[leader]), "connected")
