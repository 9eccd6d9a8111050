"""
Tests for L{gateway.config}.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import ipaddress
import os
import traceback
import types
from collections.abc import Iterator

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh.common import NS
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EXEC_COMMAND,
    DEFAULT_REKEY_BYTES,
    DEFAULT_WINDOW_SIZE,
    ClusterConfig,
    ConfigError,
    GatewayConfig,
    GatewaySettings,
    ListenConfig,
    ProxyAddress,
    load_config,
    parse_cluster,
    parse_config,
    parse_proxy_address,
    parse_size,
)
from gateway.config.model import DEFAULT_RESOLVE_TTL, DEFAULT_RESOLVER_COMMAND

PASSPHRASE = "correct horse battery staple"
TOKEN = "tok-7a1b9c3d5e"
OTHER_TOKEN = "tok-from-file-0042"


@dataclasses.dataclass(frozen=True)
class Material:
    """Key files generated once for the whole module."""

    files: dict[str, bytes]
    ed25519_public: str
    ecdsa_public: str
    rsa_public_blob: str

    def secrets(self) -> Iterator[str]:
        """Strings that must never show in errors or reprs."""
        yield PASSPHRASE
        yield TOKEN
        yield OTHER_TOKEN
        for name, data in self.files.items():
            if not name.startswith("id_") or name.endswith(".pub"):
                continue
            for line in data.decode("ascii").splitlines():
                if line and not line.startswith("-----") and ":" not in line:
                    yield line


@functools.cache
def material() -> Material:
    r = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = ed25519.Ed25519PrivateKey.generate()
    c = ec.generate_private_key(ec.SECP256R1())
    pw = ser.BestAvailableEncryption(PASSPHRASE.encode())
    files = {
        "id_rsa": r.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, ser.NoEncryption()),
        "id_rsa_enc": r.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, pw),
        "id_rsa_pkcs8_enc": r.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, pw),
        "id_ed25519": e.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()),
        "id_ed25519_pkcs8": e.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()),
        "id_ecdsa": c.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, ser.NoEncryption()),
        "id_ed25519.pub": e.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH) + b" me@host\n",
    }
    ed_pub = files["id_ed25519.pub"].decode().strip()
    ec_pub = c.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    rsa_pub = r.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    files["known_hosts"] = f"10.250.1.2 {ed_pub}\n".encode()
    files["token"] = f"\n  {OTHER_TOKEN}  \n".encode()
    files["passphrase"] = f"{PASSPHRASE}\n".encode()
    files["empty"] = b""
    files["garbage"] = b"this is not a key at all\n"
    return Material(files, ed_pub, ec_pub.decode(), rsa_pub.decode().split()[1])


EXAMPLE = """\
[listen]
socks = "tcp:1080:interface=127.0.0.1"     # Twisted endpoint strings: unix: and ssl: work too
http  = "tcp:3128:interface=127.0.0.1"

[clusters.cluster-a]
aliases = ["net-aaaa"]                     # e.g. the cluster's neutron network id
proxies = ["10.250.1.2:22", "10.250.1.3:22"]   # the proxy node, in failover order
user = "root"
key_file = "/path/to/id_rsa"               # or: key = \"\"\"-----BEGIN ... (PEM text, kept in memory)\"\"\"
known_hosts = "/path/to/known_hosts"       # or: host_keys = ["ssh-ed25519 AAAA..."]
networks = ["10.251.0.0/24"]               # destinations this cluster may reach / routes by
token = "secret"                           # optional: required as SOCKS/HTTP proxy password when set
"""


class ConfigTestCase(SynchronousTestCase):
    """Writes the key material and config files into a temporary directory."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.m = material()
        for name, data in self.m.files.items():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(self.dir, name), 0o600)  # as an operator must

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, text: str, name: str = "gateway.toml") -> str:
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def cluster_toml(self, name: str = "a", **overrides: str | None) -> str:
        """A valid cluster table; overrides replace (None removes) lines."""
        lines = {
            "proxies": '["10.250.1.2"]',
            "user": '"root"',
            "key_file": f"'{self.path('id_ed25519')}'",
            "known_hosts": f"'{self.path('known_hosts')}'",
            "networks": '["10.251.0.0/24"]',
        }
        lines.update(overrides)
        body = "".join(f"{k} = {v}\n" for k, v in lines.items() if v is not None)
        return f"[clusters.{name}]\n{body}"

    def load(self, text: str) -> GatewayConfig:
        return load_config(self.write(text))

    def assertNoSecrets(self, text: str) -> None:
        for secret in self.m.secrets():
            self.assertNotIn(secret, text)
        self.assertNotIn("PRIVATE KEY", text)
        self.assertNotIn("Private Key", text)

    def assertError(self, text: str, key: str, reason: str) -> ConfigError:
        """
        Loading C{text} fails with C{key}, a reason containing C{reason}, and
        the file name, and no secret shows anywhere in the error.
        """
        path = self.write(text)
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(e.source, path)
        self.assertEqual(e.key, key)
        self.assertIn(reason, e.reason)
        self.assertEqual(str(e), f"{path}: {key}: {e.reason}")
        self.assertNoSecrets(str(e))
        self.assertNoSecrets(repr(e))
        self.assertNoSecrets("".join(traceback.format_exception(e)))
        return e


class ExampleTests(ConfigTestCase):
    def example(self) -> str:
        return EXAMPLE.replace("/path/to/id_rsa", self.path("id_rsa")).replace(
            "/path/to/known_hosts", self.path("known_hosts")
        )

    def test_example(self) -> None:
        """The documented example loads with every field as expected."""
        path = self.write(self.example())
        config = load_config(path)
        self.assertEqual(config.source, path)
        self.assertEqual(
            config.listen,
            ListenConfig(socks=("tcp:1080:interface=127.0.0.1",), http=("tcp:3128:interface=127.0.0.1",)),
        )
        self.assertEqual(list(config.clusters), ["cluster-a"])
        c = config.clusters["cluster-a"]
        self.assertEqual(c.name, "cluster-a")
        self.assertEqual(c.aliases, ("net-aaaa",))
        self.assertEqual(c.names(), ("cluster-a", "net-aaaa"))
        self.assertEqual(c.proxies, (ProxyAddress("10.250.1.2", 22), ProxyAddress("10.250.1.3", 22)))
        self.assertEqual(c.user, "root")
        self.assertEqual(c.private_key.type(), "RSA")
        self.assertFalse(c.private_key.isPublic())
        self.assertEqual(c.known_hosts, self.path("known_hosts"))
        self.assertEqual(c.host_keys, ())
        self.assertFalse(c.insecure_accept_any_host_key)
        self.assertEqual(c.networks, (ipaddress.ip_network("10.251.0.0/24"),))
        self.assertEqual(c.hostnames, ())
        self.assertEqual(c.token, "secret")
        self.assertEqual(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT)
        self.assertEqual(c.window_size, DEFAULT_WINDOW_SIZE)
        self.assertEqual(DEFAULT_WINDOW_SIZE, 2 * 1024 * 1024)

    def test_immutable(self) -> None:
        config = self.load(self.example())
        self.assertIsInstance(config.clusters, types.MappingProxyType)
        with self.assertRaises(TypeError):
            config.clusters["x"] = config.clusters["cluster-a"]  # type: ignore[index]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.clusters["cluster-a"].user = "x"  # type: ignore[misc]
        # hashable despite holding keys.Key objects, and equal to itself
        c = config.clusters["cluster-a"]
        self.assertEqual({c: 1}[c], 1)
        self.assertEqual(c, dataclasses.replace(c))

    def test_relative_paths(self) -> None:
        """Relative file paths resolve against the config file's directory."""
        text = self.example().replace(self.path("id_rsa"), "id_rsa")
        text = text.replace(self.path("known_hosts"), "./known_hosts")
        old = os.getcwd()
        os.chdir("/")
        self.addCleanup(os.chdir, old)
        c = load_config(self.write(text)).clusters["cluster-a"]
        self.assertEqual(c.known_hosts, self.path("known_hosts"))
        self.assertEqual(c.private_key.type(), "RSA")

    def test_parse_config_base_dir(self) -> None:
        data = {
            "clusters": {
                "a": {
                    "proxies": ["p"],
                    "user": "u",
                    "key_file": "id_ecdsa",
                    "known_hosts": "known_hosts",
                    "networks": ["10.0.0.0/8"],
                }
            }
        }
        config = parse_config(data, "mem", base_dir=self.dir)
        self.assertEqual(config.source, "mem")
        self.assertEqual(config.clusters["a"].private_key.type(), "EC")
        e = self.assertRaises(ConfigError, parse_config, data, "mem", os.path.dirname(self.dir))
        self.assertEqual(e.key, "clusters.a.key_file")

    def test_no_secrets_in_repr(self) -> None:
        text = (
            self.cluster_toml("a", key_file=f"'{self.path('id_rsa_enc')}'", token=f'"{TOKEN}"')
            + f'passphrase = "{PASSPHRASE}"\n'
            + self.cluster_toml("b", key_file=None, key=f"'''{self.m.files['id_ecdsa'].decode()}'''")
            + f"token_file = '{self.path('token')}'\n"
        )
        config = self.load(text)
        self.assertEqual(config.clusters["a"].token, TOKEN)
        self.assertEqual(config.clusters["b"].token, OTHER_TOKEN)
        for c in config.clusters.values():
            self.assertNoSecrets(repr(c))
            self.assertNoSecrets(str(c))
            self.assertNotIn("private_key", repr(c))
            self.assertNotIn("token", repr(c))
        self.assertNoSecrets(repr(config))


class KeyTests(ConfigTestCase):
    def cluster(self, **overrides: str | None) -> ClusterConfig:
        return self.load(self.cluster_toml("a", **overrides)).clusters["a"]

    def test_key_types(self) -> None:
        for name, kind in [
            ("id_rsa", "RSA"),
            ("id_ed25519", "Ed25519"),
            ("id_ecdsa", "EC"),
            ("id_ed25519_pkcs8", "Ed25519"),
        ]:
            c = self.cluster(key_file=f"'{self.path(name)}'")
            self.assertEqual(c.private_key.type(), kind)
            self.assertFalse(c.private_key.isPublic())

    def test_encrypted_with_passphrase(self) -> None:
        for name in ("id_rsa_enc", "id_rsa_pkcs8_enc"):
            c = self.cluster(key_file=f"'{self.path(name)}'", passphrase=f'"{PASSPHRASE}"')
            self.assertEqual(c.private_key.type(), "RSA")
            self.assertFalse(c.private_key.isPublic())

    def test_passphrase_file(self) -> None:
        c = self.cluster(key_file=f"'{self.path('id_rsa_enc')}'", passphrase_file="'passphrase'")
        self.assertEqual(c.private_key.type(), "RSA")

    def test_passphrase_on_plain_key(self) -> None:
        """A passphrase for an unencrypted key is harmless."""
        c = self.cluster(key_file=f"'{self.path('id_rsa')}'", passphrase='"unused"')
        self.assertEqual(c.private_key.type(), "RSA")

    def test_inline_key(self) -> None:
        for name, kind in [("id_rsa", "RSA"), ("id_ed25519", "Ed25519")]:
            pem = self.m.files[name].decode()
            c = self.cluster(key_file=None, key=f'"""\n{pem}"""')
            self.assertEqual(c.private_key.type(), kind)
            self.assertNoSecrets(repr(c))

    def test_inline_encrypted_key(self) -> None:
        pem = self.m.files["id_rsa_enc"].decode()
        c = self.cluster(key_file=None, key=f"'''{pem}'''", passphrase=f"'{PASSPHRASE}'")
        self.assertEqual(c.private_key.type(), "RSA")

    def test_host_keys(self) -> None:
        c = self.cluster(
            known_hosts=None,
            host_keys=f'["{self.m.ed25519_public}", "{self.m.ecdsa_public}"]',
        )
        self.assertIsNone(c.known_hosts)
        self.assertEqual([k.sshType() for k in c.host_keys], [b"ssh-ed25519", b"ecdsa-sha2-nistp256"])
        self.assertTrue(all(k.isPublic() for k in c.host_keys))

    def test_host_ca_keys(self) -> None:
        cas = f'["{self.m.ed25519_public}", "{self.m.ecdsa_public}"]'
        alone = self.cluster(known_hosts=None, host_ca_keys=cas)
        self.assertEqual([k.sshType() for k in alone.host_ca_keys], [b"ssh-ed25519", b"ecdsa-sha2-nistp256"])
        self.assertIsNone(alone.known_hosts)
        beside = self.cluster(host_ca_keys=cas)  # a CA adds to known_hosts
        self.assertEqual((beside.known_hosts, len(beside.host_ca_keys)), (self.path("known_hosts"), 2))
        self.assertEqual(self.cluster().host_ca_keys, ())

    def test_insecure(self) -> None:
        c = self.cluster(known_hosts=None, insecure_accept_any_host_key="true")
        self.assertTrue(c.insecure_accept_any_host_key)
        self.assertIsNone(c.known_hosts)
        self.assertEqual(c.host_keys, ())


class OtherValuesTests(ConfigTestCase):
    def test_all_optional_values(self) -> None:
        c = self.load(
            self.cluster_toml(
                '"a.b_c-1"',  # a dot needs quoting in TOML
                aliases='["x", "Y.2"]',
                proxies='["gw.example.com", "[fd00::1]:2222", "fd00::2", "10.0.0.1:2200"]',
                networks='["10.0.0.0/8", "fd00::/64", "192.168.1.7"]',
                hostnames='["*.Svc.Cluster.Local.", "db"]',
                connect_timeout="5",
                window_size=str(64 * 1024),
                token_file="'token'",
            )
        ).clusters["a.b_c-1"]
        self.assertEqual(c.aliases, ("x", "Y.2"))
        self.assertEqual(
            [str(p) for p in c.proxies],
            ["gw.example.com:22", "[fd00::1]:2222", "[fd00::2]:22", "10.0.0.1:2200"],
        )
        self.assertEqual([str(n) for n in c.networks], ["10.0.0.0/8", "fd00::/64", "192.168.1.7/32"])
        self.assertEqual(c.hostnames, ("*.svc.cluster.local", "db"))
        self.assertEqual(c.connect_timeout, 5.0)
        self.assertIsInstance(c.connect_timeout, float)
        self.assertEqual(c.window_size, 65536)
        self.assertEqual(c.token, OTHER_TOKEN)

    def test_hostnames_without_networks(self) -> None:
        c = self.load(self.cluster_toml(networks=None, hostnames='["*.internal"]')).clusters["a"]
        self.assertEqual(c.networks, ())
        self.assertEqual(c.hostnames, ("*.internal",))

    def test_no_token(self) -> None:
        self.assertIsNone(self.load(self.cluster_toml()).clusters["a"].token)

    def test_zero_clusters(self) -> None:
        for text in ("", "[listen]\n", "[clusters]\n"):
            config = self.load(text)
            self.assertEqual(dict(config.clusters), {})
            self.assertEqual(config.listen, ListenConfig())
        self.assertEqual(
            ListenConfig(),
            ListenConfig(("tcp:1080:interface=127.0.0.1",), ("tcp:3128:interface=127.0.0.1",)),
        )

    def test_listen_forms(self) -> None:
        sock = self.path("gw.sock")
        config = self.load(f'[listen]\nsocks = ["tcp:1081", "unix:{sock}"]\nhttp = ""\n')
        self.assertEqual(config.listen, ListenConfig(("tcp:1081", f"unix:{sock}"), ()))
        config = self.load("[listen]\nsocks = []\n")
        self.assertEqual(config.listen, ListenConfig((), ("tcp:3128:interface=127.0.0.1",)))

    def test_proxy_addresses(self) -> None:
        cases = {
            "h": ProxyAddress("h", 22),
            "h.example:2222": ProxyAddress("h.example", 2222),
            "10.0.0.1": ProxyAddress("10.0.0.1", 22),
            "[::1]:23": ProxyAddress("::1", 23),
            "[::1]": ProxyAddress("::1", 22),
            "fe80::1": ProxyAddress("fe80::1", 22),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_proxy_address(text), expected)
        self.assertEqual(str(ProxyAddress("::1", 23)), "[::1]:23")
        self.assertEqual(str(ProxyAddress("h", 22)), "h:22")

    def test_parse_cluster_directly(self) -> None:
        """The REST API validates one cluster body with parse_cluster."""
        body = {"proxies": ["p:22"], "networks": ["10.0.0.0/24"], "host_keys": [self.m.ed25519_public]}
        defaults = {"user": "root", "key_file": "id_ed25519", "known_hosts": "known_hosts"}
        c = parse_cluster("api-1", body, "API", "body", self.dir, defaults)
        self.assertEqual(c.user, "root")
        self.assertIsNone(c.known_hosts)  # host_keys overrides the defaults' known_hosts
        self.assertEqual(len(c.host_keys), 1)
        e = self.assertRaises(
            ConfigError, parse_cluster, "api-1", {**body, "user": 5}, "API", "body", self.dir, defaults
        )
        self.assertEqual(str(e), "API: body.user: expected a string, got integer")
        e = self.assertRaises(ConfigError, parse_cluster, "bad name", body, "API", "body")
        self.assertEqual(e.key, "body")


class DefaultsTests(ConfigTestCase):
    def test_shared(self) -> None:
        text = (
            "[defaults]\n"
            'user = "ops"\n'
            f"key_file = '{self.path('id_rsa_enc')}'\n"
            f"passphrase = '{PASSPHRASE}'\n"
            "known_hosts = 'known_hosts'\n"
            "connect_timeout = 3.5\n"
            f"window_size = {1024 * 1024}\n"
            "[clusters.a]\n"
            'proxies = ["p1"]\n'
            'networks = ["10.1.0.0/16"]\n'
            "[clusters.b]\n"
            'proxies = ["p2"]\n'
            'networks = ["10.2.0.0/16"]\n'
            'user = "root"\n'
            f"key = '''{self.m.files['id_ed25519'].decode()}'''\n"
            f'host_keys = ["{self.m.ed25519_public}"]\n'
            "connect_timeout = 1\n"
        )
        config = self.load(text)
        a, b = config.clusters["a"], config.clusters["b"]
        self.assertEqual((a.user, b.user), ("ops", "root"))
        self.assertEqual((a.private_key.type(), b.private_key.type()), ("RSA", "Ed25519"))
        self.assertEqual((a.known_hosts, b.known_hosts), (self.path("known_hosts"), None))
        self.assertEqual((len(a.host_keys), len(b.host_keys)), (0, 1))
        self.assertEqual((a.connect_timeout, b.connect_timeout), (3.5, 1.0))
        self.assertEqual(a.window_size, b.window_size)

    def test_shared_ca(self) -> None:
        text = f'[defaults]\nhost_ca_keys = ["{self.m.ed25519_public}"]\n' + self.cluster_toml("a")
        text += self.cluster_toml("b", known_hosts=None, insecure_accept_any_host_key="true")
        a, b = self.load(text).clusters.values()
        self.assertEqual((len(a.host_ca_keys), a.known_hosts), (1, self.path("known_hosts")))
        self.assertEqual((b.host_ca_keys, b.insecure_accept_any_host_key), ((), True))

    def test_insecure_overrides_known_hosts(self) -> None:
        text = "[defaults]\nknown_hosts = 'known_hosts'\n" + self.cluster_toml(
            known_hosts=None, insecure_accept_any_host_key="true"
        )
        c = self.load(text).clusters["a"]
        self.assertTrue(c.insecure_accept_any_host_key)
        self.assertIsNone(c.known_hosts)

    def test_errors_name_defaults(self) -> None:
        self.assertError("[defaults]\nuser = 1\n", "defaults.user", "expected a string, got integer")
        self.assertError(
            "[defaults]\nkey_file = 'missing'\n",
            "defaults.key_file",
            f"cannot read key file {self.path('missing')!r}: No such file or directory",
        )
        self.assertError(
            "[defaults]\nknown_hosts = 'missing'\n", "defaults.known_hosts", "cannot read known_hosts file"
        )
        self.assertError(
            "[defaults]\nkey_file = 'id_rsa_enc'\n",
            "defaults.key_file",
            "key is encrypted: set passphrase",
        )
        self.assertError(
            "[defaults]\nkey_file = 'id_rsa_enc'\npassphrase = 'nope'\n",
            "defaults.passphrase",
            "wrong passphrase",
        )
        self.assertError("[defaults]\nconnect_timeout = 0\n", "defaults.connect_timeout", "positive")
        self.assertError("[defaults]\nbogus = 1\n", "defaults.bogus", "unknown key")
        for key in ("token", "token_file", "aliases", "proxies", "networks", "hostnames", "host_keys"):
            self.assertError(f"[defaults]\n{key} = 1\n", f"defaults.{key}", "cannot be set in [defaults]")
        self.assertError("defaults = 1\n", "defaults", "expected a table, got integer")

    def test_missing_from_cluster_and_defaults(self) -> None:
        self.assertError(self.cluster_toml(user=None), "clusters.a.user", "missing: set user here or in [defaults]")
        self.assertError(
            self.cluster_toml(key_file=None, passphrase="'x'"),
            "clusters.a.passphrase",
            "passphrase given but no key_file or key",
        )

    def test_passphrase_override(self) -> None:
        """A cluster's passphrase replaces the defaults' one, keeping its key_file."""
        defaults = "[defaults]\nkey_file = 'id_rsa_enc'\npassphrase_file = 'passphrase'\n"
        c = self.load(defaults + self.cluster_toml(key_file=None, passphrase=f"'{PASSPHRASE}'")).clusters["a"]
        self.assertEqual(c.private_key.type(), "RSA")
        self.assertError(
            defaults + self.cluster_toml(key_file=None, passphrase="'wrong'"),
            "clusters.a.passphrase",
            "wrong passphrase",
        )
        # a cluster's own key_file drops the defaults' passphrase with it
        c = self.load(defaults + self.cluster_toml()).clusters["a"]
        self.assertEqual(c.private_key.type(), "Ed25519")

    def test_insecure_false_keeps_known_hosts(self) -> None:
        text = "[defaults]\nknown_hosts = 'known_hosts'\n" + self.cluster_toml(
            known_hosts=None, insecure_accept_any_host_key="false"
        )
        c = self.load(text).clusters["a"]
        self.assertEqual(c.known_hosts, self.path("known_hosts"))
        self.assertFalse(c.insecure_accept_any_host_key)


class ErrorTests(ConfigTestCase):
    """Every validation error names the file, the key and the reason."""

    def test_file_errors(self) -> None:
        missing = self.path("nope.toml")
        e = self.assertRaises(ConfigError, load_config, missing)
        self.assertEqual(str(e), f"{missing}: (file): cannot read: No such file or directory")
        e = self.assertError('[listen]\nsocks = "tcp:1"\nhttp = \n', "(file)", "not valid TOML")
        self.assertIn("(at line 3, column", e.reason)
        path = self.path("bin.toml")
        with open(path, "wb") as f:
            f.write(b"a = '\xff'\n")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual((e.key, e.reason), ("(file)", "not UTF-8 text (byte offset 5)"))
        e = self.assertRaises(ConfigError, load_config, self.dir)
        self.assertEqual(e.key, "(file)")

    def test_unknown_keys(self) -> None:
        self.assertError(
            "bogus = 1\n", "bogus", "unknown key (expected one of: clusters, defaults, gateway, listen, store)"
        )
        self.assertError(
            "[listen]\nftp = 'tcp:21'\n", "listen.ftp", "unknown key (expected one of: control, http, socks)"
        )
        self.assertError("[defaults]\n'a b' = 1\n", 'defaults."a b"', "unknown key")
        self.assertError(self.cluster_toml(prxies='["x"]'), "clusters.a.prxies", "unknown key (did you mean proxies?)")
        self.assertError(
            self.cluster_toml(colour='"x"'),
            "clusters.a.colour",
            "unknown key (expected one of: aliases, allow_sha1_signatures, ciphers, connect_timeout, connections, ",
        )
        self.assertError("[listen]\nsock = 'tcp:1'\n", "listen.sock", "unknown key (did you mean socks?)")
        self.assertError(self.cluster_toml() + "[clusters.a.sub]\nx = 1\n", "clusters.a.sub", "unknown key")

    def test_wrong_types(self) -> None:
        cases = [
            ("proxies", '"x"', "clusters.a.proxies", "expected an array of strings, got string"),
            ("proxies", "[22]", "clusters.a.proxies[0]", "expected a string, got integer"),
            ("user", "1", "clusters.a.user", "expected a string, got integer"),
            ("aliases", '"x"', "clusters.a.aliases", "expected an array of strings, got string"),
            ("networks", '"10.0.0.0/8"', "clusters.a.networks", "expected an array of strings, got string"),
            ("networks", '["10.0.0.0/8", 1]', "clusters.a.networks[1]", "expected a string, got integer"),
            ("hostnames", "{}", "clusters.a.hostnames", "expected an array of strings, got table"),
            (
                "insecure_accept_any_host_key",
                '"true"',
                "clusters.a.insecure_accept_any_host_key",
                "expected a boolean (true or false), got string",
            ),
            ("connect_timeout", '"5"', "clusters.a.connect_timeout", "expected a number of seconds, got string"),
            ("connect_timeout", "true", "clusters.a.connect_timeout", "expected a number of seconds, got boolean"),
            ("window_size", "65536.0", "clusters.a.window_size", "expected an integer (bytes), got float"),
            ("token", "1234", "clusters.a.token", "expected a string, got integer"),
            ("key_file", "[]", "clusters.a.key_file", "expected a string, got array"),
            ("known_hosts", "1979-05-27", "clusters.a.known_hosts", "expected a string, got date/time"),
            ("host_keys", '"ssh-ed25519 AAAA"', "clusters.a.host_keys", "expected an array of strings"),
        ]
        for name, value, key, reason in cases:
            overrides: dict[str, str | None] = {name: value}
            if name == "host_keys":
                overrides["known_hosts"] = None
            self.assertError(self.cluster_toml(**overrides), key, reason)
        self.assertError(
            "[defaults]\npassphrase = 1\nkey_file = 'id_rsa'\n", "defaults.passphrase", "expected a string, got integer"
        )
        self.assertError("listen = 1\n", "listen", "expected a table, got integer")
        self.assertError("clusters = 1\n", "clusters", "expected a table, got integer")
        self.assertError("clusters = {a = 1}\n", "clusters.a", "expected a table, got integer")
        self.assertError(
            "[listen]\nsocks = 1080\n", "listen.socks", "expected a string or an array of strings, got integer"
        )
        self.assertError("[listen]\nhttp = ['tcp:1', 2]\n", "listen.http[1]", "expected a string, got integer")

    def test_bad_numbers(self) -> None:
        for value in ("0", "-1", "nan", "inf"):
            self.assertError(
                self.cluster_toml(connect_timeout=value),
                "clusters.a.connect_timeout",
                "must be a positive number of seconds",
            )
        for value in ("32767", str(64 * 1024 * 1024 + 1)):
            self.assertError(
                self.cluster_toml(window_size=value),
                "clusters.a.window_size",
                "must be between 32768 (32 KiB) and 67108864 (64 MiB)",
            )

    def test_networks(self) -> None:
        e = self.assertError(
            self.cluster_toml("cluster-a", networks='["10.251.0.0/24", "10.0.0.0/33"]'),
            "clusters.cluster-a.networks[1]",
            "'10.0.0.0/33' is not a valid network (",
        )
        self.assertEqual(e.source + ": " + e.key, f"{e.source}: clusters.cluster-a.networks[1]")
        self.assertError(
            self.cluster_toml(networks='["10.0.0.1/24"]'),
            "clusters.a.networks[0]",
            "'10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)",
        )
        self.assertError(
            self.cluster_toml(networks='["fd00::1/64"]'),
            "clusters.a.networks[0]",
            "has host bits set (did you mean fd00::/64?)",
        )
        self.assertError(
            self.cluster_toml(networks='["banana"]'), "clusters.a.networks[0]", "'banana' is not a valid network"
        )
        self.assertError(self.cluster_toml(networks='["::ffff:10.0.0.0/120"]'), "clusters.a.networks[0]", "IPv4-mapped")
        self.assertError(
            self.cluster_toml(networks=None),
            "clusters.a.networks",
            "at least one network is needed (unless hostnames is set)",
        )
        self.assertError(
            self.cluster_toml(networks="[]", hostnames="[]"), "clusters.a.networks", "at least one network is needed"
        )

    def test_hostnames(self) -> None:
        self.assertError(
            self.cluster_toml(hostnames='["a b"]'), "clusters.a.hostnames[0]", "'a b' is not a valid host name pattern"
        )
        self.assertError(
            self.cluster_toml(hostnames='[""]'), "clusters.a.hostnames[0]", "is not a valid host name pattern"
        )
        self.assertError(
            self.cluster_toml(hostnames='["10.0.0.1"]'),
            "clusters.a.hostnames[0]",
            "is an IP address: list addresses in networks",
        )

    def test_private_key_errors(self) -> None:
        def key_file(name: str) -> str:
            return f"'{self.path(name)}'"

        self.assertError(
            self.cluster_toml(key_file=key_file("missing")),
            "clusters.a.key_file",
            f"cannot read key file {self.path('missing')!r}: No such file or directory",
        )
        self.assertError(self.cluster_toml(key_file=key_file("")), "clusters.a.key_file", "cannot read key file")
        self.assertError(self.cluster_toml(key_file='""'), "clusters.a.key_file", "must not be empty")
        self.assertError(
            self.cluster_toml(key_file="'/dev/zero'"),
            "clusters.a.key_file",
            "key file '/dev/zero' is larger than 1048576 bytes",
        )
        for name in ("garbage", "empty", "known_hosts"):
            self.assertError(
                self.cluster_toml(key_file=key_file(name)), "clusters.a.key_file", "not a valid private key"
            )
        self.assertError(
            self.cluster_toml(key_file=key_file("id_ed25519.pub")),
            "clusters.a.key_file",
            "this is a public key: a private key is needed",
        )
        for name in ("id_rsa_enc", "id_rsa_pkcs8_enc"):
            self.assertError(
                self.cluster_toml(key_file=key_file(name)), "clusters.a.key_file", "key is encrypted: set passphrase"
            )
            self.assertError(
                self.cluster_toml(key_file=key_file(name), passphrase='"wrong"'),
                "clusters.a.passphrase",
                "wrong passphrase",
            )
            self.assertError(
                self.cluster_toml(key_file=key_file(name), passphrase_file="'garbage'"),
                "clusters.a.passphrase_file",
                "wrong passphrase",
            )
        self.assertError(
            self.cluster_toml(key_file=None), "clusters.a.key_file", "missing private key: set key_file or key"
        )
        self.assertError(self.cluster_toml(key='"x"'), "clusters.a.key", "key and key_file are mutually exclusive")
        self.assertError(
            self.cluster_toml(key_file=None, key='"not a key"'), "clusters.a.key", "not a valid private key"
        )
        pem = self.m.files["id_rsa_enc"].decode()
        self.assertError(
            self.cluster_toml(key_file=None, key=f"'''{pem}'''", passphrase='"bad"'),
            "clusters.a.passphrase",
            "wrong passphrase",
        )
        self.assertError(
            self.cluster_toml(key_file=None, key=f"'''{pem}'''"), "clusters.a.key", "key is encrypted: set passphrase"
        )
        self.assertError(
            self.cluster_toml(key_file=key_file("id_rsa_enc"), passphrase='"a"', passphrase_file="'passphrase'"),
            "clusters.a.passphrase_file",
            "mutually exclusive",
        )
        self.assertError(
            self.cluster_toml(key_file=key_file("id_rsa_enc"), passphrase_file="'empty'"),
            "clusters.a.passphrase_file",
            "is empty",
        )
        self.assertError(
            self.cluster_toml(key_file=key_file("id_rsa_enc"), passphrase_file="'missing'"),
            "clusters.a.passphrase_file",
            "cannot read passphrase file",
        )

    def test_host_key_errors(self) -> None:
        self.assertError(
            self.cluster_toml(known_hosts=None),
            "clusters.a.known_hosts",
            "missing host key source: set known_hosts, host_keys or host_ca_keys"
            " (or insecure_accept_any_host_key = true)",
        )
        self.assertError(
            self.cluster_toml(known_hosts=None, insecure_accept_any_host_key="false"),
            "clusters.a.known_hosts",
            "missing host key source",
        )
        self.assertError(
            self.cluster_toml(host_keys=f'["{self.m.ed25519_public}"]'),
            "clusters.a.host_keys",
            "known_hosts and host_keys are mutually exclusive",
        )
        self.assertError(
            self.cluster_toml(insecure_accept_any_host_key="true"),
            "clusters.a.insecure_accept_any_host_key",
            "cannot be combined with known_hosts",
        )
        self.assertError(
            self.cluster_toml(known_hosts="'missing'"),
            "clusters.a.known_hosts",
            f"cannot read known_hosts file {self.path('missing')!r}: No such file or directory",
        )
        self.assertError(
            self.cluster_toml(known_hosts=f"'{self.dir}'"), "clusters.a.known_hosts", "cannot read known_hosts file"
        )
        bad_lines = [
            ("garbage", "expected 'TYPE BASE64 [COMMENT]'"),
            ("ssh-ed25519 !!!", "not a valid ssh-ed25519 public key"),
            ("ssh-ed25519 AAAA", "not a valid ssh-ed25519 public key"),
            (f"ssh-rsa {self.m.ed25519_public.split()[1]}", "key type 'ssh-rsa' does not match the key data"),
            ("ssh-ed25519", "expected 'TYPE BASE64 [COMMENT]'"),
        ]
        for line, reason in bad_lines:
            self.assertError(
                self.cluster_toml(known_hosts=None, host_keys=f'["{self.m.ed25519_public}", "{line}"]'),
                "clusters.a.host_keys[1]",
                reason,
            )
        self.assertError(
            self.cluster_toml(known_hosts=None, host_keys="[]"), "clusters.a.host_keys", "must list at least one key"
        )

    def test_host_ca_key_errors(self) -> None:
        ca = self.m.ed25519_public
        self.assertError(self.cluster_toml(host_ca_keys="[]"), "clusters.a.host_ca_keys", "must list at least one key")
        self.assertError(
            self.cluster_toml(host_ca_keys=f'["{ca}", "ssh-ed25519 AAAA"]'),
            "clusters.a.host_ca_keys[1]",
            "not a valid ssh-ed25519 public key (bad base64 or key data)",
        )
        self.assertError(
            self.cluster_toml(host_ca_keys=f'"{ca}"'), "clusters.a.host_ca_keys", "expected an array of strings"
        )
        security_key = base64.b64encode(NS(b"sk-ssh-ed25519@openssh.com") + NS(b"k" * 32) + NS(b"ssh:")).decode()
        self.assertError(
            self.cluster_toml(host_ca_keys=f'["sk-ssh-ed25519@openssh.com {security_key}"]'),
            "clusters.a.host_ca_keys[0]",
            "a sk-ssh-ed25519@openssh.com key cannot be a host CA here",
        )
        self.assertError(
            self.cluster_toml(known_hosts=None, host_ca_keys=f'["{ca}"]', insecure_accept_any_host_key="true"),
            "clusters.a.insecure_accept_any_host_key",
            "insecure_accept_any_host_key = true cannot be combined with host_ca_keys",
        )

    def test_names(self) -> None:
        self.assertError(
            self.cluster_toml('"bad name"'),
            'clusters."bad name"',
            "cluster name 'bad name' is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ -",
        )
        self.assertError(self.cluster_toml('"a.b"', user="1"), 'clusters."a.b".user', "expected a string")
        self.assertError(self.cluster_toml("x" * 65), "clusters." + "x" * 65, "is invalid")
        self.assertError(self.cluster_toml('""'), 'clusters.""', "is invalid")
        self.assertError(self.cluster_toml(aliases='["ok", "a/b"]'), "clusters.a.aliases[1]", "alias 'a/b' is invalid")
        self.assertError(self.cluster_toml(aliases='[""]'), "clusters.a.aliases[0]", "alias '' is invalid")
        self.assertError(self.cluster_toml(aliases='["x", "x"]'), "clusters.a.aliases[1]", "listed twice")
        for dots in (".", ".."):
            self.assertError(
                self.cluster_toml(f'"{dots}"'),
                f'clusters."{dots}"',
                "is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ - (not . or ..)",
            )
            self.assertError(
                self.cluster_toml(aliases=f'["{dots}"]'), "clusters.a.aliases[0]", f"alias '{dots}' is invalid"
            )
        # dots are fine in names that are not path segments
        text = self.cluster_toml('"..a"') + self.cluster_toml('"a."', networks='["10.9.0.0/24"]')
        self.assertEqual(sorted(self.load(text).clusters), ["..a", "a."])
        self.assertError(self.cluster_toml(aliases='["a"]'), "clusters.a.aliases[0]", "listed twice")

    def test_duplicate_names(self) -> None:
        self.assertError(
            self.cluster_toml("a", aliases='["net-1"]') + self.cluster_toml("b", aliases='["x", "net-1"]'),
            "clusters.b.aliases[1]",
            "alias 'net-1' is already used by cluster 'a'",
        )
        self.assertError(
            self.cluster_toml("a", aliases='["b"]') + self.cluster_toml("b"),
            "clusters.b",
            "cluster name 'b' is already used by cluster 'a'",
        )
        self.assertError(
            self.cluster_toml("a") + self.cluster_toml("b", aliases='["a"]'),
            "clusters.b.aliases[0]",
            "alias 'a' is already used by cluster 'a'",
        )
        # case-sensitive: these are different names
        config = self.load(self.cluster_toml("a", aliases='["N"]') + self.cluster_toml("A", aliases='["n"]'))
        self.assertEqual(sorted(config.clusters), ["A", "a"])

    def test_proxies(self) -> None:
        cases = [
            ("host name", "'host name' is not a valid host name or address"),
            ("", "'' is not a valid host name or address"),
            ("[::1", "'[::1' is not a valid address"),
            ("[10.0.0.1]:22", "'10.0.0.1' in brackets is not an IPv6 address"),
            ("::1::2", "'::1::2' is not a valid address (write IPv6 addresses with a port as [address]:port)"),
            ("h:0", "port '0' is not a number between 1 and 65535"),
            ("h:65536", "port '65536' is not a number between 1 and 65535"),
            ("h:abc", "port 'abc' is not a number between 1 and 65535"),
            ("h:", "port '' is not a number"),
            ("[::1]:x", "port 'x' is not a number"),
            ("-h", "is not a valid host name"),
        ]
        for text, reason in cases:
            self.assertError(self.cluster_toml(proxies=f'["ok", "{text}"]'), "clusters.a.proxies[1]", reason)
        self.assertError(self.cluster_toml(proxies="[]"), "clusters.a.proxies", "at least one address")
        self.assertError(self.cluster_toml(proxies=None), "clusters.a.proxies", "missing")
        self.assertError(self.cluster_toml(proxies='["h", "h:22"]'), "clusters.a.proxies[1]", "h:22 is listed twice")

    def test_tokens(self) -> None:
        self.assertError(self.cluster_toml(token='""'), "clusters.a.token", "must not be empty")
        self.assertError(self.cluster_toml(token=f'"{"x" * 256}"'), "clusters.a.token", "longer than 255 bytes")
        self.assertError(
            self.cluster_toml(token=f'"{TOKEN}"', token_file="'token'"), "clusters.a.token_file", "mutually exclusive"
        )
        self.assertError(self.cluster_toml(token_file="'missing'"), "clusters.a.token_file", "cannot read token file")
        self.assertError(self.cluster_toml(token_file="'empty'"), "clusters.a.token_file", "is empty")
        path = self.path("token.bin")
        with open(path, "wb") as f:
            f.write(b"\xff\xfe")
        os.chmod(path, 0o600)
        self.assertError(self.cluster_toml(token_file=f"'{path}'"), "clusters.a.token_file", "is not UTF-8 text")

    def test_secret_files_readable_by_others_are_refused(self) -> None:
        for key, name in (("key_file", "id_ed25519"), ("token_file", "token")):
            os.chmod(self.path(name), 0o644)
            overrides = {key: f"'{self.path(name)}'"}
            e = self.assertError(self.cluster_toml(**overrides), f"clusters.a.{key}", "accessible by other users")
            self.assertIn("mode 0644): chmod 600 it", e.reason)
            os.chmod(self.path(name), 0o600)

    def test_listen(self) -> None:
        self.assertError(
            "[listen]\nsocks = 'foo:1'\n",
            "listen.socks",
            "'foo:1' is not a valid server endpoint (ValueError: Unknown endpoint type: 'foo')",
        )
        self.assertError(
            "[listen]\nsocks = ['tcp:1', 'tcp:abc']\n", "listen.socks[1]", "'tcp:abc' is not a valid server endpoint"
        )
        self.assertError("[listen]\nhttp = ['']\n", "listen.http[0]", "empty endpoint")
        # Not started by socket activation: the reason says so, not Twisted's IndexError.
        self.assertError(
            "[listen]\nsocks = 'systemd:domain=INET:index=0'\n",
            "listen.socks",
            "'systemd:domain=INET:index=0' names no socket this process inherited (LISTEN_FDS, LISTEN_FDNAMES and "
            "LISTEN_PID from systemd's socket activation: see docs/operating.md)",
        )
        self.assertError("[listen]\nsocks = 'systemd:domain=INET:name=socks'\n", "listen.socks", "names no socket")
        self.assertError(
            "[listen]\nsocks = 'tcp:1080'\nhttp = ['tcp:1080']\n",
            "listen.http[0]",
            "'tcp:1080' is already used by listen.socks",
        )

    def test_user(self) -> None:
        self.assertError(self.cluster_toml(user='""'), "clusters.a.user", "must not be empty")
        self.assertError(self.cluster_toml(user='"a b"'), "clusters.a.user", "'a b' is not a valid user name")

    def test_no_secret_in_any_error(self) -> None:
        """
        Errors next to secrets do not echo them: wrong types of secret keys,
        and every key error (assertError checks every message it sees).
        """
        pem = self.m.files["id_rsa"].decode()
        self.assertError(
            self.cluster_toml(token=f'"{TOKEN}"', networks='["x"]'), "clusters.a.networks[0]", "not a valid network"
        )
        self.assertError(
            self.cluster_toml(key_file=None, key=f"'''{pem[:-40]}'''"), "clusters.a.key", "not a valid private key"
        )
        self.assertError(
            self.cluster_toml(key_file=None, key=f"'''{pem.replace('RSA ', '')}'''"),
            "clusters.a.key",
            "not a valid private key",
        )
        self.assertError(
            self.cluster_toml(key_file=None, key=f"'''{pem}'''", user="7"), "clusters.a.user", "expected a string"
        )
        self.assertError(f'[defaults]\ntoken = "{TOKEN}"\n', "defaults.token", "cannot be set")


NEW_DEFAULTS = {
    "keepalive_interval": 10.0,
    "keepalive_count_max": 3,
    "mode": "auto",
    "exec_command": "nc {host} {port}",
    "resolver_command": "getent ahosts {host}",
    "resolve_ttl": 60.0,
    "proxy_command": None,
    "jump": None,
    "jump_cluster": None,
    "jump_address": None,
    "jump_user": None,
    "connections": 1,
    "max_streams": 1024,
    "open_timeout": 15.0,
    "rekey_bytes": 1 << 30,
    "rekey_interval": 3600.0,
    "allow_sha1_signatures": False,
}


class ConnectionSettingsTests(ConfigTestCase):
    """keepalive, mode, exec_command, proxy_command, connections, limits, rekeying."""

    def cluster(self, **overrides: str | None) -> ClusterConfig:
        return self.load(self.cluster_toml("a", **overrides)).clusters["a"]

    def test_defaults(self) -> None:
        c = self.cluster()
        for name, value in NEW_DEFAULTS.items():
            self.assertEqual((name, getattr(c, name)), (name, value))
        self.assertEqual(DEFAULT_EXEC_COMMAND, "nc {host} {port}")
        self.assertEqual(DEFAULT_REKEY_BYTES, 1024**3)
        self.assertIsInstance(c.keepalive_interval, float)
        # the constructor still works without the new fields
        short = ClusterConfig(
            name="x",
            aliases=(),
            proxies=(ProxyAddress("p"),),
            user="u",
            private_key=c.private_key,
            known_hosts=None,
            host_keys=(),
            insecure_accept_any_host_key=True,
            networks=(),
        )
        for name, value in NEW_DEFAULTS.items():
            self.assertEqual((name, getattr(short, name)), (name, value))

    def test_all_values(self) -> None:
        c = self.cluster(
            keepalive_interval="2.5",
            keepalive_count_max="5",
            mode='"exec"',
            exec_command='"socat - TCP:{host}:{port}"',
            proxy_command='"ip netns exec qrouter-1234 nc {host} {port}"',
            connections="4",
            max_streams="100",
            open_timeout="3",
            rekey_bytes='"512M"',
            rekey_interval="600",
        )
        self.assertEqual(c.keepalive_interval, 2.5)
        self.assertEqual(c.keepalive_count_max, 5)
        self.assertEqual(c.mode, "exec")
        self.assertEqual(c.exec_command, "socat - TCP:{host}:{port}")
        self.assertEqual(c.proxy_command, "ip netns exec qrouter-1234 nc {host} {port}")
        self.assertEqual(c.connections, 4)
        self.assertEqual(c.max_streams, 100)
        self.assertEqual(c.open_timeout, 3.0)
        self.assertIsInstance(c.open_timeout, float)
        self.assertEqual(c.rekey_bytes, 512 * 1024 * 1024)
        self.assertEqual(c.rekey_interval, 600.0)
        self.assertIsInstance(c.rekey_interval, float)
        self.assertNoSecrets(repr(c))

    def test_bounds_accepted(self) -> None:
        for name, value, expected in [
            ("keepalive_interval", "0", 0.0),
            ("keepalive_interval", "0.5", 0.5),
            ("keepalive_count_max", "1", 1),
            ("keepalive_count_max", "100", 100),
            ("connections", "1", 1),
            ("connections", "16", 16),
            ("max_streams", "1", 1),
            ("max_streams", "1_000_000", 1_000_000),
            ("open_timeout", "0.1", 0.1),
            ("rekey_interval", "0", 0.0),
            ("rekey_interval", "60", 60.0),
            ("rekey_interval", "86400.5", 86400.5),
        ]:
            self.assertEqual((name, getattr(self.cluster(**{name: value}), name)), (name, expected))

    def test_modes(self) -> None:
        for mode in ("auto", "direct-tcpip", "exec"):
            self.assertEqual(self.cluster(mode=f'"{mode}"').mode, mode)

    def test_command_templates(self) -> None:
        """Accepted templates format with host and port only; {{ }} are literal."""
        c = self.cluster(
            exec_command="\"printf '{{}}' >&2; nc {port} {host} {host}\"",
            proxy_command="\"sh -c 'exec nc {host} {port}' # {{x}}\"",
        )
        self.assertEqual(c.exec_command.format(host="h", port=22), "printf '{}' >&2; nc 22 h h")
        self.assertEqual(c.proxy_command.format(host="h", port=22), "sh -c 'exec nc h 22' # {x}")
        # proxy_command needs no placeholder; "none" means no proxy command
        self.assertEqual(self.cluster(proxy_command='"connect-to-proxy"').proxy_command, "connect-to-proxy")
        self.assertEqual(self.cluster(proxy_command='"{port}"').proxy_command, "{port}")
        self.assertIsNone(self.cluster(proxy_command='"none"').proxy_command)

    def test_rekey_bytes_forms(self) -> None:
        cases = {
            "1048576": 1 << 20,
            str(1 << 40): 1 << 40,
            '"1G"': 1 << 30,
            '"512M"': 512 << 20,
            '"2048k"': 2 << 20,
            '"1024K"': 1 << 20,
            '"1t"': 1 << 40,
            '"2g"': 2 << 30,
            '"0001M"': 1 << 20,
            '"1048576"': 1 << 20,
        }
        for text, expected in cases.items():
            self.assertEqual((text, self.cluster(rekey_bytes=text).rekey_bytes), (text, expected))
        self.assertEqual(parse_size("64K"), 64 * 1024)
        self.assertEqual(parse_size("64k"), 64 * 1024)
        self.assertEqual(parse_size("7"), 7)
        self.assertEqual(parse_size("3T"), 3 << 40)
        for bad in ("", "K", "1.5G", "-1M", "1 G", "1GB", "1P", " 1G"):
            self.assertRaises(ValueError, parse_size, bad)

    def test_shared_in_defaults(self) -> None:
        text = (
            "[defaults]\n"
            "keepalive_interval = 0\n"
            "keepalive_count_max = 7\n"
            'mode = "direct-tcpip"\n'
            'exec_command = "ncat {host} {port}"\n'
            'proxy_command = "ip netns exec qrouter-1 nc {host} {port}"\n'
            "connections = 2\n"
            "max_streams = 10\n"
            "open_timeout = 4\n"
            'rekey_bytes = "2G"\n'
            "rekey_interval = 0\n"
            "allow_sha1_signatures = true\n"
            + self.cluster_toml("a")
            + self.cluster_toml(
                "b",
                mode='"exec"',
                connections="3",
                proxy_command='"none"',
                rekey_bytes="1048576",
                allow_sha1_signatures="false",
            )
        )
        config = self.load(text)
        a, b = config.clusters["a"], config.clusters["b"]
        self.assertEqual(
            (a.keepalive_interval, a.keepalive_count_max, a.mode, a.exec_command, a.connections),
            (0.0, 7, "direct-tcpip", "ncat {host} {port}", 2),
        )
        self.assertEqual(a.proxy_command, "ip netns exec qrouter-1 nc {host} {port}")
        self.assertEqual((a.max_streams, a.open_timeout, a.rekey_bytes, a.rekey_interval), (10, 4.0, 2 << 30, 0.0))
        self.assertEqual((b.mode, b.connections, b.proxy_command, b.rekey_bytes), ("exec", 3, None, 1 << 20))
        self.assertEqual((b.exec_command, b.max_streams), ("ncat {host} {port}", 10))
        self.assertEqual((a.allow_sha1_signatures, b.allow_sha1_signatures), (True, False))

    def test_wrong_types(self) -> None:
        cases = [
            ("keepalive_interval", '"10"', "expected a number of seconds, got string"),
            ("keepalive_interval", "true", "expected a number of seconds, got boolean"),
            ("keepalive_count_max", "true", "expected an integer, got boolean"),
            ("keepalive_count_max", "3.0", "expected an integer, got float"),
            ("keepalive_count_max", '"3"', "expected an integer, got string"),
            ("mode", "1", "expected a string, got integer"),
            ("mode", "true", "expected a string, got boolean"),
            ("exec_command", '["nc", "{host}"]', "expected a string, got array"),
            ("proxy_command", "false", "expected a string, got boolean"),
            ("connections", "true", "expected an integer, got boolean"),
            ("connections", "2.0", "expected an integer, got float"),
            ("max_streams", "false", "expected an integer, got boolean"),
            ("max_streams", '"1024"', "expected an integer, got string"),
            ("open_timeout", "true", "expected a number of seconds, got boolean"),
            ("open_timeout", '"15"', "expected a number of seconds, got string"),
            ("rekey_bytes", "true", 'expected an integer (bytes) or a size string such as "1G", got boolean'),
            ("rekey_bytes", "1e9", 'expected an integer (bytes) or a size string such as "1G", got float'),
            ("rekey_bytes", "[1]", "got array"),
            ("rekey_interval", "true", "expected a number of seconds, got boolean"),
            ("rekey_interval", '"3600"', "expected a number of seconds, got string"),
            ("allow_sha1_signatures", '"yes"', "expected a boolean (true or false), got string"),
            ("allow_sha1_signatures", "1", "expected a boolean (true or false), got integer"),
        ]
        for name, value, reason in cases:
            self.assertError(self.cluster_toml(**{name: value}), f"clusters.a.{name}", reason)

    def test_out_of_range(self) -> None:
        cases = [
            ("keepalive_interval", "-1", "must be 0 (no keepalive) or a positive number of seconds, got -1"),
            ("keepalive_interval", "nan", "must be 0 (no keepalive) or a positive number of seconds, got nan"),
            ("keepalive_interval", "inf", "got inf"),
            ("keepalive_count_max", "0", "must be between 1 and 100, got 0"),
            ("keepalive_count_max", "101", "must be between 1 and 100, got 101"),
            ("connections", "0", "must be between 1 and 16, got 0"),
            ("connections", "17", "must be between 1 and 16, got 17"),
            ("max_streams", "0", "must be between 1 and 1000000, got 0"),
            ("max_streams", "1000001", "must be between 1 and 1000000, got 1000001"),
            ("open_timeout", "0", "must be a positive number of seconds, got 0"),
            ("open_timeout", "-2.5", "must be a positive number of seconds, got -2.5"),
            ("open_timeout", "inf", "must be a positive number of seconds, got inf"),
            ("open_timeout", "nan", "must be a positive number of seconds, got nan"),
            ("rekey_interval", "59.9", "must be 0 (rekey by bytes only) or at least 60 seconds, got 59.9"),
            ("rekey_interval", "1", "must be 0 (rekey by bytes only) or at least 60 seconds, got 1"),
            ("rekey_interval", "-60", "at least 60 seconds, got -60"),
            ("rekey_interval", "inf", "at least 60 seconds, got inf"),
            ("rekey_interval", "nan", "at least 60 seconds, got nan"),
            ("rekey_bytes", "0", "must be between 1048576 (1M) and 1099511627776 (1T) bytes, got 0"),
            ("rekey_bytes", "1048575", "got 1048575"),
            ("rekey_bytes", str((1 << 40) + 1), f"got {(1 << 40) + 1}"),
            ("rekey_bytes", "-1", "got -1"),
            ("rekey_bytes", '"1023K"', "got '1023K' (1047552 bytes)"),
            ("rekey_bytes", '"2T"', "got '2T' (2199023255552 bytes)"),
            ("rekey_bytes", '"0M"', "got '0M' (0 bytes)"),
            ("rekey_bytes", '"' + "9" * 50 + '"', "must be between 1048576 (1M) and 1099511627776 (1T) bytes"),
        ]
        for name, value, reason in cases:
            self.assertError(self.cluster_toml(**{name: value}), f"clusters.a.{name}", reason)

    def test_rekey_bytes_bad_strings(self) -> None:
        for text in ("", "G", "1.5G", "-1M", "1 G", "1GB", "1P", "1MiB", "one"):
            self.assertError(
                self.cluster_toml(rekey_bytes=f'"{text}"'),
                "clusters.a.rekey_bytes",
                f"{text!r} is not a size: write a whole number of bytes with an optional suffix K, M, G or T "
                '(powers of 1024), e.g. "512M"',
            )

    def test_huge_integer_seconds(self) -> None:
        """An integer too large for a float is out of range, not a crash."""
        body = {"proxies": ["p"], "networks": ["10.0.0.0/8"], "insecure_accept_any_host_key": True}
        body["key_file"] = "id_ed25519"
        body["user"] = "u"
        for name in ("open_timeout", "keepalive_interval", "connect_timeout"):
            e = self.assertRaises(ConfigError, parse_cluster, "a", {**body, name: 10**400}, "API", "body", self.dir)
            self.assertEqual(e.key, f"body.{name}")
            self.assertIn("number of seconds, got 1000", e.reason)

    def test_unknown_mode(self) -> None:
        for mode in ("", "Exec", "direct_tcpip", "tcpip"):
            self.assertError(
                self.cluster_toml(mode=f'"{mode}"'),
                "clusters.a.mode",
                f"unknown mode {mode!r} (expected one of: auto, direct-tcpip, exec)",
            )

    def test_placeholders(self) -> None:
        hint = "(only {host} and {port} are replaced; write {{ and }} for literal braces)"
        for key in ("exec_command", "proxy_command"):
            cases = [
                ("nc {host} {port} {user}", f"unknown placeholder '{{user}}' {hint}"),
                ("nc {HOST} {port}", "unknown placeholder '{HOST}'"),
                ("nc {0} {host} {port}", "unknown placeholder '{0}'"),
                ("nc {} {host} {port}", "unknown placeholder '{}'"),
                ("nc {host!r} {port}", "unknown placeholder '{host!r}'"),
                ("nc {host} {port:5}", "unknown placeholder '{port:5}'"),
                ("nc {host.real} {port}", "unknown placeholder '{host.real}'"),
                ("nc { host } {port}", "unknown placeholder '{ host }'"),
                ("nc {host} {port", f"unmatched '{{' at character 11 of 'nc {{host}} {{port' {hint}"),
                ("nc {host {port}", "unmatched '{' at character 4 of"),
                ("nc { {host} {port}", "unmatched '{' at character 4"),
                ("nc {host} {port}}", f"unmatched '}}' at character 17 of 'nc {{host}} {{port}}}}' {hint}"),
                ("nc }{host} {port}", "unmatched '}' at character 4"),
                ("nc {{host} {port}", "unmatched '}' at character 10"),
            ]
            for text, reason in cases:
                self.assertError(self.cluster_toml(**{key: f'"{text}"'}), f"clusters.a.{key}", reason)
        missing = [
            ("nc {host} 22", "'nc {host} 22' lacks the {port} placeholder"),
            ("nc 10.0.0.1 {port}", "'nc 10.0.0.1 {port}' lacks the {host} placeholder"),
            ("nc {{host}} {{port}}", "lacks the {host} placeholder"),
            ("nc", "lacks the {host} placeholder"),
        ]
        for text, reason in missing:
            self.assertError(self.cluster_toml(exec_command=f'"{text}"'), "clusters.a.exec_command", reason)
        self.assertError(self.cluster_toml(exec_command='""'), "clusters.a.exec_command", "must not be empty")
        self.assertError(self.cluster_toml(exec_command='"  "'), "clusters.a.exec_command", "must not be empty")
        for blank in ('""', '" "'):
            self.assertError(
                self.cluster_toml(proxy_command=blank),
                "clusters.a.proxy_command",
                'must not be empty (write "none" for no proxy command)',
            )
        self.assertError(
            "[defaults]\nexec_command = 'nc {host}'\n", "defaults.exec_command", "lacks the {port} placeholder"
        )

    def test_errors_name_defaults(self) -> None:
        cases = [
            ("keepalive_interval = -1", "defaults.keepalive_interval", "no keepalive"),
            ("keepalive_count_max = true", "defaults.keepalive_count_max", "expected an integer, got boolean"),
            ("mode = 'ssh'", "defaults.mode", "unknown mode 'ssh'"),
            ("exec_command = 'nc {h} {port}'", "defaults.exec_command", "unknown placeholder '{h}'"),
            ("proxy_command = 'nc {host'", "defaults.proxy_command", "unmatched '{'"),
            ("connections = 0", "defaults.connections", "must be between 1 and 16"),
            ("max_streams = 1.5", "defaults.max_streams", "expected an integer, got float"),
            ("open_timeout = 0", "defaults.open_timeout", "must be a positive number of seconds"),
            ("rekey_bytes = '1X'", "defaults.rekey_bytes", "'1X' is not a size"),
            ("rekey_interval = 10", "defaults.rekey_interval", "at least 60 seconds"),
        ]
        for line, key, reason in cases:
            # checked on their own, even with no cluster...
            self.assertError(f"[defaults]\n{line}\n", key, reason)
            # ... and named as defaults.KEY when a cluster inherits them
            self.assertError(f"[defaults]\n{line}\n" + self.cluster_toml(), key, reason)


class ResolverSettingsTests(ConfigTestCase):
    """resolver_command and resolve_ttl: names resolved on the proxy node."""

    def cluster(self, **overrides: str | None) -> ClusterConfig:
        return self.load(self.cluster_toml("a", **overrides)).clusters["a"]

    def test_defaults(self) -> None:
        c = self.cluster()
        self.assertEqual((c.resolver_command, c.resolve_ttl), (DEFAULT_RESOLVER_COMMAND, DEFAULT_RESOLVE_TTL))
        self.assertEqual((DEFAULT_RESOLVER_COMMAND, DEFAULT_RESOLVE_TTL), ("getent ahosts {host}", 60.0))

    def test_values(self) -> None:
        c = self.cluster(resolver_command='"dig +short {host} # {{x}}"', resolve_ttl="2.5")
        self.assertEqual(c.resolver_command.format(host="h"), "dig +short h # {x}")
        self.assertEqual(c.resolve_ttl, 2.5)
        self.assertEqual(self.cluster(resolve_ttl="300").resolve_ttl, 300.0)
        self.assertIsInstance(self.cluster(resolve_ttl="300").resolve_ttl, float)

    def test_off_and_no_caching(self) -> None:
        """An empty resolver_command turns resolution on the proxy node off; a TTL of 0 caches nothing."""
        c = self.cluster(resolver_command='""', resolve_ttl="0")
        self.assertEqual((c.resolver_command, c.resolve_ttl), ("", 0.0))

    def test_in_defaults(self) -> None:
        text = (
            '[defaults]\nresolver_command = "resolve-name {host}"\nresolve_ttl = 5\n'
            + self.cluster_toml("a")
            + self.cluster_toml("b", resolver_command='""', resolve_ttl="10")
        )
        config = self.load(text)
        a, b = config.clusters["a"], config.clusters["b"]
        self.assertEqual((a.resolver_command, a.resolve_ttl), ("resolve-name {host}", 5.0))
        self.assertEqual((b.resolver_command, b.resolve_ttl), ("", 10.0))

    def test_errors(self) -> None:
        hint = "(only {host} is replaced; write {{ and }} for literal braces)"
        cases = [
            ("resolver_command", "true", "expected a string, got boolean"),
            ("resolver_command", '["getent", "{host}"]', "expected a string, got array"),
            ("resolver_command", '" "', 'must not be blank (write "" to resolve no names on the proxy node)'),
            ("resolver_command", '"getent ahosts {host} {port}"', f"unknown placeholder '{{port}}' {hint}"),
            ("resolver_command", '"getent ahosts {name}"', "unknown placeholder '{name}'"),
            (
                "resolver_command",
                '"getent ahosts {host"',
                f"unmatched '{{' at character 15 of 'getent ahosts {{host' {hint}",
            ),
            ("resolver_command", '"getent ahosts localhost"', "'getent ahosts localhost' lacks the {host} placeholder"),
            ("resolver_command", '"getent ahosts {{host}}"', "lacks the {host} placeholder"),
            ("resolve_ttl", '"60"', "expected a number of seconds, got string"),
            ("resolve_ttl", "true", "expected a number of seconds, got boolean"),
            ("resolve_ttl", "-1", "must be 0 (no caching) or a positive number of seconds, got -1"),
            ("resolve_ttl", "inf", "must be 0 (no caching) or a positive number of seconds, got inf"),
            ("resolve_ttl", "nan", "got nan"),
        ]
        for name, value, reason in cases:
            self.assertError(self.cluster_toml(**{name: value}), f"clusters.a.{name}", reason)
        self.assertError("[defaults]\nresolve_ttl = -5\n", "defaults.resolve_ttl", "no caching")

    def test_api_body(self) -> None:
        """An API body sets them like any other key, and its errors name the body field."""
        from gateway.control.bodies import validate_body

        body = {
            "proxies": ["p"],
            "networks": ["10.0.0.0/8"],
            "insecure_accept_any_host_key": True,
            "key": self.m.files["id_ed25519"].decode(),
            "user": "u",
        }
        c = validate_body("a", {**body, "resolver_command": "", "resolve_ttl": 1})
        self.assertEqual((c.resolver_command, c.resolve_ttl), ("", 1.0))
        c = validate_body("a", {**body, "resolver_command": "dig +short {host}"})
        self.assertEqual((c.resolver_command, c.resolve_ttl), ("dig +short {host}", 60.0))
        e = self.assertRaises(ConfigError, validate_body, "a", {**body, "resolver_command": "x {port}"})
        self.assertEqual(e.key, "resolver_command")
        self.assertIn("unknown placeholder '{port}'", e.reason)


class JumpTests(ConfigTestCase):
    def test_cluster_reference(self) -> None:
        """A name or alias of a cluster of the file: the canonical name is kept."""
        config = self.load(
            self.cluster_toml("a", jump='"net-b"')  # forward reference, by alias
            + self.cluster_toml("b", aliases='["net-b"]', networks='["10.2.0.0/24"]', jump='"c"')
            + self.cluster_toml("c", networks='["10.3.0.0/24"]')
        )
        a, b, c = (config.clusters[n] for n in "abc")
        self.assertEqual((a.jump, a.jump_cluster, a.jump_address, a.jump_user), ("net-b", "b", None, None))
        self.assertEqual((b.jump, b.jump_cluster, b.jump_address, b.jump_user), ("c", "c", None, None))
        self.assertEqual((c.jump, c.jump_cluster), (None, None))

    def test_address(self) -> None:
        cases = {
            "admin@bastion.example:2222": (ProxyAddress("bastion.example", 2222), "admin"),
            "admin@bastion.example": (ProxyAddress("bastion.example", 22), "admin"),
            "bastion.example": (ProxyAddress("bastion.example", 22), None),
            "bastion.example:2200": (ProxyAddress("bastion.example", 2200), None),
            "10.0.0.1": (ProxyAddress("10.0.0.1", 22), None),
            "[fd00::1]:2200": (ProxyAddress("fd00::1", 2200), None),
            "ops@[fd00::1]": (ProxyAddress("fd00::1", 22), "ops"),
            # looks like a cluster name, but no cluster of the file has it
            "bastion": (ProxyAddress("bastion", 22), None),
            "b": (ProxyAddress("b", 22), None),
        }
        for text, (address, user) in cases.items():
            c = self.load(self.cluster_toml("a", jump=f'"{text}"')).clusters["a"]
            self.assertEqual(
                (text, c.jump, c.jump_cluster, c.jump_address, c.jump_user), (text, text, None, address, user)
            )

    def test_jump_displaces_default_proxy_command(self) -> None:
        text = "[defaults]\nproxy_command = 'ip netns exec qrouter-1 nc {host} {port}'\n"
        config = self.load(text + self.cluster_toml("a") + self.cluster_toml("b", jump='"a"'))
        self.assertEqual(config.clusters["a"].proxy_command, "ip netns exec qrouter-1 nc {host} {port}")
        self.assertEqual((config.clusters["b"].proxy_command, config.clusters["b"].jump_cluster), (None, "a"))

    def test_to_self(self) -> None:
        self.assertError(
            self.cluster_toml("a", jump='"a"'), "clusters.a.jump", "cluster 'a' cannot jump through itself"
        )
        self.assertError(
            self.cluster_toml("a", aliases='["net-a"]', jump='"net-a"'),
            "clusters.a.jump",
            "cluster 'a' cannot jump through itself",
        )

    def test_cycles(self) -> None:
        self.assertError(
            self.cluster_toml("a", jump='"b"') + self.cluster_toml("b", jump='"a"'),
            "clusters.a.jump",
            "jump cycle a -> b -> a",
        )
        self.assertError(
            self.cluster_toml("a", jump='"b"')
            + self.cluster_toml("b", jump='"net-c"')
            + self.cluster_toml("c", aliases='["net-c"]', jump='"a"'),
            "clusters.a.jump",
            "jump cycle a -> b -> c -> a",
        )
        # d only leads into the cycle: the first cluster in it is named
        self.assertError(
            self.cluster_toml("d", jump='"b"')
            + self.cluster_toml("b", jump='"c"')
            + self.cluster_toml("c", jump='"b"'),
            "clusters.b.jump",
            "jump cycle b -> c -> b",
        )

    def test_bad_address(self) -> None:
        cases = [
            ("bad host", "'bad host' is neither a cluster name or alias nor a [user@]host[:port] address: "),
            ("h:0", "port '0' is not a number between 1 and 65535"),
            ("u@h:x", "port 'x' is not a number"),
            ("u@", "'' is not a valid host name or address"),
            ("[::1", "is not a valid address"),
            ("u@-h", "'-h' is not a valid host name"),
            ("@h", "'' in '@h' is not a valid user name"),
            ("a b@h", "'a b' in 'a b@h' is not a valid user name"),
            ("a@b@h", "'a@b' in 'a@b@h' is not a valid user name"),
            ("", "must not be empty"),
        ]
        for text, reason in cases:
            self.assertError(self.cluster_toml(jump=f'"{text}"'), "clusters.a.jump", reason)
        self.assertError(self.cluster_toml(jump="1"), "clusters.a.jump", "expected a string, got integer")
        self.assertError(self.cluster_toml(jump='["b"]'), "clusters.a.jump", "expected a string, got array")

    def test_with_proxy_command(self) -> None:
        self.assertError(
            self.cluster_toml("a") + self.cluster_toml("b", jump='"a"', proxy_command='"nc {host} {port}"'),
            "clusters.b.jump",
            "proxy_command and jump are mutually exclusive: set only one",
        )
        self.assertError(
            self.cluster_toml("a", jump='"h:22"', proxy_command='"nc {host} {port}"'),
            "clusters.a.jump",
            "proxy_command and jump are mutually exclusive",
        )
        # "none" is no proxy command
        c = self.load(self.cluster_toml("a", jump='"h"', proxy_command='"none"')).clusters["a"]
        self.assertEqual((c.proxy_command, c.jump_address), (None, ProxyAddress("h")))

    def test_not_in_defaults(self) -> None:
        self.assertError(
            "[defaults]\njump = 'bastion'\n",
            "defaults.jump",
            "jump cannot be set in [defaults]: set it in each cluster",
        )

    def test_parse_cluster(self) -> None:
        """Without known_clusters, a name-like value is a reference for the caller to check."""
        body = {"proxies": ["p"], "networks": ["10.0.0.0/8"], "user": "u", "insecure_accept_any_host_key": True}
        body["key_file"] = "id_ed25519"

        def jump(value: str, **kw: object) -> tuple[object, ...]:
            c = parse_cluster("api-1", {**body, "aliases": ["net-1"], "jump": value}, "API", "body", self.dir, **kw)
            return c.jump, c.jump_cluster, c.jump_address, c.jump_user

        self.assertEqual(jump("other"), ("other", "other", None, None))
        self.assertEqual(jump("bastion.example"), ("bastion.example", "bastion.example", None, None))
        self.assertEqual(jump("u@bastion"), ("u@bastion", None, ProxyAddress("bastion"), "u"))
        self.assertEqual(jump("bastion:2222"), ("bastion:2222", None, ProxyAddress("bastion", 2222), None))
        known = {"x": "X", "X": "X", "api-1": "api-1"}
        self.assertEqual(jump("x", known_clusters=known), ("x", "X", None, None))
        self.assertEqual(jump("other", known_clusters=known), ("other", None, ProxyAddress("other"), None))
        for value, kw in [("api-1", {}), ("net-1", {}), ("api-1", {"known_clusters": known})]:
            e = self.assertRaises(ConfigError, jump, value, **kw)
            self.assertEqual(str(e), "API: body.jump: cluster 'api-1' cannot jump through itself")
        e = self.assertRaises(ConfigError, jump, "net-9", known_clusters={"net-9": "api-1"})
        self.assertEqual(e.reason, "cluster 'api-1' cannot jump through itself")


class GatewaySettingsTests(ConfigTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(
            GatewaySettings(),
            GatewaySettings(
                handshake_timeout=10.0,
                body_timeout=30.0,
                response_timeout=120.0,
                keepalive_timeout=60.0,
                max_clients=4096,
                drain_timeout=10.0,
            ),
        )
        # The API may not do what the gateway's own user can, unless allowed.
        settings = GatewaySettings()
        self.assertEqual((settings.api_proxy_command, settings.api_file_paths, settings.api_jump), (False,) * 3)
        self.assertEqual(
            (settings.control_max_clients, settings.control_head_timeout, settings.control_body_timeout),
            (64, 10.0, 10.0),
        )
        self.assertEqual(self.load("").settings, GatewaySettings())
        self.assertEqual(self.load("[gateway]\n").settings, GatewaySettings())
        config = GatewayConfig(listen=ListenConfig(), clusters={}, source="(demo)")
        self.assertEqual(config.settings, GatewaySettings())

    def test_values(self) -> None:
        settings = self.load("[gateway]\nhandshake_timeout = 2\nmax_clients = 10\ndrain_timeout = 0\n").settings
        self.assertEqual(settings, GatewaySettings(handshake_timeout=2.0, max_clients=10, drain_timeout=0.0))
        self.assertIsInstance(settings.handshake_timeout, float)
        self.assertIsInstance(settings.drain_timeout, float)
        settings = self.load("[gateway]\nmax_clients = 1_000_000\ndrain_timeout = 30.5\n").settings
        self.assertEqual((settings.max_clients, settings.drain_timeout), (1_000_000, 30.5))
        settings = parse_config({"gateway": {"max_clients": 1}}, "mem").settings
        self.assertEqual(settings.max_clients, 1)
        settings = self.load("[gateway]\nbody_timeout = 5\nresponse_timeout = 0\nkeepalive_timeout = 2.5\n").settings
        self.assertEqual((settings.body_timeout, settings.response_timeout, settings.keepalive_timeout), (5, 0, 2.5))
        settings = self.load(
            "[gateway]\napi_file_paths = true\napi_jump = true\ncontrol_max_clients = 8\n"
            "control_head_timeout = 2\ncontrol_body_timeout = 3.5\n"
        ).settings
        self.assertEqual(
            settings,
            GatewaySettings(
                api_file_paths=True,
                api_jump=True,
                control_max_clients=8,
                control_head_timeout=2.0,
                control_body_timeout=3.5,
            ),
        )
        with self.assertRaises(dataclasses.FrozenInstanceError):
            settings.max_clients = 2  # type: ignore[misc]

    def test_errors(self) -> None:
        cases = [
            ("handshake_timeout = '10'", "gateway.handshake_timeout", "expected a number of seconds, got string"),
            ("handshake_timeout = true", "gateway.handshake_timeout", "expected a number of seconds, got boolean"),
            ("handshake_timeout = 0", "gateway.handshake_timeout", "must be a positive number of seconds, got 0"),
            ("handshake_timeout = -1", "gateway.handshake_timeout", "must be a positive number of seconds, got -1"),
            ("handshake_timeout = nan", "gateway.handshake_timeout", "must be a positive number of seconds, got nan"),
            ("max_clients = true", "gateway.max_clients", "expected an integer, got boolean"),
            ("max_clients = 10.0", "gateway.max_clients", "expected an integer, got float"),
            ("max_clients = 0", "gateway.max_clients", "must be between 1 and 1000000, got 0"),
            ("max_clients = 1000001", "gateway.max_clients", "must be between 1 and 1000000, got 1000001"),
            ("drain_timeout = false", "gateway.drain_timeout", "expected a number of seconds, got boolean"),
            (
                "drain_timeout = -1",
                "gateway.drain_timeout",
                "must be 0 (close streams at once) or a positive number of seconds, got -1",
            ),
            ("drain_timeout = inf", "gateway.drain_timeout", "got inf"),
            ("body_timeout = 0", "gateway.body_timeout", "must be a positive number of seconds, got 0"),
            ("keepalive_timeout = '1'", "gateway.keepalive_timeout", "expected a number of seconds, got string"),
            (
                "response_timeout = -1",
                "gateway.response_timeout",
                "must be 0 (no limit) or a positive number of seconds, got -1",
            ),
            ("api_file_paths = 1", "gateway.api_file_paths", "expected a boolean (true or false), got integer"),
            ("api_jump = 'yes'", "gateway.api_jump", "expected a boolean (true or false), got string"),
            ("control_max_clients = 0", "gateway.control_max_clients", "must be between 1 and 1000000, got 0"),
            ("control_head_timeout = 0", "gateway.control_head_timeout", "must be a positive number of seconds"),
            ("control_body_timeout = -1", "gateway.control_body_timeout", "must be a positive number of seconds"),
            ("handshake_timout = 1", "gateway.handshake_timout", "unknown key (did you mean handshake_timeout?)"),
            (
                "colour = 1",
                "gateway.colour",
                "unknown key (expected one of: api_file_paths, api_jump, api_proxy_command, api_remote_listeners, "
                "body_timeout, cluster_domain, control_body_timeout, control_head_timeout, control_max_clients, "
                "control_token_file, drain_timeout, handshake_timeout, keepalive_timeout, max_clients, name, "
                "response_timeout, state_file)",
            ),
            ("socks = 'tcp:1'", "gateway.socks", "unknown key"),
            ("[gateway.sub]", "gateway.sub", "unknown key"),
        ]
        for line, key, reason in cases:
            self.assertError(f"[gateway]\n{line}\n", key, reason)
        self.assertError("gateway = 1\n", "gateway", "expected a table, got integer")


class ClusterListenerTests(ConfigTestCase):
    """A cluster's own SOCKS and HTTP listeners (socks, http, remote_listeners) and [gateway] cluster_domain."""

    def test_values(self) -> None:
        config = self.load(
            self.cluster_toml(
                socks='"tcp:10801:interface=127.0.0.1"',
                http='["tcp:31281:interface=127.0.0.1", "unix:/run/gw-a.sock"]',
                remote_listeners="true",
            )
            + self.cluster_toml("b", networks='["10.251.0.0/24"]')
        )
        a, b = config.clusters["a"], config.clusters["b"]
        self.assertEqual(a.socks, ("tcp:10801:interface=127.0.0.1",))
        self.assertEqual(a.http, ("tcp:31281:interface=127.0.0.1", "unix:/run/gw-a.sock"))
        self.assertTrue(a.remote_listeners)
        self.assertEqual((b.socks, b.http, b.remote_listeners), ((), (), False))
        self.assertEqual(self.load(self.cluster_toml(socks='""')).clusters["a"].socks, ())

    def test_errors(self) -> None:
        cases = [
            ("socks", "1080", "expected a string or an array of strings, got integer"),
            ("socks", '"tcp:nope"', "is not a valid server endpoint"),
            ("remote_listeners", '"yes"', "expected a boolean (true or false), got string"),
        ]
        for name, value, reason in cases:
            self.assertError(self.cluster_toml(**{name: value}), f"clusters.a.{name}", reason)
        self.assertError(self.cluster_toml(http='["tcp:1", ""]'), "clusters.a.http[1]", "empty endpoint")
        self.assertError(self.cluster_toml(http='["tcp:1", 2]'), "clusters.a.http[1]", "expected a string, got integer")
        self.assertError(self.cluster_toml(http='["tcp:2000", "tcp:2000"]'), "clusters.a.http[1]", "is given twice")

    def test_not_in_defaults(self) -> None:
        for line in ('socks = "tcp:10801"', 'http = "tcp:31281"', "remote_listeners = true"):
            key = line.split()[0]
            self.assertError(f"[defaults]\n{line}\n" + self.cluster_toml(), f"defaults.{key}", "set it in each cluster")

    def test_endpoint_used_twice(self) -> None:
        self.assertError(
            "[listen]\nsocks = 'tcp:1080'\n" + self.cluster_toml(http="'tcp:1080'"),
            "clusters.a.http",
            "'tcp:1080' is already used by listen.socks",
        )
        self.assertError(
            self.cluster_toml(socks="'tcp:10801'") + self.cluster_toml("b", socks="['tcp:10802', 'tcp:10801']"),
            "clusters.b.socks",
            "'tcp:10801' is already used by clusters.a.socks",
        )

    def test_cluster_domain(self) -> None:
        self.assertEqual(self.load("").settings.cluster_domain, "gw.internal")
        settings = self.load("[gateway]\ncluster_domain = 'Clusters.Example.ORG.'\n").settings
        self.assertEqual(settings.cluster_domain, "clusters.example.org")
        for value, reason in (
            ("''", "must not be empty"),
            ("'a..b'", "is not a DNS domain"),
            ("'under_score.internal'", "is not a DNS domain"),
            ("'10.0.0.1'", "looks like an address"),
            ("1", "expected a string, got integer"),
        ):
            self.assertError(f"[gateway]\ncluster_domain = {value}\n", "gateway.cluster_domain", reason)
