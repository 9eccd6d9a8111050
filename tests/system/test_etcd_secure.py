"""
System tests of the etcd backend's TLS and authentication against real etcd
3.4 on 127.0.0.1 (the root namespace, loopback only): https with the
members' CA and a client certificate (C{--client-cert-auth}), and etcd's own
users with a role limited to the gateway's prefix.  One real `twistd
gateway` each, whose control API registers a cluster that must land in etcd,
and which must pick up a change made with etcdctl.

Needs etcd (and no sshd: the clusters registered stay down, which is fine:
these tests are about the store); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from functools import partial
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from gateway.testing.keys import generate_key, private_pem, public_line
from tests.system.etcdlab import EtcdCluster, etcd_skip_reason
from tests.system.netlab import stop_processes
from tests.system.pki import write_tls_files
from tests.system.support import twistd_argv

PREFIX = "/gateway/"
PASSWORD = "etcd-pass-3141"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(path: str, text: str, mode: int = 0o600) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text)
    return path


class SecureStoreTests(TestCase):
    def setUp(self) -> None:
        reason = etcd_skip_reason()
        if reason:
            raise SkipTest(reason)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)

    def etcd(self, **kw: Any) -> EtcdCluster:
        cluster = EtcdCluster(os.path.join(self.workdir, "etcd"), 1, **kw)
        self.addCleanup(cluster.stop)
        cluster.start()
        return cluster

    def gateway(self, store: str, name: str = "gw") -> str:
        """A gateway (its control API on loopback) with C{store} as its [store] table; its API's URL."""
        control = _free_port()
        config = _write(
            os.path.join(self.workdir, f"{name}.toml"),
            f"""
[listen]
socks = "tcp:{_free_port()}:interface=127.0.0.1"
http = "tcp:{_free_port()}:interface=127.0.0.1"
control = "tcp:{control}:interface=127.0.0.1"

[gateway]
name = "gw-secure"
state_file = "{os.path.join(self.workdir, name, "clusters.json")}"

[store]
backend = "etcd"
prefix = "{PREFIX}"
timeout = 2.0
{store}
""",
        )
        self.log = os.path.join(self.workdir, f"{name}.log")
        self.proc = proc = subprocess.Popen(
            twistd_argv(config, self.log), stdin=subprocess.DEVNULL, start_new_session=True
        )

        self.addCleanup(stop_processes, [proc], 10)
        self.stop_gateway = partial(stop_processes, [proc], 10)
        url = f"http://127.0.0.1:{control}"
        self.until(lambda: self.call(url, "GET", "/v1/health/live")[0] == 200, 20)
        return url

    def call(self, url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                text = answer.read()
                return answer.status, json.loads(text) if text.strip() else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except OSError:
            return 0, None

    def until(self, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s; gateway log:\n{self.read_log()[-3000:]}")
            time.sleep(0.05)

    def read_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def body(self) -> dict[str, Any]:
        return {
            "proxies": ["127.0.0.1:1"],
            "user": "u",
            "key": private_pem(generate_key()),
            "host_keys": [public_line(generate_key())],
            "networks": ["10.0.0.0/24"],
        }

    def check_round_trip(self, etcd: EtcdCluster, url: str) -> None:
        """A PUT lands in etcd; an etcdctl write reaches the gateway."""
        self.until(lambda: self.call(url, "GET", "/v1/health")[1]["store"]["state"] == "synced", 10)
        code, answer = self.call(url, "PUT", "/v1/clusters/s1", self.body())
        self.assertEqual(code, 201, answer)
        self.assertIn(PREFIX + "clusters/s1", etcd.items(PREFIX))
        etcd.put(PREFIX + "clusters/s2", json.dumps(self.body()))
        self.until(lambda: self.call(url, "GET", "/v1/clusters/s2")[0] == 200, 5)

    def test_tls_with_client_certificates(self) -> None:
        etcd = self.etcd(tls=True, client_certs=True)
        files = etcd.tls_files
        assert files is not None
        url = self.gateway(
            f"endpoints = {json.dumps(etcd.endpoints)}\n"
            f'ca_file = "{files.ca_file}"\ncert_file = "{files.cert_file}"\nkey_file = "{files.key_file}"\n'
        )
        self.check_round_trip(etcd, url)
        # The connections to etcd closed by the gateway after its last call: left to the reactor's
        # shutdown, a TLS one raced Twisted's teardown ("Unhandled Error", a traceback) at every stop.
        self.stop_gateway()
        self.assertNotIn("Traceback", self.read_log())

    def test_tls_refuses_a_member_of_another_ca(self) -> None:
        etcd = self.etcd(tls=True)
        other = write_tls_files(os.path.join(self.workdir, "other")).ca_file
        url = self.gateway(f'endpoints = {json.dumps(etcd.endpoints)}\nca_file = "{other}"\n')
        self.until(lambda: self.call(url, "GET", "/v1/health")[1]["store"]["state"] == "degraded", 10)
        code, health = self.call(url, "GET", "/v1/health")
        self.assertFalse(health["ready"])  # never read the registry, no cache
        self.assertEqual(self.call(url, "PUT", "/v1/clusters/s1", self.body())[0], 503)

    def test_etcd_users(self) -> None:
        etcd = self.etcd()
        etcd.enable_auth("gateway", PASSWORD, prefix=PREFIX)
        password_file = _write(os.path.join(self.workdir, "etcd.password"), PASSWORD + "\n")
        url = self.gateway(
            f'endpoints = {json.dumps(etcd.endpoints)}\nuser = "gateway"\npassword_file = "{password_file}"\n'
        )
        self.check_round_trip(etcd, url)
        self.assertNotIn(PASSWORD, self.read_log())

    def test_a_wrong_password_is_reported_not_shown(self) -> None:
        etcd = self.etcd()
        etcd.enable_auth("gateway", PASSWORD, prefix=PREFIX)
        password_file = _write(os.path.join(self.workdir, "etcd.password"), "not-the-password\n")
        url = self.gateway(
            f'endpoints = {json.dumps(etcd.endpoints)}\nuser = "gateway"\npassword_file = "{password_file}"\n'
        )
        self.until(lambda: self.call(url, "GET", "/v1/health")[1]["store"]["last_error"] is not None, 10)
        error = self.call(url, "GET", "/v1/health")[1]["store"]["last_error"]
        self.assertIn("cannot authenticate as 'gateway'", error)
        self.assertNotIn("not-the-password", error + self.read_log())

    def test_another_secret_key_refuses_to_start(self) -> None:
        etcd = self.etcd()
        keys = [_write(os.path.join(self.workdir, f"k{i}"), os.urandom(32).hex() + "\n") for i in (1, 2)]
        endpoints = f"endpoints = {json.dumps(etcd.endpoints)}\n"
        url = self.gateway(endpoints + f'secret_key_file = "{keys[0]}"\n', name="gw1")
        self.until(lambda: self.call(url, "GET", "/v1/health")[1]["store"]["state"] == "synced", 10)
        self.assertEqual(self.call(url, "PUT", "/v1/clusters/s1", {**self.body(), "token": "tok-9"})[0], 201)
        config = _write(
            os.path.join(self.workdir, "gw2.toml"),
            f"""
[listen]
socks = "tcp:{_free_port()}:interface=127.0.0.1"
http = ""
[gateway]
state_file = "{os.path.join(self.workdir, "gw2", "clusters.json")}"
[store]
backend = "etcd"
prefix = "{PREFIX}"
{endpoints}secret_key_file = "{keys[1]}"
""",
        )
        log = os.path.join(self.workdir, "gw2.log")
        done = subprocess.run(twistd_argv(config, log), stdin=subprocess.DEVNULL, timeout=30)
        self.assertEqual(done.returncode, 1)
        with open(log) as f:
            text = f.read()
        critical = [line for line in text.splitlines() if "#critical]" in line]
        self.assertEqual(len(critical), 1, text)
        self.assertIn("etcd holds secrets this gateway cannot open (s1: ", critical[0])
        self.assertIn("refusing to start", critical[0])
        self.assertNotIn("tok-9", text)
