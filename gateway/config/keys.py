"""
The cluster's keys: its private key (C{key_file} or C{key}, with
C{passphrase} or C{passphrase_file}) and the proxy node's host key source
(C{known_hosts} or C{host_keys}, C{host_ca_keys}, or
C{insecure_accept_any_host_key}).

Malformed key data makes the parsers raise nearly anything (struct.error,
IndexError, ValueError, ...), and some of those messages quote the data, so
every failure is caught and replaced by a reason of our own, "from None"
(the C{except Exception} clauses below).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from twisted.conch.ssh import keys

from gateway.config.model import ConfigError
from gateway.config.secrets import SecretFileError, read_secret_file
from gateway.config.values import Values
from gateway.ssh.certs import CA_KEY_TYPES

#: Loaded keys by (key data, passphrase): clusters sharing [defaults]' key
#: decrypt it once.
KeyCache = dict[tuple[bytes, bytes | None], keys.Key]

_PKCS8 = b"-----BEGIN PRIVATE KEY-----"
_ENCRYPTED_PKCS8 = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def read_secret(values: Values, name: str, what: str) -> bytes:
    """The content of the secret file named by key C{name} (L{read_secret_file})."""
    try:
        return read_secret_file(values.path(name), what)
    except SecretFileError as e:
        raise values.error(name, str(e)) from None


class _KeyLoadError(Exception):
    """Loading failed; C{which} is "key" (the key source) or "passphrase"."""

    def __init__(self, which: str, reason: str) -> None:
        super().__init__(which, reason)
        self.which = which
        self.reason = reason


def _load_private_key(data: bytes, passphrase: bytes | None) -> keys.Key:
    """
    Load a private key (OpenSSH, PEM or PKCS#8), decrypting it with
    C{passphrase} when it is encrypted.  Never puts key data in its errors.
    """
    if _ENCRYPTED_PKCS8 in data or _PKCS8 in data:
        key = _load_pkcs8(data, passphrase)
    else:
        try:
            key = keys.Key.fromString(data)
        except keys.EncryptedKeyError:
            if passphrase is None:
                raise _KeyLoadError("key", "key is encrypted: set passphrase") from None
            try:
                key = keys.Key.fromString(data, passphrase=passphrase)
            except Exception:  # noqa: BLE001 - see the module docstring
                raise _KeyLoadError("passphrase", "wrong passphrase (cannot decrypt the key)") from None
        except Exception:  # noqa: BLE001 - see the module docstring
            raise _KeyLoadError("key", "not a valid private key (expected an OpenSSH or PEM private key)") from None
    try:
        public = key.isPublic()
        key.type()
    except Exception:  # noqa: BLE001 - see the module docstring
        raise _KeyLoadError("key", "unsupported key type") from None
    if public:
        raise _KeyLoadError("key", "this is a public key: a private key is needed")
    return key


def _load_pkcs8(data: bytes, passphrase: bytes | None) -> keys.Key:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    encrypted = _ENCRYPTED_PKCS8 in data
    if encrypted and passphrase is None:
        raise _KeyLoadError("key", "key is encrypted: set passphrase")
    try:
        obj = load_pem_private_key(data, passphrase if encrypted else None)
    except Exception:  # noqa: BLE001 - see the module docstring
        if encrypted:
            raise _KeyLoadError("passphrase", "wrong passphrase (cannot decrypt the key)") from None
        raise _KeyLoadError("key", "not a valid private key (malformed PKCS#8 data)") from None
    try:
        return keys.Key(obj)
    except Exception:  # noqa: BLE001 - see the module docstring
        raise _KeyLoadError("key", "unsupported key type") from None


def _passphrase(values: Values) -> bytes | None:
    """The passphrase from C{passphrase} or C{passphrase_file}, or None if unset."""
    if "passphrase" in values and "passphrase_file" in values:
        raise values.error("passphrase_file", "passphrase and passphrase_file are mutually exclusive: set only one")
    if "passphrase" in values:
        return values.string("passphrase").encode("utf-8")
    if "passphrase_file" in values:
        passphrase = read_secret(values, "passphrase_file", "passphrase file").rstrip(b"\r\n")
        if not passphrase:
            raise values.error("passphrase_file", f"passphrase file {values.path('passphrase_file')!r} is empty")
        return passphrase
    return None


def private_key(values: Values, cache: KeyCache | None) -> keys.Key | None:
    """The private key from C{key_file} / C{key} (+ passphrase), or None if unset."""
    if "key_file" in values and "key" in values:
        raise values.error("key", "key and key_file are mutually exclusive: set only one")
    passphrase = _passphrase(values)
    which_passphrase = "passphrase" if "passphrase" in values else "passphrase_file"
    if "key_file" in values:
        source_name = "key_file"
        data = read_secret(values, "key_file", "key file")
    elif "key" in values:
        source_name = "key"
        data = values.string("key").encode("utf-8")
    else:
        if passphrase is not None:
            raise values.error(which_passphrase, "passphrase given but no key_file or key")
        return None
    cache_key = (data, passphrase)
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    try:
        key = _load_private_key(data, passphrase)
    except _KeyLoadError as e:
        if e.which == "passphrase":
            raise values.error(which_passphrase, e.reason) from None
        where = f"key file {values.path('key_file')!r}: " if source_name == "key_file" else ""
        raise values.error(source_name, where + e.reason) from None
    if cache is not None:
        cache[cache_key] = key
    return key


def _host_key_line(line: str) -> keys.Key:
    """Parse C{"TYPE BASE64 [COMMENT]"}; raise ValueError with a reason."""
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("expected 'TYPE BASE64 [COMMENT]' (e.g. 'ssh-ed25519 AAAA...')")
    key_type, blob = fields[0], fields[1]
    if not re.fullmatch(r"[A-Za-z0-9@._-]+", key_type):
        raise ValueError("expected 'TYPE BASE64 [COMMENT]' (e.g. 'ssh-ed25519 AAAA...')")
    try:
        key = keys.Key.fromString(f"{key_type} {blob}".encode("ascii"), type="public_openssh")
        actual = key.sshType().decode("ascii")
    except Exception:  # noqa: BLE001 - see the module docstring
        raise ValueError(f"not a valid {key_type} public key (bad base64 or key data)") from None
    if actual != key_type:
        raise ValueError(f"key type {key_type!r} does not match the key data ({actual!r})")
    return key


def _check_readable(values: Values, name: str, what: str) -> None:
    """Refuse a (non-secret) file that cannot be read, naming the reason."""
    path = values.path(name)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise values.error(name, f"cannot read {what} {path!r}: {reason}") from None


def _key_lines(values: Values, name: str) -> tuple[keys.Key, ...]:
    """The public keys listed by key C{name} (C{host_keys}, C{host_ca_keys}), one per entry."""
    lines = values.strings(name)
    if not lines:
        raise values.error(name, "must list at least one key")
    result: list[keys.Key] = []
    for i, line in enumerate(lines):
        try:
            result.append(_host_key_line(line))
        except ValueError as e:
            raise ConfigError(values.source, f"{values.key(name)}[{i}]", str(e)) from None
    return tuple(result)


def _ca_keys(values: Values) -> tuple[keys.Key, ...]:
    """C{host_ca_keys}: keys of a type that can sign certificates (L{gateway.ssh.certs.CA_KEY_TYPES})."""
    ca_keys = _key_lines(values, "host_ca_keys")
    for i, key in enumerate(ca_keys):
        if key.sshType() not in CA_KEY_TYPES:
            raise ConfigError(
                values.source,
                f"{values.key('host_ca_keys')}[{i}]",
                f"a {key.sshType().decode()} key cannot be a host CA here (use ssh-ed25519, ecdsa-sha2-* or ssh-rsa)",
            )
    return ca_keys


class HostKeySource(NamedTuple):
    """What a cluster checks its proxy nodes' host keys against."""

    known_hosts: str | None
    host_keys: tuple[keys.Key, ...]
    host_ca_keys: tuple[keys.Key, ...]
    insecure: bool

    @property
    def given(self) -> bool:
        """Whether any source is set."""
        return self.known_hosts is not None or bool(self.host_keys) or bool(self.host_ca_keys) or self.insecure


def host_key_source(values: Values) -> HostKeySource:
    """The host key source keys: C{known_hosts} or C{host_keys}, C{host_ca_keys}, or the insecure opt-out."""
    insecure = values.boolean("insecure_accept_any_host_key") if "insecure_accept_any_host_key" in values else False
    if "known_hosts" in values and "host_keys" in values:
        raise values.error("host_keys", "known_hosts and host_keys are mutually exclusive: set only one")
    if insecure:
        other = next((k for k in ("known_hosts", "host_keys", "host_ca_keys") if k in values), None)
        if other is not None:
            raise values.error(
                "insecure_accept_any_host_key", f"insecure_accept_any_host_key = true cannot be combined with {other}"
            )
    known_hosts: str | None = None
    if "known_hosts" in values:
        known_hosts = values.path("known_hosts")
        # Only check that it can be read: it is read again at each connect.
        _check_readable(values, "known_hosts", "known_hosts file")
    host_keys = _key_lines(values, "host_keys") if "host_keys" in values else ()
    host_ca_keys = _ca_keys(values) if "host_ca_keys" in values else ()
    return HostKeySource(known_hosts, host_keys, host_ca_keys, insecure)
