"""
C{gateway-ctl add}'s side of the operator's files: the cluster table read from
a TOML or JSON file, and the secret files it names read *here* (so the
gateway never needs to see them), refused when other users can read them.
Standard library only, like the rest of C{gateway-ctl}.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from gateway.scripts.ctl_errors import EXIT_USAGE, CtlError

#: Secret files larger than this are refused (as by the gateway's loader).
MAX_FILE_BYTES = 1024 * 1024

#: Top-level tables of a gateway configuration file that say nothing about
#: one cluster, ignored next to C{[clusters.NAME]}.
_IGNORED_TABLES = ("listen", "gateway")


def _resolve(path: str, base_dir: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normpath(path)


def read_secret(path: str, what: str, where: str) -> bytes:
    """
    Read a secret file, refusing one that other users can read.

    The gateway's reader is L{gateway.config.secrets.read_secret_file}; this
    twin stays because gateway-ctl runs on the standard library alone, and
    importing C{gateway.config} loads Twisted.
    """
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:
            raise CtlError(
                f"{where}: {what} {path!r} is accessible by other users (mode {stat.S_IMODE(mode):04o}): chmod 600 it",
                EXIT_USAGE,
            )
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise CtlError(f"{where}: cannot read {what} {path!r}: {e.strerror or type(e).__name__}", EXIT_USAGE) from None
    if len(data) > MAX_FILE_BYTES:
        raise CtlError(f"{where}: {what} {path!r} is larger than {MAX_FILE_BYTES} bytes", EXIT_USAGE)
    return data


def read_text_secret(path: str, what: str, where: str, trim: Callable[[str], str], shown: str | None = None) -> str:
    """
    The UTF-8 text of the secret file C{path}, C{trim}med; refused when it is
    not UTF-8 or nothing is left.  Messages name C{shown} (the path as the
    operator wrote it, when that differs), never the content.
    """
    data = read_secret(path, what, where)
    shown = path if shown is None else shown
    try:
        text = trim(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CtlError(f"{where}: {what} {shown!r} is not UTF-8 text", EXIT_USAGE) from None
    if not text:
        raise CtlError(f"{where}: {what} {shown!r} is empty", EXIT_USAGE)
    return text


def _read_key(path: str, where: str) -> str:
    """The PEM text of a private key file; a public key or anything else is refused."""
    data = read_secret(path, "key file", where)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CtlError(f"{where}: key file {path!r} is not a text (PEM) key", EXIT_USAGE) from None
    if "PRIVATE KEY-----" not in text:
        public = "PUBLIC KEY-----" in text or text.lstrip().startswith(("ssh-", "ecdsa-"))
        why = "this is a public key: a private key is needed" if public else "not an OpenSSH or PEM private key"
        raise CtlError(f"{where}: key file {path!r}: {why}", EXIT_USAGE)
    return text


def _read_passphrase(path: str, where: str) -> str:
    """A passphrase file's text without its trailing newline (other white space is the passphrase's)."""
    return read_text_secret(path, "passphrase file", where, lambda text: text.rstrip("\r\n"))


def read_token(path: str, where: str, shown: str | None = None) -> str:
    """A token file's text without surrounding white space (a cluster's C{token_file}, or C{--token-file})."""
    return read_text_secret(path, "token file", where, str.strip, shown)


#: The C{*_file} keys sent inline: (file key, inline key, reader), in the
#: order they are checked (so the first problem reported stays the same).
_SECRET_FILES: tuple[tuple[str, str, Callable[[str, str], str]], ...] = (
    ("key_file", "key", _read_key),
    ("passphrase_file", "passphrase", _read_passphrase),
    ("token_file", "token", read_token),
)


def _parse_file(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CtlError(f"cannot read {path}: {e.strerror or type(e).__name__}", EXIT_USAGE) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CtlError(f"{path}: not UTF-8 text (byte {e.start})", EXIT_USAGE) from None
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise CtlError(
                f"{path}: invalid JSON: {e.msg} (at line {e.lineno}, column {e.colno})", EXIT_USAGE
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CtlError(f"{path}: invalid TOML: {e}", EXIT_USAGE) from None


def _cluster_table(data: Any, path: str, name: str) -> tuple[dict[str, Any], str]:
    """The cluster's table in the parsed file, and the dotted prefix of its keys."""
    if not isinstance(data, dict):
        raise CtlError(f"{path}: expected a table (JSON object) of cluster keys", EXIT_USAGE)
    if "clusters" not in data:
        return data, ""
    clusters = data["clusters"]
    if not isinstance(clusters, dict):
        raise CtlError(f"{path}: clusters: expected a table of clusters", EXIT_USAGE)
    if "defaults" in data:
        raise CtlError(
            f"{path}: defaults: [defaults] is not applied by gateway-ctl add: "
            f"copy the keys the cluster needs into [clusters.{name}]",
            EXIT_USAGE,
        )
    others = sorted(k for k in data if k not in ("clusters", *_IGNORED_TABLES))
    if others:
        raise CtlError(f"{path}: {others[0]}: unexpected key next to [clusters]", EXIT_USAGE)
    if name not in clusters:
        have = ", ".join(sorted(clusters)) or "none"
        raise CtlError(f"{path}: no [clusters.{name}] table (clusters in the file: {have})", EXIT_USAGE)
    table = clusters[name]
    if not isinstance(table, dict):
        raise CtlError(f"{path}: clusters.{name}: expected a table of cluster keys", EXIT_USAGE)
    return table, f"clusters.{name}."


def load_cluster(path: str, name: str) -> dict[str, Any]:
    """
    The body to PUT for cluster C{name} from the TOML or JSON file C{path}:
    its cluster table, with C{key_file}, C{passphrase_file} and C{token_file}
    replaced by the contents they name and C{known_hosts} made absolute.

    Raise L{CtlError} (L{EXIT_USAGE}) naming the file and key.
    """
    table, prefix = _cluster_table(_parse_file(path), path, name)
    body = dict(table)
    base_dir = os.path.dirname(os.path.abspath(path))

    def where(key: str) -> str:
        return f"{path}: {prefix}{key}"

    for file_key, inline_key, read in _SECRET_FILES:
        file_path = _take_file_path(body, file_key, inline_key, where, base_dir)
        if file_path is not None:
            body[inline_key] = read(file_path, where(file_key))

    known_hosts = body.get("known_hosts")
    if isinstance(known_hosts, str) and known_hosts:
        body["known_hosts"] = _resolve(known_hosts, base_dir)

    return body


def _take_file_path(
    body: dict[str, Any], key: str, inline_as: str, where: Callable[[str], str], base_dir: str
) -> str | None:
    """
    Remove C{key} (a file path) from C{body} and return it resolved against
    C{base_dir}; None when absent.  It and its inline twin C{inline_as} may
    not both be set: which one would win is a guess.
    """
    if key not in body:
        return None
    if inline_as in body:
        raise CtlError(f"{where(inline_as)}: {inline_as} and {key} are mutually exclusive: set only one", EXIT_USAGE)
    value = body.pop(key)
    if not isinstance(value, str) or not value:
        raise CtlError(f"{where(key)}: expected a file path (a non-empty string)", EXIT_USAGE)
    return _resolve(value, base_dir)


def to_json(body: Mapping[str, Any], path: str) -> bytes:
    def refuse(value: object) -> object:
        raise CtlError(f"{path}: a value of type {type(value).__name__} cannot be sent as JSON", EXIT_USAGE)

    return json.dumps(body, default=refuse).encode("utf-8")
