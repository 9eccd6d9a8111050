"""
The bulk data path (issue 15): CHANNEL_DATA sealed with its header and data
joined once, in memory, for every cipher.
"""

from __future__ import annotations

import os
import struct
import zlib

from twisted.conch.ssh import connection
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gateway.ssh.channel import TunnelChannel
from gateway.ssh.connection import TunnelConnection
from gateway.ssh.packets import AES128_GCM, ETM_MACS
from tests.test_packets import AEAD, CLASSIC, MSG_TEST, Peer, cipher_pair, client_transport

#: Every kind of sealer: AEAD, encrypt-and-MAC, encrypt-then-MAC.
EVERY_CIPHER = [*((n, b"hmac-sha2-256") for n in AEAD + (CLASSIC,)), *((CLASSIC, m) for m in ETM_MACS)]


class SendMessageTests(TestCase):
    """C{send_message(type, payload, data)} sends the message C{payload + data}."""

    def test_payload_and_data_arrive_as_one_message(self):
        for name, mac in EVERY_CIPHER:
            client_ciphers, server_ciphers = cipher_pair(name, mac)
            client, _ = client_transport(client_ciphers)
            peer = Peer(server_ciphers)
            parts = [(b"", b""), (b"head", b""), (b"", b"data"), (b"\0\0\0\7", os.urandom(32768))]
            for payload, data in parts:
                client.send_message(MSG_TEST, payload, data)
            self.assertEqual(peer.receive(client.transport.value()), [(MSG_TEST, p + d) for p, d in parts], name)
            self.assertEqual(client._bytes_since_kex, sum(len(p + d) for p, d in parts))

    def test_same_length_as_the_joined_payload(self):
        # The padding depends on the whole payload's length, not on how it is split.
        for name, mac in EVERY_CIPHER:
            sealer = cipher_pair(name, mac)[0]
            for size in range(40):
                whole = sealer.seal(0, MSG_TEST, bytes(size))
                for cut in range(size + 1):
                    split = sealer.seal(0, MSG_TEST, bytes(cut), bytes(size - cut))
                    self.assertEqual(len(split), len(whole), (name, mac, size, cut))

    def test_held_back_during_key_exchange_as_one_payload(self):
        client, _ = client_transport(cipher_pair(AES128_GCM)[0])
        client._keyExchangeState = client._KEY_EXCHANGE_REQUESTED
        client._blockedByKeyExchange = []
        client.send_message(MSG_TEST, b"head", b"data")
        self.assertEqual(client._blockedByKeyExchange, [(MSG_TEST, b"headdata")])
        self.assertEqual(client.transport.value(), b"")

    def test_compressed_as_one_payload(self):
        client_ciphers, server_ciphers = cipher_pair(AES128_GCM)
        client, _ = client_transport(client_ciphers)
        client.outgoingCompression = zlib.compressobj(6)
        client.send_message(MSG_TEST, b"head", b"abc" * 1000)
        [(number, payload)] = Peer(server_ciphers).receive(client.transport.value())
        inflated = zlib.decompressobj().decompress(bytes([number]) + payload)
        self.assertEqual(inflated, bytes([MSG_TEST]) + b"head" + b"abc" * 1000)


class ChannelDataTests(TestCase):
    """A tunnel's data leaves as CHANNEL_DATA packets in the peer's maximum size."""

    def setUp(self):
        client_ciphers, server_ciphers = cipher_pair(AES128_GCM)
        self.client, _ = client_transport(client_ciphers)
        self.peer = Peer(server_ciphers)
        self.conn = TunnelConnection(Deferred(), Clock())
        self.conn.transport = self.client
        self.conn.serviceStarted()
        self.opened = self.conn.open_tunnel("10.0.0.5", 80, ("127.0.0.1", 5000))
        # remote channel 7, remote window 1 MiB, max packet 32768
        self.conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", 0, 7, 1 << 20, 32768))
        self.channel: TunnelChannel = self.successResultOf(self.opened)
        [(number, _)] = self.peer.receive(self.client.transport.value())
        self.assertEqual(number, connection.MSG_CHANNEL_OPEN)
        self.client.transport.clear()

    def test_data_split_into_packets_with_their_headers(self):
        data = os.urandom(65536 + 100)
        self.channel.send(data)
        messages = self.peer.receive(self.client.transport.value())
        chunks = [data[:32768], data[32768:65536], data[65536:]]
        self.assertEqual(messages, [(connection.MSG_CHANNEL_DATA, struct.pack(">2L", 7, len(c)) + c) for c in chunks])
        self.assertEqual(self.channel.remoteWindowLeft, (1 << 20) - len(data))

    def test_nothing_after_close(self):
        self.channel.localClosed = True
        self.conn.sendData(self.channel, b"late")
        self.assertEqual(self.client.transport.value(), b"")
