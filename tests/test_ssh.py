"""
Unit tests of the SSH side: rsa-sha2 signing, host-key policy, channel flow
control, the cluster's reconnect logic and TCP_QUICKACK on the SSH socket,
with fake transports and clocks.
"""

from __future__ import annotations

import errno
import socket
import struct

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.ssh import connection, keys, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.transport import DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from gateway.errors import Reason, StreamError
from gateway.ssh import quickack as quickack_module
from gateway.ssh.auth import KeyAuthClient, signature_algorithm
from gateway.ssh.channel import TunnelChannel, open_failure_reason
from gateway.ssh.connection import TunnelConnection
from gateway.ssh.hostkeys import HostKeyError, HostKeyPolicy, known_hosts_name
from gateway.ssh.transport import GatewayClientTransport, SSHConnectError
from gateway.testing import generate_key, public_line
from tests.support import FakeSSHTransport


def rsa_key() -> keys.Key:
    return keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ecdsa_key() -> keys.Key:
    return keys.Key(ec.generate_private_key(ec.SECP256R1()))


class SignatureAlgorithmTests(TestCase):
    def test_rsa_prefers_sha512(self):
        key = rsa_key()
        self.assertEqual(signature_algorithm(key, b"ssh-ed25519,rsa-sha2-256,rsa-sha2-512"), b"rsa-sha2-512")

    def test_rsa_sha256_when_only_offered(self):
        self.assertEqual(signature_algorithm(rsa_key(), b"rsa-sha2-256,ssh-rsa"), b"rsa-sha2-256")

    def test_rsa_without_ext_info_is_rsa_sha2_512(self):
        # OpenSSH >= 7.2 accepts it without saying so; SHA-1 only on request.
        self.assertEqual(signature_algorithm(rsa_key(), None), b"rsa-sha2-512")
        self.assertEqual(signature_algorithm(rsa_key(), b"ssh-rsa,ssh-ed25519"), b"rsa-sha2-512")

    def test_sha1_only_when_allowed_and_no_sha2_is_listed(self):
        key = rsa_key()
        self.assertEqual(signature_algorithm(key, None, allow_sha1=True), b"ssh-rsa")
        self.assertEqual(signature_algorithm(key, b"ssh-rsa", allow_sha1=True), b"ssh-rsa")
        self.assertEqual(signature_algorithm(key, b"ssh-rsa,rsa-sha2-256", allow_sha1=True), b"rsa-sha2-256")

    def test_other_key_types_use_their_own_name(self):
        self.assertEqual(signature_algorithm(generate_key(), b"rsa-sha2-512"), b"ssh-ed25519")
        self.assertEqual(signature_algorithm(ecdsa_key(), None), b"ecdsa-sha2-nistp256")


class KeyAuthClientTests(TestCase):
    def _request(
        self, key: keys.Key, server_sig_algs: bytes | None, allow_sha1: bool = False
    ) -> tuple[bytes, bytes, bytes]:
        transport = FakeSSHTransport()
        if server_sig_algs is not None:
            transport.peerExtensions[b"server-sig-algs"] = server_sig_algs
        client = KeyAuthClient("root", key, connection.SSHConnection(), allow_sha1_signatures=allow_sha1)
        client.transport = transport
        client.auth_publickey()
        self.client = client
        (payload,) = transport.of_kind(userauth.MSG_USERAUTH_REQUEST)
        user, service, method, rest = getNS(payload, 3)
        self.assertEqual((user, service, method), (b"root", b"ssh-connection", b"publickey"))
        self.assertEqual(rest[:1], b"\x01")
        algorithm, blob, signature, _ = getNS(rest[1:], 3)
        signed = (
            NS(transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(b"root")
            + NS(b"ssh-connection")
            + NS(b"publickey")
            + b"\x01"
            + NS(algorithm)
            + NS(blob)
        )
        self.assertTrue(key.public().verify(signature, signed))
        self.assertEqual(blob, key.public().blob())
        return algorithm, blob, signature

    def test_rsa_signs_with_rsa_sha2_512(self):
        algorithm, _, signature = self._request(rsa_key(), b"rsa-sha2-256,rsa-sha2-512")
        self.assertEqual(algorithm, b"rsa-sha2-512")
        self.assertEqual(getNS(signature)[0], b"rsa-sha2-512")

    def test_rsa_signs_with_rsa_sha2_256(self):
        algorithm, _, signature = self._request(rsa_key(), b"rsa-sha2-256")
        self.assertEqual(getNS(signature)[0], b"rsa-sha2-256")

    def test_ed25519(self):
        algorithm, _, _ = self._request(generate_key(), b"rsa-sha2-512")
        self.assertEqual(algorithm, b"ssh-ed25519")
        self.assertIsNone(self.client.unlisted_algorithm)
        self._request(generate_key(), None)
        self.assertIsNone(self.client.unlisted_algorithm)

    def test_rsa_without_server_sig_algs_signs_sha2_and_says_it_guessed(self):
        algorithm, _, signature = self._request(rsa_key(), None)
        self.assertEqual((algorithm, getNS(signature)[0]), (b"rsa-sha2-512", b"rsa-sha2-512"))
        self.assertEqual(self.client.unlisted_algorithm, b"rsa-sha2-512")
        self._request(rsa_key(), b"rsa-sha2-512")
        self.assertIsNone(self.client.unlisted_algorithm)

    def test_rsa_sha1_when_the_cluster_opts_in(self):
        algorithm, _, signature = self._request(rsa_key(), None, allow_sha1=True)
        self.assertEqual((algorithm, getNS(signature)[0]), (b"ssh-rsa", b"ssh-rsa"))
        self.assertIsNone(self.client.unlisted_algorithm)

    def test_key_is_tried_once_and_only_publickey(self):
        client = KeyAuthClient("root", generate_key(), connection.SSHConnection())
        client.transport = FakeSSHTransport()
        self.assertTrue(self.successResultOf(client.auth_publickey()))
        self.assertFalse(self.successResultOf(client.auth_publickey()))
        self.assertIsNone(client.tryAuth(b"password"))
        self.assertIsNone(client.tryAuth(b"keyboard-interactive"))


class HostKeyPolicyTests(TestCase):
    def setUp(self):
        self.ed25519 = generate_key().public()
        self.ecdsa = ecdsa_key().public()
        self.path = self.mktemp()

    def _known_hosts(self, lines: list[str], hashed: bool = False) -> HostKeyPolicy:
        if hashed:
            known = KnownHostsFile(FilePath(self.path))
            for line in lines:
                host, _, key = line.partition(" ")
                known.addHostKey(host.encode(), keys.Key.fromString(key))
            known.save()
        else:
            with open(self.path, "w") as f:
                f.write("\n".join(lines) + "\n")
        return HostKeyPolicy(known_hosts=self.path)

    def test_known_host_accepted(self):
        policy = self._known_hosts([f"10.0.0.1 {public_line(self.ed25519)}"])
        policy.verify("10.0.0.1", 22, self.ed25519)

    def test_hashed_entries_and_non_default_port(self):
        name = known_hosts_name("10.0.0.1", 2222)
        self.assertEqual(name, "[10.0.0.1]:2222")
        policy = self._known_hosts([f"{name} {public_line(self.ed25519)}"], hashed=True)
        with open(self.path) as f:
            self.assertTrue(f.read().startswith("|1|"))
        policy.verify("10.0.0.1", 2222, self.ed25519)
        self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, self.ed25519)

    def test_mismatch_names_the_offered_fingerprint(self):
        policy = self._known_hosts([f"10.0.0.1 {public_line(self.ed25519)}"])
        other = generate_key().public()
        e = self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, other)
        self.assertIn("does not match", str(e))
        self.assertIn("SHA256:", str(e))

    def test_unknown_host_is_refused(self):
        policy = self._known_hosts([f"10.0.0.2 {public_line(self.ed25519)}"])
        e = self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, self.ed25519)
        self.assertIn("no host key for 10.0.0.1", str(e))

    def test_pinned_keys(self):
        policy = HostKeyPolicy(pinned=[self.ed25519])
        policy.verify("anything", 22, self.ed25519)
        self.assertRaises(HostKeyError, policy.verify, "anything", 22, self.ecdsa)

    def test_accept_any_is_explicit(self):
        HostKeyPolicy(accept_any=True).verify("x", 22, self.ecdsa)
        self.assertRaises(HostKeyError, HostKeyPolicy().verify, "x", 22, self.ecdsa)

    def test_algorithms_of_held_keys_come_first(self):
        policy = self._known_hosts([f"10.0.0.1 {public_line(self.ed25519)}"])
        supported = [b"ecdsa-sha2-nistp256", b"rsa-sha2-512", b"ssh-ed25519"]
        self.assertEqual(
            policy.preferred_algorithms("10.0.0.1", 22, supported),
            [b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"rsa-sha2-512"],
        )


class ChannelOpenDeadlineTests(TestCase):
    """A channel keeps its own open deadline (C{open_timeout}): one Deferred per stream."""

    def setUp(self):
        self.clock = Clock()
        self.transport = FakeSSHTransport()
        self.conn = TunnelConnection(Deferred(), self.clock)
        self.conn.transport = self.transport
        self.conn.serviceStarted()
        self.opened = self.conn.open_tunnel("fd00::5", 80, ("127.0.0.1", 5000), open_timeout=4)

    def confirm(self):
        self.conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", 0, 7, 100, 32768))

    def test_a_confirmation_in_time_opens_and_stops_the_deadline(self):
        self.clock.advance(3.9)
        self.confirm()
        self.assertIsInstance(self.successResultOf(self.opened), TunnelChannel)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_answer_in_time_fails_with_timeout(self):
        self.clock.advance(4)
        error = self.failureResultOf(self.opened, StreamError).value
        self.assertEqual(error.reason, Reason.TIMEOUT)
        self.assertEqual(error.detail, "proxy node did not open [fd00::5]:80 within 4 s")

    def test_a_channel_confirmed_after_its_deadline_is_closed(self):
        self.clock.advance(4)
        self.failureResultOf(self.opened, StreamError)
        self.confirm()
        self.assertEqual(len(self.transport.of_kind(connection.MSG_CHANNEL_CLOSE)), 1)

    def test_a_refusal_after_the_deadline_changes_nothing(self):
        self.clock.advance(4)
        self.failureResultOf(self.opened, StreamError)
        self.conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", 0, 2) + NS(b"Connection refused") + NS(b""))
        self.assertEqual(self.conn.channels, {})

    def test_a_refusal_in_time_stops_the_deadline(self):
        self.conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", 0, 2) + NS(b"Connection refused") + NS(b""))
        self.assertEqual(self.failureResultOf(self.opened, StreamError).value.reason, Reason.REFUSED)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ChannelFlowControlTests(TestCase):
    """The window is granted only as the local consumer keeps up."""

    def setUp(self):
        self.transport = FakeSSHTransport()
        self.conn = TunnelConnection(Deferred(), Clock())
        self.conn.transport = self.transport
        self.conn.serviceStarted()
        self.opened = self.conn.open_tunnel("10.0.0.5", 80, ("127.0.0.1", 5000), window_size=65536)
        self.received: list[bytes] = []
        # remote channel 7, remote window 100 bytes, max packet 32768
        self.conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", 0, 7, 100, 32768))
        self.channel: TunnelChannel = self.successResultOf(self.opened)
        self.channel.attach(self)

    # TunnelPeer
    def tunnel_data(self, data):
        self.received.append(data)

    def tunnel_eof(self):
        self.received.append(b"<eof>")

    def tunnel_closed(self):
        pass

    def tunnel_pause_writing(self):
        self.received.append(b"<pause>")

    def tunnel_resume_writing(self):
        self.received.append(b"<resume>")

    def _data(self, size: int) -> None:
        self.conn.ssh_CHANNEL_DATA(struct.pack(">L", 0) + NS(b"x" * size))

    def _adjustments(self) -> list[int]:
        return [struct.unpack(">2L", p)[1] for p in self.transport.of_kind(connection.MSG_CHANNEL_WINDOW_ADJUST)]

    def test_open_request_carries_destination_and_window(self):
        (payload,) = self.transport.of_kind(connection.MSG_CHANNEL_OPEN)
        kind, rest = getNS(payload)
        self.assertEqual(kind, b"direct-tcpip")
        self.assertEqual(struct.unpack(">3L", rest[:12])[1:], (65536, 32768))
        host, rest = getNS(rest[12:])
        self.assertEqual((host, struct.unpack(">L", rest[:4])[0]), (b"10.0.0.5", 80))

    def test_window_granted_after_half_consumed(self):
        self._data(30000)
        self.assertEqual(self._adjustments(), [])
        self._data(10000)
        self.assertEqual(self._adjustments(), [40000])

    def test_paused_consumer_gets_no_window(self):
        self.channel.pauseProducing()
        self._data(32768)
        self._data(32768)
        self.assertEqual(self._adjustments(), [])
        self.assertEqual(self.channel.localWindowLeft, 0)
        # More than the window is a protocol violation: the channel is closed.
        self._data(1)
        self.assertEqual(len(self.transport.of_kind(connection.MSG_CHANNEL_CLOSE)), 1)

    def test_resume_grants_the_consumed_window(self):
        self.channel.pauseProducing()
        self._data(32768)
        self._data(32768)
        self.channel.resumeProducing()
        self.assertEqual(self._adjustments(), [65536])

    def test_writes_are_cut_into_packets_of_the_peers_maximum_within_its_window(self):
        self.channel.remoteMaxPacket = 40
        data = bytes(range(150))
        self.channel.send(data)  # window 100: 40 + 40 + 20 now, 50 queued
        self.conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", 0, 1000))
        sent = [payload for payload in self.transport.of_kind(connection.MSG_CHANNEL_DATA)]
        self.assertEqual([struct.unpack(">L", p[:4])[0] for p in sent], [7] * 5)
        chunks = [getNS(p[4:])[0] for p in sent]
        self.assertEqual([len(c) for c in chunks], [40, 40, 20, 40, 10])
        self.assertEqual(b"".join(chunks), data)

    def test_full_remote_window_pauses_the_writer_and_eof_waits_for_data(self):
        self.channel.send(b"y" * 150)
        self.assertIn(b"<pause>", self.received)
        self.channel.send_eof()
        sent = self.transport.of_kind(connection.MSG_CHANNEL_DATA)
        self.assertEqual(sum(len(getNS(p[4:])[0]) for p in sent), 100)
        self.assertEqual(self.transport.of_kind(connection.MSG_CHANNEL_EOF), [])
        self.conn.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", 0, 1000))
        kinds = [k for k, _ in self.transport.packets]
        self.assertEqual(kinds[-2:], [connection.MSG_CHANNEL_DATA, connection.MSG_CHANNEL_EOF])
        self.assertEqual(self.channel.bytes_up, 150)

    def test_counts_bytes_down(self):
        self._data(10)
        self.assertEqual(self.channel.bytes_down, 10)
        self.assertEqual(self.received, [b"x" * 10])


class OpenFailureTests(TestCase):
    def test_mapping(self):
        cases = {
            (1, "open failed"): Reason.PROHIBITED,
            (2, "Connection refused"): Reason.REFUSED,
            (2, "Network is unreachable"): Reason.NETWORK_UNREACHABLE,
            (2, "No route to host"): Reason.HOST_UNREACHABLE,
            (2, "Name or service not known"): Reason.HOST_UNREACHABLE,
            (2, "Connection timed out"): Reason.TIMEOUT,
            (4, "resource shortage"): Reason.GENERAL,
        }
        for (code, text), reason in cases.items():
            self.assertEqual(open_failure_reason(code, text), reason, text)

    def test_open_failure_reaches_the_opener_as_stream_error(self):
        conn = TunnelConnection(Deferred(), Clock())
        conn.transport = FakeSSHTransport()
        conn.serviceStarted()
        opened = conn.open_tunnel("10.0.0.5", 81, ("127.0.0.1", 1))
        conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", 0, 2) + NS(b"Connection refused") + NS(b""))
        error = self.failureResultOf(opened, StreamError).value
        self.assertEqual(error.reason, Reason.REFUSED)
        self.assertIn("10.0.0.5:81", error.detail)

    def test_the_proxy_nodes_open_failure_text_is_escaped_and_cut(self):
        conn = TunnelConnection(Deferred(), Clock())
        conn.transport = FakeSSHTransport()
        conn.serviceStarted()
        opened = conn.open_tunnel("10.0.0.5", 81, ("127.0.0.1", 1))
        text = b"refused\n2026-12-01 forged log line\x1b[31m" + b"x" * 500
        conn.ssh_CHANNEL_OPEN_FAILURE(struct.pack(">2L", 0, 2) + NS(text) + NS(b""))
        detail = self.failureResultOf(opened, StreamError).value.detail
        self.assertNotIn("\n", detail)
        self.assertNotIn("\x1b", detail)
        self.assertIn("refused\\n2026", detail)
        self.assertLess(len(detail), 300)


class KnownHostsLikeOpenSSHTests(TestCase):
    """What Conch's KnownHostsFile does not do and OpenSSH does."""

    def setUp(self):
        self.path = self.mktemp()
        self.key = generate_key().public()

    def policy(self, *lines: str) -> HostKeyPolicy:
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return HostKeyPolicy(known_hosts=self.path)

    def test_any_of_several_same_type_keys_is_accepted(self):
        old = generate_key().public()
        policy = self.policy(f"10.0.0.1 {public_line(old)}", f"10.0.0.1 {public_line(self.key)}")
        policy.verify("10.0.0.1", 22, self.key)

    def test_wildcards_and_negation(self):
        policy = self.policy(f"10.0.0.*,!10.0.0.9 {public_line(self.key)}")
        policy.verify("10.0.0.1", 22, self.key)
        self.assertRaises(HostKeyError, policy.verify, "10.0.0.9", 22, self.key)

    def test_revoked_key_is_refused_even_when_listed(self):
        policy = self.policy(f"10.0.0.1 {public_line(self.key)}", f"@revoked * {public_line(self.key)}")
        e = self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, self.key)
        self.assertIn("@revoked", str(e))

    def test_bracketed_port_entries_are_literal(self):
        policy = self.policy(f"[10.0.0.1]:2222 {public_line(self.key)}")
        policy.verify("10.0.0.1", 2222, self.key)
        self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, self.key)


class _SocketStub:
    """The part of a socket L{quick_ack} uses, recording C{setsockopt} calls."""

    def __init__(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, fails: bool = False) -> None:
        self.family = family
        self.type = kind
        self.fails = fails
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if self.fails:
            raise OSError(errno.EBADF, "Bad file descriptor")
        self.options.append((level, option, value))


class _TCPTransport(StringTransport):
    def __init__(self, sock: _SocketStub) -> None:
        super().__init__()
        self.sock = sock
        self.handles = 0

    def getHandle(self) -> _SocketStub:
        self.handles += 1
        return self.sock


class QuickAckTests(TestCase):
    """TCP_QUICKACK after every read of the SSH socket, and only where it exists."""

    def transport_over(self, tcp: StringTransport) -> GatewayClientTransport:
        client = GatewayClientTransport("10.0.0.1", 22, "root", generate_key(), HostKeyPolicy(accept_any=True), Clock())
        client.makeConnection(tcp)
        return client

    def test_set_after_each_read_with_one_socket_lookup(self):
        if quickack_module._TCP_QUICKACK is None:
            raise SkipTest("no TCP_QUICKACK on this platform")
        sock = _SocketStub()
        tcp = _TCPTransport(sock)
        client = self.transport_over(tcp)
        for chunk in (b"SSH-2.0-OpenSSH_9.2\r\n", b"\0\0", b"\0"):
            client.dataReceived(chunk)
        self.assertEqual(sock.options, [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)] * 3)
        self.assertEqual(tcp.handles, 1)

    def test_not_attempted_where_not_available(self):
        self.patch(quickack_module, "_TCP_QUICKACK", 12)
        not_tcp = [_SocketStub(family=socket.AF_UNIX), _SocketStub(kind=socket.SOCK_DGRAM)]
        for sock in not_tcp:
            self.transport_over(_TCPTransport(sock)).dataReceived(b"SSH-2.0-x\r\n")
            self.assertEqual(sock.options, [])
        # No socket at all: a proxy command's pipes, a channel of a jump connection.
        self.assertIsNone(quickack_module.quick_ack(StringTransport()))
        self.transport_over(StringTransport()).dataReceived(b"SSH-2.0-x\r\n")
        # Not Linux.
        self.patch(quickack_module, "_TCP_QUICKACK", None)
        sock = _SocketStub()
        self.transport_over(_TCPTransport(sock)).dataReceived(b"SSH-2.0-x\r\n")
        self.assertEqual(sock.options, [])

    def test_a_failing_socket_is_not_asked_again(self):
        self.patch(quickack_module, "_TCP_QUICKACK", 12)
        sock = _SocketStub(fails=True)
        client = self.transport_over(_TCPTransport(sock))
        client.dataReceived(b"SSH-2.0-x\r\n")
        sock.fails = False
        client.dataReceived(b"\0")
        self.assertEqual(sock.options, [])


class AuthFailureTextTests(TestCase):
    def failure_after_refusal(self, server_sig_algs: bytes | None) -> str:
        client = GatewayClientTransport("10.0.0.1", 22, "root", rsa_key(), HostKeyPolicy(accept_any=True), Clock())
        client.makeConnection(StringTransport())
        if server_sig_algs is not None:
            client.peerExtensions[b"server-sig-algs"] = server_sig_algs
        client.sessionID = b"session-id"
        client.connectionSecure()
        client._auth.transport = client
        client._auth.auth_publickey()
        client.sendDisconnect(DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"no more methods")
        client.connectionLost(Failure(ConnectionDone()))
        return str(self.failureResultOf(client.ready, SSHConnectError).value)

    def test_a_refused_guess_names_the_opt_in(self):
        text = self.failure_after_refusal(None)
        self.assertTrue(
            text.startswith(
                "authentication as 'root' failed: the proxy node refused the key "
                "(signed with rsa-sha2-512, which the node does not list in server-sig-algs"
            ),
            text,
        )
        self.assertIn("allow_sha1_signatures = true", text)

    def test_a_refused_listed_algorithm_is_just_refused(self):
        text = self.failure_after_refusal(b"rsa-sha2-512")
        self.assertEqual(text, "authentication as 'root' failed: the proxy node refused the key")
