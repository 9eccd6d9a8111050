"""
The twistd entry point: options, start-up refusals with one clear message,
and the service tree built from parsed options.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import _SystemdParser
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from gateway.app.clusters import ClusterRegistry
from gateway.app.demo import DemoService
from gateway.app.service import GatewayService, ListenerService
from gateway.app.tap import Options, makeService
from gateway.config import load_config, parse_cluster
from gateway.control.http import TOKEN_ENV
from gateway.routing import Router
from gateway.testing import DEMO_API_WEB, DEMO_WEB, DemoCluster, FakeProxyNode, generate_key, private_pem, public_line
from tests.support import capture_events

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
            f"gateway: {config}: clusters.a.networks[0]: '10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)",
        )
        self.assertEqual(done.stdout, b"")

    def test_control_listener_off_loopback_needs_a_token(self):
        """Refused once bound (0.0.0.0), with one critical line in the log, before any cluster connects."""
        config = self.write("gw.toml", '[listen]\ncontrol = "tcp:0"\n' + self.cluster())
        done = self.twistd(f"--config={config}")
        self.assertEqual(done.returncode, 1)
        refusals = [line for line in done.stdout.decode().splitlines() if "#critical]" in line]
        self.assertEqual(len(refusals), 1, done.stdout)
        self.assertIn("listen.control: 'tcp:0' listens on 0.0.0.0:", refusals[0])
        self.assertIn("control_token_file", refusals[0])
        self.assertNotIn("cluster a connecting", done.stdout.decode())

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
        self.assertIsInstance(list(service)[0], ClusterRegistry)
        listeners = sorted((c.kind, c.description) for c in service if isinstance(c, ListenerService))
        self.assertEqual(listeners, [("control", "unix:c.sock"), ("socks", "tcp:0:interface=127.0.0.1")])
        self.assertEqual(sorted(service.clusters), ["a"])
        self.assertFalse(any(isinstance(c, DemoService) for c in service))

    def test_name_overrides_the_file(self):
        """
        C{--name}: the workers of one host share one file (and one socket) but
        are fleet members each, told apart by name (docs/operating.md, "More cores").
        """
        config = self.write("gw.toml", '[gateway]\nname = "gw-a"\n')
        options = Options()
        options.parseOptions([f"--config={config}", "--name=gw-a-2"])
        self.assertEqual(options.gateway_config.settings.name, "gw-a-2")
        options = Options()
        options.parseOptions([f"--config={config}"])
        self.assertEqual(options.gateway_config.settings.name, "gw-a")

    def test_bad_name_stops_start_up_with_one_line(self):
        config = self.write("gw.toml", "")
        done = self.twistd(f"--config={config}", "--name=a b")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            done.stderr.decode().strip(),
            f"gateway: {config}: --name: gateway name 'a b' is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ - "
            "(not . or ..)",
        )

    def test_demo_tree(self):
        options = Options()
        options.parseOptions(["--demo", "--socks=tcp:0:interface=127.0.0.1", "--http=", "--control="])
        service = makeService(options)
        self.assertTrue(any(isinstance(c, DemoService) for c in service))
        self.assertEqual(service.clusters, {})  # "demo" is added when the service starts


@implementer(IListeningPort)
class _BoundPort:
    """A listening port that reports the interface it was bound to, as a real bind does."""

    def __init__(self, address: IAddress) -> None:
        self.address = address
        self.listening = True

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)

    def getHost(self) -> IAddress:
        return self.address


class _BindingReactor(MemoryReactorClock):
    """L{MemoryReactorClock} reports every TCP port on 0.0.0.0; this one tells where it was asked to bind."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: list[_BoundPort] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        super().listenTCP(port, factory, backlog, interface)
        port = port or 40000 + len(self.bound)  # what the kernel picks for port 0
        bound = _BoundPort(IPv4Address("TCP", interface or "0.0.0.0", port))
        self.bound.append(bound)
        return bound

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        super().listenUNIX(address, factory, backlog, mode, wantPID)
        bound = _BoundPort(UNIXAddress(address))
        self.bound.append(bound)
        return bound


class ServiceTreeTests(TestCase):
    """The tree C{makeService} builds, started and stopped in memory."""

    def setUp(self) -> None:
        self.reactor = _BindingReactor()
        self.set_token(None)

    def set_token(self, token: str | None) -> None:
        """Set or clear C{GATEWAY_CONTROL_TOKEN} for this test (in place: control_token holds os.environ)."""
        saved = os.environ.pop(TOKEN_ENV, None)
        if token is not None:
            os.environ[TOKEN_ENV] = token
        self.addCleanup(lambda: os.environ.__setitem__(TOKEN_ENV, saved) if saved else os.environ.pop(TOKEN_ENV, None))

    def service(self, *args: str) -> GatewayService:
        options = Options()
        options.parseOptions(["--demo", "--socks=tcp:0:interface=127.0.0.1", "--http=", *args])
        return makeService(options, reactor=self.reactor)

    def test_the_demo_cluster_is_started_once(self) -> None:
        """
        The demo adds its cluster while the tree starts: one SSH connection,
        not one per start (the old tree started a child added during its
        own start a second time).
        """
        service = self.service("--control=")
        service.privilegedStartService()
        service.startService()
        self.assertEqual([(host, port) for host, port, *_ in self.reactor.tcpClients], [("127.0.0.1", 40002)])
        self.assertEqual(sorted(service.clusters), ["demo"])
        self.successResultOf(service.stopService())
        self.assertEqual([port.listening for port in self.reactor.bound], [False, False, False])

    def test_control_listener_on_loopback_without_token(self) -> None:
        service = self.service("--control=tcp:0:interface=127.0.0.1")
        service.privilegedStartService()
        self.assertEqual(service.listening_address("control"), "127.0.0.1:40001")
        self.successResultOf(service.stopService())

    def test_control_listener_off_loopback_without_token_stops_start_up(self) -> None:
        service = self.service("--control=tcp:0")
        self.assertRaises(SystemExit, service.privilegedStartService)
        control = [c for c in service if isinstance(c, ListenerService) and c.kind == "control"][0]
        self.assertTrue(control.refused)
        self.assertIsNone(control.port)
        self.assertFalse(self.reactor.bound[-1].listening)  # closed at once, never served

    def test_an_inherited_descriptor_that_is_no_socket_stops_start_up_with_one_line(self) -> None:
        """
        Socket activation gone wrong (a supervisor's descriptor 3 is a file):
        Twisted's adoption raises the socket error itself, not a
        CannotListenError, and it is refused as one all the same.
        """
        # A descriptor of the test's own (a file): Twisted sets the adopted
        # descriptor non-blocking before adopting it, and descriptor 3 itself
        # may be anything here (trial's -j workers talk to their parent on it).
        fd = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        # Twisted reads LISTEN_FDS once, at import, into this class attribute: what it would have read.
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([fd], ("socks",)))

        def not_a_socket(fd: int, family: int, factory: Factory) -> None:
            raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))

        self.patch(self.reactor, "adoptStreamPort", not_a_socket)
        service = ListenerService(self.reactor, "socks", "systemd:domain=INET:name=socks", Factory())
        events = capture_events(self)
        self.assertRaises(SystemExit, service.privilegedStartService)
        [critical] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(
            critical["log_format"].format(**critical),
            "cannot listen for socks on systemd:domain=INET:name=socks: Socket operation on non-socket",
        )

    def test_control_listener_off_loopback_with_token(self) -> None:
        self.set_token("secret")
        service = self.service("--control=tcp:0")
        service.privilegedStartService()
        self.assertEqual(service.listening_address("control"), "0.0.0.0:40001")


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

    def test_the_demo_proxy_node_logs_only_warnings(self) -> None:
        """Its Conch server's info and debug events (a dozen per login) would bury the demo's instructions."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        node = FakeProxyNode(MemoryReactorClock(), [generate_key()])
        node.factory.startFactory()
        server = node.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        server.makeConnection(StringTransport())
        server.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
        server.receiveError(11, b"gateway closing the connection")  # logged at error: kept
        below = [e for e in events if e.get("log_level", LogLevel.critical) < LogLevel.warn]
        self.assertEqual(below, [])
        self.assertEqual(len(events), 1)
