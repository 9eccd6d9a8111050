"""
Pins on the Conch internals that gateway/ssh/_conch.py relies on.

Each private name is checked for existence, kind and signature (parameter
names; annotations come and go between releases), each private constant for
its value, and every Conch method a gateway.ssh class overrides for the
parameters of the override.  A Twisted upgrade that renames or reshapes one
fails here, by name, instead of somewhere deep in a connection test -- run
against Twisted trunk by tox's C{twisted-trunk} environment.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from twisted.conch.client.knownhosts import PlainEntry
from twisted.conch.ssh import channel, connection, service, transport, userauth
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from gateway.ssh import _conch
from gateway.ssh import auth as auth_module
from gateway.ssh import channel as channel_module
from gateway.ssh import connection as connection_module
from gateway.ssh import exec_channel as exec_channel_module
from gateway.ssh import packets as packets_module
from gateway.ssh import transport as transport_module
from gateway.testing import generate_key, public_line

#: Every gateway.ssh class derived from a Conch class.
OUR_CONCH_SUBCLASSES = (
    _conch.ConchClientTransport,
    transport_module.GatewayClientTransport,
    connection_module.TunnelConnection,
    packets_module.FastSSHCiphers,
    channel_module.OrderedEOFChannel,
    channel_module.ConsumerPacedWindow,
    channel_module.TunnelChannel,
    exec_channel_module.ExecTunnelChannel,
    auth_module.KeyAuthClient,
)


def parameters(function: Callable) -> list[str]:
    return list(inspect.signature(function).parameters)


class PrivateNamesTests(SynchronousTestCase):
    """The private names of _conch.py's docstring, one by one."""

    def assertParameters(self, function: object, expected: list[str]) -> None:
        self.assertTrue(inspect.isfunction(function), f"{function!r} is no longer a function")
        self.assertEqual(parameters(function), expected)

    def test_key_exchange_state(self) -> None:
        base = transport.SSHTransportBase
        self.assertEqual(base._KEY_EXCHANGE_NONE, "_KEY_EXCHANGE_NONE")
        self.assertEqual(base._keyExchangeState, base._KEY_EXCHANGE_NONE)  # the state of a new transport
        self.assertNotEqual(base._KEY_EXCHANGE_REQUESTED, base._KEY_EXCHANGE_NONE)
        self.assertParameters(base._allowedKeyExchangeMessageType, ["self", "messageType"])
        # What may_send_now leans on: KEXINIT waits, NEWKEYS and ECDH go at once.
        allowed = base._allowedKeyExchangeMessageType
        self.assertFalse(allowed(None, transport.MSG_KEXINIT))
        self.assertTrue(allowed(None, transport.MSG_NEWKEYS))
        self.assertTrue(allowed(None, transport.MSG_KEX_DH_GEX_GROUP))
        self.assertFalse(allowed(None, transport.MSG_SERVICE_REQUEST))
        self.assertFalse(allowed(None, connection.MSG_CHANNEL_DATA))

    def test_key_setup_and_version_hooks(self) -> None:
        for cls in (transport.SSHTransportBase, transport.SSHClientTransport):
            self.assertParameters(cls.__dict__["_keySetup"], ["self", "sharedSecret", "exchangeHash"])
        self.assertParameters(transport.SSHTransportBase._unsupportedVersionReceived, ["self", "remoteVersion"])

    def test_key_derivation(self) -> None:
        # _getKey is overridden with our exchange's hash; _keySetup calls it per letter.
        self.assertParameters(transport.SSHTransportBase._getKey, ["self", "c", "sharedSecret", "exchangeHash"])
        self.assertIn("self._getKey(", inspect.getsource(transport.SSHTransportBase._keySetup))

    def test_the_base_kexinit_answers_and_the_client_one_starts_conchs_exchange(self) -> None:
        # What ConchClientTransport.ssh_KEXINIT relies on: the base class
        # negotiates and sends our KEXINIT; only the client class's starts
        # Conch's own exchange (which ours replaces).
        base = inspect.getsource(transport.SSHTransportBase.ssh_KEXINIT)
        self.assertIn("self.sendKexInit()", base)
        self.assertIn("return kexAlgs, keyAlgs, rest", base)
        client = inspect.getsource(transport.SSHClientTransport.ssh_KEXINIT)
        self.assertIn("SSHTransportBase.ssh_KEXINIT(self, packet)", client)
        self.assertIn("sendKexInit()", inspect.getsource(transport.SSHTransportBase.connectionMade))

    def test_cipher_internals(self) -> None:
        self.assertParameters(transport.SSHCiphers._getCipher, ["self", "cip", "iv", "key"])
        self.assertParameters(transport.SSHCiphers._getMAC, ["self", "mac", "key"])
        ciphers = transport.SSHCiphers(b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256")
        cipher = _conch.conch_cipher(ciphers, b"aes128-ctr", bytes(16), bytes(16))
        self.assertEqual(cipher.algorithm.block_size, 128)
        params = _conch.conch_mac(ciphers, b"hmac-sha2-256", b"k" * 32)
        self.assertEqual(params[3], 32)  # digest size, read as verifyDigestSize
        self.assertEqual(_conch.mac_key(params)[:32], b"k" * 32)  # padded to the hash's block
        self.assertEqual(_conch.conch_mac(ciphers, b"none", b""), (None, b"", b"", 0))

    def test_known_hosts_entry_patterns(self) -> None:
        entry = PlainEntry.fromString(b"node-1,!node-2,10.0.0.* " + public_line(generate_key()).encode())
        self.assertEqual(_conch.entry_host_patterns(entry), [b"node-1", b"!node-2", b"10.0.0.*"])

    def test_conch_classes_log_through_a_class_logger(self) -> None:
        # A class attribute (not one made per instance), which a subclass's replaces.
        for cls in (transport.SSHTransportBase, connection.SSHConnection, channel.SSHChannel, service.SSHService):
            self.assertIsInstance(cls.__dict__.get("_log"), Logger, cls.__name__)
        self.assertTrue(issubclass(userauth.SSHUserAuthClient, service.SSHService))

    def test_the_ecdh_reply_shares_the_group_message_number(self) -> None:
        # ssh_KEX_DH_GEX_GROUP is where Conch's client handles KEX_ECDH_REPLY.
        self.assertEqual(transport.MSG_KEX_DH_GEX_GROUP, 31)
        self.assertIn("ssh_KEX_DH_GEX_GROUP", transport.SSHClientTransport.__dict__)

    def test_kexinit_sets_what_the_override_rewrites(self) -> None:
        source = inspect.getsource(transport.SSHTransportBase.ssh_KEXINIT)
        self.assertIn("self.otherKexInitPayload =", source)
        self.assertIn("self.nextEncryptions =", source)


class OverridesTests(SynchronousTestCase):
    """Conch methods we override: still there, with our parameters, and all listed."""

    def test_each_listed_method_exists_with_our_parameters(self) -> None:
        for conch_class, names in _conch.OVERRIDDEN.items():
            for name in names:
                theirs = getattr(conch_class, name, None)
                self.assertTrue(callable(theirs), f"{conch_class.__name__}.{name} is gone")
                for ours in OUR_CONCH_SUBCLASSES:
                    if issubclass(ours, conch_class) and name in ours.__dict__:
                        self.assertEqual(
                            parameters(ours.__dict__[name]),
                            parameters(theirs),
                            f"{ours.__name__}.{name} no longer matches {conch_class.__name__}.{name}",
                        )

    def test_every_override_is_listed(self) -> None:
        for ours in OUR_CONCH_SUBCLASSES:
            (conch_class,) = [c for c in _conch.OVERRIDDEN if issubclass(ours, c)]
            for name, value in ours.__dict__.items():
                if callable(value) and not name.startswith("__") and hasattr(conch_class, name):
                    self.assertIn(name, _conch.OVERRIDDEN[conch_class], f"{ours.__name__}.{name}")


class QuietConchLogsTests(SynchronousTestCase):
    def test_only_warnings_and_worse_reach_the_observers(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        @_conch.quiet_conch_logs("tests.chatty")
        class Chatty:
            pass

        chatty = Chatty()
        self.assertIs(chatty._log, Chatty._log)  # no new Logger per access
        chatty._log.debug("kex step")
        chatty._log.info("channel opened")
        chatty._log.warn("window overrun")
        chatty._log.error("Got remote error")
        ours = [e for e in events if e.get("log_namespace") == "tests.chatty"]
        self.assertEqual([e["log_format"] for e in ours], ["window overrun", "Got remote error"])


class QuietEtcdPoolTests(SynchronousTestCase):
    def test_the_pool_builds_connections_from_its_factory_attribute(self) -> None:
        """gateway.store.etcd.client silences the pool's per-connection log lines through C{_factory}."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

        from gateway.store.etcd.client import EtcdClient

        self.assertIs(HTTPConnectionPool._factory, _HTTP11ClientFactory)
        client = EtcdClient(MemoryReactorClock(), ["http://127.0.0.1:2379"], timeout=1)
        self.assertFalse(client._pool._factory.noisy)
