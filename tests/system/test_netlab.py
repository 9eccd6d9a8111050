"""Self-test of the network-namespace lab (tests/system/netlab.py).  Needs root."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.trial import unittest

from tests.system import netlab


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10).stdout


def _root_ns_snapshot() -> tuple[set[str], set[str]]:
    """Root-namespace link names, and IPv4 addrs/routes inside the lab ranges."""
    links = _out(["ip", "-o", "link", "show"]).splitlines()
    names = {line.split(":")[1].strip().split("@")[0] for line in links if ":" in line}
    v4 = _out(["ip", "-4", "-o", "addr", "show"]) + _out(["ip", "-4", "route", "show", "table", "all"])
    return names, {line for line in v4.splitlines() if "10.250." in line or "10.251." in line}


PARAMIKO_CHECK = """
import sys
import paramiko

known_hosts, key, proxy_command, url = sys.argv[1:5]
client = paramiko.SSHClient()
client.load_host_keys(known_hosts)
client.set_missing_host_key_policy(paramiko.RejectPolicy())
client.connect(
    "10.251.0.10", username="root", key_filename=key, sock=paramiko.ProxyCommand(proxy_command),
    timeout=20, allow_agent=False, look_for_keys=False,
)
_, stdout, _ = client.exec_command("curl -s --max-time 5 " + url)
sys.stdout.write(stdout.read().decode())
client.close()
"""


class NetLabTests(unittest.TestCase):
    def setUp(self):
        reason = netlab.lab_skip_reason()
        if reason:
            raise unittest.SkipTest(reason)
        self.root_before = _root_ns_snapshot()
        self.lab = netlab.Lab(self.mktemp())
        self.addCleanup(self.lab.stop)
        t0 = time.monotonic()
        self.lab.start()
        self.start_time = time.monotonic() - t0

    # -- helpers -------------------------------------------------------------
    def ssh_argv(self, key, addr, *, known_hosts=None, extra=()):
        opts = {
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": known_hosts or self.lab.known_hosts,
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": "5",
        }
        argv = ["ssh", "-F", "/dev/null", "-i", key]
        for name, value in opts.items():
            argv += ["-o", f"{name}={value}"]
        return [*argv, *extra, f"root@{addr}"]

    def ssh(self, key, addr, *cmd, known_hosts=None, extra=(), **kw):
        argv = self.ssh_argv(key, addr, known_hosts=known_hosts, extra=extra) + list(cmd)
        return self.lab.run(self.lab.ctl_ns, argv, timeout=30, **kw)

    def tcp_via(self, tenant, port, request: bytes) -> bytes:
        """Raw TCP to 10.251.0.10:port through proxy-<tenant> (ssh -W, direct-tcpip)."""
        lab = self.lab
        cp = self.ssh(
            lab.client_key_ed25519,
            lab.proxy_addr[tenant],
            extra=["-W", f"{lab.internal_addr}:{port}"],
            input=request,
        )
        self.assertEqual(cp.returncode, 0, cp.stderr)
        return cp.stdout

    # -- tests ------------------------------------------------------------------
    def test_proxies_accept_both_client_keys(self):
        lab = self.lab
        with open(lab.client_key_rsa) as f:
            self.assertTrue(f.readline().startswith("-----BEGIN RSA PRIVATE KEY-----"))
        cases = [
            (t, key, kh)
            for t in ("a", "b")
            for key, kh in (
                (lab.client_key_ed25519, lab.known_hosts),
                (lab.client_key_rsa, lab.known_hosts),
                (lab.client_key_rsa, lab.known_hosts_hashed),
            )
        ]
        with ThreadPoolExecutor(len(cases)) as pool:  # each login costs a remote shell
            results = list(pool.map(lambda c: self.ssh(c[1], lab.proxy_addr[c[0]], "true", known_hosts=c[2]), cases))
        for (t, key, kh), cp in zip(cases, results, strict=True):
            self.assertEqual(cp.returncode, 0, (t, key, kh, cp.stderr, lab.sshd_log(f"proxy-{t}")))
        for t in ("a", "b"):
            self.assertIn(f"Server listening on {lab.proxy_addr[t]} port 22", lab.sshd_log(f"proxy-{t}"))
            self.assertIn("Accepted publickey for root", lab.sshd_log(f"proxy-{t}"))
        # strict host key checking is really on: unknown host -> refused
        empty = os.path.join(lab.workdir, "empty_known_hosts")
        open(empty, "w").close()
        cp = self.ssh(lab.client_key_ed25519, lab.proxy_addr["a"], "true", known_hosts=empty)
        self.assertNotEqual(cp.returncode, 0)
        with open(lab.known_hosts_hashed) as f:
            self.assertTrue(all(line.startswith("|1|") for line in f if line.strip()))
        self.assertEqual(sorted(lab.host_key_lines), ["internal-a", "internal-b", "proxy-a", "proxy-b"])
        self.assertTrue(all(len(v) == 3 for v in lab.host_key_lines.values()))

    def test_overlapping_tenants_serve_different_content(self):
        lab = self.lab
        for t in ("a", "b"):
            cp = self.ssh(
                lab.client_key_ed25519,
                lab.proxy_addr[t],
                f"curl -s --max-time 5 http://{lab.internal_addr}:8080/",
            )
            self.assertEqual(cp.stdout, f"internal-{t}\n".encode(), cp.stderr)
            # direct-tcpip (what the gateway uses), HTTP/1.0 -> server closes
            raw = self.tcp_via(t, 8080, b"GET / HTTP/1.0\r\n\r\n")
            self.assertTrue(raw.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), raw)
            self.assertTrue(raw.endswith(f"\r\n\r\ninternal-{t}\n".encode()), raw)

    def test_http_big_echo_keepalive(self):
        lab = self.lab
        self.assertEqual(hashlib.sha256(netlab.big_body()).hexdigest(), lab.big_sha256)
        self.assertEqual(len(netlab.big_body()), lab.big_size)
        raw = self.tcp_via("a", 8080, b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(f"Content-Length: {lab.big_size}".encode(), head)
        self.assertEqual(hashlib.sha256(body).hexdigest(), lab.big_sha256)

        # keep-alive: two requests on one connection, second closes
        raw = self.tcp_via(
            "b",
            8080,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(raw.count(b"HTTP/1.1 200"), 2, raw)
        self.assertEqual(raw.count(b"internal-b\n"), 2, raw)

        # /echo with Content-Length and with chunked encoding
        payload = os.urandom(300_000)
        raw = self.tcp_via(
            "a",
            8080,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload,
        )
        self.assertEqual(raw.partition(b"\r\n\r\n")[2], payload)
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(c), c) for c in (payload[:1000], payload[1000:70000], payload[70000:])
        )
        raw = self.tcp_via(
            "b",
            8080,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n",
        )
        self.assertEqual(raw.partition(b"\r\n\r\n")[2], payload)
        # and via curl inside the proxy namespace (chunked upload from stdin)
        cp = self.ssh(
            lab.client_key_ed25519,
            lab.proxy_addr["a"],
            "curl -sS --max-time 10 -H 'Transfer-Encoding: chunked' "
            f"--data-binary @- http://{lab.internal_addr}:8080/echo",
            input=payload,
        )
        self.assertEqual(cp.stdout, payload, cp.stderr)

    def ssh_via(self, lab, tenant, *cmd, known_hosts):
        """OpenSSH to the internal sshd of `tenant`, tunnelled through its proxy (ssh -W)."""
        jump = self.ssh_argv(lab.client_key_ed25519, lab.proxy_addr[tenant], extra=["-W", "%h:%p"])
        argv = self.ssh_argv(
            lab.client_key_rsa,
            lab.internal_addr,
            known_hosts=known_hosts,
            extra=["-o", "ProxyCommand=" + " ".join(jump)],
        )
        return lab.run(lab.ctl_ns, argv + list(cmd), timeout=30)

    def test_internal_sshd_via_proxy_shared_known_hosts(self):
        lab = self.lab
        # default: one unambiguous host key set for 10.251.0.10
        self.assertEqual(
            [line.split()[:2] for line in lab.host_key_lines["internal-a"]],
            [line.split()[:2] for line in lab.host_key_lines["internal-b"]],
        )
        url = f"http://{lab.internal_addr}:8080/"
        for t in ("a", "b"):
            cp = self.ssh_via(lab, t, f"curl -s --max-time 5 {url}", known_hosts=lab.known_hosts)
            self.assertEqual(cp.stdout, f"internal-{t}\n".encode(), (cp.stderr, lab.sshd_log(f"internal-{t}")))
        # paramiko only honours the first known_hosts entry per host and key type
        script = os.path.join(lab.workdir, "paramiko_check.py")
        with open(script, "w") as f:
            f.write(PARAMIKO_CHECK)
        for t in ("a", "b"):
            target = f"{lab.internal_addr}:22"  # paramiko.ProxyCommand does not expand %h:%p
            jump = " ".join(self.ssh_argv(lab.client_key_ed25519, lab.proxy_addr[t], extra=["-W", target]))
            cp = lab.run(
                lab.ctl_ns,
                [sys.executable, script, lab.known_hosts_hashed, lab.client_key_ed25519, jump, url],
                timeout=30,
            )
            self.assertEqual(cp.stdout, f"internal-{t}\n".encode(), cp.stderr)

    def test_distinct_internal_host_keys(self):
        lab2 = netlab.Lab(self.mktemp())  # a second lab, running alongside self.lab
        lab2.distinct_internal_host_keys = True
        self.addCleanup(lab2.stop)
        lab2.start()
        self.assertFalse(set(lab2.namespaces) & set(self.lab.namespaces))
        only_a = os.path.join(lab2.workdir, "known_hosts_internal_a")
        with open(only_a, "w") as f:
            f.writelines(f"{lab2.internal_addr} {line}\n" for line in lab2.host_key_lines["internal-a"])
        cp = self.ssh_via(lab2, "a", "true", known_hosts=only_a)
        self.assertEqual(cp.returncode, 0, (cp.stderr, lab2.sshd_log("internal-a")))
        cp = self.ssh_via(lab2, "b", "true", known_hosts=only_a)
        self.assertNotEqual(cp.returncode, 0)
        self.assertIn(b"REMOTE HOST IDENTIFICATION HAS CHANGED", cp.stderr)
        # OpenSSH accepts any of several keys listed for one host
        cp = self.ssh_via(lab2, "b", "true", known_hosts=lab2.known_hosts)
        self.assertEqual(cp.returncode, 0, cp.stderr)

    def test_isolation(self):
        lab = self.lab
        for ns in lab.namespaces:
            routes = lab.run(ns, ["ip", "route", "show", "table", "all"], text=True).stdout
            self.assertNotIn("default", routes, ns)
            lo = lab.run(ns, ["ip", "-o", "link", "show", "lo"], text=True).stdout
            self.assertIn("UP", lo.split(">")[0], ns)
            fwd = lab.run(ns, ["cat", "/proc/sys/net/ipv4/ip_forward"], text=True).stdout
            self.assertEqual(fwd.strip(), "0", ns)
        t0 = time.monotonic()
        cp = lab.run(lab.ctl_ns, ["curl", "-s", "--max-time", "3", f"http://{lab.internal_addr}:8080/"], timeout=10)
        self.assertNotEqual(cp.returncode, 0)
        self.assertLess(time.monotonic() - t0, 3.5)
        # internal-a cannot reach ctl or the other proxy either
        cp = lab.run(lab.internal_ns["a"], ["nc", "-z", "-w1", lab.proxy_addr["b"], "22"], timeout=10)
        self.assertNotEqual(cp.returncode, 0)
        netlab.wait_for_port(lab, lab.ctl_ns, lab.proxy_addr["b"], 22, timeout=5)
        t0 = time.monotonic()
        with self.assertRaises(TimeoutError):
            netlab.wait_for_port(lab, lab.ctl_ns, lab.proxy_addr["b"], 2222, timeout=0.5)
        self.assertLess(time.monotonic() - t0, 5)
        # nothing of ours leaked into the root namespace
        names, lab_lines = _root_ns_snapshot()
        self.assertEqual(names - self.root_before[0], set())
        self.assertEqual(lab_lines - self.root_before[1], set())

    def test_stop_removes_everything(self):
        lab = self.lab
        # an sshd session child, a tracked process and an untracked orphan
        sess = lab.spawn(
            lab.ctl_ns,
            self.ssh_argv(lab.client_key_ed25519, lab.proxy_addr["a"]) + ["sleep", "60"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sleeper = lab.spawn(lab.internal_ns["b"], ["sleep", "60"])
        lab.run(lab.proxy_ns["b"], ["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], timeout=10)
        # spawn's pid becomes the command itself once ip/setpriv have exec'd
        deadline = time.monotonic() + 5
        while True:
            with open(f"/proc/{sleeper.pid}/comm") as f:
                if f.read().strip() == "sleep":
                    break
            self.assertLess(time.monotonic(), deadline, "spawned pid never became 'sleep'")
            time.sleep(0.02)

        def remote_sleep_running():
            for pid in lab.ns_pids(lab.proxy_ns["a"]):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f.read().split(b"\0")[:2] == [b"sleep", b"60"]:
                            return True
                except OSError:
                    pass
            return False

        deadline = time.monotonic() + 10
        while not remote_sleep_running():
            self.assertLess(time.monotonic(), deadline, lab.sshd_log("proxy-a"))
            time.sleep(0.05)
        pids = lab.pids()
        self.assertIn(sess.pid, pids)
        self.assertGreaterEqual(len(pids), 6 + 4)
        names = lab.namespaces

        t0 = time.monotonic()
        lab.stop()
        stop_time = time.monotonic() - t0
        self.assertEqual(lab.stop_errors, [])
        listed = _out(["ip", "netns", "list"])
        for ns in names:
            self.assertNotIn(ns, listed)
            self.assertFalse(os.path.exists(f"/run/netns/{ns}"))
        alive = [p for p in pids if netlab.pid_alive(p)]
        self.assertEqual(alive, [])
        lab.stop()  # idempotent
        self.assertLess(stop_time, 10)
        self.assertLess(self.start_time, 20)

    def test_failed_start_cleans_up(self):
        class BrokenLab(netlab.Lab):
            def _sshd_config(self, name, listen):
                path = super()._sshd_config(name, listen)
                if name == "internal-b":
                    with open(path, "a") as f:
                        f.write("NoSuchOption yes\n")
                return path

        lab = BrokenLab(self.mktemp())
        self.addCleanup(lab.stop)
        with self.assertRaises(netlab.LabError) as cm:
            lab.start()
        self.assertIn("Bad configuration option: NoSuchOption", str(cm.exception))
        self.assertEqual(lab.stop_errors, [])
        for ns in lab.namespaces:
            self.assertFalse(os.path.exists(f"/run/netns/{ns}"), ns)
        self.assertEqual(lab.pids(), [])
        self.assertFalse([p for p in lab._procs if netlab.pid_alive(p.pid)])
