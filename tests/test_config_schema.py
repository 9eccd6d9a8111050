"""
Tests for L{gateway.config.schema} (the key table) and
L{gateway.config.secrets} (the secret-file reader).
"""

from __future__ import annotations

import dataclasses
import os

from twisted.trial.unittest import SynchronousTestCase

from gateway.config import ClusterConfig, GatewaySettings, parse_cluster
from gateway.config.schema import (
    CLUSTER_KEYS,
    CLUSTER_SCHEMA,
    DEFAULTABLE_KEYS,
    GATEWAY_KEYS,
    GATEWAY_SCHEMA,
    api_body_refusal,
    api_config_refusal,
    displaced,
    safe_settings,
)
from gateway.config.secrets import SecretFileError, read_secret_file

#: ClusterConfig fields that no key sets under their own name: the name is the
#: table's, the private key comes from key/key_file, the jump fields from jump.
_DERIVED_FIELDS = {"name", "private_key", "jump_cluster", "jump_address", "jump_user"}
#: Keys that fill no field of their own name (they feed private_key or token).
_SOURCE_ONLY_KEYS = {"key", "key_file", "passphrase", "passphrase_file", "token_file"}


def _cluster(**more: object) -> ClusterConfig:
    return parse_cluster("a", {**_base_body(), **more}, "test", "")


def _base_body() -> dict[str, object]:
    return {
        "proxies": ["10.250.1.2"],
        "user": "root",
        "insecure_accept_any_host_key": True,
        "networks": ["10.251.0.0/24"],
        "key": _key_text(),
    }


def _key_text() -> str:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()


class ClusterTableTests(SynchronousTestCase):
    """The cluster key table states the schema once."""

    def test_every_field_has_one_row(self) -> None:
        """Adding a ClusterConfig field without its row (or a row without a field) is caught here."""
        fields = {f.name for f in dataclasses.fields(ClusterConfig)} - _DERIVED_FIELDS
        self.assertEqual(set(CLUSTER_KEYS) - _SOURCE_ONLY_KEYS, fields)
        self.assertEqual(len(CLUSTER_KEYS), len(CLUSTER_SCHEMA))

    def test_readers_fill_their_field(self) -> None:
        fields = {f.name for f in dataclasses.fields(ClusterConfig)}
        for row in CLUSTER_SCHEMA:
            if row.reader is not None:
                self.assertIn(row.name, fields)

    def test_defaultable_keys(self) -> None:
        """What [defaults] may set (docs/configuration.md lists the same keys)."""
        self.assertEqual(
            DEFAULTABLE_KEYS,
            (
                "allow_sha1_signatures",
                "ciphers",
                "connect_timeout",
                "connections",
                "exec_command",
                "host_ca_keys",
                "host_key_algorithms",
                "insecure_accept_any_host_key",
                "keepalive_count_max",
                "keepalive_interval",
                "kex_algorithms",
                "key",
                "key_file",
                "known_hosts",
                "macs",
                "max_streams",
                "mode",
                "open_timeout",
                "passphrase",
                "passphrase_file",
                "proxy_command",
                "rekey_bytes",
                "rekey_interval",
                "resolve_ttl",
                "resolver_command",
                "user",
                "window_size",
            ),
        )

    def test_displacement(self) -> None:
        self.assertEqual(displaced({"key": "x"}), {"key", "key_file", "passphrase", "passphrase_file"})
        self.assertEqual(displaced({"passphrase": "x"}), {"passphrase", "passphrase_file"})
        self.assertEqual(displaced({"jump": "b"}), {"jump", "proxy_command"})
        self.assertEqual(displaced({"insecure_accept_any_host_key": False}), {"insecure_accept_any_host_key"})
        self.assertEqual(
            displaced({"insecure_accept_any_host_key": True}),
            {"insecure_accept_any_host_key", "known_hosts", "host_keys", "host_ca_keys"},
        )
        # a CA adds to known_hosts / host_keys: it displaces only the insecure opt-out
        self.assertEqual(displaced({"host_ca_keys": []}), {"host_ca_keys", "insecure_accept_any_host_key"})
        self.assertNotIn("host_ca_keys", displaced({"known_hosts": "kh"}))

    def test_status_shows_no_secret(self) -> None:
        config = _cluster(token="tok-secret-1")
        shown = safe_settings(config)
        self.assertEqual(shown["token_set"], True)
        self.assertEqual(set(shown["key"]), {"type", "fingerprint"})
        self.assertNotIn("tok-secret-1", repr(shown))
        for hidden in _SOURCE_ONLY_KEYS | {"token"}:
            self.assertNotIn(hidden, set(shown) - {"key"})

    def test_status_order(self) -> None:
        """gateway-ctl show prints the settings in this order."""
        self.assertEqual(
            list(safe_settings(_cluster())),
            [
                "aliases",
                "proxies",
                "user",
                "key",
                "known_hosts",
                "host_keys",
                "host_ca_keys",
                "insecure_accept_any_host_key",
                "networks",
                "hostnames",
                "token_set",
                "connect_timeout",
                "open_timeout",
                "window_size",
                "keepalive_interval",
                "keepalive_count_max",
                "mode",
                "exec_command",
                "resolver_command",
                "resolve_ttl",
                "proxy_command",
                "jump",
                "connections",
                "max_streams",
                "rekey_bytes",
                "rekey_interval",
                "allow_sha1_signatures",
                "ciphers",
                "host_key_algorithms",
                "kex_algorithms",
                "macs",
                "socks",
                "http",
                "remote_listeners",
            ],
        )


class ApiRuleTests(SynchronousTestCase):
    """The table's api column: what an API body may do, and under which [gateway] flag."""

    def test_file_keys_first_in_table_order(self) -> None:
        body = {"token_file": "/t", "proxy_command": "nc %h %p", "key_file": "/k"}
        key, reason = api_body_refusal(body, GatewaySettings()) or ("", "")
        self.assertEqual(key, "key_file")
        self.assertIn("send the content inline as key", reason)

    def test_each_flag_lifts_its_rule(self) -> None:
        self.assertIsNone(api_body_refusal({"key_file": "/k"}, GatewaySettings(api_file_paths=True)))
        self.assertIsNone(
            api_body_refusal({"proxy_command": "nc {host} {port}"}, GatewaySettings(api_proxy_command=True))
        )
        config = _cluster(jump="b")
        self.assertEqual(api_config_refusal(config, GatewaySettings())[0], "jump")  # type: ignore[index]
        self.assertIsNone(api_config_refusal(config, GatewaySettings(api_jump=True)))

    def test_ca_keys_inline(self) -> None:
        """host_ca_keys, like host_keys, is content, not a file: any API body may carry it, and status shows it."""
        ca = _cluster().private_key.public().toString("OPENSSH").decode()
        self.assertIsNone(api_body_refusal({"host_ca_keys": [ca]}, GatewaySettings()))
        shown = safe_settings(_cluster(host_ca_keys=[ca], insecure_accept_any_host_key=False))
        self.assertEqual(shown["host_ca_keys"], [ca])

    def test_relative_path_refused_when_allowed(self) -> None:
        refused = api_body_refusal({"known_hosts": "kh"}, GatewaySettings(api_file_paths=True))
        self.assertEqual(
            refused, ("known_hosts", "'kh' is not an absolute path (a file on the gateway's host must be absolute)")
        )


class GatewayTableTests(SynchronousTestCase):
    def test_every_setting_has_one_row(self) -> None:
        self.assertEqual(set(GATEWAY_KEYS), {f.name for f in dataclasses.fields(GatewaySettings)})
        self.assertEqual(len(GATEWAY_KEYS), len(GATEWAY_SCHEMA))


class SecretFileTests(SynchronousTestCase):
    """L{read_secret_file}: the one permission-checked reader of secret files."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.file = os.path.join(self.dir, "secret")
        with open(self.file, "wb") as f:
            f.write(b"s3cret\n")
        os.chmod(self.file, 0o600)

    def test_reads(self) -> None:
        self.assertEqual(read_secret_file(self.file, "token file"), b"s3cret\n")

    def test_open_to_others(self) -> None:
        os.chmod(self.file, 0o640)
        with self.assertRaises(SecretFileError) as caught:
            read_secret_file(self.file, "token file")
        self.assertEqual(
            str(caught.exception),
            f"token file {self.file!r} is accessible by other users (mode 0640): chmod 600 it",
        )

    def test_too_large(self) -> None:
        with self.assertRaises(SecretFileError) as caught:
            read_secret_file(self.file, "key file", limit=3)
        self.assertEqual(str(caught.exception), f"key file {self.file!r} is larger than 3 bytes")

    def test_missing(self) -> None:
        missing = os.path.join(self.dir, "nope")
        with self.assertRaises(SecretFileError) as caught:
            read_secret_file(missing, "key file")
        self.assertEqual(str(caught.exception), f"cannot read key file {missing!r}: No such file or directory")

    def test_not_regular(self) -> None:
        with self.assertRaises(SecretFileError) as caught:
            read_secret_file(self.dir, "control token file", regular_only=True)
        self.assertEqual(str(caught.exception), f"control token file {self.dir!r} is not a regular file")
        with self.assertRaises(SecretFileError) as caught:
            read_secret_file(self.dir, "key file")
        self.assertEqual(str(caught.exception), f"cannot read key file {self.dir!r}: Is a directory")


class AlgorithmKeyTests(SynchronousTestCase):
    def parse(self, **keys):
        return parse_cluster("a", {**_base_body(), **keys}, "gw.toml", "clusters.a")

    def test_read_in_order(self) -> None:
        config = self.parse(ciphers=["aes256-ctr", "aes128-gcm@openssh.com"], macs=["hmac-sha2-512-etm@openssh.com"])
        self.assertEqual(config.ciphers, ("aes256-ctr", "aes128-gcm@openssh.com"))
        self.assertEqual(config.macs, ("hmac-sha2-512-etm@openssh.com",))
        self.assertEqual(config.kex_algorithms, ())
        self.assertEqual(safe_settings(config)["ciphers"], ["aes256-ctr", "aes128-gcm@openssh.com"])

    def test_refused_naming_the_item(self) -> None:
        from gateway.config import ConfigError

        for keys, where, reason in (
            ({"ciphers": ["aes128-ctr", "aes128-cbc"]}, "clusters.a.ciphers[1]", "'aes128-cbc' is not one the gateway"),
            ({"macs": ["hmac-sha1"]}, "clusters.a.macs[0]", "'hmac-sha1' is not one the gateway offers"),
            ({"kex_algorithms": ["diffie-hellman-group14-sha1"]}, "clusters.a.kex_algorithms[0]", "is not one"),
            ({"host_key_algorithms": ["ssh-dss"]}, "clusters.a.host_key_algorithms[0]", "is not one"),
            ({"ciphers": ["aes128-ctr", "aes128-ctr"]}, "clusters.a.ciphers[1]", "is listed twice"),
            ({"ciphers": []}, "clusters.a.ciphers", "must name at least one algorithm"),
            ({"ciphers": "aes128-ctr"}, "clusters.a.ciphers", "expected an array of strings"),
        ):
            e = self.assertRaises(ConfigError, self.parse, **keys)
            self.assertEqual(e.key, where, keys)
            self.assertIn(reason, e.reason, keys)
