"""
Headless Chromium in a lab namespace, driven over the DevTools protocol.

The browser runs where the lab's clients run (the ctl namespace: no default
route, it reaches only the lab), the test in the root namespace: so the
protocol goes over a pipe (C{--remote-debugging-pipe}: fd 3 carries commands
in, fd 4 answers and events out, each message JSON ended by a NUL byte), which
crosses namespaces where a loopback port would not.  It is also what makes
the test bounded and readable: C{Page.navigate} says why a page failed
(C{net::ERR_...}), and the DOM is read when the page says it is done (a
condition in JavaScript, polled with a time-out), not whenever a
C{--dump-dom --virtual-time-budget} run decides the page has settled.

Each L{Chromium} has a fresh profile and C{HOME} (crash reports and caches
land there, not in root's home); L{Chromium.close} kills the browser's whole
process group by pid, then the crash handlers (they start sessions of their
own) by pid, found by the profile path in their command lines, and removes the
profile.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from tests.system.netlab import Lab, pid_alive

CHROMIUM = "/usr/bin/chromium"

#: Headless, as root (no sandbox), and quiet: nothing the browser does on its
#: own (updates, sync, metrics, QUIC) gets in the way of what the test asks.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-pipe",
)

# Run first, in the browser's place: moves the two pipe ends to fds 3 and 4,
# where --remote-debugging-pipe expects them, then becomes the browser.  Via
# fds >= 10, so that an end that already is 3 or 4 is not closed by another's
# move, and dup2 leaves exactly 3 and 4 to be inherited.
_EXEC_WITH_PIPE = (
    "import fcntl, os, sys\n"
    "passed = [int(fd) for fd in sys.argv[1:3]]\n"
    "high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in passed]\n"
    "for fd in passed:\n"
    "    os.close(fd)\n"
    "for target, fd in zip((3, 4), high):\n"
    "    os.dup2(fd, target)\n"
    "    os.close(fd)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def chromium_skip_reason() -> str | None:
    """None if a browser test can run here, else why not (for SkipTest)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"needs {CHROMIUM} (Debian's chromium package; `make test` installs it as root)"
    return None


class BrowserError(AssertionError):
    """The browser failed, or did not do what was asked in time; the message has its last words."""


class Chromium:
    """One headless Chromium process in C{ns}, with C{flags} after L{FLAGS} (e.g. a PAC URL)."""

    def __init__(self, lab: Lab, ns: str, *flags: str, timeout: float = 20.0) -> None:
        self.lab = lab
        self.ns = ns
        self.timeout = timeout
        self.home = tempfile.mkdtemp(prefix="gw-chromium-")
        self.log = os.path.join(self.home, "chromium.log")
        self._buffer = b""
        self._next_id = 0
        commands, to_browser = os.pipe()
        from_browser, answers = os.pipe()
        argv = [sys.executable, "-I", "-c", _EXEC_WITH_PIPE, str(commands), str(answers), CHROMIUM, *FLAGS]
        argv += [f"--user-data-dir={os.path.join(self.home, 'profile')}", *flags, "about:blank"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home, "LANG": "C.UTF-8"}
        try:
            with open(self.log, "wb") as log:
                self.proc: subprocess.Popen | None = lab.spawn(
                    ns, argv, pass_fds=(commands, answers), env=env, stdout=log, stderr=log
                )
        except BaseException:
            for fd in (commands, to_browser, from_browser, answers):
                os.close(fd)
            shutil.rmtree(self.home, ignore_errors=True)
            raise
        os.close(commands)
        os.close(answers)
        self._to = to_browser
        self._from = from_browser

    # -- what tests ask ------------------------------------------------------

    def open(self, url: str, ready: str = "document.readyState === 'complete'") -> str:
        """
        Load C{url} in a new tab and wait until the JavaScript C{ready} is true
        there: its session id, for L{evaluate}.

        @raise BrowserError: the navigation failed (its C{net::ERR_...}) or
            C{ready} did not become true within the time-out.
        """
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        navigated = self.call("Page.navigate", {"url": url}, session)
        if navigated.get("errorText"):
            raise BrowserError(f"{url}: {navigated['errorText']}")
        deadline = time.monotonic() + self.timeout
        # (not the about:blank the tab started with, should its context still answer)
        while not self.evaluate(session, f"location.href !== 'about:blank' && ({ready})"):
            if time.monotonic() > deadline:
                state = self.evaluate(session, "document.title + ' | ' + document.body.innerText")
                raise BrowserError(f"{url}: not ready ({ready}) within {self.timeout:g} s: {state!r}")
            time.sleep(0.05)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of the JavaScript C{expression} in the tab of C{session}."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    def text(self, url: str) -> str:
        """What the page at C{url} shows (C{document.body.innerText}, stripped) once loaded."""
        return self.evaluate(self.open(url), "document.body.innerText").strip()

    # -- the protocol ----------------------------------------------------------

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait (bounded) for its answer; events in between are dropped."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to, data) :]
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read(deadline, method)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer["result"]

    def _read(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise BrowserError(f"no answer to {waiting_for} within {self.timeout:g} s\n{self.last_words()}")
            chunk = os.read(self._from, 1 << 16)
            if not chunk:
                raise BrowserError(f"the browser exited waiting for {waiting_for}\n{self.last_words()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def last_words(self) -> str:
        """The end of the browser's stderr, without the D-Bus noise of a machine without a session bus."""
        try:
            with open(self.log, errors="replace") as f:
                lines = [line for line in f.read().splitlines() if "dbus" not in line]
        except OSError:
            return ""
        return "\n".join(lines[-15:])

    # -- cleanup -----------------------------------------------------------------

    def close(self) -> None:
        """Kill the browser (its process group, then its stray crash handlers), by pid; remove its profile."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for fd in (self._to, self._from):
            os.close(fd)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a session leader (lab.spawn): its group is its pid
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                strays = [pid for pid in self.lab.ns_pids(self.ns) if self.home.encode() in _cmdline(pid)]
                if not strays:
                    break
                for pid in strays:
                    if pid_alive(pid):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                time.sleep(0.05)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
