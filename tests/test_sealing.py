"""
Secrets at rest: sealing the store's keys, passphrases and tokens
(L{gateway.control.sealing}), the store reading and writing them sealed, and
a gateway without the right key refusing to start.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from gateway.app.tap import Options
from gateway.config import ConfigError
from gateway.control.bodies import validate_body
from gateway.store.sealing import Sealer, SealError, has_plaintext_secrets, read_sealing_key
from gateway.store.statefile import StateFile, StoreError
from gateway.testing.keys import generate_key, private_pem, public_line
from tests.support import capture_events

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
PEM = private_pem(generate_key())


def body(**more: object) -> dict:
    return {
        "proxies": ["127.0.0.1:1"],
        "user": "root",
        "key": PEM,
        "host_keys": [public_line(generate_key())],
        "networks": ["10.0.0.0/24"],
        "token": "tok-sealed-42",
        **more,
    }


class SealerTests(SynchronousTestCase):
    def test_round_trip_and_only_secrets_sealed(self) -> None:
        sealer = Sealer(KEY_A)
        original = body(passphrase="pass-77")
        sealed = sealer.seal_body("a", original)
        for field in ("key", "token", "passphrase"):
            self.assertTrue(sealed[field].startswith("sealed:v1:"), field)
        self.assertEqual(sealed["networks"], original["networks"])
        self.assertEqual(sealer.open_body("a", sealer.seal_body("a", sealed)), sealed)  # whatever it looks like
        self.assertEqual(sealer.open_body("a", sealed), original)
        self.assertNotEqual(sealer.seal_body("a", original)["token"], sealed["token"])  # a nonce each time

    def test_bound_to_its_cluster_field_and_key(self) -> None:
        sealed = Sealer(KEY_A).seal_body("a", body())
        for attempt in (
            lambda: Sealer(KEY_B).open_body("a", sealed),
            lambda: Sealer(KEY_A).open_body("b", sealed),  # copied into another cluster's body
            lambda: Sealer(KEY_A).open_body("a", {**sealed, "passphrase": sealed["token"]}),  # another field
            lambda: Sealer(KEY_A).open_body("a", {**sealed, "token": sealed["token"][:-4] + "AAAA"}),
            lambda: Sealer(KEY_A).open_body("a", {**sealed, "token": "sealed:v1:@@@"}),
        ):
            e = self.assertRaises(SealError, attempt)
            self.assertIn("clusters.", str(e))
            self.assertNotIn("tok-sealed", str(e))
        self.assertNotIn(str(KEY_A), repr(Sealer(KEY_A)))

    def test_plaintext_detection(self) -> None:
        self.assertTrue(has_plaintext_secrets({"a": body()}))
        self.assertFalse(has_plaintext_secrets({"a": Sealer(KEY_A).seal_body("a", body())}))
        self.assertFalse(has_plaintext_secrets({"a": {"networks": []}}))


class SealedLookingValueTests(SynchronousTestCase):
    def test_api_refuses_the_sealed_form(self) -> None:
        """A client's token in the store's sealed form would stop the next start-up: 400, naming the field."""
        sealed = Sealer(KEY_A).seal_body("a", body())["token"]
        e = self.assertRaises(ConfigError, validate_body, "a", body(token=sealed))
        self.assertEqual(e.key, "token")
        self.assertIn("sealed form", e.reason)


class KeyFileTests(SynchronousTestCase):
    def write(self, text: str, mode: int = 0o600) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_hex(self) -> None:
        self.assertEqual(read_sealing_key(self.write(KEY_A.hex() + "\n")), KEY_A)

    def test_refused(self) -> None:
        for text, mode, reason in (
            ("abc", 0o600, "64 hex digits"),
            (KEY_A.hex() * 2, 0o600, "64 hex digits"),
            (KEY_A.hex(), 0o644, "accessible by other users"),
        ):
            e = self.assertRaises(ValueError, read_sealing_key, self.write(text, mode))
            self.assertIn(reason, str(e))
            self.assertNotIn(KEY_A.hex(), str(e))


class SealedStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory, 0o700)
        self.path = os.path.join(directory, "clusters.json")

    def test_written_sealed_read_open(self) -> None:
        original = body()
        StateFile(self.path, Sealer(KEY_A)).save({"a": original})
        with open(self.path) as f:
            raw = f.read()
        self.assertNotIn("PRIVATE KEY", raw)
        self.assertNotIn("tok-sealed-42", raw)
        self.assertEqual(StateFile(self.path, Sealer(KEY_A)).load(), {"a": original})

    def test_without_or_with_another_key(self) -> None:
        StateFile(self.path, Sealer(KEY_A)).save({"a": body()})
        e = self.assertRaises(StoreError, StateFile(self.path).load)
        self.assertIn("clusters.a.key is sealed: set [store] secret_key_file", str(e))
        e = self.assertRaises(StoreError, StateFile(self.path, Sealer(KEY_B)).load)
        self.assertIn("does not open it", str(e))

    def test_plaintext_store_sealed_at_the_next_save(self) -> None:
        StateFile(self.path).save({"a": body()})
        store = StateFile(self.path, Sealer(KEY_A))
        bodies = store.load()
        self.assertEqual(bodies["a"]["token"], "tok-sealed-42")
        store.save(bodies)
        with open(self.path) as f:
            self.assertNotIn("tok-sealed-42", f.read())


class StartUpTests(SynchronousTestCase):
    """twistd gateway with a state file: the key must match, and plaintext is warned of."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir, 0o700)
        self.state = os.path.join(self.dir, "state.json")

    def options(self, store_table: str = "") -> list[str]:
        config = os.path.join(self.dir, "gw.toml")
        with open(config, "w") as f:
            f.write(
                f'[listen]\ncontrol = "tcp:0:interface=127.0.0.1"\n[gateway]\nstate_file = "{self.state}"\n'
                + store_table
            )
        return [f"--config={config}"]

    def key_file(self, key: bytes) -> str:
        path = os.path.join(self.dir, "store.key")
        with open(path, "w") as f:
            f.write(key.hex())
        os.chmod(path, 0o600)
        return path

    def test_sealed_store_needs_its_key(self) -> None:
        StateFile(self.state, Sealer(KEY_A)).save({"a": body()})
        e = self.assertRaises(SystemExit, Options().parseOptions, self.options())
        self.assertIn("clusters.a.key is sealed", str(e.code))
        table = f'[store]\nsecret_key_file = "{self.key_file(KEY_B)}"\n'
        e = self.assertRaises(SystemExit, Options().parseOptions, self.options(table))
        self.assertIn("does not open it", str(e.code))
        table = f'[store]\nsecret_key_file = "{self.key_file(KEY_A)}"\n'
        options = Options()
        options.parseOptions(self.options(table))
        self.assertEqual(list(options.api_clusters), ["a"])

    def test_plaintext_store_sealed_at_start_up_with_a_key(self) -> None:
        # Not left readable on disk until some API change happens to save it.
        original = body()
        StateFile(self.state).save({"a": original})
        table = f'[store]\nsecret_key_file = "{self.key_file(KEY_A)}"\n'
        events = capture_events(self)
        Options().parseOptions(self.options(table))
        with open(self.state) as f:
            raw = f.read()
        self.assertNotIn("tok-sealed-42", raw)
        self.assertNotIn("PRIVATE KEY", raw)
        self.assertEqual(StateFile(self.state, Sealer(KEY_A)).load(), {"a": original})
        self.assertEqual([e for e in events if e["log_level"].name == "warn"], [])

    def test_plaintext_store_is_warned_of(self) -> None:
        StateFile(self.state).save({"a": body()})
        events = capture_events(self)
        Options().parseOptions(self.options())
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("plaintext", warnings[0]["log_format"])

    def test_bad_key_file_and_store_table(self) -> None:
        e = self.assertRaises(
            SystemExit, Options().parseOptions, self.options('[store]\nsecret_key_file = "/nonexistent"\n')
        )
        self.assertIn("store.secret_key_file: cannot read secret key file", str(e.code))
        e = self.assertRaises(SystemExit, Options().parseOptions, self.options('[store]\nbackend = "consul"\n'))
        self.assertIn("store.backend: unknown backend 'consul' (expected one of: file, etcd)", str(e.code))
        e = self.assertRaises(SystemExit, Options().parseOptions, self.options('[store]\nprefix = "/gw/"\n'))
        self.assertIn('store.prefix: is a key of the etcd backend: set backend = "etcd" too', str(e.code))
