"""
Public-key user authentication with a key held in memory.

Conch's stock client signs RSA requests with C{ssh-rsa} (SHA-1), which
OpenSSH >= 8.8 refuses.  This client names and signs with C{rsa-sha2-512} or
C{rsa-sha2-256}, chosen from the server's C{server-sig-algs} extension
(RFC 8308, RFC 8332).  It also sends the signed request straight away instead
of first asking whether the key would be acceptable: one round trip less per
connection, and the only key we have is the one to try anyway.
"""

from __future__ import annotations

from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.service import SSHService
from twisted.internet.defer import Deferred, succeed

from gateway.ssh.channel import quiet_logger

_RSA_SHA2 = (b"rsa-sha2-512", b"rsa-sha2-256")


def signature_algorithm(key: Key, server_sig_algs: bytes | None) -> bytes:
    """
    The public-key algorithm name to authenticate C{key} with.

    For RSA, the strongest SHA-2 algorithm the server lists; a server that
    sends no C{server-sig-algs} predates RFC 8332 (OpenSSH < 7.2) and only
    knows C{ssh-rsa}.  Other key types have exactly one name.
    """
    if key.type() != "RSA":
        return key.sshType()
    if server_sig_algs is None:
        return b"ssh-rsa"
    offered = server_sig_algs.split(b",")
    for algorithm in _RSA_SHA2:
        if algorithm in offered:
            return algorithm
    return b"ssh-rsa"


class KeyAuthClient(userauth.SSHUserAuthClient):
    """Authenticate as C{user} with one private key, then start C{instance}."""

    preferredOrder = [b"publickey"]
    #: Conch's per-attempt chatter ("trying to auth with publickey", ...).
    _log = quiet_logger("gateway.ssh.auth")

    def __init__(self, user: str, private_key: Key, instance: SSHService) -> None:
        super().__init__(user.encode("utf-8"), instance)
        self._private_key = private_key
        self._tried = False

    def tryAuth(self, kind: bytes) -> Deferred[bool] | None:
        # Only publickey: the stock password and keyboard-interactive methods
        # would ask a user who is not there.
        if kind != b"publickey":
            return None
        return super().tryAuth(kind)

    def auth_publickey(self) -> Deferred[bool]:
        if self._tried:
            return succeed(False)
        self._tried = True
        key = self._private_key
        algorithm = signature_algorithm(
            key, self.transport.peerExtensions.get(b"server-sig-algs")
        )
        blob = key.public().blob()
        signed = (
            NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(self.user)
            + NS(self.instance.name)
            + NS(b"publickey")
            + b"\x01"
            + NS(algorithm)
            + NS(blob)
        )
        signature = key.sign(signed, signatureType=algorithm)
        self.askForAuth(
            b"publickey", b"\x01" + NS(algorithm) + NS(blob) + NS(signature)
        )
        return succeed(True)
