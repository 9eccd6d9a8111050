"""Self-test of the network-namespace lab (tests/netlab.py).  Needs root."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

from twisted.trial import unittest

from tests import netlab


def _root_ns_snapshot() -> tuple[set[str], set[str]]:
    """Root-namespace link names and IPv4 routes/addrs inside the lab ranges."""
    links = subprocess.run(
        ["ip", "-o", "link", "show"],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    names = {
        line.split(":")[1].strip().split("@")[0]
        for line in links.splitlines()
        if ":" in line
    }
    v4 = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    v4 += subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    lab_lines = {line for line in v4 if "10.250." in line or "10.251." in line}
    return names, lab_lines


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
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            key,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.lab.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            *extra,
            f"root@{addr}",
        ]

    def ssh(self, key, addr, *cmd, known_hosts=None, extra=(), **kw):
        argv = self.ssh_argv(key, addr, known_hosts=known_hosts, extra=extra) + list(
            cmd
        )
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
        for t in ("a", "b"):
            for key in (lab.client_key_ed25519, lab.client_key_rsa):
                cp = self.ssh(key, lab.proxy_addr[t], "true")
                self.assertEqual(
                    cp.returncode, 0, (t, key, cp.stderr, lab.sshd_log(f"proxy-{t}"))
                )
            cp = self.ssh(
                lab.client_key_rsa,
                lab.proxy_addr[t],
                "true",
                known_hosts=lab.known_hosts_hashed,
            )
            self.assertEqual(cp.returncode, 0, cp.stderr)
            self.assertIn(
                f"Server listening on {lab.proxy_addr[t]} port 22",
                lab.sshd_log(f"proxy-{t}"),
            )
        # strict host key checking is really on: unknown host -> refused
        empty = os.path.join(lab.workdir, "empty_known_hosts")
        open(empty, "w").close()
        cp = self.ssh(
            lab.client_key_ed25519, lab.proxy_addr["a"], "true", known_hosts=empty
        )
        self.assertNotEqual(cp.returncode, 0)
        with open(lab.known_hosts_hashed) as f:
            self.assertTrue(all(line.startswith("|1|") for line in f if line.strip()))
        self.assertEqual(
            sorted(lab.host_key_lines),
            ["internal-a", "internal-b", "proxy-a", "proxy-b"],
        )
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
        raw = self.tcp_via(
            "a", 8080, b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(f"Content-Length: {lab.big_size}".encode(), head)
        self.assertEqual(hashlib.sha256(body).hexdigest(), lab.big_sha256)

        # keep-alive: two requests on one connection, second closes
        raw = self.tcp_via(
            "b",
            8080,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
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
            b"%x\r\n%s\r\n" % (len(c), c)
            for c in (payload[:1000], payload[1000:70000], payload[70000:])
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

    def test_internal_sshd_reachable_only_via_own_proxy(self):
        lab = self.lab
        only_a = os.path.join(lab.workdir, "known_hosts_internal_a")
        with open(only_a, "w") as f:
            f.write("\n".join(lab.host_key_lines["internal-a"]) + "\n")

        def via(t):
            jump = " ".join(
                self.ssh_argv(
                    lab.client_key_ed25519, lab.proxy_addr[t], extra=["-W", "%h:%p"]
                )
            )
            return self.ssh(
                lab.client_key_rsa,
                lab.internal_addr,
                "true",
                known_hosts=only_a,
                extra=["-o", f"ProxyCommand={jump}"],
            )

        cp = via("a")
        self.assertEqual(cp.returncode, 0, (cp.stderr, lab.sshd_log("internal-a")))
        cp = via("b")  # internal-b has different host keys at the same address
        self.assertNotEqual(cp.returncode, 0)
        self.assertIn(b"REMOTE HOST IDENTIFICATION HAS CHANGED", cp.stderr)

    def test_isolation(self):
        lab = self.lab
        for ns in lab.namespaces:
            routes = lab.run(
                ns, ["ip", "route", "show", "table", "all"], text=True
            ).stdout
            self.assertNotIn("default", routes, ns)
            lo = lab.run(ns, ["ip", "-o", "link", "show", "lo"], text=True).stdout
            self.assertIn("UP", lo.split(">")[0], ns)
            fwd = lab.run(
                ns, ["cat", "/proc/sys/net/ipv4/ip_forward"], text=True
            ).stdout
            self.assertEqual(fwd.strip(), "0", ns)
        t0 = time.monotonic()
        cp = lab.run(
            lab.ctl_ns,
            ["curl", "-s", "--max-time", "3", f"http://{lab.internal_addr}:8080/"],
            timeout=10,
        )
        self.assertNotEqual(cp.returncode, 0)
        self.assertLess(time.monotonic() - t0, 3.5)
        # internal-a cannot reach ctl or the other proxy either
        cp = lab.run(
            lab.internal_ns["a"],
            ["nc", "-z", "-w1", lab.proxy_addr["b"], "22"],
            timeout=10,
        )
        self.assertNotEqual(cp.returncode, 0)
        # nothing of ours leaked into the root namespace
        names, lab_lines = _root_ns_snapshot()
        self.assertEqual(names - self.root_before[0], set())
        self.assertEqual(lab_lines - self.root_before[1], set())

    def test_stop_removes_everything(self):
        lab = self.lab
        # an sshd session child, a tracked process and an untracked orphan
        sess = lab.spawn(
            lab.ctl_ns,
            self.ssh_argv(lab.client_key_ed25519, lab.proxy_addr["a"])
            + ["sleep", "60"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sleeper = lab.spawn(lab.internal_ns["b"], ["sleep", "60"])
        lab.run(
            lab.proxy_ns["b"], ["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], timeout=10
        )
        with open(f"/proc/{sleeper.pid}/comm") as f:
            self.assertEqual(
                f.read().strip(), "sleep"
            )  # spawn's pid is the command's pid
        proxy_a = netlab._ns_key(lab.proxy_ns["a"])

        def remote_sleep_running():
            for pid in lab.pids():
                if netlab._proc_ns_key(pid) != proxy_a:
                    continue
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
        listed = subprocess.run(
            ["ip", "netns", "list"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        for ns in names:
            self.assertNotIn(ns, listed)
            self.assertFalse(os.path.exists(f"/run/netns/{ns}"))
        alive = [p for p in pids if netlab.pid_alive(p)]
        self.assertEqual(alive, [])
        lab.stop()  # idempotent
        self.assertLess(stop_time, 10)
        self.assertLess(self.start_time, 20)
