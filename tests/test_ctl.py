"""
Tests for L{gateway.scripts.ctl}: C{gateway-ctl} run in a thread against a
stub control API on loopback.
"""

from __future__ import annotations

import io
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from gateway.config import ConfigError, GatewaySettings
from gateway.control.bodies import validate_body
from gateway.scripts.ctl import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CtlError,
    load_cluster,
    main,
)
from gateway.testing import generate_key, public_line

TOKEN = "ctl-token-5f3e1a"
KEY_PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
KEY_LINE = KEY_PEM.splitlines()[1]

CLUSTERS = {
    "clusters": [
        {
            "name": "cluster-a",
            "source": "config",
            "state": "up",
            "proxy": "10.0.0.5:22",
            "open_streams": 3,
            "last_error": None,
        },
        {
            "name": "b",
            "source": "api",
            "state": "backoff",
            "proxy": None,
            "open_streams": 0,
            "last_error": "connection refused by 10.1.0.5:22",
        },
    ]
}
CLUSTER_A = {
    "name": "cluster-a",
    "source": "config",
    "settings": {
        "user": "gw",
        "proxies": ["10.0.0.5:22", "10.0.0.6:22"],
        "key": {"type": "ssh-ed25519", "fingerprint": "SHA256:abc"},
        "token_set": True,
    },
    "status": {"state": "up", "proxy": "10.0.0.5:22", "open_streams": 3, "last_error": None},
}


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    content_type: str | None
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class StubAPI(Resource):
    """
    Answers C{(method, path)} from C{answers}: C{(status, body)} where the
    body is JSON-able, raw bytes, or None (empty); C{"hang"} never answers.
    Unknown routes get 404.  Every request is recorded.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.requests: list[Recorded] = []
        self.hanging: list[Deferred] = []

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode()
        path = request.uri.decode()
        self.requests.append(
            Recorded(
                method,
                path,
                _header(request, b"authorization"),
                _header(request, b"content-type"),
                request.content.read(),
            )
        )
        status, body = self.answers.get((method, path), (404, {"error": f"no route {path}"}))
        if body == "hang":
            self.hanging.append(request.notifyFinish())
            return NOT_DONE_YET
        request.setResponseCode(status)
        if status in (301, 302):
            request.setHeader(b"location", b"http://127.0.0.1:1/elsewhere")
        if body is None:
            return b""
        if isinstance(body, bytes):
            return body
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode() if isinstance(value, bytes) else value


class CtlTestCase(TestCase):
    async def setUp(self) -> None:
        for name in ("GATEWAY_CONTROL_URL", "GATEWAY_CONTROL_TOKEN"):
            self.setenv(name, None)
        self.api = StubAPI()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(self.api))
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def setenv(self, name: str, value: str | None) -> None:
        old = os.environ.get(name)

        def restore() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def answer(self, method: str, path: str, status: int, body: Any = None) -> None:
        self.api.answers[(method, path)] = (status, body)

    async def ctl(self, *argv: str, url: bool = True, token: str | None = TOKEN) -> tuple[int, str, str]:
        args = []
        if url:
            args += ["--url", self.url]
        if token is not None:
            args += ["--token", token]
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(main, [*args, *argv], out, err)
        stdout, stderr = out.getvalue(), err.getvalue()
        self.assertNotIn(TOKEN, stdout + stderr)
        self.assertNotIn(KEY_LINE, stdout + stderr)
        return code, stdout, stderr

    def write(self, relative: str, text: str, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def assertOneLine(self, stderr: str, expected: str) -> None:
        self.assertEqual(stderr, f"gateway-ctl: {expected}\n")


class ListTests(CtlTestCase):
    async def test_table(self) -> None:
        self.answer("GET", "/v1/clusters", 200, CLUSTERS)
        code, out, err = await self.ctl("list")
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "NAME       STATE    PROXY        STREAMS  LAST ERROR",
                "cluster-a  up       10.0.0.5:22  3        -",
                "b          backoff  -            0        connection refused by 10.1.0.5:22",
            ],
        )
        [request] = self.api.requests
        self.assertEqual(
            (request.method, request.path, request.authorization), ("GET", "/v1/clusters", f"Bearer {TOKEN}")
        )

    async def test_empty(self) -> None:
        self.answer("GET", "/v1/clusters", 200, {"clusters": []})
        code, out, err = await self.ctl("list")
        self.assertEqual((code, out, err), (EXIT_OK, "NAME  STATE  PROXY  STREAMS  LAST ERROR\n", ""))

    async def test_json(self) -> None:
        """--json prints the answer as is, before or after the command."""
        self.answer("GET", "/v1/clusters", 200, CLUSTERS)
        for argv in (["--json", "list"], ["list", "--json"]):
            code, out, err = await self.ctl(*argv)
            self.assertEqual((code, err), (EXIT_OK, ""))
            self.assertEqual(json.loads(out), CLUSTERS)

    async def test_options_after_command(self) -> None:
        """Common options may follow the command, and keep those given before it."""
        self.answer("GET", "/v1/clusters", 200, {"clusters": []})
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(main, ["--token", TOKEN, "list", "--url", self.url], out, err)
        self.assertEqual((code, err.getvalue()), (EXIT_OK, ""))
        self.assertEqual(self.api.requests[0].authorization, f"Bearer {TOKEN}")

    async def test_not_json(self) -> None:
        self.answer("GET", "/v1/clusters", 200, b"<html>hello</html>")
        code, out, err = await self.ctl("list")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, f"unexpected answer from {self.url}/v1/clusters: HTTP 200 with a body that is not JSON")

    async def test_wrong_shape(self) -> None:
        self.answer("GET", "/v1/clusters", 200, [1, 2])
        code, out, err = await self.ctl("list")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, f"unexpected answer from {self.url}: no clusters list")


class ShowTests(CtlTestCase):
    async def test_show(self) -> None:
        self.answer("GET", "/v1/clusters/cluster-a", 200, CLUSTER_A)
        code, out, err = await self.ctl("show", "cluster-a")
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "name: cluster-a",
                "source: config",
                "status:",
                "  state:        up",
                "  proxy:        10.0.0.5:22",
                "  open_streams: 3",
                "  last_error:   -",
                "settings:",
                "  user:      gw",
                "  proxies:   10.0.0.5:22, 10.0.0.6:22",
                "  key:       type=ssh-ed25519, fingerprint=SHA256:abc",
                "  token_set: true",
            ],
        )

    async def test_json(self) -> None:
        self.answer("GET", "/v1/clusters/cluster-a", 200, CLUSTER_A)
        code, out, err = await self.ctl("--json", "show", "cluster-a")
        self.assertEqual((code, err, json.loads(out)), (EXIT_OK, "", CLUSTER_A))

    async def test_unknown(self) -> None:
        self.answer("GET", "/v1/clusters/nope", 404, {"error": "no cluster 'nope'"})
        code, out, err = await self.ctl("show", "nope")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, "no cluster named nope")

    async def test_name_quoted(self) -> None:
        """A name is one path segment, whatever it holds."""
        code, out, err = await self.ctl("show", "a/b c")
        self.assertEqual(code, EXIT_REFUSED)
        self.assertOneLine(err, "no cluster named a/b c")
        self.assertEqual(self.api.requests[0].path, "/v1/clusters/a%2Fb%20c")


class HealthTests(CtlTestCase):
    async def test_ok(self) -> None:
        self.answer("GET", "/v1/health", 200, {"status": "ok", "clusters": {"up": 2, "down": 1}})
        code, out, err = await self.ctl("health")
        self.assertEqual((code, out, err), (EXIT_OK, "ok: 2 clusters up, 1 down\n", ""))

    async def test_json(self) -> None:
        answer = {"status": "ok", "clusters": {"up": 0, "down": 0}}
        self.answer("GET", "/v1/health", 200, answer)
        code, out, err = await self.ctl("health", "--json")
        self.assertEqual((code, err, json.loads(out)), (EXIT_OK, "", answer))

    async def test_not_ready(self) -> None:
        answer = {"status": "not-ready", "gateway": "gw-a", "not_ready": ["http listener 'tcp:3128' is not listening"]}
        self.answer("GET", "/v1/health", 200, {**answer, "clusters": {"up": 1, "down": 0}})
        code, out, err = await self.ctl("health")
        self.assertEqual(code, EXIT_REFUSED)
        self.assertEqual(
            out,
            "gateway gw-a not-ready: 1 clusters up, 0 down\n  not ready: http listener 'tcp:3128' is not listening\n",
        )

    async def test_etcd_store(self) -> None:
        store = {
            "backend": "etcd",
            "state": "degraded",
            "revision": 42,
            "last_error": "m1: refused",
            "rejected": {"c2": "socks: port in use"},
            "members": ["gw-a", "gw-b"],
        }
        self.answer("GET", "/v1/health", 200, {"status": "ok", "clusters": {"up": 1, "down": 0}, "store": store})
        code, out, err = await self.ctl("health")
        self.assertEqual(
            out,
            "ok: 1 clusters up, 0 down\n  store: etcd degraded at revision 42 (m1: refused)\n"
            "  fleet: gw-a, gw-b\n  not served here: c2: socks: port in use\n",
        )

    async def test_not_ok(self) -> None:
        self.answer("GET", "/v1/health", 200, {"status": "degraded", "clusters": {"up": 0, "down": 3}})
        code, out, err = await self.ctl("health")
        self.assertEqual((code, out, err), (EXIT_REFUSED, "degraded: 0 clusters up, 3 down\n", ""))


class RemoveTests(CtlTestCase):
    async def test_remove(self) -> None:
        self.answer("DELETE", "/v1/clusters/b", 204)
        code, out, err = await self.ctl("remove", "b")
        self.assertEqual((code, out, err), (EXIT_OK, "removed cluster b\n", ""))
        self.assertEqual([(r.method, r.path) for r in self.api.requests], [("DELETE", "/v1/clusters/b")])

    async def test_unknown(self) -> None:
        code, out, err = await self.ctl("remove", "nope")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, "no cluster named nope")

    async def test_conflict(self) -> None:
        self.answer(
            "DELETE",
            "/v1/clusters/cluster-a",
            409,
            {"error": "cluster 'cluster-a' is defined in the configuration file", "field": None},
        )
        code, out, err = await self.ctl("remove", "cluster-a")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(
            err, "cannot remove cluster cluster-a: cluster 'cluster-a' is defined in the configuration file"
        )


BARE_TOML = """\
user = "gw"
proxies = ["10.0.0.5:22"]
networks = ["10.99.0.0/16"]
key_file = "keys/id_ed25519"
known_hosts = "known_hosts"
"""

CONFIG_TOML = """\
[listen]
socks = "tcp:1080"

[clusters.other]
user = "nobody"
proxies = ["10.9.9.9:22"]
key_file = "missing"

[clusters.b]
user = "gw"
proxies = ["10.1.0.5:22"]
networks = ["10.1.0.0/16"]
key_file = "/ABS/id_ed25519"
passphrase_file = "secret/passphrase"
token_file = "secret/token"
host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"]
"""


class AddTests(CtlTestCase):
    async def setUp(self) -> None:
        await super().setUp()
        self.key_path = self.write("conf/keys/id_ed25519", KEY_PEM)

    def last_body(self) -> Any:
        request = self.api.requests[-1]
        self.assertEqual(request.content_type, "application/json")
        return request.json()

    async def test_bare_toml(self) -> None:
        """
        A file of cluster keys: key_file is sent as key (read relative to the
        file, not the working directory); known_hosts is made absolute.
        """
        path = self.write("conf/cluster.toml", BARE_TOML)
        self.answer("PUT", "/v1/clusters/a", 201)
        code, out, err = await self.ctl("add", "a", "--file", path)
        self.assertEqual((code, out, err), (EXIT_OK, "created cluster a\n", ""))
        request = self.api.requests[0]
        self.assertEqual((request.method, request.path), ("PUT", "/v1/clusters/a"))
        self.assertEqual(request.authorization, f"Bearer {TOKEN}")
        self.assertEqual(
            self.last_body(),
            {
                "user": "gw",
                "proxies": ["10.0.0.5:22"],
                "networks": ["10.99.0.0/16"],
                "key": KEY_PEM,
                "known_hosts": os.path.join(self.dir, "conf", "known_hosts"),
            },
        )

    async def test_replaced(self) -> None:
        path = self.write("conf/cluster.toml", BARE_TOML)
        self.answer("PUT", "/v1/clusters/a", 200)
        code, out, err = await self.ctl("add", "a", "-f", path)
        self.assertEqual((code, out, err), (EXIT_OK, "replaced cluster a\n", ""))

    async def test_clusters_table_toml(self) -> None:
        """
        From a file with [clusters.NAME] only that table is sent ([listen]
        ignored); passphrase_file and token_file are inlined too.
        """
        self.write("conf/secret/passphrase", "pass phrase\n")
        self.write("conf/secret/token", "  cluster-token-b \n")
        path = self.write("conf/gateway.toml", CONFIG_TOML.replace("/ABS/id_ed25519", self.key_path))
        self.answer("PUT", "/v1/clusters/b", 201)
        code, out, err = await self.ctl("add", "b", "--file", path)
        self.assertEqual((code, out, err), (EXIT_OK, "created cluster b\n", ""))
        self.assertEqual(
            self.last_body(),
            {
                "user": "gw",
                "proxies": ["10.1.0.5:22"],
                "networks": ["10.1.0.0/16"],
                "key": KEY_PEM,
                "passphrase": "pass phrase",
                "token": "cluster-token-b",
                "host_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"],
            },
        )
        self.assertNotIn("cluster-token-b", out + err)

    async def test_bare_json(self) -> None:
        path = self.write(
            "conf/cluster.json",
            json.dumps({"user": "gw", "proxies": ["10.0.0.5:22"], "key_file": "keys/id_ed25519"}),
        )
        self.answer("PUT", "/v1/clusters/a", 201)
        code, out, err = await self.ctl("add", "a", "--file", path)
        self.assertEqual((code, out, err), (EXIT_OK, "created cluster a\n", ""))
        self.assertEqual(self.last_body(), {"user": "gw", "proxies": ["10.0.0.5:22"], "key": KEY_PEM})

    async def test_clusters_json(self) -> None:
        path = self.write(
            "conf/clusters.json",
            json.dumps({"clusters": {"a": {"user": "gw", "key": KEY_PEM}, "z": {"user": "other"}}}),
        )
        self.answer("PUT", "/v1/clusters/a", 200, {"name": "a", "created": False})
        code, out, err = await self.ctl("--json", "add", "a", "--file", path)
        self.assertEqual((code, err, json.loads(out)), (EXIT_OK, "", {"name": "a", "created": False}))
        self.assertEqual(self.last_body(), {"user": "gw", "key": KEY_PEM})

    async def test_invalid(self) -> None:
        """A 400 with a field names it."""
        path = self.write("conf/cluster.toml", BARE_TOML)
        self.answer("PUT", "/v1/clusters/a", 400, {"error": "'10.99.0.0/33' is not a network", "field": "networks[0]"})
        code, out, err = await self.ctl("add", "a", "--file", path)
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, "invalid cluster: networks[0]: '10.99.0.0/33' is not a network")

    async def test_invalid_no_field(self) -> None:
        path = self.write("conf/cluster.toml", BARE_TOML)
        self.answer("PUT", "/v1/clusters/a", 400, {"error": "body is not a JSON object"})
        code, out, err = await self.ctl("add", "a", "--file", path)
        self.assertEqual(code, EXIT_REFUSED)
        self.assertOneLine(err, "invalid cluster: body is not a JSON object")

    async def test_conflict(self) -> None:
        path = self.write("conf/cluster.toml", BARE_TOML)
        self.answer("PUT", "/v1/clusters/a", 409, {"error": "cluster 'a' is defined in the configuration file"})
        code, out, err = await self.ctl("add", "a", "--file", path)
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, "cannot add cluster a: cluster 'a' is defined in the configuration file")

    async def local_error(self, path: str, name: str = "a") -> str:
        """Run add; check it fails locally (exit 2, nothing sent); return stderr."""
        code, out, err = await self.ctl("add", name, "--file", path)
        self.assertEqual((code, out), (EXIT_USAGE, ""))
        self.assertEqual(self.api.requests, [])
        self.assertTrue(err.startswith("gateway-ctl: ") and err.count("\n") == 1, err)
        return err

    async def test_bad_toml(self) -> None:
        path = self.write("conf/cluster.toml", 'user = "gw"\nproxies = [10.0.0.5:22]\n')
        err = await self.local_error(path)
        self.assertIn(f"gateway-ctl: {path}: invalid TOML: ", err)
        self.assertIn("line 2", err)

    async def test_bad_json(self) -> None:
        path = self.write("conf/cluster.json", '{"user": "gw",\n "proxies": [}\n')
        err = await self.local_error(path)
        self.assertIn(f"gateway-ctl: {path}: invalid JSON: ", err)
        self.assertIn("line 2", err)

    async def test_missing_file(self) -> None:
        path = os.path.join(self.dir, "nope.toml")
        self.assertOneLine(await self.local_error(path), f"cannot read {path}: No such file or directory")

    async def test_missing_key_file(self) -> None:
        path = self.write("conf/cluster.toml", 'user = "gw"\nkey_file = "keys/nope"\n')
        missing = os.path.join(self.dir, "conf", "keys", "nope")
        self.assertOneLine(
            await self.local_error(path),
            f"{path}: key_file: cannot read key file {missing!r}: No such file or directory",
        )

    async def test_key_file_readable_by_others(self) -> None:
        os.chmod(self.key_path, 0o644)
        path = self.write("conf/cluster.toml", BARE_TOML)
        err = await self.local_error(path)
        self.assertIn("key_file: key file", err)
        self.assertIn("is accessible by other users (mode 0644): chmod 600 it", err)

    async def test_public_key(self) -> None:
        self.write("conf/keys/id_ed25519", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host\n")
        path = self.write("conf/cluster.toml", BARE_TOML)
        self.assertIn("this is a public key: a private key is needed", await self.local_error(path))

    async def test_key_and_key_file(self) -> None:
        path = self.write("conf/cluster.toml", BARE_TOML + 'key = "inline"\n')
        self.assertOneLine(
            await self.local_error(path), f"{path}: key: key and key_file are mutually exclusive: set only one"
        )

    async def test_no_such_table(self) -> None:
        path = self.write("conf/gateway.toml", CONFIG_TOML)
        self.assertOneLine(
            await self.local_error(path, "c"), f"{path}: no [clusters.c] table (clusters in the file: b, other)"
        )

    async def test_defaults_refused(self) -> None:
        path = self.write("conf/gateway.toml", '[defaults]\nuser = "gw"\n\n' + CONFIG_TOML)
        self.assertIn("[defaults] is not applied by gateway-ctl add", await self.local_error(path, "b"))

    async def test_errors_name_the_table(self) -> None:
        """Keys of a [clusters.NAME] table are named in full, as by the gateway."""
        path = self.write("conf/gateway.toml", CONFIG_TOML)
        self.assertIn(f"{path}: clusters.other.key_file: cannot read key file", await self.local_error(path, "other"))

    async def test_not_a_table(self) -> None:
        path = self.write("conf/cluster.json", "[1, 2]")
        self.assertOneLine(await self.local_error(path), f"{path}: expected a table (JSON object) of cluster keys")

    async def test_not_sendable(self) -> None:
        path = self.write("conf/cluster.toml", 'user = "gw"\nwhen = 1979-05-27\n')
        self.assertOneLine(await self.local_error(path), f"{path}: a value of type date cannot be sent as JSON")


class LoadClusterTests(SynchronousTestCase):
    def test_tilde(self) -> None:
        """C{~} in key_file is the operator's home directory."""
        home = self.mktemp()
        os.makedirs(home)
        self.patch(os, "environ", {**os.environ, "HOME": os.path.abspath(home)})
        key = os.path.join(home, "id")
        with open(key, "w") as f:
            f.write(KEY_PEM)
        os.chmod(key, 0o600)
        conf = os.path.join(home, "c.toml")
        with open(conf, "w") as f:
            f.write('key_file = "~/id"\n')
        self.assertEqual(load_cluster(conf, "x"), {"key": KEY_PEM})

    def test_empty_token_file(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        token = os.path.join(base, "token")
        with open(token, "w") as f:
            f.write("\n")
        os.chmod(token, 0o600)
        conf = os.path.join(base, "c.toml")
        with open(conf, "w") as f:
            f.write('token_file = "token"\n')
        with self.assertRaises(CtlError) as raised:
            load_cluster(conf, "x")
        self.assertEqual(raised.exception.status, EXIT_USAGE)
        self.assertEqual(str(raised.exception), f"{conf}: token_file: token file {os.path.abspath(token)!r} is empty")

    def test_body_follows_the_api_body_rules(self) -> None:
        """
        The files of a cluster file are read here and sent inline, so what
        C{add} sends passes the gateway's default rules (no file paths in API
        bodies); C{known_hosts} is the gateway's own file (re-read at every
        connection) and stays a path, refused unless C{api_file_paths}.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        key = generate_key()
        for name, content in (
            ("id", key.toString("OPENSSH", passphrase=b"pass phrase").decode("ascii")),
            ("phrase", "pass phrase\n"),
            ("token", "tok-1\n"),
            ("known_hosts", f"10.0.0.5 {public_line(key)}\n"),
        ):
            with open(os.path.join(base, name), "w") as f:
                f.write(content)
            os.chmod(os.path.join(base, name), 0o600)
        conf = os.path.join(base, "c.toml")
        table = (
            'proxies = ["10.0.0.5"]\nuser = "gw"\nnetworks = ["10.1.0.0/24"]\n'
            'key_file = "id"\npassphrase_file = "phrase"\ntoken_file = "token"\n'
        )
        with open(conf, "w") as f:
            f.write(table + f'host_keys = ["{public_line(key)}"]\n')
        body = load_cluster(conf, "x")
        self.assertFalse(set(body) & {"key_file", "passphrase_file", "token_file"})
        cluster = validate_body("x", body)
        self.assertEqual((cluster.private_key.public(), cluster.token), (key.public(), "tok-1"))

        with open(conf, "w") as f:
            f.write(table + 'known_hosts = "known_hosts"\n')
        body = load_cluster(conf, "x")
        self.assertEqual(body["known_hosts"], os.path.join(base, "known_hosts"))
        e = self.assertRaises(ConfigError, validate_body, "x", body)
        self.assertEqual(e.key, "known_hosts")
        self.assertIn("inline as host_keys", e.reason)
        self.assertEqual(validate_body("x", body, settings=GatewaySettings(api_file_paths=True)).user, "gw")


class FailureTests(CtlTestCase):
    async def test_no_token(self) -> None:
        self.answer("GET", "/v1/clusters", 401, {"error": "authentication required"})
        code, out, err = await self.ctl("list", token=None)
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, "authentication failed: give --token or GATEWAY_CONTROL_TOKEN")
        self.assertIsNone(self.api.requests[0].authorization)

    async def test_wrong_token(self) -> None:
        self.answer("GET", "/v1/health", 401, {"error": "bad token"})
        code, out, err = await self.ctl("health")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(
            err, "authentication failed: the gateway refused the token (check --token or GATEWAY_CONTROL_TOKEN)"
        )

    async def test_cannot_reach(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        url = f"http://127.0.0.1:{port}"
        out, err = io.StringIO(), io.StringIO()
        code = await deferToThread(main, ["--url", url, "health"], out, err)
        self.assertEqual((code, out.getvalue()), (EXIT_UNREACHABLE, ""))
        self.assertEqual(
            err.getvalue(), f"gateway-ctl: cannot reach the gateway control API at {url}: Connection refused\n"
        )

    async def test_timeout(self) -> None:
        self.answer("GET", "/v1/health", 200, "hang")
        code, out, err = await self.ctl("--timeout", "0.2", "health")
        self.assertEqual((code, out), (EXIT_UNREACHABLE, ""))
        self.assertOneLine(err, f"cannot reach the gateway control API at {self.url}: no answer within 0.2 s")
        # the client hung up: the server's request ends
        for finished in self.api.hanging:
            await finished.addErrback(lambda _: None)

    async def test_server_error(self) -> None:
        self.answer("GET", "/v1/clusters", 500, b"<html>Internal Server Error</html>")
        code, out, err = await self.ctl("list")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(err, "the gateway refused the request (HTTP 500): Internal Server Error")

    async def test_redirect_not_followed(self) -> None:
        """The token is not carried to another address."""
        self.answer("GET", "/v1/clusters", 302, b"")
        code, out, err = await self.ctl("list")
        self.assertEqual((code, out), (EXIT_REFUSED, ""))
        self.assertOneLine(
            err, "the gateway refused the request (HTTP 302): redirected (Found); is --url the gateway control API?"
        )
        self.assertEqual(len(self.api.requests), 1)

    async def test_environment(self) -> None:
        """The URL and token default to GATEWAY_CONTROL_URL and GATEWAY_CONTROL_TOKEN."""
        self.setenv("GATEWAY_CONTROL_URL", self.url + "/")
        self.setenv("GATEWAY_CONTROL_TOKEN", TOKEN)
        self.answer("GET", "/v1/health", 200, {"status": "ok", "clusters": {"up": 1, "down": 0}})
        code, out, err = await self.ctl("health", url=False, token=None)
        self.assertEqual((code, out, err), (EXIT_OK, "ok: 1 clusters up, 0 down\n", ""))
        self.assertEqual(self.api.requests[0].authorization, f"Bearer {TOKEN}")

    async def test_token_file(self) -> None:
        """--token-file wins over the environment."""
        self.setenv("GATEWAY_CONTROL_TOKEN", "from-environment")
        path = self.write("token", TOKEN + "\n")
        self.answer("GET", "/v1/health", 200, {"status": "ok", "clusters": {"up": 1, "down": 0}})
        code, out, err = await self.ctl("--token-file", path, "health", token=None)
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertEqual(self.api.requests[0].authorization, f"Bearer {TOKEN}")

    async def test_token_file_missing(self) -> None:
        path = os.path.join(self.dir, "nope")
        code, out, err = await self.ctl("--token-file", path, "health", token=None)
        self.assertEqual((code, out), (EXIT_USAGE, ""))
        self.assertOneLine(err, f"--token-file: cannot read token file {path!r}: No such file or directory")
        self.assertEqual(self.api.requests, [])

    async def test_token_and_token_file(self) -> None:
        path = self.write("token", TOKEN)
        code, out, err = await self.ctl("list", "--token-file", path)
        self.assertEqual((code, out), (EXIT_USAGE, ""))
        self.assertOneLine(err, "give --token or --token-file, not both")

    async def test_bad_token(self) -> None:
        """A token that cannot go in a header is refused without quoting it."""
        code, out, err = await self.ctl("list", token=TOKEN + "\nX-Evil: 1")
        self.assertEqual((code, out), (EXIT_USAGE, ""))
        self.assertOneLine(err, "the token contains white space or control characters")
        self.assertEqual(self.api.requests, [])


class UsageTests(CtlTestCase):
    async def usage(self, *argv: str) -> str:
        code, out, err = await self.ctl(*argv)
        self.assertEqual((code, out), (EXIT_USAGE, ""))
        self.assertIn("usage: gateway-ctl", err)
        self.assertEqual(self.api.requests, [])
        return err

    async def test_no_command(self) -> None:
        self.assertIn("required: COMMAND", await self.usage())

    async def test_unknown_command(self) -> None:
        self.assertIn("invalid choice: 'frobnicate'", await self.usage("frobnicate"))

    async def test_add_without_file(self) -> None:
        self.assertIn("required: --file", await self.usage("add", "a"))

    async def test_show_without_name(self) -> None:
        self.assertIn("required: NAME", await self.usage("show"))

    async def test_bad_url(self) -> None:
        err = await self.usage("--url", "ftp://x", "list")
        self.assertIn("--url must be an http:// or https:// URL, not 'ftp://x'", err)

    async def test_help(self) -> None:
        code, out, err = await self.ctl("--help")
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertIn("usage: gateway-ctl", out)
        for command in ("list", "show", "add", "remove", "health"):
            self.assertIn(command, out)
