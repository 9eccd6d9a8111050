"""
System tests of clients without proxy credentials (issue 12): per-cluster
listeners, cluster-qualified names, names resolved and checked on the proxy
node, per-cluster listeners opened and closed through the control API -- the
real `twistd gateway` process against real OpenSSH sshd with real clients
(curl, requests, paramiko, OpenSSH), in network namespaces this test creates
(L{tests.system.names_gateway}).

The two clusters' internal hosts share 10.251.0.10 and answer with their
namespace's name, so every answer also proves which cluster carried it.
Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest, TestCase

from tests.system.names_gateway import HTTP, SOCKS, TENANTS, TOKEN, TOKEN_CLUSTER, NamesGateway, Tenant
from tests.system.netlab import MIXED_NAME, OUTSIDE_NAME, RESOLVED_NAME
from tests.system.support import INTERNAL, VENV_BIN, GatewayProcess

#: curl's exit status when a SOCKS5 proxy refuses the stream; the reply code is in its message ("(2)").
CURL_SOCKS_REFUSED = 97
#: curl's exit status when nothing listens on the proxy's port.
CURL_CONNECT_FAILED = 7

REQUESTS_CHECK = """
import sys
import requests

for proxy, url in zip(sys.argv[1::2], sys.argv[2::2]):
    with requests.Session() as session:
        session.proxies = {"http": proxy}
        texts = {session.get(url, timeout=15).text.strip() for _ in range(3)}  # kept alive
        echo = session.post(url + "echo", data=b"x" * 70000, timeout=15).content
        print(proxy.split(":")[0], *sorted(texts), len(echo))
"""

JAVA_FETCH = """
import java.io.InputStream;
import java.net.URL;

public class Fetch {
    public static void main(String[] args) throws Exception {
        try (InputStream in = new URL(args[0]).openStream()) {
            System.out.print(new String(in.readAllBytes(), "UTF-8"));
        }
    }
}
"""

PARAMIKO_CHECK = """
import sys
import paramiko

known_hosts, key, proxy_command, host = sys.argv[1:5]
client = paramiko.SSHClient()
client.load_host_keys(known_hosts)
client.set_missing_host_key_policy(paramiko.RejectPolicy())
client.connect(host, username="root", key_filename=key, sock=paramiko.ProxyCommand(proxy_command),
               timeout=15, allow_agent=False, look_for_keys=False)
_, stdout, _ = client.exec_command("curl -s --max-time 5 http://" + host + ":8080/")
sys.stdout.write(stdout.read().decode())
client.close()
"""


class NamesSystemTests(TestCase):
    names: NamesGateway

    def setUp(self) -> None:
        self.names = NamesGateway.get()

    def fetch(self, *args: str) -> tuple[int, bytes, bytes]:
        """curl with C{args}; an HTTP status goes after the body (C{-w})."""
        return self.names.curl("-w", "\n%{http_code}", *args)

    def assertServed(self, tenant: Tenant, *args: str, body: str | None = None) -> None:
        status, out, err = self.fetch(*args)
        self.assertEqual((status, out.decode()), (0, f"{body or tenant.served}\n\n200"), (args, err))

    def assertSocksRefused(self, reply: int | str, *args: str) -> None:
        """curl's SOCKS5 handshake failed: with C{reply} (a reply code), or with curl's words for the failure."""
        status, _, err = self.fetch(*args)
        self.assertEqual(status, CURL_SOCKS_REFUSED, (args, err))
        self.assertIn(f"({reply})".encode() if isinstance(reply, int) else reply.encode(), err, args)

    def assertHttpStatus(self, code: int, *args: str) -> bytes:
        status, out, err = self.fetch(*args)
        body, _, got = out.rpartition(b"\n")
        self.assertEqual((status, got), (0, str(code).encode()), (args, out, err))
        return body

    # -- per-cluster listeners -------------------------------------------------

    def test_per_cluster_listeners_with_curl(self):
        """Each cluster's own listeners reach its own host: no credentials, same address, SOCKS5, plain and CONNECT."""
        for t in TENANTS.values():
            self.assertServed(t, "--socks5-hostname", f"127.0.0.1:{t.socks}", t.url())
            self.assertServed(t, "--socks5", f"127.0.0.1:{t.socks}", t.url())
            self.assertServed(t, "-x", f"http://127.0.0.1:{t.http}", t.url())
            self.assertServed(t, "-p", "-x", f"http://127.0.0.1:{t.http}", t.url())
            self.assertServed(t, "-x", f"http://127.0.0.1:{t.http}", t.url("/host"), body=f"{INTERNAL}:8080")
            # credentials there must name its cluster (its alias does)
            self.assertServed(t, "--socks5-hostname", f"127.0.0.1:{t.socks}", "-U", f"{t.alias}:", t.url())
        a, b = TENANTS["a"], TENANTS["b"]
        self.assertSocksRefused(
            "User was rejected", "--socks5-hostname", f"127.0.0.1:{a.socks}", "-U", f"{b.name}:", a.url()
        )
        self.assertHttpStatus(407, "-x", f"http://{a.name}:x@127.0.0.1:{b.http}", b.url())
        # the shared listeners still cannot tell the clusters apart
        self.assertHttpStatus(407, "-x", f"http://127.0.0.1:{HTTP}", a.url())
        for t in TENANTS.values():
            self.assertEqual(
                self.names.cluster_status(t.name)["listeners"],
                {"socks": [f"127.0.0.1:{t.socks}"], "http": [f"127.0.0.1:{t.http}"]},
            )

    def test_per_cluster_listeners_with_requests(self):
        """
        requests, kept-alive sessions without credentials: socks5h:// (PySocks, from the test extra's
        requests[socks]) and http:// on per-cluster listeners, socks5h:// with a qualified name on the shared one.
        """
        a, b = TENANTS["a"], TENANTS["b"]
        status, out, err = self.names.python(
            REQUESTS_CHECK,
            f"socks5h://127.0.0.1:{a.socks}",
            a.url(),
            f"http://127.0.0.1:{b.http}",
            b.url(),
            f"socks5h://127.0.0.1:{SOCKS}",
            f"http://{b.qualified()}:8080/",
        )
        self.assertEqual(status, 0, err.decode(errors="replace"))
        self.assertEqual(
            out.decode().splitlines(),
            ["socks5h internal-a 70000", "http internal-b 70000", "socks5h internal-b 70000"],
        )

    def test_socat_and_netcat_without_credentials(self):
        """
        Clients that cannot send a cluster's credentials (issue 12's list): socat's SOCKS4 and SOCKS4A (it
        sends $USER as the user id) and OpenBSD netcat's SOCKS5 and SOCKS4, each on a per-cluster listener,
        and with a qualified name on the shared one.
        """
        a, b = TENANTS["a"], TENANTS["b"]
        cases = [
            (a, ["socat", "-", f"SOCKS4:127.0.0.1:{INTERNAL}:8080,socksport={a.socks}"]),
            (b, ["socat", "-", f"SOCKS4A:127.0.0.1:{INTERNAL}:8080,socksport={b.socks}"]),
            (b, ["socat", "-", f"SOCKS4A:127.0.0.1:{b.qualified()}:8080,socksport={SOCKS}"]),
            (a, ["nc", "-X", "5", "-x", f"127.0.0.1:{a.socks}", INTERNAL, "8080"]),
            (b, ["nc", "-X", "4", "-x", f"127.0.0.1:{b.socks}", INTERNAL, "8080"]),
            (a, ["nc", "-X", "5", "-x", f"127.0.0.1:{SOCKS}", a.qualified(), "8080"]),
        ]
        for tenant, argv in cases:
            done = self.names.lab.run(
                self.names.lab.ctl_ns, argv, timeout=20, input=b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
            )
            self.assertEqual(done.returncode, 0, (argv, done.stderr))
            self.assertTrue(done.stdout.startswith(b"HTTP/1.1 200"), (argv, done.stdout[:200]))
            self.assertTrue(done.stdout.rstrip().endswith(tenant.served.encode()), (argv, done.stdout[-200:]))

    def test_java_socks_proxy_host(self):
        """
        Java's own SOCKS client (-DsocksProxyHost, what JDBC drivers and JVM tools use): it can send no
        cluster credentials, so a per-cluster listener or a qualified name picks the cluster.
        """
        java = shutil.which("java")
        if java is None:
            raise SkipTest("java is not installed (Debian's default-jre-headless)")
        a, b = TENANTS["a"], TENANTS["b"]
        source = os.path.join(self.mktemp() + "-java", "Fetch.java")
        os.makedirs(os.path.dirname(source))
        with open(source, "w") as f:
            f.write(JAVA_FETCH)
        for port, tenant, url in ((a.socks, a, a.url()), (SOCKS, b, f"http://{b.qualified()}:8080/")):
            argv = [java, "-DsocksProxyHost=127.0.0.1", f"-DsocksProxyPort={port}", source, url]
            done = self.names.lab.run(self.names.lab.ctl_ns, argv, timeout=60)
            self.assertEqual((done.returncode, done.stdout.decode().strip()), (0, tenant.served), done.stderr)

    # -- qualified names ---------------------------------------------------------

    def test_qualified_names_over_socks5_and_http(self):
        """HOST.CLUSTER.gw.internal on the shared listeners: the name picks the cluster, overlap or not."""
        for t in TENANTS.values():
            for label in (t.name, t.alias.upper()):
                url = f"http://{t.qualified(label=label)}:8080/"
                self.assertServed(t, "--socks5-hostname", f"127.0.0.1:{SOCKS}", url)
                self.assertServed(t, "-x", f"http://127.0.0.1:{HTTP}", url)
            self.assertServed(t, "-p", "-x", f"http://127.0.0.1:{HTTP}", f"http://{t.qualified()}:8080/")
            # a name as HOST: a glob name, sent to the proxy node as it is
            self.assertServed(
                t, "-x", f"http://127.0.0.1:{HTTP}", f"http://{t.qualified('master.cluster.internal')}:8080/"
            )
        b = TENANTS["b"]
        # The origin sees the real destination in Host when the gateway writes the request (absolute-form);
        # through SOCKS5 or CONNECT it sees what the client wrote.
        self.assertServed(
            b, "-x", f"http://127.0.0.1:{HTTP}", f"http://{b.qualified()}:8080/host", body=f"{INTERNAL}:8080"
        )
        self.assertServed(
            b,
            "--socks5-hostname",
            f"127.0.0.1:{SOCKS}",
            f"http://{b.qualified()}:8080/host",
            body=f"{b.qualified()}:8080",
        )
        # a trailing dot and upper case are normalised
        self.assertServed(b, "-x", f"http://127.0.0.1:{HTTP}", f"http://{b.qualified().upper()}.:8080/")
        body = self.assertHttpStatus(403, "-x", f"http://127.0.0.1:{HTTP}", f"http://{b.qualified(label='nope')}:8080/")
        self.assertIn(b"names no cluster", body)
        # a per-cluster listener takes qualified names of its own cluster only
        a = TENANTS["a"]
        self.assertServed(a, "--socks5-hostname", f"127.0.0.1:{a.socks}", f"http://{a.qualified()}:8080/")
        self.assertSocksRefused(2, "--socks5-hostname", f"127.0.0.1:{a.socks}", f"http://{b.qualified()}:8080/")

    def test_a_qualified_name_does_not_replace_a_token(self):
        url = f"http://{TENANTS['a'].qualified(label=TOKEN_CLUSTER)}:8080/"
        self.assertHttpStatus(407, "-x", f"http://127.0.0.1:{HTTP}", url)
        status, _, err = self.fetch("--socks5-hostname", f"127.0.0.1:{SOCKS}", url)
        self.assertEqual(status, CURL_SOCKS_REFUSED, err)  # curl offers no method the gateway accepts
        self.assertServed(TENANTS["a"], "-x", f"http://{TOKEN_CLUSTER}:{TOKEN}@127.0.0.1:{HTTP}", url)
        self.assertServed(
            TENANTS["a"], "--socks5-hostname", f"127.0.0.1:{SOCKS}", "-U", f"{TOKEN_CLUSTER}:{TOKEN}", url
        )
        self.assertNotIn(TOKEN, self.names.log())

    # -- names resolved on the proxy node ----------------------------------------

    def test_names_resolved_on_the_proxy_node_are_checked(self):
        """
        A name outside every hostnames glob, through a per-cluster listener or as a qualified name's HOST:
        each proxy node resolves it (its namespace's hosts file), and only a name whose every address lies in
        the cluster's networks is let through -- to the address resolved there.
        """
        a, b = TENANTS["a"], TENANTS["b"]
        self.assertServed(a, "--socks5-hostname", f"127.0.0.1:{a.socks}", f"http://{RESOLVED_NAME}:8080/")
        self.assertServed(b, "-x", f"http://127.0.0.1:{b.http}", f"http://{RESOLVED_NAME}:8080/")
        self.assertServed(a, "-x", f"http://127.0.0.1:{HTTP}", f"http://{a.qualified(RESOLVED_NAME)}:8080/")
        for name in (OUTSIDE_NAME, MIXED_NAME):
            url = f"http://{name}:8080/"
            self.assertSocksRefused(2, "--socks5-hostname", f"127.0.0.1:{a.socks}", url)
            body = self.assertHttpStatus(403, "-x", f"http://127.0.0.1:{b.http}", url)
            self.assertEqual(body, f"{name} is not allowed through cluster 'cluster-b'\n".encode())
            self.assertHttpStatus(403, "-x", f"http://127.0.0.1:{HTTP}", f"http://{a.qualified(name)}:8080/")
        self.assertSocksRefused(4, "--socks5-hostname", f"127.0.0.1:{a.socks}", "http://nope.tenant.test:8080/")
        log = self.names.log()
        self.assertIn(f"stream to {RESOLVED_NAME}:8080 ({INTERNAL}) via cluster-a closed", log)
        self.assertIn(f"stream to {OUTSIDE_NAME}:8080 via cluster-a refused: not-allowed", log)

    # -- the control API -----------------------------------------------------------

    def test_api_registration_opens_and_closes_listeners(self):
        names = self.names
        cluster = names.cluster_file(socks="tcp:0:interface=127.0.0.1", http="tcp:0:interface=127.0.0.1")
        status, out, err = names.ctl("add", "api-c", "--file", cluster)
        self.assertEqual(status, 0, err)
        self.addCleanup(names.ctl, "remove", "api-c")
        listeners = names.cluster_status("api-c")["listeners"]
        (socks,), (http,) = listeners["socks"], listeners["http"]
        for args in (["--socks5-hostname", socks], ["-x", f"http://{http}"]):
            self.assertServed(TENANTS["b"], *args, f"http://{INTERNAL}:8080/")

        # a replacement that cannot listen is refused whole, naming the key: the listeners stay as they were
        for key, endpoint, why in (
            ("socks", f"tcp:{SOCKS}:interface=127.0.0.1", "Address already in use"),
            ("http", "tcp:0:interface=10.250.1.1", "reachable beyond this host"),
        ):
            status, _, err = names.ctl("add", "api-c", "--file", names.cluster_file(**{key: endpoint}))
            self.assertEqual(status, 1, err)
            self.assertTrue(err.startswith(f"gateway-ctl: invalid cluster: {key}: "), err)
            self.assertIn(why, err)
        self.assertEqual(names.cluster_status("api-c")["listeners"], listeners)
        self.assertServed(TENANTS["b"], "--socks5-hostname", socks, f"http://{INTERNAL}:8080/")

        status, out, err = names.ctl("remove", "api-c")
        self.assertEqual(status, 0, err)
        for args in (["--socks5-hostname", socks], ["-x", f"http://{http}"]):
            status, _, err = self.fetch(*args, f"http://{INTERNAL}:8080/")
            self.assertEqual(status, CURL_CONNECT_FAILED, err)

    def test_a_port_in_use_stops_start_up(self):
        """A second gateway whose cluster wants a port the first one holds: one critical line, exit status 1."""
        names = self.names
        lab = names.lab
        taken = TENANTS["a"].socks
        second = GatewayProcess(
            lab,
            names.workdir,
            "clash",
            f"""
            [listen]
            socks = ""
            http = ""

            [clusters.clash]
            proxies = ["{lab.proxy_addr["a"]}:22"]
            user = "root"
            key_file = "{lab.client_key_ed25519}"
            known_hosts = "{lab.known_hosts}"
            networks = ["10.251.0.0/24"]
            socks = "tcp:{taken}:interface=127.0.0.1"
            """,
            0,
            0,
        )
        self.assertEqual(second.proc.wait(timeout=30), 1)
        critical = [line for line in second.read_log().splitlines() if "#critical]" in line]
        self.assertEqual(len(critical), 1, second.read_log())
        self.assertTrue(
            critical[0].endswith(
                f"{second.config}: clusters.clash.socks: cannot listen on "
                f"'tcp:{taken}:interface=127.0.0.1': Address already in use"
            ),
            critical,
        )
        self.assertNotIn("cluster clash connecting", second.read_log())

    # -- SSH ---------------------------------------------------------------------------

    def test_ssh_through_a_per_cluster_listener_and_a_qualified_name(self):
        """paramiko and OpenSSH to the internal sshd, with gateway-connect as the ProxyCommand, no credentials."""
        lab = self.names.lab
        connect = os.path.join(VENV_BIN, "gateway-connect")
        for t, command in (
            (TENANTS["b"], f"{connect} --socks 127.0.0.1:{TENANTS['b'].socks} {INTERNAL} 22"),
            (TENANTS["a"], f"{connect} --socks 127.0.0.1:{SOCKS} {TENANTS['a'].qualified()} 22"),
        ):
            status, out, err = self.names.python(
                PARAMIKO_CHECK, lab.known_hosts, lab.client_key_ed25519, command, INTERNAL
            )
            self.assertEqual((status, out.decode()), (0, f"{t.served}\n"), err.decode(errors="replace"))
        a = TENANTS["a"]
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            lab.client_key_rsa,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ]
        argv += [
            "-o",
            f"UserKnownHostsFile={lab.known_hosts}",
            "-o",
            f"ProxyCommand={connect} --socks 127.0.0.1:{a.socks} %h %p",
        ]
        done = lab.run(lab.ctl_ns, [*argv, f"root@{INTERNAL}", f"curl -s --max-time 5 {a.url()}"], timeout=20)
        self.assertEqual((done.returncode, done.stdout.decode()), (0, f"{a.served}\n"), done.stderr)
