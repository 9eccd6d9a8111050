"""
Tests of the endpoints that reach a proxy node indirectly: through a local
command (ProxyCommand) and through a channel of another SSH connection.

Real processes and a real in-process Conch stack on loopback; the "internal"
addresses exist only in the fake proxy nodes' route tables.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.internet import error, reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.errors import Reason, StreamError
from gateway.ssh.hostkeys import HostKeyPolicy
from gateway.ssh.proxycommand import (
    ChannelEndpoint,
    ChannelTransport,
    CommandProcessProtocol,
    command_endpoint,
    format_command,
    program_name,
)
from gateway.ssh.transport import client_factory
from gateway.testing import DEMO_PAGE, FakeProxyNode, demo_web_site, generate_key

WEB = ("10.99.0.10", 80)
JUMP = ("10.99.0.20", 22)
ORIGIN = ("127.0.0.1", 0)
WAIT = 5.0


def inline(f):
    """Run an async test method as a Deferred (trial understands those)."""

    def wrapper(self):
        return Deferred.fromCoroutine(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


def within(d: Deferred, seconds: float = WAIT) -> Deferred:
    return d.addTimeout(seconds, reactor)


def capture_log(testcase: TestCase) -> list[dict]:
    events: list[dict] = []

    def observer(event: dict) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def messages(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "gateway.ssh.proxycommand"]


def _stat(pid: int) -> list[str] | None:
    """State, ppid, pgrp, ... of a process; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def running(pid: int) -> bool:
    """Whether C{pid} is a live process (a zombie awaiting its reaper is not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes in process group C{pgid}."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(name))
    return members


class Collector(Protocol):
    """Records what it receives; C{until} waits for enough of it."""

    def __init__(self) -> None:
        self.data = b""
        #: Fires with the exception connectionLost was given.
        self.lost: Deferred[BaseException] = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, d))
                d.callback(self.data)

    def until(self, marker: bytes) -> Deferred:
        if marker in self.data:
            d: Deferred = Deferred()
            d.callback(self.data)
            return d
        d = Deferred()
        self._waiting.append((marker, d))
        return within(d)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(reason.value)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.factory.open.remove(self)
        if not self.factory.open and self.factory.all_closed is not None:
            self.factory.all_closed.callback(None)


class EchoFactory(Factory):
    noisy = False
    protocol = Echo

    def __init__(self) -> None:
        self.open: list[Echo] = []
        self.all_closed: Deferred | None = None

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.open.append(p)
        return p

    def closed(self) -> Deferred:
        """Fires when every accepted connection has closed."""
        d: Deferred = Deferred()
        if not self.open:
            d.callback(None)
        else:
            self.all_closed = d
        return within(d)


class OneShot(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        self.address = addr
        return self.protocol_instance


# -- command templates ---------------------------------------------------------


class TemplateTests(TestCase):
    def test_host_and_port_are_shell_quoted(self):
        self.assertEqual(format_command("nc {host} {port}", "10.0.0.1", 22), "nc 10.0.0.1 22")
        self.assertEqual(format_command("nc {host} {port}", "a b;rm -rf /", 22), "nc 'a b;rm -rf /' 22")

    def test_double_braces_are_literal(self):
        self.assertEqual(format_command("awk '{{print}}' {host}:{port}", "h", 1), "awk '{print}' h:1")

    def test_optional_placeholders(self):
        self.assertEqual(format_command("ssh -W %h:%p jump", "h", 1), "ssh -W %h:%p jump")

    def test_other_fields_are_refused(self):
        for template in ("nc {user}", "nc {}", "nc {0}", "nc {host.upper}", "nc {host[0]}", "nc {host"):
            with self.assertRaises(ValueError, msg=template):
                format_command(template, "h", 1)
        with self.assertRaises(ValueError):
            command_endpoint(reactor, "nc {router_id}", "h", 1)

    def test_program_name(self):
        self.assertEqual(program_name("nc 10.0.0.1 22"), "nc")
        self.assertEqual(program_name("ip netns exec qrouter-1234 nc 10.0.0.1 22"), "ip")
        self.assertEqual(program_name("LC_ALL=C exec /usr/bin/ssh -W h:22 jump"), "ssh")
        self.assertEqual(program_name("printf '%s\\n' x >&2; exit 1"), "printf")
        self.assertEqual(program_name("'unbalanced"), "sh")


# -- command endpoint: real processes ---------------------------------------------


class CommandEndpointTests(TestCase):
    async def _connect(self, template: str, host: str = "127.0.0.1", port: int = 1, **kw):
        protocol = Collector()
        endpoint = command_endpoint(reactor, template, host, port, **kw)
        connected = await endpoint.connect(OneShot(protocol))
        self.assertIs(connected, protocol)

        def reap():
            # Never leave a process behind, whatever the test did.
            if not protocol.lost.called:
                protocol.transport.abortConnection()
                return within(protocol.lost)

        self.addCleanup(reap)
        # (transport.pid is None once the process is reaped, which a quick
        # command may be before connect() returns; the address keeps it.)
        pid = protocol.transport.getPeer().pid
        self.assertIsInstance(pid, int)
        return protocol, pid

    async def _echo_server(self) -> tuple[EchoFactory, int]:
        factory = EchoFactory()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.closed)
        return factory, port.getHost().port

    @inline
    async def test_round_trip_through_nc(self):
        factory, port = await self._echo_server()
        protocol, pid = await self._connect("nc {host} {port}", "127.0.0.1", port, stop_timeout=0.3)
        transport = protocol.transport
        self.assertTrue(verifyObject(ITransport, transport))
        self.assertTrue(verifyObject(IPushProducer, transport))
        self.assertTrue(verifyObject(IConsumer, transport))
        self.assertIn("nc 127.0.0.1", str(transport.getPeer()))
        self.assertIn(str(pid), str(transport.getHost()))
        transport.write(b"hello ")
        transport.writeSequence([b"through ", b"nc\n"])
        self.assertEqual(await protocol.until(b"nc\n"), b"hello through nc\n")
        self.assertTrue(running(pid))
        self.assertEqual(transport.pid, pid)

        # nc ignores EOF on stdin: closing must escalate to SIGTERM, to the
        # whole group (dash forks nc rather than exec'ing it).
        started = time.monotonic()
        transport.loseConnection()
        reason = await within(protocol.lost)
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertLess(time.monotonic() - started, 3)
        self.assertFalse(running(pid))
        await wait_until(lambda: not group_members(pid))  # signalled; may still be dying
        self.assertIsNone(transport.pid)
        await factory.closed()

    @inline
    async def test_ssh_through_nc(self):
        key = generate_key()
        tmp = self.mktemp()
        os.makedirs(tmp)
        sock = os.path.join(tmp, "web.sock")
        web = await serverFromString(reactor, f"unix:{sock}").listen(demo_web_site())
        self.addCleanup(web.stopListening)
        node = FakeProxyNode(reactor, [key], routes={WEB: f"unix:{sock}"})
        listening = await node.listen()
        self.addCleanup(listening.stopListening)
        ssh_port = listening.getHost().port
        factory = client_factory(
            "127.0.0.1", ssh_port, "demo", key, HostKeyPolicy(pinned=[node.host_key.public()]), reactor
        )
        transport = await command_endpoint(reactor, "nc {host} {port}", "127.0.0.1", ssh_port).connect(factory)
        pid = transport.transport.getPeer().pid

        def reap():
            if not transport.lost.called:
                transport.transport.abortConnection()
            return within(transport.lost)

        self.addCleanup(reap)
        conn = await within(transport.ready)
        self.assertEqual(await fetch(conn), DEMO_PAGE)
        # The SSH disconnect makes the server close, and nc exit by itself.
        transport.loseConnection()
        await within(transport.lost)
        self.assertFalse(running(pid))

    @inline
    async def test_stderr_is_logged_and_exit_loses_the_connection(self):
        events = capture_log(self)
        protocol, pid = await self._connect("nc -v {host} {port}", "127.0.0.1", 1)
        reason = await within(protocol.lost)
        self.assertIsInstance(reason, error.ConnectionLost)
        self.assertNotIsInstance(reason, error.ConnectionDone)
        self.assertIn("exited with status 1", str(reason))
        self.assertIn(
            "proxy_command (nc) stderr: nc: connect to 127.0.0.1 port 1 (tcp) failed: Connection refused",
            messages(events),
        )
        stderr_events = [e for e in events if "line" in e and e.get("log_namespace") == "gateway.ssh.proxycommand"]
        self.assertEqual(stderr_events[0]["pid"], pid)
        self.assertEqual(stderr_events[0]["program"], "nc")
        self.assertEqual(protocol.data, b"")

    @inline
    async def test_clean_exit_is_connection_done(self):
        protocol, _ = await self._connect("printf 'bye\\n'")
        reason = await within(protocol.lost)
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertEqual(protocol.data, b"bye\n")

    @inline
    async def test_host_is_one_shell_word(self):
        events = capture_log(self)
        host = "a b;echo injected >&2 {port}"
        protocol, _ = await self._connect("printf '%s\\n' {host} >&2; echo '[{port}]' >&2; exit 1", host, 8022)
        await within(protocol.lost)
        lines = [m.split("stderr: ", 1)[1] for m in messages(events) if "stderr: " in m]
        self.assertEqual(lines, [host, "[8022]"])

    @inline
    async def test_partial_and_long_stderr_lines(self):
        events = capture_log(self)
        protocol, _ = await self._connect(
            "printf 'one\\r\\ntwo\\n\\nthree' >&2; head -c 5000 /dev/zero | tr '\\0' x >&2"
        )
        await within(protocol.lost)
        lines = [m.split("stderr: ", 1)[1] for m in messages(events) if "stderr: " in m]
        self.assertEqual(lines[:2], ["one", "two"])
        self.assertEqual(lines[2][:5], "three")
        self.assertEqual("".join(lines[2:]), "three" + "x" * 5000)
        self.assertTrue(all(len(line) <= 4096 for line in lines))

    @inline
    async def test_close_stops_everything_the_command_started(self):
        events = capture_log(self)
        protocol, pid = await self._connect("sleep 30 & echo $! >&2; sleep 30", stop_timeout=0.2)
        while not any("stderr: " in m for m in messages(events)):
            await deferLater(0.01)
        background = int(next(m for m in messages(events) if "stderr: " in m).split("stderr: ")[1])
        self.assertTrue(running(background))
        self.assertEqual(len(group_members(pid)), 3)  # sh, and both sleeps

        protocol.transport.loseConnection()
        reason = await within(protocol.lost)
        self.assertIsInstance(reason, error.ConnectionDone)
        await wait_until(lambda: not running(background))
        await wait_until(lambda: not group_members(pid))  # signalled; may still be dying

    @inline
    async def test_sigkill_when_sigterm_is_ignored(self):
        events = capture_log(self)
        protocol, pid = await self._connect("trap '' TERM; echo ready >&2; sleep 30", stop_timeout=0.2)
        while "proxy_command (trap) stderr: ready" not in messages(events):
            await deferLater(0.01)
        started = time.monotonic()
        protocol.transport.loseConnection()
        await within(protocol.lost)
        self.assertGreaterEqual(time.monotonic() - started, 0.35)
        self.assertFalse(running(pid))
        await wait_until(lambda: not group_members(pid))  # signalled; may still be dying

    @inline
    async def test_abort_kills_at_once(self):
        protocol, pid = await self._connect("exec sleep 30")  # default 5 s grace
        started = time.monotonic()
        protocol.transport.abortConnection()
        await within(protocol.lost)
        self.assertLess(time.monotonic() - started, 2)
        self.assertFalse(running(pid))

    @inline
    async def test_leftovers_holding_stdout_are_stopped_after_exit(self):
        protocol, pid = await self._connect("sleep 30 & exit 3", stop_timeout=0.2)
        reason = await within(protocol.lost)
        self.assertIn("exited with status 3", str(reason))
        await wait_until(lambda: not group_members(pid))


async def deferLater(seconds: float) -> None:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def wait_until(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(0.01)


# -- command endpoint: stopping, with a fake process and clock ---------------------


class FakeProcess:
    pid = 4242

    def __init__(self) -> None:
        self.stdin_closed = False
        self.signals: list[int] = []
        self.pipes_closed = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signum) -> None:
        self.signals.append(signum)

    def loseConnection(self) -> None:
        self.pipes_closed = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class StoppingTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.protocol = Collector()
        self.process = FakeProcess()
        self.pp = CommandProcessProtocol(self.protocol, "nc h 22", "nc", self.clock, stop_timeout=5.0)
        self.pp.makeConnection(self.process)

    def test_close_escalates_within_bounds(self):
        self.protocol.transport.write(b"x")
        self.assertEqual(self.process.written, [b"x"])
        self.protocol.transport.loseConnection()
        self.assertTrue(self.process.stdin_closed)
        self.protocol.transport.write(b"late")
        self.assertEqual(self.process.written, [b"x"])
        self.clock.advance(4.9)
        self.assertEqual(self.process.signals, [])
        self.clock.advance(0.1)
        self.assertEqual(self.process.signals, [signal.SIGTERM])
        self.clock.advance(5)
        self.assertEqual(self.process.signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertFalse(self.protocol.lost.called)
        # Still not reaped 5 s after SIGKILL: give up waiting, bounded.
        self.clock.advance(5)
        self.assertTrue(self.process.pipes_closed)
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionLost)
        self.pp.processEnded(Failure(error.ProcessTerminated(signal=9)))  # no second connectionLost
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_exit_during_grace_cancels_escalation(self):
        self.protocol.transport.loseConnection()
        self.clock.advance(1)
        self.pp.processExited(Failure(error.ProcessTerminated(exitCode=1)))
        self.pp.processEnded(Failure(error.ProcessTerminated(exitCode=1)))
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.process.signals, [])

    def test_abort_kills_now(self):
        self.protocol.transport.abortConnection()
        self.assertEqual(self.process.signals, [signal.SIGKILL])

    def test_stderr_logging_never_raises(self):
        events = capture_log(self)
        self.pp.errReceived(b"\xff\xfebad utf-8 {braces} %s\n")
        self.pp.childDataReceived(2, b"no newline")
        self.pp.processEnded(Failure(error.ProcessDone(0)))
        self.assertEqual(
            messages(events),
            ["proxy_command (nc) stderr: \ufffd\ufffdbad utf-8 {braces} %s", "proxy_command (nc) stderr: no newline"],
        )


# -- channel transport, with a fake channel -----------------------------------------


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.peer = None
        self.buf = b""
        self.extBuf: list = []

    def attach(self, peer) -> None:
        self.peer = peer

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def send_eof(self) -> None:
        self.events.append("eof")

    def abort(self) -> None:
        # As TunnelChannel.abort: queued data is dropped, then the close.
        self.buf = b""
        self.close()

    def close(self) -> None:
        self.events.append("close")

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")


@implementer(IHalfCloseableProtocol)
class HalfCloser(Collector):
    read_lost = False

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        pass


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class ChannelTransportTests(TestCase):
    def _transport(self, protocol=None):
        self.clock = Clock()
        self.channel = FakeChannel()
        self.protocol = protocol or Collector()
        transport = ChannelTransport(self.channel, self.protocol, "10.99.0.20", 22, self.clock)
        self.channel.attach(transport)
        self.protocol.makeConnection(transport)
        return transport

    def test_interfaces_and_addresses(self):
        transport = self._transport()
        self.assertTrue(verifyObject(ITransport, transport))
        self.assertTrue(verifyObject(IPushProducer, transport))
        self.assertTrue(verifyObject(IConsumer, transport))
        self.assertEqual(str(transport.getPeer()), "10.99.0.20:22 via channel")
        self.assertEqual(str(transport.getHost()), "10.99.0.20:22 via channel")

    def test_data_both_ways(self):
        transport = self._transport()
        transport.write(b"a")
        transport.writeSequence([b"b", b"c"])
        self.assertEqual(self.channel.sent, [b"a", b"bc"])
        self.channel.peer.tunnel_data(b"xyz")
        self.assertEqual(self.protocol.data, b"xyz")

    def test_lose_connection_sends_eof_then_close(self):
        transport = self._transport()
        transport.loseConnection()
        transport.loseConnection()
        transport.write(b"late")
        self.assertEqual(self.channel.events, ["eof", "close"])
        self.assertEqual(self.channel.sent, [])
        self.channel.peer.tunnel_closed()
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionDone)

    def test_eof_closes_a_plain_protocol(self):
        self._transport()
        self.channel.peer.tunnel_eof()
        self.assertEqual(self.channel.events, ["eof", "close"])
        self.channel.peer.tunnel_closed()
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionDone)

    def test_eof_half_closes_a_half_closeable_protocol(self):
        transport = self._transport(HalfCloser())
        self.channel.peer.tunnel_eof()
        self.assertTrue(self.protocol.read_lost)
        self.assertEqual(self.channel.events, [])
        transport.write(b"still writing")
        self.assertEqual(self.channel.sent, [b"still writing"])

    def test_close_without_eof_is_connection_lost(self):
        self._transport()
        self.channel.peer.tunnel_closed()
        reason = self.successResultOf(self.protocol.lost)
        self.assertIsInstance(reason, error.ConnectionLost)
        self.assertNotIsInstance(reason, error.ConnectionDone)

    def test_abort_drops_buffer_and_loses_connection(self):
        transport = self._transport()
        self.channel.buf = b"unsent"
        transport.abortConnection()
        self.assertEqual(self.channel.buf, b"")
        self.assertEqual(self.channel.events, ["close"])
        self.assertIsNone(self.channel.peer)
        self.clock.advance(0)
        self.assertIsInstance(self.successResultOf(self.protocol.lost), error.ConnectionAborted)

    def test_window_pauses_a_registered_streaming_producer(self):
        transport = self._transport()
        self.channel.peer.tunnel_pause_writing()  # nobody registered: ignored
        self.channel.peer.tunnel_resume_writing()
        producer = Producer()
        transport.registerProducer(producer, True)
        self.channel.peer.tunnel_pause_writing()
        self.channel.peer.tunnel_resume_writing()
        self.assertEqual(producer.events, ["pause", "resume"])
        transport.unregisterProducer()
        self.channel.peer.tunnel_pause_writing()
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_pull_producer_is_pulled_while_window_is_open(self):
        transport = self._transport()
        producer = Producer()
        transport.registerProducer(producer, False)
        self.clock.advance(0)
        self.assertEqual(producer.events, ["resume"])
        self.channel.peer.tunnel_pause_writing()
        transport.write(b"x")
        self.clock.advance(0)
        self.assertEqual(producer.events, ["resume"])
        self.channel.peer.tunnel_resume_writing()
        self.clock.advance(0)
        self.assertEqual(producer.events, ["resume", "resume"])

    def test_producer_is_stopped_when_the_channel_closes(self):
        transport = self._transport()
        producer = Producer()
        transport.registerProducer(producer, True)
        self.channel.peer.tunnel_closed()
        self.assertEqual(producer.events, ["stop"])

    def test_pausing_the_transport_pauses_the_channel(self):
        transport = self._transport()
        transport.pauseProducing()
        transport.resumeProducing()
        self.assertEqual(self.channel.events, ["pause", "resume"])


class ChannelEndpointUnitTests(TestCase):
    def test_cancel_before_open_closes_the_channel_when_it_opens(self):
        opening: Deferred = Deferred()
        factory = OneShot(Collector())
        d = ChannelEndpoint(lambda host, port: opening, "10.99.0.20", 22, Clock()).connect(factory)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        channel = FakeChannel()
        opening.callback(channel)
        self.assertEqual(channel.events, ["close"])
        self.assertFalse(hasattr(factory, "address"))  # no protocol was built

    def test_cancel_then_open_failure_is_quiet(self):
        opening: Deferred = Deferred()
        d = ChannelEndpoint(lambda host, port: opening, "h", 22, Clock()).connect(OneShot(Collector()))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        opening.errback(StreamError(Reason.REFUSED, "nope"))
        self.assertIsNone(self.successResultOf(opening))  # the failure was consumed

    def test_open_failure_fails_connect(self):
        opening: Deferred = Deferred()
        d = ChannelEndpoint(lambda host, port: opening, "h", 22, Clock()).connect(OneShot(Collector()))
        self.assertNoResult(d)
        opening.errback(StreamError(Reason.PROHIBITED, "no"))
        self.assertEqual(self.failureResultOf(d, StreamError).value.reason, Reason.PROHIBITED)

    def test_connects_the_protocol_after_open(self):
        opening: Deferred = Deferred()
        asked = []
        protocol = Collector()
        factory = OneShot(protocol)

        def opener(host, port):
            asked.append((host, port))
            return opening

        d = ChannelEndpoint(opener, "10.99.0.20", 22, Clock()).connect(factory)
        self.assertEqual(asked, [("10.99.0.20", 22)])
        channel = FakeChannel()
        opening.callback(channel)
        self.assertIs(self.successResultOf(d), protocol)
        self.assertIsInstance(protocol.transport, ChannelTransport)
        self.assertIs(channel.peer, protocol.transport)
        self.assertEqual(str(factory.address), "10.99.0.20:22 via channel")


# -- SSH over SSH ------------------------------------------------------------------


async def fetch(conn) -> bytes:
    """GET / through a tunnel of C{conn}; the response body."""
    channel = await within(conn.open_tunnel(*WEB, ORIGIN))
    received: list[bytes] = []
    closed: Deferred = Deferred()

    class Peer:
        def tunnel_data(self, data):
            received.append(data)

        def tunnel_eof(self):
            channel.close()  # the server answered and closed: so do we

        def tunnel_closed(self):
            closed.callback(None)

        def tunnel_pause_writing(self):
            pass

        def tunnel_resume_writing(self):
            pass

    channel.attach(Peer())
    channel.send(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
    await within(closed)
    response = b"".join(received)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body


class SSHOverSSHTests(TestCase):
    @inline
    async def setUp(self):
        self.key = generate_key()
        tmp = self.mktemp()
        os.makedirs(tmp)
        sock = os.path.join(tmp, "web.sock")
        web = await serverFromString(reactor, f"unix:{sock}").listen(demo_web_site())
        self.addCleanup(web.stopListening)
        self.inner_node = FakeProxyNode(reactor, [self.key], routes={WEB: f"unix:{sock}"})
        inner = await self.inner_node.listen()
        self.addCleanup(inner.stopListening)
        self.outer_node = FakeProxyNode(reactor, [self.key], routes={JUMP: f"tcp:127.0.0.1:{inner.getHost().port}"})
        outer = await self.outer_node.listen()
        self.addCleanup(outer.stopListening)
        port = outer.getHost().port
        self.outer, self.outer_conn = await self._ssh(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), "127.0.0.1", port, self.outer_node
        )
        self.channels = []

    def _open(self, host: str, port: int) -> Deferred:
        def opened(channel):
            self.channels.append(channel)
            return channel

        return self.outer_conn.open_tunnel(host, port, ORIGIN).addCallback(opened)

    async def _ssh(self, endpoint, host, port, node):
        factory = client_factory(host, port, "demo", self.key, HostKeyPolicy(pinned=[node.host_key.public()]), reactor)
        transport = await within(endpoint.connect(factory))

        def close():
            if not transport.lost.called:
                transport.loseConnection()
            return within(transport.lost)

        self.addCleanup(close)
        return transport, await within(transport.ready)

    @inline
    async def test_ssh_over_ssh(self):
        with self.assertRaises(StreamError):  # only the inner node reaches the web server
            await within(self.outer_conn.open_tunnel(*WEB, ORIGIN))
        inner, inner_conn = await self._ssh(ChannelEndpoint(self._open, *JUMP), *JUMP, self.inner_node)
        self.assertEqual(str(inner.transport.getPeer()), "10.99.0.20:22 via channel")
        self.assertEqual(await fetch(inner_conn), DEMO_PAGE)
        self.assertEqual(await fetch(inner_conn), DEMO_PAGE)
        self.assertEqual(len(self.outer_conn.channels), 1)

    @inline
    async def test_closing_the_inner_connection_closes_the_channel(self):
        inner, _ = await self._ssh(ChannelEndpoint(self._open, *JUMP), *JUMP, self.inner_node)
        (channel,) = self.channels
        closed = []
        channel.closed_hooks.append(lambda: closed.append(True))
        inner.loseConnection()
        await within(inner.lost)
        self.assertEqual(closed, [True])
        self.assertEqual(len(self.outer_conn.channels), 0)
        self.assertFalse(self.outer.lost.called)
        # The jump connection carries on.
        again, again_conn = await self._ssh(ChannelEndpoint(self._open, *JUMP), *JUMP, self.inner_node)
        self.assertEqual(await fetch(again_conn), DEMO_PAGE)

    @inline
    async def test_open_failure_fails_connect(self):
        factory = client_factory(
            "10.99.0.21", 22, "demo", self.key, HostKeyPolicy(pinned=[self.inner_node.host_key.public()]), reactor
        )
        with self.assertRaises(StreamError) as caught:
            await within(ChannelEndpoint(self._open, "10.99.0.21", 22).connect(factory))
        self.assertEqual(caught.exception.reason, Reason.REFUSED)
        self.assertEqual(len(self.outer_conn.channels), 0)
