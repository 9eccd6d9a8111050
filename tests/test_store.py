"""
Tests for L{gateway.store.statefile}: the persistent registry of API-added clusters.
"""

from __future__ import annotations

import json
import os
import random
import stat
import types

from twisted.trial.unittest import SynchronousTestCase

from gateway.config import ClusterConfig, ConfigError, GatewaySettings
from gateway.control.bodies import validate_body
from gateway.store import statefile as store_module
from gateway.store.statefile import STORE_VERSION, StateFile, StoreError
from gateway.testing import generate_key, private_pem, public_line

TOKEN = "tok-3f9a0c7e-store"


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class _Keys:
    """One client key and one host key, generated once for the module."""

    def __init__(self) -> None:
        self.client = generate_key()
        self.host = generate_key()
        self.pem = private_pem(self.client)
        self.host_line = public_line(self.host)


KEYS = _Keys()


def body(**overrides) -> dict:
    """A valid cluster body, as a client would PUT it."""
    result = {
        "proxies": ["192.0.2.10:22", "192.0.2.11"],
        "user": "gateway",
        "key": KEYS.pem,
        "host_keys": [KEYS.host_line],
        "networks": ["10.20.0.0/24"],
        "token": TOKEN,
    }
    result.update(overrides)
    return result


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir, 0o700)
        self.path = os.path.join(self.dir, "clusters.json")
        self.store = StateFile(self.path)

    def write(self, content: bytes | str, mode: int = 0o600, path: str | None = None) -> str:
        path = path or self.path
        if isinstance(content, str):
            content = content.encode("utf-8")
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def snapshot(self, path: str | None = None) -> tuple[bytes, int, int]:
        path = path or self.path
        with open(path, "rb") as f:
            data = f.read()
        st = os.stat(path)
        return data, stat.S_IMODE(st.st_mode), st.st_ino

    def assertNoTemp(self) -> None:
        leftovers = [n for n in os.listdir(os.path.dirname(self.path)) if n.endswith(".tmp")]
        self.assertEqual(leftovers, [])


class SaveLoadTests(StoreTestCase):
    def test_round_trip(self) -> None:
        clusters = {"a": body(), "b": body(networks=["10.21.0.0/24"], aliases=["net-b"])}
        self.store.save(clusters)
        self.assertEqual(self.store.load(), clusters)
        self.assertEqual(StateFile(self.path).load(), clusters)

    def test_file_shape(self) -> None:
        """The file is {"version": 1, "clusters": {...}}, sorted, indented."""
        clusters = {"b": body(), "a": body(user="root")}
        self.store.save(clusters)
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
        self.assertEqual(data, {"version": STORE_VERSION, "clusters": clusters})
        self.assertEqual(data["version"], 1)
        self.assertEqual(text, json.dumps(data, sort_keys=True, indent=2) + "\n")

    def test_file_mode_0600(self) -> None:
        self.store.save({"a": body()})
        self.assertEqual(_mode(self.path), 0o600)

    def test_file_mode_0600_whatever_the_umask(self) -> None:
        old = os.umask(0)
        try:
            self.store.save({"a": body()})
            self.store.save({"a": body(user="other")})
        finally:
            os.umask(old)
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(self.store.load()["a"]["user"], "other")

    def test_parent_directory_created_0700(self) -> None:
        path = os.path.join(self.dir, "var", "lib", "gateway", "clusters.json")
        store = StateFile(path)
        old = os.umask(0o022)
        try:
            store.save({"a": body()})
        finally:
            os.umask(old)
        self.assertEqual(_mode(os.path.dirname(path)), 0o700)
        self.assertEqual(_mode(path), 0o600)
        self.assertEqual(store.load(), {"a": body()})

    def test_existing_directory_mode_kept(self) -> None:
        """An existing directory is used as it is (the file itself is 0600)."""
        os.chmod(self.dir, 0o755)
        self.store.save({"a": body()})
        self.assertEqual(_mode(self.dir), 0o755)
        self.assertEqual(_mode(self.path), 0o600)

    def test_empty_registry(self) -> None:
        self.store.save({"a": body()})
        self.store.save({})
        self.assertEqual(self.store.load(), {})
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"version": 1, "clusters": {}})

    def test_mappings_and_tuples(self) -> None:
        """Read-only mappings and tuples are stored as JSON objects and arrays."""
        frozen = types.MappingProxyType({"a": types.MappingProxyType(body(networks=("10.20.0.0/24",)))})
        self.store.save(frozen)
        self.assertEqual(self.store.load(), {"a": body()})

    def test_unencodable_registry(self) -> None:
        """A value JSON cannot hold: StoreError, the old file is kept."""
        self.store.save({"a": body()})
        before = self.snapshot()
        for bad in ({"a": body(connect_timeout=float("nan"))}, {"a": body(user=object())}, {"a": {1: "x"}}):
            e = self.assertRaises(StoreError, self.store.save, bad)
            self.assertIn(self.path, str(e))
            self.assertNotIn(TOKEN, str(e))
        self.assertEqual(self.snapshot(), before)
        self.assertNoTemp()

    def test_missing_file(self) -> None:
        self.assertEqual(self.store.load(), {})
        self.assertFalse(os.path.exists(self.path))

    def test_missing_directory(self) -> None:
        """Loading does not create anything."""
        path = os.path.join(self.dir, "nowhere", "clusters.json")
        self.assertEqual(StateFile(path).load(), {})
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    def test_save_leaves_no_temp(self) -> None:
        self.store.save({"a": body()})
        self.store.save({"b": body()})
        self.assertEqual(os.listdir(self.dir), ["clusters.json"])


class BadFileTests(StoreTestCase):
    """
    A bad file stops the start with a StoreError naming it, and is left
    exactly as it was.
    """

    def assertRefused(self, content: bytes | str, mode: int = 0o600, *fragments: str) -> StoreError:
        self.write(content, mode)
        before = self.snapshot()
        e = self.assertRaises(StoreError, self.store.load)
        message = str(e)
        self.assertTrue(message.startswith(self.path + ": "), message)
        self.assertEqual(e.path, self.path)
        self.assertIn("refusing to start (the file is kept as it is)", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn(TOKEN, message)
        self.assertNotIn("PRIVATE KEY", message)
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(os.listdir(self.dir), ["clusters.json"])
        return e

    def test_corrupt_json(self) -> None:
        text = '{\n  "version": 1,\n  "clusters": {"a": {"token": "' + TOKEN + '",}}\n}\n'
        self.assertRefused(text, 0o600, "not valid JSON (line 3")

    def test_corrupt_json_position(self) -> None:
        self.assertRefused('{\n  "version": 1,\n  "clusters" {}\n}', 0o600, "not valid JSON (line 3 column 14)")

    def test_truncated(self) -> None:
        """A half-written file (e.g. by another tool) is refused, not emptied."""
        self.store.save({"a": body()})
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertRefused(data[: len(data) // 2], 0o600, "not valid JSON")

    def test_empty_file(self) -> None:
        self.assertRefused(b"", 0o600, "not valid JSON (line 1 column 1)")

    def test_not_utf8(self) -> None:
        self.assertRefused(b'{"version": 1, "clusters": {"\xff": {}}}', 0o600, "not UTF-8")

    def test_nan(self) -> None:
        self.assertRefused('{"version": 1, "clusters": {"a": {"connect_timeout": NaN}}}', 0o600, "NaN")

    def test_not_an_object(self) -> None:
        self.assertRefused("[]", 0o600, "expected a JSON object", "got array")

    def test_clusters_not_an_object(self) -> None:
        self.assertRefused('{"version": 1, "clusters": ["a"]}', 0o600, '"clusters": expected a JSON object, got array')

    def test_body_not_an_object(self) -> None:
        self.assertRefused(
            json.dumps({"version": 1, "clusters": {"a": TOKEN}}), 0o600, "'a': expected a JSON object, got string"
        )

    def test_missing_clusters(self) -> None:
        self.assertRefused('{"version": 1}', 0o600, 'missing "clusters"')

    def test_missing_version(self) -> None:
        self.assertRefused('{"clusters": {}}', 0o600, 'missing "version"')

    def test_unknown_top_level_key(self) -> None:
        self.assertRefused('{"version": 1, "clusters": {}, "extra": 1}', 0o600, "unknown top-level key 'extra'")

    def test_wrong_version(self) -> None:
        self.assertRefused('{"version": 2, "clusters": {}}', 0o600, "unsupported version 2")

    def test_wrong_version_type(self) -> None:
        self.assertRefused('{"version": "1", "clusters": {}}', 0o600, "unsupported version string")
        self.assertRefused('{"version": 1.0, "clusters": {}}', 0o600, "unsupported version 1.0")
        self.assertRefused('{"version": true, "clusters": {}}', 0o600, "unsupported version boolean")

    def test_duplicate_cluster(self) -> None:
        """A cluster given twice would silently lose one: refused."""
        self.assertRefused('{"version": 1, "clusters": {"a": {}, "a": {}}}', 0o600, "'a' appears twice")

    def test_mode_0644(self) -> None:
        self.store.save({"a": body()})
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertRefused(data, 0o644, "accessible by other users (mode 0644)", "chmod 600")

    def test_group_or_other_bits(self) -> None:
        content = json.dumps({"version": 1, "clusters": {}})
        for mode in (0o640, 0o604, 0o610, 0o601, 0o660):
            self.assertRefused(content, mode, f"(mode {mode:04o})", "chmod 600")

    def test_mode_checked_before_content(self) -> None:
        """An open file is refused for its mode even when its content is bad."""
        self.assertRefused("not json", 0o644, "chmod 600")

    def test_owner_only_modes_accepted(self) -> None:
        content = json.dumps({"version": 1, "clusters": {"a": body()}})
        for mode in (0o400, 0o600, 0o700):
            self.write(content, mode)
            self.assertEqual(self.store.load(), {"a": body()})

    def test_directory(self) -> None:
        os.mkdir(self.path, 0o700)
        e = self.assertRaises(StoreError, self.store.load)
        self.assertIn(self.path, str(e))
        self.assertIn("not a regular file", str(e))
        self.assertTrue(os.path.isdir(self.path))

    def test_bad_file_is_not_overwritten_by_load(self) -> None:
        """Repeated loads change nothing either."""
        self.write("{oops", 0o600)
        before = self.snapshot()
        for _ in range(3):
            self.assertRaises(StoreError, self.store.load)
        self.assertEqual(self.snapshot(), before)


class CrashTests(StoreTestCase):
    """A save that fails at any step leaves the previous file whole."""

    OLD = {"a": body(), "b": body(networks=["10.21.0.0/24"])}
    NEW = {"c": body(networks=["10.22.0.0/24"])}

    def fail(self, *args, **kwargs):
        raise OSError(5, "Input/output error (simulated)")

    def assertOldKept(self, before: tuple[bytes, int, int]) -> None:
        e = self.assertRaises(StoreError, self.store.save, self.NEW)
        self.assertIn(self.path, str(e))
        self.assertIn("simulated", str(e))
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.store.load(), self.OLD)
        self.assertNoTemp()

    def test_replace_fails(self) -> None:
        self.store.save(self.OLD)
        before = self.snapshot()
        self.patch(os, "replace", self.fail)
        self.assertOldKept(before)

    def test_fsync_fails(self) -> None:
        self.store.save(self.OLD)
        before = self.snapshot()
        self.patch(os, "fsync", self.fail)
        self.assertOldKept(before)

    def test_write_fails(self) -> None:
        """A full disk while writing the temporary file."""
        self.store.save(self.OLD)
        before = self.snapshot()
        real_write = os.write
        calls = []

        def write_some_then_fail(fd, data):
            calls.append(fd)
            if len(calls) > 1:
                raise OSError(28, "No space left on device (simulated)")
            return real_write(fd, data[:10])

        self.patch(os, "write", write_some_then_fail)
        self.assertOldKept(before)

    def test_first_save_fails(self) -> None:
        """With no previous file, a failed save leaves no file at all."""
        self.patch(os, "replace", self.fail)
        self.assertRaises(StoreError, self.store.save, self.NEW)
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.store.load(), {})

    def test_failure_then_success(self) -> None:
        self.store.save(self.OLD)
        real_replace = os.replace
        self.patch(os, "replace", self.fail)
        self.assertRaises(StoreError, self.store.save, self.NEW)
        self.patch(os, "replace", real_replace)
        self.store.save(self.NEW)
        self.assertEqual(self.store.load(), self.NEW)
        self.assertEqual(os.listdir(self.dir), ["clusters.json"])

    def test_directory_fsync_fails(self) -> None:
        """
        After the rename the new file is in place: the error says it was
        saved but may not survive a crash.
        """
        self.store.save(self.OLD)
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(5, "Input/output error (simulated)")
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        e = self.assertRaises(StoreError, self.store.save, self.NEW)
        self.assertIn("saved, but cannot fsync directory", str(e))
        self.assertEqual(self.store.load(), self.NEW)
        self.assertNoTemp()

    def test_directory_is_fsynced(self) -> None:
        """The temporary file and then the directory are fsynced."""
        real_fsync = os.fsync
        kinds = []

        def fsync(fd):
            kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        self.store.save(self.OLD)
        self.assertEqual(kinds, ["file", "dir"])

    def test_temp_file_created_exclusively_0600(self) -> None:
        """The temporary file is created O_EXCL with mode 0600 in the same directory."""
        real_open = os.open
        opened = []

        def spy(path, flags, mode=0o777, **kw):
            fd = real_open(path, flags, mode, **kw)
            if flags & os.O_CREAT:
                opened.append((path, flags, mode, _mode(path)))
            return fd

        self.patch(os, "open", spy)
        self.store.save(self.OLD)
        self.assertEqual(len(opened), 1)
        path, flags, mode, actual = opened[0]
        self.assertEqual(os.path.dirname(path), self.dir)
        self.assertTrue(flags & os.O_EXCL)
        self.assertEqual(mode, 0o600)
        self.assertEqual(actual, 0o600)

    def crash_leftover(self, name: str = ".clusters.json.0123456789abcdef.tmp") -> str:
        """A temporary file left by a crash between write and rename."""
        partial = json.dumps({"version": 1, "clusters": self.NEW}, indent=2)
        return self.write(partial[: len(partial) // 3], 0o600, os.path.join(self.dir, name))

    def test_leftover_temp_ignored_by_load(self) -> None:
        """
        A truncated temporary file does not affect load (which leaves it
        alone); the next successful save removes it.
        """
        self.store.save(self.OLD)
        leftover = self.crash_leftover()
        self.assertEqual(self.store.load(), self.OLD)
        self.assertTrue(os.path.exists(leftover))
        self.store.save(self.NEW)
        self.assertFalse(os.path.exists(leftover))
        self.assertEqual(self.store.load(), self.NEW)
        self.assertEqual(os.listdir(self.dir), ["clusters.json"])

    def test_leftover_temp_without_store(self) -> None:
        """A crash during the very first save: the store is still empty."""
        self.crash_leftover()
        self.assertEqual(self.store.load(), {})
        self.store.save(self.OLD)
        self.assertEqual(os.listdir(self.dir), ["clusters.json"])

    def test_other_files_kept(self) -> None:
        """Only this store's temporary files are cleaned up."""
        others = [
            self.write("x", 0o600, os.path.join(self.dir, name))
            for name in (".other.json.0123.tmp", "clusters.json.bak", ".clusters.json.swp")
        ]
        self.store.save(self.OLD)
        for path in others:
            self.assertTrue(os.path.exists(path), path)


class SequentialSaveTests(StoreTestCase):
    def test_fifty_saves(self) -> None:
        """
        50 PUT/DELETE handled one after the other by the reactor, each
        followed by a save of the whole registry: the file ends equal to the
        last registry.
        """
        rng = random.Random(20240611)
        registry: dict[str, dict] = {}
        history = []
        for i in range(50):
            if registry and rng.random() < 0.3:
                del registry[rng.choice(sorted(registry))]
            else:
                name = f"c{rng.randrange(12)}"
                registry[name] = body(networks=[f"10.{i}.0.0/24"], connections=rng.randint(1, 16))
            self.store.save(registry)
            history.append(json.loads(json.dumps(registry)))
        self.assertEqual(self.store.load(), registry)
        self.assertEqual(self.store.load(), history[-1])
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"version": 1, "clusters": history[-1]})
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(os.listdir(self.dir), ["clusters.json"])

    def test_save_copies(self) -> None:
        """Changing the registry after a save does not change the file."""
        registry = {"a": body()}
        self.store.save(registry)
        registry["a"]["user"] = "changed"
        registry["b"] = body()
        self.assertEqual(self.store.load(), {"a": body()})


class ValidateBodyTests(SynchronousTestCase):
    def assertField(
        self, name: str, data, key: str, *fragments: str, settings: GatewaySettings | None = None
    ) -> ConfigError:
        e = self.assertRaises(ConfigError, validate_body, name, data, settings=settings)
        self.assertEqual(e.key, key, str(e))
        self.assertEqual(e.source, "request body")
        self.assertTrue(str(e).startswith(f"request body: {key}: "), str(e))
        for fragment in fragments:
            self.assertIn(fragment, e.reason)
        self.assertNotIn(TOKEN, str(e))
        self.assertNotIn("PRIVATE KEY", str(e))
        return e

    def test_valid(self) -> None:
        cluster = validate_body("cluster-a", body(aliases=["net-a"]))
        self.assertIsInstance(cluster, ClusterConfig)
        self.assertEqual(cluster.name, "cluster-a")
        self.assertEqual(cluster.aliases, ("net-a",))
        self.assertEqual([str(p) for p in cluster.proxies], ["192.0.2.10:22", "192.0.2.11:22"])
        self.assertEqual(cluster.user, "gateway")
        self.assertEqual(cluster.private_key.public(), KEYS.client.public())
        self.assertEqual(cluster.host_keys, (KEYS.host.public(),))
        self.assertIsNone(cluster.known_hosts)
        self.assertEqual([str(n) for n in cluster.networks], ["10.20.0.0/24"])
        self.assertEqual(cluster.token, TOKEN)
        self.assertNotIn(TOKEN, repr(cluster))

    def test_valid_after_store_round_trip(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "clusters.json")
        store = StateFile(path)
        store.save({"a": body()})
        ((name, loaded),) = store.load().items()
        self.assertEqual(validate_body(name, loaded, source=path).token, TOKEN)

    def test_source(self) -> None:
        e = self.assertRaises(ConfigError, validate_body, "a", body(networks=["x"]), "/var/lib/gw/clusters.json")
        self.assertTrue(str(e).startswith("/var/lib/gw/clusters.json: networks[0]: "))

    def test_bad_network(self) -> None:
        self.assertField("a", body(networks=["10.20.0.1/24"]), "networks[0]", "did you mean 10.20.0.0/24")
        self.assertField("a", body(networks=["10.20.0.0/24", "nope"]), "networks[1]", "not a valid network")

    def test_missing(self) -> None:
        data = body()
        del data["proxies"]
        self.assertField("a", data, "proxies", "missing")
        data = body()
        del data["key"]
        self.assertField("a", data, "key_file", "missing private key")

    def test_unknown_key(self) -> None:
        data = body()
        data["usr"] = data.pop("user")
        self.assertField("a", data, "usr", "did you mean user?")

    def test_listeners(self) -> None:
        """API clusters get TCP listeners; files and privileged ports need the operator's consent."""
        cluster = validate_body("a", body(socks="tcp:0:interface=127.0.0.1", http=["tcp:31281"]))
        self.assertEqual((cluster.socks, cluster.http), (("tcp:0:interface=127.0.0.1",), ("tcp:31281",)))
        self.assertField("a", body(socks="unix:/tmp/gw.sock"), "socks", "tcp: endpoints only", "api_file_paths")
        self.assertField("a", body(http=["tcp:2000", "ssl:4443:privateKey=/etc/k.pem"]), "http", "tcp: endpoints only")
        self.assertField("a", body(socks="tcp:80"), "socks", "privileged port 80")
        allowed = GatewaySettings(api_file_paths=True)
        self.assertEqual(
            validate_body("a", body(socks="unix:/tmp/gw.sock"), settings=allowed).socks, ("unix:/tmp/gw.sock",)
        )

    def test_privileged_ports_refused_whatever_the_setting(self) -> None:
        """api_file_paths is about files: a port below 1024 stays the host's (control-api.md), in any spelling."""
        for endpoint in ("tcp:0080", "tcp:port=443", "tcp6:22:interface=\\:\\:1", "tcp:interface=127.0.0.1:port=80"):
            self.assertField("a", body(socks=endpoint), "socks", settings=GatewaySettings())
        allowed = GatewaySettings(api_file_paths=True)
        for endpoint in ("tcp:80", "tcp:interface=127.0.0.1:port=80", "ssl:443:privateKey=/etc/k.pem", "ssl:port=1"):
            self.assertField("a", body(http=[endpoint]), "http", "privileged port", settings=allowed)
        self.assertEqual(validate_body("a", body(socks="tcp:port=1080"), settings=allowed).socks, ("tcp:port=1080",))

    def test_remote_listeners_need_the_operator(self) -> None:
        self.assertField("a", body(remote_listeners=True), "remote_listeners", "api_remote_listeners")
        self.assertFalse(validate_body("a", body(remote_listeners=False)).remote_listeners)
        allowed = GatewaySettings(api_remote_listeners=True)
        self.assertTrue(validate_body("a", body(remote_listeners=True), settings=allowed).remote_listeners)

    def test_lone_surrogates_are_a_400(self) -> None:
        """JSON may carry "\\ud800"; it is no text: refused naming the field, not a 500 with a traceback."""
        for field in ("token", "passphrase", "user"):
            self.assertField("a", body(**{field: "x\ud800"}), field, "lone UTF-16 surrogate")
        self.assertField("a", body(networks=["10.20.0.0/24", "\udfff"]), "networks[1]", "lone UTF-16 surrogate")

    def test_wrong_type(self) -> None:
        self.assertField("a", body(proxies="192.0.2.10"), "proxies", "got string")
        self.assertField("a", body(connections="4"), "connections")

    def test_bad_key(self) -> None:
        pem = KEYS.pem
        self.assertField("a", body(key=pem[:-80]), "key")
        self.assertField("a", body(key=public_line(KEYS.client)), "key", "public key")

    def test_bad_host_key(self) -> None:
        self.assertField("a", body(host_keys=["ssh-ed25519 AAAAbad"]), "host_keys[0]", "ssh-ed25519")

    def test_bad_token(self) -> None:
        self.assertField("a", body(token=""), "token", "must not be empty")

    def test_not_an_object(self) -> None:
        for data, kind in (([], "array"), ("x", "string"), (None, "null"), (3, "number")):
            self.assertField("a", data, "(body)", f"expected a JSON object, got {kind}")

    def test_bad_name(self) -> None:
        self.assertField("bad name", body(), "(name)", "cluster name 'bad name' is invalid")
        self.assertField("", body(), "(name)", "is invalid")

    def test_alias_field(self) -> None:
        self.assertField("a", body(aliases=["ok", "no way"]), "aliases[1]", "alias 'no way' is invalid")

    def test_jump(self) -> None:
        allowed = GatewaySettings(api_jump=True)
        known = {"a": "a", "net-a": "a"}
        cluster = validate_body("b", body(jump="net-a"), known_clusters=known, settings=allowed)
        self.assertEqual(cluster.jump_cluster, "a")
        self.assertField("a", body(jump="a"), "jump", "cannot jump through itself", settings=allowed)

    def test_jump_to_a_cluster_is_off_by_default(self) -> None:
        """
        Through another cluster's connection, that cluster's proxy node would
        connect wherever the body's proxies say, outside its policy.
        """
        e = self.assertRaises(
            ConfigError, validate_body, "b", body(jump="net-a"), known_clusters={"a": "a", "net-a": "a"}
        )
        self.assertEqual(e.key, "jump")
        self.assertIn("api_jump = true", e.reason)
        # a jump to an address uses this body's own key: allowed
        cluster = validate_body("b", body(jump="root@192.0.2.20:2222"), known_clusters={"a": "a"})
        self.assertEqual((cluster.jump_cluster, str(cluster.jump_address)), (None, "192.0.2.20:2222"))

    def test_proxy_command_is_off_by_default(self) -> None:
        e = self.assertField("a", body(proxy_command="nc {host} {port}"), "proxy_command", "api_proxy_command = true")
        self.assertNotIn("nc {host}", e.reason)
        allowed = GatewaySettings(api_proxy_command=True)
        cluster = validate_body("a", body(proxy_command="nc {host} {port}"), settings=allowed)
        self.assertEqual(cluster.proxy_command, "nc {host} {port}")

    def test_file_keys_are_off_by_default(self) -> None:
        """
        An API client may not make the gateway read a file: not even its
        existence is checked (no oracle), whatever the path.
        """
        for k, inline in (
            ("key_file", "key"),
            ("known_hosts", "host_keys"),
            ("token_file", "token"),
            ("passphrase_file", "passphrase"),
        ):
            for path in ("/root/.ssh/id_ed25519", "relative/file", "/nonexistent", 3):
                e = self.assertField("a", {**body(), k: path}, k, "api_file_paths = true", f"inline as {inline}")
                self.assertNotIn(str(path), e.reason)

    def test_file_keys_allowed_when_absolute(self) -> None:
        """With api_file_paths, key_file / known_hosts / token_file name files on the gateway's host."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory, 0o700)

        def put(name: str, content: str, mode: int = 0o600) -> str:
            path = os.path.join(directory, name)
            with open(path, "w", encoding="ascii") as f:
                f.write(content)
            os.chmod(path, mode)
            return path

        data = body(
            key_file=put("id_ed25519", KEYS.pem),
            known_hosts=put("known_hosts", f"192.0.2.10 {KEYS.host_line}\n", 0o644),
            token_file=put("token", TOKEN + "\n"),
        )
        for k in ("key", "host_keys", "token"):
            del data[k]
        allowed = GatewaySettings(api_file_paths=True)
        cluster = validate_body("a", data, settings=allowed)
        self.assertEqual(cluster.private_key.public(), KEYS.client.public())
        self.assertEqual(cluster.known_hosts, os.path.join(directory, "known_hosts"))
        self.assertEqual(cluster.token, TOKEN)

        os.chmod(data["key_file"], 0o644)
        self.assertField("a", data, "key_file", "chmod 600", settings=allowed)

    def test_file_keys_relative_refused(self) -> None:
        allowed = GatewaySettings(api_file_paths=True)
        for k in ("key_file", "known_hosts", "token_file", "passphrase_file"):
            self.assertField("a", {**body(), k: "relative/file"}, k, "not an absolute path", settings=allowed)

    def test_both_key_and_key_file(self) -> None:
        allowed = GatewaySettings(api_file_paths=True)
        self.assertField("a", body(key_file="/nonexistent/id"), "key", "mutually exclusive", settings=allowed)

    def test_dot_names_refused(self) -> None:
        for dots in (".", ".."):
            self.assertField(dots, body(), "(name)", "(not . or ..)")
            self.assertField("a", body(aliases=[dots]), "aliases[0]", "is invalid")


class ModuleTests(SynchronousTestCase):
    def test_store_error_str(self) -> None:
        e = StoreError("/var/lib/gateway/clusters.json", "not valid JSON")
        self.assertEqual(str(e), "/var/lib/gateway/clusters.json: not valid JSON")
        self.assertEqual(e.path, "/var/lib/gateway/clusters.json")
        self.assertEqual(e.reason, "not valid JSON")

    def test_exports(self) -> None:
        for name in store_module.__all__:
            self.assertTrue(hasattr(store_module, name), name)
