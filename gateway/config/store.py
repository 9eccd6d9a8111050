"""
The C{[store]} table: where API-registered clusters are kept (the state
file, or etcd shared by a fleet of gateways), and how their secrets are
sealed.  The etcd keys are refused with the file backend, so a table that
says C{endpoints} is never silently read as a local file store.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from gateway.config.model import ConfigError, StoreConfig
from gateway.config.values import Reader, Values, join, read_path, read_seconds, show, unknown

__all__ = ["STORE_BACKENDS", "STORE_KEYS", "parse_store"]

#: The backends there are ("file": the 0600 state file, [gateway] state_file).
STORE_BACKENDS = ("file", "etcd")
_COMMON = ("backend", "secret_key_file")
_ETCD = (
    "ca_file",
    "cache_file",
    "cert_file",
    "endpoints",
    "key_file",
    "password_file",
    "prefix",
    "probe_interval",
    "timeout",
    "user",
)
#: Every [store] key, sorted (as error messages list them).
STORE_KEYS = tuple(sorted(_COMMON + _ETCD))


def _endpoints(values: Values, name: str) -> tuple[str, ...]:
    urls = values.strings(name)
    if not urls:
        raise values.error(name, "must name at least one etcd member")
    for i, url in enumerate(urls):
        parts = urlsplit(url)
        key = f"{values.key(name)}[{i}]"
        if "@" in parts.netloc:  # not shown: what is before the @ may be a password
            raise ConfigError(values.source, key, "must not hold a user or password: set user and password_file")
        try:
            port = parts.port
        except ValueError:
            port = None
        # The scheme as written: fleet picks the TLS settings by "https:", and
        # the client appends /v3/... to the URL (no room for a query).
        if (
            not url.startswith(("http://", "https://"))
            or not parts.hostname
            or not port
            or parts.path not in ("", "/")
            or "?" in url
            or "#" in url
        ):
            raise ConfigError(values.source, key, f"{show(url)} is not an etcd client URL (http://HOST:PORT)")
    return tuple(urls)


def _prefix(values: Values, name: str) -> str:
    prefix = values.string(name)
    if "\0" in prefix:
        raise values.error(name, "must not hold a NUL character")
    if not prefix.endswith("/"):
        # "/gw" would also cover "/gw2/...": another fleet's registry.
        raise values.error(name, f"must end with '/' (as in {show(prefix + '/')}), or it also covers other prefixes")
    return prefix


def _user(values: Values, name: str) -> str:
    user = values.string(name)
    if ":" in user:
        raise values.error(name, "must not hold ':' (etcd's user names cannot)")
    return user


_READERS: dict[str, Reader] = {
    "endpoints": _endpoints,
    "prefix": _prefix,
    "user": _user,
    "timeout": read_seconds,
    "probe_interval": partial(read_seconds, minimum=0.1),
    "secret_key_file": read_path,
    "ca_file": read_path,
    "cert_file": read_path,
    "key_file": read_path,
    "password_file": read_path,
    "cache_file": read_path,
}


def parse_store(data: Mapping[str, Any], source: str, base_dir: str | None) -> StoreConfig:
    for k in data:
        if k not in STORE_KEYS:
            raise unknown(source, join("store", k), k, STORE_KEYS)
    values = Values(source, base_dir)
    values.add(data, "store")
    backend = values.string("backend") if "backend" in values else "file"
    if backend not in STORE_BACKENDS:
        raise values.error("backend", f"unknown backend {show(backend)} (expected one of: {', '.join(STORE_BACKENDS)})")
    if backend == "file":
        for k in _ETCD:
            if k in values:
                raise values.error(k, 'is a key of the etcd backend: set backend = "etcd" too')
    settings = {k: _READERS[k](values, k) for k in STORE_KEYS if k != "backend" and k in values}
    for one, other in (
        ("cert_file", "key_file"),
        ("key_file", "cert_file"),
        ("user", "password_file"),
        ("password_file", "user"),
    ):
        if one in settings and other not in settings:
            raise values.error(one, f"needs {other} too")
    return StoreConfig(backend=backend, **settings)
