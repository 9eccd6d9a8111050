"""
System tests: the real `twistd gateway` process against real OpenSSH sshd, with
real clients (curl, requests, paramiko, ssh), in network namespaces this test
creates (see tests/system/netlab.py).

The gateway and every client run in the lab's controller namespace, which has
no default route; the two clusters' internal hosts share one address
(10.251.0.10) and serve different content, so every answer also proves the
gateway picked the right cluster.  Needs root; skipped with the reason
otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.system.netlab import INTERNAL_NAME, Lab, wait_for_port
from tests.system.support import INTERNAL, VENV_BIN, curl, shared_lab, twistd_argv

TOKENS = {"a": "token-a", "b": "token-b"}


class SystemTests(TestCase):
    """
    One lab and one gateway process for all system tests (L{shared_lab}):
    built by the first test, kept on the class.
    """

    lab: Lab

    def setUp(self) -> None:
        type(self).lab = shared_lab("system_lab", "system tests", SystemTests._start_shared)[0]

    @classmethod
    def _start_shared(cls, lab: Lab, workdir: str) -> None:
        cls.lab, cls.workdir = lab, workdir
        cls._start_gateway()

    @classmethod
    def _start_gateway(cls) -> None:
        lab = cls.lab
        cls.config = os.path.join(cls.workdir, "gateway.toml")
        with open(cls.config, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""
                    [listen]
                    socks = "tcp:1080:interface=127.0.0.1"
                    http  = "tcp:3128:interface=127.0.0.1"

                    [clusters.cluster-a]
                    aliases = ["net-aaaa"]
                    proxies = ["{lab.proxy_addr["a"]}:22"]
                    user = "root"
                    key_file = "{lab.client_key_rsa}"
                    known_hosts = "{lab.known_hosts}"
                    networks = ["10.251.0.0/24"]
                    hostnames = ["*.cluster.internal"]
                    token = "{TOKENS["a"]}"

                    [clusters.cluster-b]
                    aliases = ["net-bbbb"]
                    proxies = ["{lab.proxy_addr["b"]}:22"]
                    user = "root"
                    key_file = "{lab.client_key_ed25519}"
                    known_hosts = "{lab.known_hosts_hashed}"
                    networks = ["10.251.0.0/24"]
                    hostnames = ["*.cluster.internal"]
                    token = "{TOKENS["b"]}"

                    [clusters.cluster-r]
                    proxies = ["{lab.proxy_addr["a"]}:22"]
                    user = "root"
                    key_file = "{lab.client_key_ed25519}"
                    known_hosts = "{lab.known_hosts}"
                    networks = ["10.251.0.0/24"]
                    rekey_bytes = "1M"

                    [clusters.cluster-x]
                    proxies = ["{lab.proxy_addr["a"]}:22"]
                    user = "root"
                    key_file = "{lab.client_key_ed25519}"
                    host_keys = {lab.host_key_lines["proxy-b"]!r}
                    networks = ["10.252.0.0/24"]
                    connect_timeout = 2.0
                    """
                )
            )
        cls.gateway_log = os.path.join(cls.workdir, "gateway.log")
        cls.gateway = lab.spawn(
            lab.ctl_ns,
            twistd_argv(cls.config, cls.gateway_log),
        )
        wait_for_port(lab, lab.ctl_ns, "127.0.0.1", 1080, timeout=20)
        wait_for_port(lab, lab.ctl_ns, "127.0.0.1", 3128, timeout=20)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = cls.read_log()
            if all(f"cluster cluster-{c} up" in log for c in "abr"):
                return
            time.sleep(0.2)
        raise AssertionError("clusters did not come up:\n" + cls.read_log()[-4000:])

    @classmethod
    def read_log(cls) -> str:
        with open(cls.gateway_log, errors="replace") as f:
            return f.read()

    # -- helpers ---------------------------------------------------------

    def ctl(self, argv: list[str], timeout: float = 60, input: bytes | None = None):
        return self.lab.run(self.lab.ctl_ns, argv, timeout=timeout, input=input, capture_output=True)

    def curl(self, *args: str) -> tuple[int, bytes, bytes]:
        return curl(self.lab, *args)

    def python(self, code: str, timeout: float = 60) -> bytes:
        done = self.ctl([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        return done.stdout

    def ssh_through(self, command: str) -> tuple[bytes, bytes]:
        """OpenSSH to the internal host with C{command} as ProxyCommand: what it prints there."""
        done = self.ctl(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                self.lab.client_key_rsa,
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={self.lab.known_hosts}",
                "-o",
                f"ProxyCommand={command}",
                f"root@{INTERNAL}",
                f"curl -s http://{INTERNAL}:8080/",
            ],
            timeout=20,
        )
        return done.stdout, done.stderr

    def url(self, path: str = "/") -> str:
        return f"http://{INTERNAL}:8080{path}"

    # -- curl --------------------------------------------------------------

    def test_socks5_credentials_pick_the_cluster(self):
        for cluster, user in (("a", "cluster-a"), ("b", "cluster-b"), ("a", "net-aaaa"), ("b", "net-bbbb")):
            status, out, err = self.curl(
                "--socks5-hostname", "127.0.0.1:1080", "-U", f"{user}:{TOKENS[cluster]}", self.url()
            )
            self.assertEqual((status, out), (0, f"internal-{cluster}\n".encode()), err)

    def test_names_are_resolved_on_the_proxy_side(self):
        """INTERNAL_NAME resolves only inside each proxy namespace, to its own host."""
        url = f"http://{INTERNAL_NAME}:8080/"
        status, out, err = self.curl("--socks5-hostname", "127.0.0.1:1080", "-U", f"cluster-a:{TOKENS['a']}", url)
        self.assertEqual((status, out), (0, b"internal-a\n"), err)
        status, out, err = self.curl("-x", f"http://cluster-b:{TOKENS['b']}@127.0.0.1:3128", url)
        self.assertEqual((status, out), (0, b"internal-b\n"), err)
        # A name outside the cluster's hostnames patterns is refused before any lookup.
        status, out, err = self.curl(
            "-x", f"http://cluster-b:{TOKENS['b']}@127.0.0.1:3128", "-w", "%{http_code}", "http://localhost:8080/"
        )
        self.assertTrue(out.endswith(b"403"), out)
        # A name the proxy node cannot resolve is 'host unreachable': SOCKS 0x04, HTTP 502.
        status, out, err = self.curl(
            "-x",
            f"http://cluster-b:{TOKENS['b']}@127.0.0.1:3128",
            "-w",
            "%{http_code}",
            "http://nope.cluster.internal/",
        )
        self.assertTrue(out.endswith(b"502"), out)

    def test_http_proxy_absolute_form_and_connect(self):
        status, out, err = self.curl("-x", f"http://cluster-a:{TOKENS['a']}@127.0.0.1:3128", self.url())
        self.assertEqual((status, out), (0, b"internal-a\n"), err)
        status, out, err = self.curl("-p", "-x", f"http://net-bbbb:{TOKENS['b']}@127.0.0.1:3128", self.url())
        self.assertEqual((status, out), (0, b"internal-b\n"), err)

    def test_overlapping_networks_need_credentials(self):
        status, out, err = self.curl("-x", "http://127.0.0.1:3128", "-w", "%{http_code}", self.url())
        self.assertEqual(status, 0, err)
        self.assertTrue(out.endswith(b"407"), out)  # a challenge: credentials pick the cluster
        # An unauthenticated client is not told which clusters exist (log_detail names them).
        self.assertIn(b"several clusters", out)
        self.assertNotIn(b"cluster-a", out)
        self.assertNotIn(b"cluster-b", out)
        status, _, _ = self.curl("--socks5-hostname", "127.0.0.1:1080", self.url())
        self.assertNotEqual(status, 0)

    def test_wrong_token_is_refused(self):
        status, out, err = self.curl("-x", "http://cluster-a:wrong@127.0.0.1:3128", "-w", "%{http_code}", self.url())
        self.assertTrue(out.endswith(b"407"), out)
        self.assertNotIn(b"wrong", self.read_log().encode())
        self.assertNotIn(TOKENS["a"].encode(), self.read_log().encode())

    def test_destination_outside_the_cluster_is_refused(self):
        status, out, err = self.curl(
            "-x", f"http://cluster-a:{TOKENS['a']}@127.0.0.1:3128", "-w", "%{http_code}", "http://10.250.2.2:22/"
        )
        self.assertTrue(out.endswith(b"403"), out)

    def test_connection_refused_by_destination(self):
        status, out, err = self.curl(
            "--socks5-hostname", "127.0.0.1:1080", "-U", f"cluster-a:{TOKENS['a']}", self.url().replace("8080", "8081")
        )
        self.assertEqual(status, 97, err)  # curl: SOCKS proxy handshake failed
        self.assertIn(b"(5)", err)  # reply 0x05 connection refused

    def test_20_mib_byte_for_byte(self):
        for args in (
            ["--socks5-hostname", "127.0.0.1:1080", "-U", f"cluster-b:{TOKENS['b']}"],
            ["-x", f"http://cluster-a:{TOKENS['a']}@127.0.0.1:3128"],
        ):
            status, out, err = self.curl(*args, self.url("/big"))
            self.assertEqual(status, 0, err)
            self.assertEqual(len(out), self.lab.big_size)
            self.assertEqual(hashlib.sha256(out).hexdigest(), self.lab.big_sha256)

    def test_rekey_every_mib_during_a_20_mib_download_against_openssh(self):
        status, out, err = self.curl("--socks5-hostname", "127.0.0.1:1080", "-U", "cluster-r:", self.url("/big"))
        self.assertEqual(status, 0, err)
        self.assertEqual(hashlib.sha256(out).hexdigest(), self.lab.big_sha256)
        self.assertGreaterEqual(self.read_log().count(f"rekeying with {self.lab.proxy_addr['a']}:22"), 10)

    def test_unverifiable_host_key_is_refused_with_fingerprint(self):
        status, out, err = self.curl("--socks5-hostname", "127.0.0.1:1080", "-U", "cluster-x:", "http://10.252.0.1/")
        self.assertEqual(status, 97, err)
        self.assertIn(b"(4)", err)  # host unreachable: no SSH connection
        log = self.read_log()
        self.assertIn("not one of the pinned host_keys", log)
        self.assertIn("SHA256:", log)

    # -- requests ------------------------------------------------------------

    def test_requests_keep_alive_sessions(self):
        out = self.python(
            f"""
            import requests
            for proxy in ("socks5h://cluster-a:{TOKENS["a"]}@127.0.0.1:1080",
                          "http://cluster-b:{TOKENS["b"]}@127.0.0.1:3128"):
                s = requests.Session()
                s.proxies = {{"http": proxy}}
                texts = [s.get("{self.url()}", timeout=20).text for _ in range(3)]
                echo = s.post("{self.url("/echo")}", data=b"x" * 100000, timeout=20).content
                chunked = s.post("{self.url("/echo")}", data=iter([b"ab", b"cd"]), timeout=20).content
                print(texts[0].strip(), len(set(texts)), len(echo), chunked.decode())
            """
        )
        self.assertEqual(out.decode().split("\n")[:2], ["internal-a 1 100000 abcd", "internal-b 1 100000 abcd"])

    # -- SSH through gateway-connect ------------------------------------------

    def test_paramiko_through_gateway_connect(self):
        connect = os.path.join(VENV_BIN, "gateway-connect")
        out = self.python(
            f"""
            import paramiko
            for cluster, token in (("cluster-a", "{TOKENS["a"]}"), ("net-bbbb", "{TOKENS["b"]}")):
                client = paramiko.SSHClient()
                client.load_host_keys("{self.lab.known_hosts}")
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
                sock = paramiko.ProxyCommand("{connect} --cluster " + cluster + " --token " + token + " {INTERNAL} 22")
                client.connect("{INTERNAL}", username="root", key_filename="{self.lab.client_key_ed25519}",
                               sock=sock, timeout=20, allow_agent=False, look_for_keys=False)
                _, stdout, _ = client.exec_command("curl -s http://{INTERNAL}:8080/")
                print(stdout.read().decode().strip())
                client.close()
            """
        )
        self.assertEqual(out.decode().split(), ["internal-a", "internal-b"])

    def test_openssh_through_gateway_connect(self):
        connect = os.path.join(VENV_BIN, "gateway-connect")
        for cluster in ("a", "b"):
            out, err = self.ssh_through(f"{connect} --cluster cluster-{cluster} --token {TOKENS[cluster]} %h %p")
            self.assertEqual(out, f"internal-{cluster}\n".encode(), err)

    # -- clients nobody here wrote -----------------------------------------------
    # Each needs its client on PATH and skips, naming it, when it is missing.

    def need(self, *tools: str) -> None:
        missing = [tool for tool in tools if shutil.which(tool) is None]
        if missing:
            raise SkipTest(f"needs {', '.join(missing)} on PATH")

    def test_socks4_clients_name_a_tokenless_cluster(self):
        """SOCKS4 carries a user id and no password: it names cluster-r (no token) for curl and socat."""
        self.need("socat")
        for flag in ("--socks4", "--socks4a"):
            status, out, err = self.curl(flag, "127.0.0.1:1080", "-U", "cluster-r:", self.url())
            self.assertEqual((status, out), (0, b"internal-a\n"), err)
        request = f"GET / HTTP/1.0\r\nHost: {INTERNAL}\r\n\r\n".encode()
        for kind in ("SOCKS4", "SOCKS4A"):
            done = self.ctl(
                ["socat", "-t", "5", "-", f"{kind}:127.0.0.1:{INTERNAL}:8080,socksport=1080,socksuser=cluster-r"],
                timeout=15,
                input=request,
            )
            self.assertTrue(done.stdout.endswith(b"\r\n\r\ninternal-a\n"), (kind, done.stdout, done.stderr))

    def test_wget_and_proxychains(self):
        self.need("wget", "proxychains4")
        done = self.ctl(
            ["env", f"http_proxy=http://cluster-b:{TOKENS['b']}@127.0.0.1:3128", "wget", "-q", "-O", "-", self.url()]
        )
        self.assertEqual(done.stdout, b"internal-b\n", done.stderr)
        for line, expected in (
            (f"socks5 127.0.0.1 1080 cluster-a {TOKENS['a']}", b"internal-a\n"),
            (f"http 127.0.0.1 3128 cluster-b {TOKENS['b']}", b"internal-b\n"),
        ):
            conf = os.path.join(self.workdir, "proxychains.conf")
            with open(conf, "w") as f:
                f.write(f"strict_chain\nproxy_dns\ntcp_read_time_out 15000\n[ProxyList]\n{line}\n")
            done = self.ctl(["proxychains4", "-q", "-f", conf, "curl", "-sS", "--max-time", "20", self.url()])
            self.assertEqual(done.stdout, expected, (line.split()[0], done.stderr))

    def test_openssh_with_ncat_and_socat_proxy_commands(self):
        """The usual ProxyCommand one-liners, each with the credentials it can carry."""
        self.need("ncat", "socat")
        for command, cluster in (
            (f"ncat --proxy 127.0.0.1:1080 --proxy-type socks5 --proxy-auth cluster-a:{TOKENS['a']} %h %p", "a"),
            ("socat - SOCKS4A:127.0.0.1:%h:%p,socksport=1080,socksuser=cluster-r", "a"),
        ):
            out, err = self.ssh_through(command)
            self.assertEqual(out, f"internal-{cluster}\n".encode(), (command, err))

    def test_challenge_driven_http_client_reaches_an_ambiguous_destination(self):
        """
        ncat (like curl --proxy-anyauth, OpenBSD nc -P, browsers and Java) sends
        its first CONNECT without credentials and offers them only when
        challenged with a 407.  The destination is in several clusters'
        networks, so the answer must be that challenge: a 403 ends it there.
        """
        self.need("ncat")
        out, err = self.ssh_through(
            f"ncat --proxy 127.0.0.1:3128 --proxy-type http --proxy-auth cluster-b:{TOKENS['b']} %h %p"
        )
        self.assertEqual(out, b"internal-b\n", err)

    def test_node_exiting_with_open_sockets_cuts_no_other_stream(self):
        """
        A Node program that exits (or is killed) with kept-alive sockets and
        replies still unread resets them all at once, while the destination's
        reply and EOF are in flight; this once dropped the cluster's SSH
        connection and every stream on it.  Another client's download over the
        same connection must arrive whole, with no reconnect.
        """
        self.need("node")
        script = os.path.join(self.workdir, "exit-with-sockets.js")
        auth = base64.b64encode(f"cluster-a:{TOKENS['a']}".encode()).decode()
        with open(script, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""
                    const http = require('http'), net = require('net');
                    const auth = 'Proxy-Authorization: Basic {auth}\\r\\n';
                    const agent = new http.Agent({{keepAlive: true}});
                    const get = (path) => new Promise((done) => http.get(
                      {{host: '127.0.0.1', port: 3128, path: 'http://{INTERNAL}:8080' + path, agent,
                        headers: {{'Proxy-Authorization': 'Basic {auth}'}}}},
                      (res) => {{ res.on('data', () => {{}}); res.on('end', done); if (path === '/big') done(); }}));
                    // CONNECT tunnels with a reply (and, after it, the server's EOF) on its way
                    const tunnel = (path) => new Promise((done) => {{
                      const s = net.connect(3128, '127.0.0.1', () =>
                        s.write('CONNECT {INTERNAL}:8080 HTTP/1.1\\r\\n' + auth + '\\r\\n'));
                      s.once('data', () => {{ s.pause(); s.write('GET ' + path + ' HTTP/1.0\\r\\n\\r\\n'); done(); }});
                    }});
                    (async () => {{
                      await Promise.all([get('/'), get('/'), get('/')]);
                      await get('/big');
                      await Promise.all(['/', '/bytes/100000', '/big'].flatMap((p) => [p, p, p]).map(tunnel));
                      setTimeout(() => {{
                        if (process.argv[2] === 'kill') process.kill(process.pid, 'SIGKILL');
                        process.exit(0);
                      }}, Number(process.argv[3]));
                    }})();
                    """
                )
            )
        reconnects = self.read_log().count("cluster cluster-a connecting")
        victim = self.lab.spawn(
            self.lab.ctl_ns,
            [
                "curl",
                "-sS",
                "--max-time",
                "30",
                "--limit-rate",
                "5M",
                "-x",
                f"http://cluster-a:{TOKENS['a']}@127.0.0.1:3128",
                self.url("/big"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for mode, delay in zip(("exit", "kill") * 4, (0, 0, 1, 1, 3, 3, 10, 10), strict=True):
            done = self.ctl(["node", script, mode, str(delay)], timeout=15)
            self.assertIn(done.returncode, (0, -signal.SIGKILL), done.stderr)
        out, err = victim.communicate(timeout=30)
        self.assertEqual(victim.returncode, 0, err)
        self.assertEqual(hashlib.sha256(out).hexdigest(), self.lab.big_sha256)
        log = self.read_log()
        self.assertEqual(log.count("cluster cluster-a connecting"), reconnects, log[-3000:])
        self.assertNotIn("Traceback", log)

    # -- logs --------------------------------------------------------------

    def test_stream_events_are_logged_without_secrets(self):
        self.curl("--socks5-hostname", "127.0.0.1:1080", "-U", f"cluster-a:{TOKENS['a']}", self.url())
        log = self.read_log()
        self.assertIn(f"stream to {INTERNAL}:8080 via cluster-a closed", log)
        for secret in TOKENS.values():
            self.assertNotIn(secret, log)
        self.assertNotIn("PRIVATE KEY", log)


class ControlPlaneSystemTests(TestCase):
    """
    Clusters registered through the control API against real OpenSSH, kept
    across a restart of the gateway process (its own process, ports 1090/3138,
    control on a unix socket).
    """

    setUp = SystemTests.setUp
    ctl = SystemTests.ctl
    curl = SystemTests.curl
    python = SystemTests.python
    url = SystemTests.url

    def _gateway_argv(self, workdir: str) -> list[str]:
        self.control_socket = os.path.join(workdir, "control.sock")
        return twistd_argv(self.api_config, os.path.join(workdir, "gateway.log"))

    def _start_api_gateway(self, workdir: str):
        process = self.lab.spawn(self.lab.ctl_ns, self._gateway_argv(workdir))
        self.addCleanup(self._stop, process)
        wait_for_port(self.lab, self.lab.ctl_ns, "127.0.0.1", 1090, timeout=20)
        return process

    def _stop(self, process) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except Exception:
                process.kill()
                process.wait(5)

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        import json as _json

        out = self.python(
            f"""
            import http.client, json, socket
            class Conn(http.client.HTTPConnection):
                def connect(self):
                    self.sock = socket.socket(socket.AF_UNIX)
                    self.sock.connect({self.control_socket!r})
            c = Conn("localhost", timeout=20)
            body = {_json.dumps(body)!r}
            c.request({method!r}, {path!r}, body=None if body == "null" else body,
                      headers={{"Content-Type": "application/json"}})
            r = c.getresponse()
            data = r.read()
            print(r.status)
            print(data.decode() or "{{}}")
            """
        ).decode()
        status, _, payload = out.partition("\n")
        return int(status), _json.loads(payload)

    def test_register_restart_delete(self):
        # Short: a unix socket path must fit in 108 bytes.
        workdir = tempfile.mkdtemp(prefix="gwctl-")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.api_config = os.path.join(workdir, "gateway.toml")
        with open(self.api_config, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""
                    [listen]
                    socks = "tcp:1090:interface=127.0.0.1"
                    http = "tcp:3138:interface=127.0.0.1"
                    control = "unix:{workdir}/control.sock:mode=600"

                    [gateway]
                    state_file = "{workdir}/state/clusters.json"
                    """
                )
            )
        gateway = self._start_api_gateway(workdir)
        with open(self.lab.client_key_rsa) as f:
            key = f.read()
        body = {
            "aliases": ["net-api"],
            "proxies": [f"{self.lab.proxy_addr['b']}:22"],
            "user": "root",
            "key": key,
            "host_keys": self.lab.host_key_lines["proxy-b"],  # inline: API bodies name no files
            "networks": ["10.251.0.0/24"],
            "token": "api-token",
        }
        status, answer = self.api("PUT", "/v1/clusters/api-b", body)
        self.assertEqual(status, 201, answer)

        def fetch_until(expected_status: int, timeout: float = 20) -> bytes:
            deadline = time.monotonic() + timeout
            while True:
                status, out, err = self.curl(
                    "--socks5-hostname", "127.0.0.1:1090", "-U", "net-api:api-token", self.url()
                )
                if status == expected_status or time.monotonic() > deadline:
                    return out
                time.sleep(0.2)

        self.assertEqual(fetch_until(0), b"internal-b\n")
        status, view = self.api("GET", "/v1/clusters/api-b", None)
        self.assertEqual((status, view["status"]["state"], view["source"]), (200, "up", "api"))
        self.assertNotIn("PRIVATE", repr(view))

        # Restart the gateway process: the cluster comes back from the state file.
        self._stop(gateway)
        state = os.path.join(workdir, "state", "clusters.json")
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o600)
        self._start_api_gateway(workdir)
        self.assertEqual(fetch_until(0), b"internal-b\n")

        status, _ = self.api("DELETE", "/v1/clusters/api-b", None)
        self.assertEqual(status, 204)
        status, out, err = self.curl("--socks5-hostname", "127.0.0.1:1090", "-U", "net-api:api-token", self.url())
        self.assertEqual(status, 97, err)  # the credentials name no cluster any more
