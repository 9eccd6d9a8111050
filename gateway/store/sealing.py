"""
Secrets at rest: the private keys, passphrases and tokens of API-registered
clusters, sealed (AES-256-GCM) before they leave the process for the store.

With C{[store] secret_key_file}, each secret field of a stored body
(L{SEALED_FIELDS}) is written as C{"sealed:v1:" + base64(nonce || ciphertext
|| tag)}, the cluster name and field name bound in as associated data, so a
sealed token copied into another cluster's body, or into another field,
does not open.  Everything else stays readable (it is what an operator
inspects).  A store read without the key that sealed it refuses to load
with one message; a wrong key likewise; plaintext secrets in a store read
with a key (a store from before the key) are taken as they are, and the
gateway rewrites the store sealed at start-up (L{gateway.app.tap}).

The key file holds 32 random bytes written as 64 hex digits (C{openssl rand
-hex 32}), 0600 like every secret file.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config.secrets import read_secret_file

__all__ = ["SEALED_FIELDS", "SealError", "Sealer", "has_plaintext_secrets", "is_sealed", "read_sealing_key"]

#: The body fields that hold secrets.
SEALED_FIELDS = ("key", "passphrase", "token")
_PREFIX = "sealed:v1:"
_NONCE_BYTES = 12


class SealError(Exception):
    """A stored secret cannot be opened; the message names the cluster and field, never the value."""


def read_sealing_key(path: str) -> bytes:
    """
    The 32-byte key of C{path} (64 hex digits, surrounding white space
    ignored).

    @raise ValueError: with the reason (unreadable, accessible by others,
        not 64 hex digits) -- never the file's content.
    """
    text = read_secret_file(path, "secret key file", limit=1024, regular_only=True).strip()
    try:
        key = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path!r} must hold 32 bytes as 64 hex digits ((umask 077; openssl rand -hex 32 > FILE))")
    return key


def _aad(cluster: str, field: str) -> bytes:
    return f"gateway-store:{cluster}:{field}".encode()


class Sealer:
    """Seals and opens the secret fields of stored cluster bodies with one key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<key>)"

    def seal_body(self, cluster: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """
        C{body} (as the registry holds it: secrets in the clear) with each
        secret field sealed -- every one, also one that looks sealed, so no
        value a client chose is ever stored as if the store had sealed it.
        """
        sealed = dict(body)
        for field in SEALED_FIELDS:
            value = sealed.get(field)
            if isinstance(value, str):
                nonce = os.urandom(_NONCE_BYTES)
                box = self._aead.encrypt(nonce, value.encode("utf-8"), _aad(cluster, field))
                sealed[field] = _PREFIX + base64.b64encode(nonce + box).decode("ascii")
        return sealed

    def open_body(self, cluster: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """
        C{body} with each sealed field opened.

        @raise SealError: for a field this key does not open (another key, a
            value moved from another cluster or field, a damaged value).
        """
        opened = dict(body)
        for field in SEALED_FIELDS:
            value = opened.get(field)
            if isinstance(value, str) and value.startswith(_PREFIX):
                opened[field] = self._open(cluster, field, value)
        return opened

    def _open(self, cluster: str, field: str, value: str) -> str:
        try:
            raw = base64.b64decode(value[len(_PREFIX) :], validate=True)
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(cluster, field))
            return plain.decode("utf-8")
        except (binascii.Error, ValueError, InvalidTag):
            raise SealError(
                f"clusters.{cluster}.{field}: the secret key file does not open it (another key, or a damaged value)"
            ) from None


def is_sealed(value: object) -> bool:
    """Whether a stored field value is sealed."""
    return isinstance(value, str) and value.startswith(_PREFIX)


def has_plaintext_secrets(bodies: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any stored body holds a secret field in plaintext."""
    return any(
        isinstance(body.get(field), str) and not is_sealed(body.get(field))
        for body in bodies.values()
        for field in SEALED_FIELDS
    )
