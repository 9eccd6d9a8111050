"""
The persistent registry of the clusters added through the control API.

The store keeps the I{bodies} clients PUT, as they were sent: one JSON object
per cluster, with the keys of a C{[clusters.NAME]} TOML table (C{key} as PEM
text, possibly C{token} or C{passphrase}).  The file therefore holds secrets:
it is written with mode 0600 in a directory created 0700, and L{StateFile.load}
refuses a file that group or others can access, as OpenSSH refuses such a
private key.  The file is::

    {
      "clusters": {
        "NAME": {"proxies": [...], "user": "...", "key": "-----BEGIN ...", ...},
        ...
      },
      "version": 1
    }

Concurrency model
=================

The gateway is single-threaded (the Twisted reactor): the API validates a
body (L{validate_body}), updates the in-memory registry, then calls
L{StateFile.save} with the I{whole} current registry.  Saves are therefore
sequential and never interleave; each is synchronous and complete when it
returns, so concurrent PUT/DELETE requests, handled one after the other,
leave the file equal to the registry after the last one.  Only one gateway
process may use a given store file (there is no lock between processes).

Crash safety
============

L{StateFile.save} writes a temporary file next to the store
(C{.NAME.RANDOM.tmp}, created with C{O_CREAT | O_EXCL} and mode 0600),
fsyncs it, renames it onto the store with C{os.replace} (atomic within a
file system) and fsyncs the directory.  A crash at any point leaves either
the old or the new complete file, never a mix.  On any error the temporary
file is removed and the old file is left as it was.

A temporary file left behind by a crash (between creating it and the
rename) is never read: L{StateFile.load} ignores it, and the next
successful L{StateFile.save} removes it.

A bad store file (unreadable, not JSON, wrong shape or version, too open
permissions) is never overwritten, renamed or "repaired": L{StateFile.load}
raises L{StoreError} and the gateway refuses to start, so that an operator
can look at the file; silently starting with no cluster would lose them all
at the next save.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Mapping
from typing import Any

from gateway.config.values import show as _show
from gateway.control import strictjson
from gateway.store.sealing import SEALED_FIELDS, Sealer, SealError, has_plaintext_secrets, is_sealed

__all__ = ["STORE_VERSION", "StateFile", "StoreError", "type_name"]

#: The version of the file format written and accepted.
STORE_VERSION = 1

_REFUSE = "refusing to start (the file is kept as it is)"
_TMP_SUFFIX = ".tmp"


class StoreError(Exception):
    """
    The store file cannot be read or written.

    C{str(error)} is C{"{path}: {reason}"}; the reason never contains the
    file's content (which holds private keys and tokens).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _plain(value: Any, where: str) -> Any:
    """C{value} as JSON-ready dicts/lists/scalars; TypeError names C{where}."""
    if isinstance(value, Mapping):
        result = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: object keys must be strings, got {type_name(k)}")
            result[k] = _plain(v, f"{where}.{k}")
        return result
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: {type_name(value)} cannot be stored as JSON")


class StateFile:
    """
    The JSON file holding the API-registered clusters' bodies.

    @param path: the file, e.g. C{/var/lib/gateway/clusters.json}.
    """

    def __init__(self, path: str, sealer: Sealer | None = None) -> None:
        self.path = path
        #: Seals the bodies' secrets before they are written, opens them when
        #: read ([store] secret_key_file); None: they are kept in plaintext.
        self.sealer = sealer
        #: Whether the file last loaded held a secret in plaintext (to warn
        #: of without a sealer, to seal at once with one).
        self.plaintext_secrets = False
        #: The etcd revision the file was a snapshot of, when it is the etcd
        #: backend's local cache (C{"revision"} in the file); None otherwise.
        self.revision: int | None = None

    def __repr__(self) -> str:
        return f"StateFile({self.path!r})"

    # --- reading ----------------------------------------------------------------------

    def _refuse(self, reason: str) -> StoreError:
        return StoreError(self.path, f"{reason}; {_REFUSE}")

    def load(self) -> dict[str, dict]:
        """
        The stored bodies, C{{name: body}}; C{{}} when the file does not exist.

        The bodies are returned as stored, not validated: pass each one to
        L{validate_body}.  The file is only read, never modified.

        @raise StoreError: if the file cannot be read, is not JSON, does not
            have the expected shape or version, or is accessible by group or
            others.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise self._refuse(f"cannot read: {e.strerror or type(e).__name__}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse("not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise self._refuse(
                    f"holds private keys and tokens but is accessible by other users (mode {mode:04o}): chmod 600 it"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        except OSError as e:
            raise self._refuse(f"cannot read: {e.strerror or type(e).__name__}") from None
        finally:
            os.close(fd)
        return self._open_secrets(self._decode(raw))

    def _open_secrets(self, clusters: dict[str, dict]) -> dict[str, dict]:
        self.plaintext_secrets = has_plaintext_secrets(clusters)
        sealer = self.sealer
        if sealer is None:
            for name, body in clusters.items():
                for field in SEALED_FIELDS:
                    if is_sealed(body.get(field)):
                        raise self._refuse(
                            f"clusters.{name}.{field} is sealed: set [store] secret_key_file to the key that sealed it"
                        )
            return clusters
        try:
            return {name: sealer.open_body(name, body) for name, body in clusters.items()}
        except SealError as e:
            raise self._refuse(str(e)) from None

    def _decode(self, raw: bytes) -> dict[str, dict]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._refuse(f"not UTF-8 text (byte offset {e.start})") from None
        try:
            data = strictjson.loads(text)
        except json.JSONDecodeError as e:
            # e.msg is the parser's reason only ("Expecting ',' delimiter"),
            # never a piece of the document.
            raise self._refuse(f"not valid JSON (line {e.lineno} column {e.colno}): {e.msg}") from None
        except strictjson.DuplicateKeyError as e:
            raise self._refuse(f"not valid: the key {_show(e.key)} appears twice in one object") from None
        except strictjson.ConstantError as e:
            raise self._refuse(f"not valid JSON: {e.name} is not a JSON value") from None
        if not isinstance(data, dict):
            raise self._refuse(f'expected a JSON object {{"version": 1, "clusters": {{...}}}}, got {type_name(data)}')
        unknown = sorted(set(data) - {"version", "clusters", "revision"})
        if unknown:
            raise self._refuse(f'unknown top-level key {_show(unknown[0])} (expected "version" and "clusters")')
        revision = data.get("revision")
        if revision is not None and (type(revision) is not int or revision < 0):
            raise self._refuse('"revision": expected a revision number')
        self.revision = revision
        if "version" not in data:
            raise self._refuse('missing "version"')
        version = data["version"]
        if type(version) is not int or version != STORE_VERSION:
            shown = repr(version) if type(version) in (int, float) else type_name(version)
            raise self._refuse(f"unsupported version {shown} (this gateway reads version {STORE_VERSION})")
        if "clusters" not in data:
            raise self._refuse('missing "clusters"')
        clusters = data["clusters"]
        if not isinstance(clusters, dict):
            raise self._refuse(f'"clusters": expected a JSON object, got {type_name(clusters)}')
        for name, body in clusters.items():
            if not isinstance(body, dict):
                raise self._refuse(f'"clusters" -> {_show(name)}: expected a JSON object, got {type_name(body)}')
        return clusters

    # --- writing ----------------------------------------------------------------------

    def _temp_prefix(self) -> str:
        return f".{os.path.basename(self.path)}."

    def save(self, clusters: Mapping[str, Mapping], revision: int | None = None) -> None:
        """
        Replace the file's content with C{clusters} (C{{name: body}}),
        atomically: after a crash the file holds either the old or the new
        registry, complete.  C{revision}: the etcd revision of a cache.

        @raise StoreError: if the registry cannot be encoded or written; the
            old file is then left as it was and no temporary file remains.
        """
        try:
            if self.sealer is not None:
                clusters = {name: self.sealer.seal_body(name, body) for name, body in clusters.items()}
            plain: dict[str, Any] = {"version": STORE_VERSION, "clusters": _plain(clusters, "clusters")}
            if revision is not None:
                plain["revision"] = revision
            data = (json.dumps(plain, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as e:
            raise StoreError(self.path, f"cannot encode the registry: {e}") from None
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            self._make_directory(directory)
        except OSError as e:
            raise StoreError(self.path, f"cannot create directory {directory!r}: {e.strerror or e}") from None
        temp = None
        try:
            temp, fd = self._create_temp(directory)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
            temp = None
        except OSError as e:
            raise StoreError(self.path, f"cannot save (the previous file is kept): {e.strerror or e}") from None
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
        try:
            self._fsync_directory(directory)
        except OSError as e:
            raise StoreError(
                self.path, f"saved, but cannot fsync directory {directory!r} (a crash may lose it): {e.strerror or e}"
            ) from None
        self._remove_stale_temps(directory)

    @staticmethod
    def _make_directory(directory: str) -> None:
        if os.path.isdir(directory):
            return
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # makedirs' mode is filtered by the umask; the leaf must be 0700
        os.chmod(directory, 0o700)

    def _create_temp(self, directory: str) -> tuple[str, int]:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            temp = os.path.join(directory, f"{self._temp_prefix()}{secrets.token_hex(8)}{_TMP_SUFFIX}")
            try:
                return temp, os.open(temp, flags, 0o600)
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "cannot create a unique temporary file")

    @staticmethod
    def _fsync_directory(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove_stale_temps(self, directory: str) -> None:
        """Remove temporary files left by earlier saves that crashed."""
        prefix = self._temp_prefix()
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(prefix) and name.endswith(_TMP_SUFFIX):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
