"""
Tests for the C{[store]} table (L{gateway.config.store}) and the etcd
backend's start-up checks of its files (L{gateway.app.fleet.etcd_settings}).
"""

from __future__ import annotations

import datetime
import functools
import os
import traceback
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.app.fleet import CACHE_NAME, EtcdSettings, etcd_settings
from gateway.config import ConfigError, GatewayConfig
from gateway.config.model import DEFAULT_STORE_PROBE_INTERVAL, DEFAULT_STORE_TIMEOUT, StoreConfig
from gateway.config.store import STORE_KEYS
from tests.test_config import ConfigTestCase

PASSWORD = "etcd-pw-5d1e9b"
ETCD_KEYS = tuple(k for k in STORE_KEYS if k not in ("backend", "secret_key_file"))


@dataclass(frozen=True)
class Pem:
    """A self-signed certificate (its own CA) and its key, and a key that is not its."""

    cert: bytes
    key: bytes
    other_key: bytes
    encrypted_key: bytes


@functools.cache
def pem() -> Pem:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "store test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )

    def private(k: ec.EllipticCurvePrivateKey, encryption: ser.KeySerializationEncryption) -> bytes:
        return k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, encryption)

    return Pem(
        cert=cert.public_bytes(ser.Encoding.PEM),
        key=private(key, ser.NoEncryption()),
        other_key=private(other, ser.NoEncryption()),
        encrypted_key=private(key, ser.BestAvailableEncryption(b"pass")),
    )


class StoreTestCase(ConfigTestCase):
    def store(self, body: str, more: str = "") -> GatewayConfig:
        return self.load(f"{more}[store]\n{body}")

    def put(self, name: str, data: bytes, mode: int = 0o600) -> str:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path


class StoreTableTests(StoreTestCase):
    def test_defaults(self) -> None:
        """No [store], an empty one and backend = "etcd" alone: every key at its default."""
        self.assertEqual(self.load("").store, StoreConfig())
        self.assertEqual(self.store("").store, StoreConfig())
        self.assertEqual(
            self.store('backend = "etcd"\n').store,
            StoreConfig(
                backend="etcd",
                secret_key_file=None,
                endpoints=("http://127.0.0.1:2379",),
                prefix="/gateway/",
                timeout=DEFAULT_STORE_TIMEOUT,
                probe_interval=DEFAULT_STORE_PROBE_INTERVAL,
                ca_file=None,
                cert_file=None,
                key_file=None,
                user=None,
                password_file=None,
                cache_file=None,
            ),
        )
        self.assertEqual((DEFAULT_STORE_TIMEOUT, DEFAULT_STORE_PROBE_INTERVAL), (2.0, 1.0))

    def test_every_key(self) -> None:
        """Every key read; paths resolved against the config file's directory."""
        store = self.store(
            'backend = "etcd"\n'
            'endpoints = ["https://10.0.0.1:2379", "https://etcd-b.example:2379/", "http://[::1]:2379"]\n'
            'prefix = "/fleet-a/"\n'
            "timeout = 5\n"
            "probe_interval = 0.1\n"
            'secret_key_file = "store.key"\n'
            'ca_file = "tls/ca.pem"\n'
            'cert_file = "tls/client.pem"\n'
            'key_file = "/etc/gateway/client-key.pem"\n'
            'user = "gw"\n'
            'password_file = "etcd.password"\n'
            'cache_file = "~/cache.json"\n'
        ).store
        self.assertEqual(
            store,
            StoreConfig(
                backend="etcd",
                secret_key_file=self.path("store.key"),
                endpoints=("https://10.0.0.1:2379", "https://etcd-b.example:2379/", "http://[::1]:2379"),
                prefix="/fleet-a/",
                timeout=5.0,
                probe_interval=0.1,
                ca_file=self.path("tls/ca.pem"),
                cert_file=self.path("tls/client.pem"),
                key_file="/etc/gateway/client-key.pem",
                user="gw",
                password_file=self.path("etcd.password"),
                cache_file=os.path.expanduser("~/cache.json"),
            ),
        )

    def test_file_backend(self) -> None:
        """The file backend takes secret_key_file, and refuses every etcd key, naming it."""
        self.assertEqual(self.store('backend = "file"\nsecret_key_file = "k"\n').store.secret_key_file, self.path("k"))
        STRING = '"x"'
        values = {"endpoints": '["http://127.0.0.1:2379"]', "timeout": "1", "probe_interval": "1"}
        for key in ETCD_KEYS:
            text = f"{key} = {values.get(key, STRING)}\n"
            self.assertError(f"[store]\n{text}", f"store.{key}", 'is a key of the etcd backend: set backend = "etcd"')
            self.assertError(f'[store]\nbackend = "file"\n{text}', f"store.{key}", "is a key of the etcd backend")

    def test_backend(self) -> None:
        self.assertError(
            '[store]\nbackend = "consul"\n', "store.backend", "unknown backend 'consul' (expected one of: file, etcd)"
        )
        self.assertError("[store]\nbackend = 1\n", "store.backend", "expected a string, got integer")
        self.assertError('[store]\nbackend = ""\n', "store.backend", "must not be empty")

    def test_not_a_table(self) -> None:
        self.assertError('store = "etcd"\n', "store", "expected a table, got string")

    def test_unknown_key(self) -> None:
        """An unknown key lists the known ones; a near miss names the one meant."""
        self.assertError("[store]\nzzz = 1\n", "store.zzz", f"unknown key (expected one of: {', '.join(STORE_KEYS)})")
        self.assertIn("ca_file, cache_file, cert_file, endpoints", ", ".join(STORE_KEYS))
        self.assertError("[store]\nendpoint = []\n", "store.endpoint", "unknown key (did you mean endpoints?)")


class EndpointTests(StoreTestCase):
    def etcd(self, endpoints: str) -> str:
        return f'[store]\nbackend = "etcd"\nendpoints = {endpoints}\n'

    def test_not_a_list(self) -> None:
        self.assertError(
            self.etcd('"http://127.0.0.1:2379"'), "store.endpoints", "expected an array of strings, got string"
        )
        self.assertError(self.etcd("{ a = 1 }"), "store.endpoints", "expected an array of strings, got table")

    def test_empty(self) -> None:
        self.assertError(self.etcd("[]"), "store.endpoints", "must name at least one etcd member")

    def test_not_a_string(self) -> None:
        self.assertError(self.etcd('["http://a:1", 2379]'), "store.endpoints[1]", "expected a string, got integer")

    def test_bad_url(self) -> None:
        """Each is named by its index, with the URL it is."""
        for url in (
            "127.0.0.1:2379",
            "unix:///run/etcd.sock",
            "ftp://127.0.0.1:2379",
            "http://127.0.0.1",
            "http://:2379",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:x",
            "http://127.0.0.1:0",
            "http://127.0.0.1:2379/v3",
            "http://127.0.0.1:2379?x=1",  # the client appends /v3/... to it
            "http://127.0.0.1:2379/#frag",
            "HTTPS://127.0.0.1:2379",  # would be dialled without the TLS files
            "",
        ):
            self.assertError(
                self.etcd(f'["http://127.0.0.1:2379", "{url}"]'),
                "store.endpoints[1]",
                f"{url!r} is not an etcd client URL (http://HOST:PORT)",
            )

    def test_credentials_in_url(self) -> None:
        """A user or password in a URL is refused without echoing the URL: user and password_file are the way."""
        for url in (f"http://gw:{PASSWORD}@127.0.0.1:2379", f"https://{PASSWORD}@127.0.0.1:2379"):
            e = self.assertError(self.etcd(f'["{url}"]'), "store.endpoints[0]", "set user and password_file")
            self.assertNotIn(PASSWORD, str(e))

    def test_good_urls(self) -> None:
        urls = ["http://127.0.0.1:2379", "https://etcd.example:2379/", "http://[::1]:22379", "https://[fd00::1]:1"]
        self.assertEqual(self.load(self.etcd(repr(urls).replace("'", '"'))).store.endpoints, tuple(urls))


class PairTests(StoreTestCase):
    def test_cert_without_key(self) -> None:
        etcd = '[store]\nbackend = "etcd"\n'
        self.assertError(etcd + 'cert_file = "c.pem"\n', "store.cert_file", "needs key_file too")
        self.assertError(etcd + 'key_file = "k.pem"\n', "store.key_file", "needs cert_file too")
        self.assertEqual(self.load(etcd + 'ca_file = "ca.pem"\n').store.ca_file, self.path("ca.pem"))

    def test_user_without_password(self) -> None:
        etcd = '[store]\nbackend = "etcd"\n'
        self.assertError(etcd + 'user = "gw"\n', "store.user", "needs password_file too")
        self.assertError(etcd + 'password_file = "pw"\n', "store.password_file", "needs user too")
        self.assertError(etcd + 'user = "gw:x"\npassword_file = "pw"\n', "store.user", "must not hold ':'")


class ValueTests(StoreTestCase):
    etcd = '[store]\nbackend = "etcd"\n'

    def test_probe_interval(self) -> None:
        """At least 0.1 s (a probe is a linearizable read through the leader), and the error says so."""
        self.assertEqual(self.load(self.etcd + "probe_interval = 0.1\n").store.probe_interval, 0.1)
        for value in ("0.05", "0", "-1"):
            self.assertError(
                self.etcd + f"probe_interval = {value}\n",
                "store.probe_interval",
                f"must be at least 0.1 seconds, got {value}",
            )
        self.assertError(self.etcd + 'probe_interval = "1s"\n', "store.probe_interval", "expected a number of seconds")

    def test_timeout(self) -> None:
        self.assertEqual(self.load(self.etcd + "timeout = 0.5\n").store.timeout, 0.5)
        self.assertError(self.etcd + "timeout = 0\n", "store.timeout", "must be a positive number of seconds, got 0")
        self.assertError(self.etcd + "timeout = inf\n", "store.timeout", "must be a positive number of seconds")

    def test_prefix(self) -> None:
        self.assertError(self.etcd + 'prefix = ""\n', "store.prefix", "must not be empty")
        self.assertError(self.etcd + 'prefix = "/g\\u0000/"\n', "store.prefix", "must not hold a NUL character")
        self.assertError(self.etcd + 'prefix = "/gw"\n', "store.prefix", "must end with '/' (as in '/gw/')")

    def test_paths(self) -> None:
        for key in ("secret_key_file", "ca_file", "cache_file"):
            self.assertError(self.etcd + f"{key} = 1\n", f"store.{key}", "expected a string, got integer")
            self.assertError(self.etcd + f'{key} = ""\n', f"store.{key}", "must not be empty")


class EtcdSettingsTests(StoreTestCase):
    """etcd_settings: the files read at start-up, each refused naming its key."""

    def settings(self, body: str, more: str = "") -> EtcdSettings:
        return etcd_settings(self.store('backend = "etcd"\n' + body, more))

    def refused(self, body: str, key: str, reason: str) -> ConfigError:
        config = self.store('backend = "etcd"\n' + body)
        e = self.assertRaises(ConfigError, etcd_settings, config)
        self.assertEqual((e.source, e.key), (config.source, key))
        self.assertIn(reason, e.reason)
        for text in (str(e), repr(e), "".join(traceback.format_exception(e))):
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn("PRIVATE KEY", text)
        return e

    def https(self, **files: str) -> str:
        lines = "".join(f'{k} = "{v}"\n' for k, v in files.items())
        return 'endpoints = ["https://127.0.0.1:2379"]\n' + lines

    def test_password(self) -> None:
        """The password file's text, its line end removed; the password stays out of the settings' repr."""
        for text in (f"{PASSWORD}\n", f"{PASSWORD}\r\n", PASSWORD):
            self.put("pw", text.encode())
            settings = self.settings('user = "gw"\npassword_file = "pw"\n')
            self.assertEqual(settings.password, PASSWORD)
            self.assertNotIn(PASSWORD, repr(settings))
            self.assertNotIn(PASSWORD, str(settings))
        self.assertIsNone(self.settings("").password)

    def test_password_mode(self) -> None:
        """A password file others can read is refused naming store.password_file (and saying what to do)."""
        for mode in (0o644, 0o640, 0o604):
            self.put("pw", f"{PASSWORD}\n".encode(), mode)
            e = self.refused('user = "gw"\npassword_file = "pw"\n', "store.password_file", "chmod 600 it")
            self.assertIn(f"mode {mode:04o}", e.reason)

    def test_password_unreadable(self) -> None:
        self.refused('user = "gw"\npassword_file = "none"\n', "store.password_file", "cannot read password file")
        self.put("pw", b"\xff\xfe" + PASSWORD.encode())
        self.refused('user = "gw"\npassword_file = "pw"\n', "store.password_file", "not UTF-8 text")

    def test_tls(self) -> None:
        """A CA and a client certificate: a TLS policy that presents it."""
        files = pem()
        self.put("ca.pem", files.cert, 0o644)
        self.put("client.pem", files.cert, 0o644)
        self.put("client-key.pem", files.key)
        settings = self.settings(self.https(ca_file="ca.pem", cert_file="client.pem", key_file="client-key.pem"))
        self.assertIsNotNone(settings.tls.creatorForNetloc(b"127.0.0.1", 2379))
        self.assertNotIn("PRIVATE", repr(settings))

    def test_tls_system_trust(self) -> None:
        """https without files: the system's CAs (a policy still), no client certificate."""
        self.assertIsNotNone(self.settings(self.https()).tls)
        self.assertIsNone(self.settings("").tls)

    def test_ca_file(self) -> None:
        self.refused(self.https(ca_file="none.pem"), "store.ca_file", "cannot read")
        self.put("ca.pem", b"not a certificate\n", 0o644)
        self.refused(self.https(ca_file="ca.pem"), "store.ca_file", "holds no PEM certificate")
        self.put("ca.pem", pem().key)  # a key where the CA belongs: refused, and not echoed
        self.refused(self.https(ca_file="ca.pem"), "store.ca_file", "holds no PEM certificate")
        os.makedirs(self.path("ca.d"))
        self.refused(self.https(ca_file="ca.d"), "store.ca_file", "cannot read")

    def test_key_file(self) -> None:
        """The client key is a secret file: 0644 is refused naming store.key_file."""
        self.put("client.pem", pem().cert, 0o644)
        self.put("client-key.pem", pem().key, 0o644)
        e = self.refused(self.https(cert_file="client.pem", key_file="client-key.pem"), "store.key_file", "chmod 600")
        self.assertIn("key file", e.reason)
        self.refused(self.https(cert_file="client.pem", key_file="none.pem"), "store.key_file", "cannot read")
        self.put("client-key.pem", pem().cert)  # the certificate twice
        self.refused(
            self.https(cert_file="client.pem", key_file="client-key.pem"), "store.key_file", "no PEM private key"
        )

    def test_key_encrypted(self) -> None:
        """An encrypted key is refused naming store.key_file, never by asking for a passphrase on a terminal."""
        self.put("client.pem", pem().cert, 0o644)
        self.put("client-key.pem", pem().encrypted_key)
        self.refused(self.https(cert_file="client.pem", key_file="client-key.pem"), "store.key_file", "encrypted")

    def test_cert_file(self) -> None:
        self.put("client-key.pem", pem().key)
        self.refused(self.https(cert_file="none.pem", key_file="client-key.pem"), "store.cert_file", "cannot read")
        self.put("client.pem", b"garbage\n", 0o644)
        self.refused(self.https(cert_file="client.pem", key_file="client-key.pem"), "store.cert_file", "not a PEM")
        self.put("client.pem", pem().cert, 0o644)
        self.put("other-key.pem", pem().other_key)
        self.refused(
            self.https(cert_file="client.pem", key_file="other-key.pem"),
            "store.cert_file",
            "not a PEM certificate matching store.key_file's key",
        )

    def test_tls_without_https(self) -> None:
        """TLS files with only http:// endpoints would be ignored: refused instead."""
        self.put("ca.pem", pem().cert, 0o644)
        self.put("client.pem", pem().cert, 0o644)
        self.put("client-key.pem", pem().key)
        http = 'endpoints = ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]\n'
        for files in ('ca_file = "ca.pem"\n', 'cert_file = "client.pem"\nkey_file = "client-key.pem"\n'):
            self.refused(http + files, "store.endpoints", "TLS files are set but no endpoint is https://")
            self.refused(files, "store.endpoints", "no endpoint is https://")  # the default endpoint is http
        mixed = 'endpoints = ["http://127.0.0.1:2379", "https://127.0.0.1:22379"]\nca_file = "ca.pem"\n'
        self.assertIsNotNone(self.settings(mixed).tls)

    def test_cache_file(self) -> None:
        """By default next to [gateway] state_file (or, without it, the default state file)."""
        state = self.path("state/clusters.json")
        settings = self.settings("", more=f'[gateway]\nstate_file = "{state}"\n')
        self.assertEqual(settings.cache_file, self.path(f"state/{CACHE_NAME}"))
        self.assertEqual(CACHE_NAME, "etcd-cache.json")
        old = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, old)
        self.assertEqual(self.settings("").cache_file, os.path.join(self.dir, CACHE_NAME))
        self.assertEqual(self.settings('cache_file = "/var/cache/gw.json"\n').cache_file, "/var/cache/gw.json")
