"""Throwaway SSH keys for fake proxy nodes and the clients that log in to them."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys


def generate_key() -> keys.Key:
    """A fresh Ed25519 private key, in memory."""
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def private_pem(key: keys.Key) -> str:
    """C{key} as the OpenSSH PEM a cluster's C{key} setting holds."""
    return key.toString("OPENSSH").decode("ascii")


def public_line(key: keys.Key) -> str:
    """C{key}'s public half as one C{authorized_keys} / C{host_keys} line."""
    return key.public().toString("OPENSSH").decode("ascii")
