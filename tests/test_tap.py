"""
The twistd entry point: options, start-up refusals with one clear message,
and the service tree built from parsed options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from gateway.app.service import GatewayService, ListenerService
from gateway.app.tap import DemoService, Options, makeService
from gateway.config import load_config, parse_cluster
from gateway.routing import Router
from gateway.testing import DEMO_API_WEB, DEMO_WEB, DemoCluster, generate_key, private_pem, public_line

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class TapTests(TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, text: str, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def cluster(self) -> str:
        key = self.write("id", private_pem(generate_key()))
        host_key = public_line(generate_key())
        return (
            "[clusters.a]\n"
            'proxies = ["127.0.0.1:1"]\n'
            'user = "root"\n'
            f'key_file = "{key}"\n'
            f'host_keys = ["{host_key}"]\n'
            'networks = ["10.0.0.0/24"]\n'
        )

    def twistd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [TWISTD, "--nodaemon", "--pidfile=", "gateway", *args],
            capture_output=True,
            timeout=60,
            cwd=self.dir,
            env={k: v for k, v in os.environ.items() if k != "GATEWAY_CONTROL_TOKEN"},
        )

    def test_bad_config_stops_start_up_with_one_line(self):
        config = self.write("gw.toml", self.cluster().replace("10.0.0.0/24", "10.0.0.1/24"))
        done = self.twistd(f"--config={config}")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            done.stderr.decode().strip(),
            f"gateway: {config}: clusters.a.networks[0]: '10.0.0.1/24' has host bits set "
            "(did you mean 10.0.0.0/24?)",
        )
        self.assertEqual(done.stdout, b"")

    def test_control_listener_off_loopback_needs_a_token(self):
        config = self.write("gw.toml", '[listen]\ncontrol = "tcp:0"\n' + self.cluster())
        done = self.twistd(f"--config={config}")
        self.assertEqual(done.returncode, 1)
        self.assertIn("listen.control", done.stderr.decode())
        self.assertIn("control_token_file", done.stderr.decode())

    def test_corrupt_state_file_stops_start_up_and_is_kept(self):
        state = self.write("state.json", '{"version": 1, "clusters": {')
        config = self.write(
            "gw.toml", f'[listen]\ncontrol = "tcp:0:interface=127.0.0.1"\n[gateway]\nstate_file = "{state}"\n'
        )
        done = self.twistd(f"--config={config}")
        self.assertEqual(done.returncode, 1)
        self.assertIn(state, done.stderr.decode())
        self.assertIn("not valid JSON", done.stderr.decode())
        with open(state) as f:
            self.assertEqual(f.read(), '{"version": 1, "clusters": {')

    def state_error(self, gateway_table: str, clusters: dict) -> str:
        """Options refusing the state file holding C{clusters}: the one-line message."""
        state = self.write("state.json", json.dumps({"version": 1, "clusters": clusters}))
        config = self.write(
            "gw.toml",
            f'[listen]\ncontrol = "tcp:0:interface=127.0.0.1"\n[gateway]\nstate_file = "{state}"\n{gateway_table}',
        )
        e = self.assertRaises(SystemExit, Options().parseOptions, [f"--config={config}"])
        return str(e.code)

    def body(self, **more) -> dict:
        return {
            "proxies": ["127.0.0.1:1"],
            "user": "root",
            "key": private_pem(generate_key()),
            "host_keys": [public_line(generate_key())],
            "networks": ["10.0.0.0/24"],
            **more,
        }

    def test_state_file_follows_the_api_body_rules(self):
        """A body saved under other rules is refused at start-up, naming it and the setting."""
        key = self.write("id", private_pem(generate_key()))
        body = self.body(key_file=key)
        del body["key"]
        message = self.state_error("", {"x": body})
        self.assertIn("clusters.x.key_file: API bodies may not name files", message)
        self.assertIn("api_file_paths = true", message)
        options = Options()
        options.parseOptions([f"--config={self.write('gw.toml', self.read('gw.toml') + 'api_file_paths = true')}"])
        self.assertEqual(sorted(options.api_clusters), ["x"])

    def test_state_file_jump_cycle(self):
        message = self.state_error(
            "api_jump = true\n", {"x": self.body(jump="y"), "y": self.body(jump="x", networks=["10.1.0.0/24"])}
        )
        self.assertIn("clusters.x.jump: jump cycle x -> y -> x", message)

    def read(self, name: str) -> str:
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def test_service_tree(self):
        config = self.write("gw.toml", self.cluster())
        options = Options()
        options.parseOptions(
            [f"--config={config}", "--socks=tcp:0:interface=127.0.0.1", "--http=", "--control=unix:c.sock"]
        )
        service = makeService(options)
        self.assertIsInstance(service, GatewayService)
        listeners = sorted((c.kind, c.description) for c in service if isinstance(c, ListenerService))
        self.assertEqual(listeners, [("control", "unix:c.sock"), ("socks", "tcp:0:interface=127.0.0.1")])
        self.assertEqual(sorted(service.clusters), ["a"])
        self.assertFalse(any(isinstance(c, DemoService) for c in service))

    def test_demo_tree(self):
        options = Options()
        options.parseOptions(["--demo", "--socks=tcp:0:interface=127.0.0.1", "--http=", "--control="])
        service = makeService(options)
        self.assertTrue(any(isinstance(c, DemoService) for c in service))
        self.assertEqual(service.clusters, {})  # "demo" is added when the service starts


class DemoWalkThroughTests(TestCase):
    def test_the_cluster_file_the_demo_prints_does_not_overlap_the_demo(self) -> None:
        """Registering it, as the demo says to, must leave the demo's own tokenless commands working."""
        demo = DemoCluster(reactor)
        demo.ssh_port = 2222  # not started: only its files are wanted
        self.addCleanup(lambda: Deferred.fromCoroutine(demo.stop()))
        config = load_config(demo.write_cluster_file())
        demo_cluster = parse_cluster("demo", demo.cluster_settings(), "(demo)", "clusters.demo")
        router = Router((demo_cluster, *config.clusters.values()))
        self.assertEqual(router.route(*DEMO_WEB).cluster.name, "demo")
        route = router.route(*DEMO_API_WEB, "demo-api", "demo-token")
        self.assertEqual((route.cluster.name, route.host), ("demo-api", DEMO_API_WEB[0]))
