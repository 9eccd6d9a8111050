"""
Penalty-aware back-off against real OpenSSH in the namespace lab: a proxy
node whose sshd refuses the cluster's key (C{AuthorizedKeysFile /dev/null})
must not be hammered -- sshd 9.8+ would penalise the gateway's address for
each failure (PerSourcePenalties) and, once they add up, refuse it for
every cluster behind that node.  The lab's sshd is 9.2 (no penalties of its
own); its log (C{LogLevel VERBOSE}: one C{Connection from} line per TCP
connection) is where the attempts are counted.  The measured spacing is
printed.  Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import re
import time

from twisted.trial.unittest import TestCase

from tests.system.netlab import Lab
from tests.system.support import GatewayProcess, defaults_table, shared_lab

#: Seconds the attempts are watched for.
WATCH = 30.0
PORT = 2223


def _build(lab: Lab, workdir: str) -> GatewayProcess:
    node = lab.proxy_addr["a"]
    lab.start_sshd("proxy-a-nokey", lab.proxy_ns["a"], node, PORT, "AuthorizedKeysFile /dev/null")
    gateway = GatewayProcess(
        lab,
        workdir,
        "gateway",
        f"""
        [listen]
        socks = "tcp:1080:interface=127.0.0.1"
        http  = "tcp:3128:interface=127.0.0.1"

        {defaults_table(lab)}

        [clusters.nokey]
        proxies = ["{node}:{PORT}"]
        networks = ["10.251.0.0/24"]
        """,
        1080,
        3128,
    )
    gateway.wait_listening()
    return gateway


class PenaltyTests(TestCase):
    def test_refused_key_not_hammered(self):
        """Attempts to a node refusing the key: at least 10 s apart, so at most 4 in 30 s (3 expected)."""
        lab, gateway, _ = shared_lab("penalty", "penalty system tests", _build)
        self.addCleanup(lambda: gateway.proc.poll() is None and gateway.proc.kill())
        # The gateway's connections come from its side of the ctl link (the
        # port check of start_sshd from inside the node's namespace does not).
        pattern = re.compile(rf"Connection from {re.escape(lab.ctl_addr['a'])} port \d+ on \S+ port {PORT}\b")
        seen: list[float] = []
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:  # the first attempt starts the watch
            if pattern.search(lab.sshd_log("proxy-a-nokey")):
                seen.append(time.monotonic())
            time.sleep(0.05)
        self.assertTrue(seen, "the gateway never connected:\n" + gateway.read_log()[-3000:])
        end = seen[0] + WATCH
        while time.monotonic() < end:
            count = len(pattern.findall(lab.sshd_log("proxy-a-nokey")))
            seen.extend(time.monotonic() for _ in range(count - len(seen)))
            time.sleep(0.05)
        spacing = [round(b - a, 1) for a, b in zip(seen, seen[1:], strict=False)]
        print(f"\nrefused key: {len(seen)} attempts in {WATCH:g} s, spaced {spacing} s")
        sshd_log = lab.sshd_log("proxy-a-nokey")
        self.assertIn(f"Failed publickey for root from {lab.ctl_addr['a']}", sshd_log)
        self.assertLessEqual(len(seen), 4, spacing)
        self.assertGreaterEqual(len(seen), 2, spacing)
        self.assertGreaterEqual(min(spacing), 9.5, spacing)
        log = gateway.read_log()
        hints = re.findall(
            r"cluster nokey: authentication as 'root' failed: the proxy node refused the key; sshd may be penalising"
            rf" this source \(PerSourcePenalties\): next attempt to {re.escape(lab.proxy_addr['a'])}:{PORT} in (\d+) s",
            log,
        )
        self.assertGreaterEqual(len(hints), len(seen) - 1, log[-3000:])
        self.assertTrue(all(int(wait) >= 10 for wait in hints), hints)
