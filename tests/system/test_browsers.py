"""
A real browser through the gateway (issue 12): headless Chromium (Debian's
C{chromium}, which `make test` installs as root) in the lab's ctl namespace,
pointed at the gateway's PAC file, loads pages of the internal web servers of
two clusters on the same address, and a page whose script opens a WebSocket
to its server and writes the echo into the DOM; the test reads what the pages
show over the DevTools protocol (L{tests.system.browser}).

The lab and gateway are L{tests.system.names_gateway}'s.  Needs root and
/usr/bin/chromium; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.system.browser import Chromium, chromium_skip_reason
from tests.system.names_gateway import CONTROL, HTTP, TENANTS, NamesGateway
from tests.system.netlab import OUTSIDE_NAME, RESOLVED_NAME
from tests.system.support import INTERNAL

#: What /ws-page shows once its WebSocket answered.
WS_DONE = "document.title === 'done'"
WS_ECHO = "document.getElementById('echo').textContent"


class BrowserTests(TestCase):
    names: NamesGateway

    def setUp(self) -> None:
        reason = chromium_skip_reason()
        if reason:
            raise SkipTest(reason)
        self.names = NamesGateway.get()
        self.started = time.monotonic()

    def browser(self, *flags: str) -> Chromium:
        """A fresh browser with C{flags}, killed after the test whatever its outcome."""
        browser = Chromium(self.names.lab, self.names.lab.ctl_ns, *flags)
        self.addCleanup(browser.close)
        return browser

    def websocket_echo(self, browser: Chromium, host: str) -> str:
        """What /ws-page at C{host} shows once its WebSocket answered."""
        return browser.evaluate(browser.open(f"http://{host}:8080/ws-page", WS_DONE), WS_ECHO)

    def timing(self, what: str) -> None:
        print(f"\n{what}: {time.monotonic() - self.started:.2f} s")

    def test_a_pac_view_per_cluster(self):
        """
        One browser per cluster, each with its cluster's view of the PAC file
        (the HTTP proxy listener's /proxy.pac?cluster=NAME): the same address
        leads each to its own cluster's host, through that cluster's own
        listener, and so does a WebSocket.
        """
        for t in TENANTS.values():
            browser = self.browser(f"--proxy-pac-url=http://127.0.0.1:{HTTP}/proxy.pac?cluster={t.name}")
            self.assertEqual(browser.text(t.url()), t.served)
            self.assertEqual(self.websocket_echo(browser, INTERNAL), f"echo: {t.served}: hello from {INTERNAL}:8080")
            browser.close()
            self.assertFalse(os.path.exists(browser.home))
            self.assertEqual([pid for pid in self.names.lab.ns_pids(self.names.lab.ctl_ns) if _is_chromium(pid)], [])
        log = self.names.log()
        for t in TENANTS.values():
            self.assertIn(f"PAC file (cluster={t.name}) for 127.0.0.1:", log)
            self.assertIn(f"stream to {INTERNAL}:8080 via {t.name} closed", log)
        self.timing("two browsers, two views")

    def test_qualified_names_with_the_control_apis_pac_file(self):
        """
        One browser, the whole PAC file (from the control API: no token needed,
        though the API has one): qualified names reach both clusters, pages and
        WebSockets, in one session.
        """
        browser = self.browser(f"--proxy-pac-url=http://127.0.0.1:{CONTROL}/v1/proxy.pac")
        for t in TENANTS.values():
            self.assertEqual(browser.text(f"http://{t.qualified()}:8080/"), t.served)
            self.assertEqual(
                self.websocket_echo(browser, t.qualified()), f"echo: {t.served}: hello from {t.qualified()}:8080"
            )
            self.assertEqual(browser.text(f"http://{t.qualified('master.cluster.internal')}:8080/"), t.served)
        # The plain address is in both clusters' networks: the whole file sends it to the first in name order.
        a = TENANTS["a"]
        self.assertEqual(browser.text(a.url()), a.served)
        # Through the file's first entry, the HTTP listener: the origin sees the real destination.
        self.assertEqual(browser.text(f"http://{a.qualified()}:8080/host"), f"{INTERNAL}:8080")
        # A name the proxy node resolves outside the networks: the HTTP listener's 403, shown.
        refused = browser.text(f"http://{a.qualified(OUTSIDE_NAME)}:8080/")
        self.assertEqual(refused, f"{OUTSIDE_NAME} is not allowed through cluster '{a.name}'")
        self.timing("one browser, qualified names")

    def test_a_per_cluster_http_listener_as_the_proxy_server(self):
        """
        No PAC file: a cluster's own HTTP listener as the browser's one proxy
        (absolute-form requests, and CONNECT for the WebSocket); a name the
        proxy node resolves is let through.
        """
        b = TENANTS["b"]
        browser = self.browser(f"--proxy-server=http://127.0.0.1:{b.http}")
        self.assertEqual(browser.text(b.url()), b.served)
        self.assertEqual(self.websocket_echo(browser, INTERNAL), f"echo: {b.served}: hello from {INTERNAL}:8080")
        self.assertEqual(browser.text(f"http://{RESOLVED_NAME}:8080/"), b.served)
        self.timing("one browser, a fixed HTTP proxy")


def _is_chromium(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").startswith("/usr/lib/chromium/")
    except OSError:
        return False
