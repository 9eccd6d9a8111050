"""
Public-key user authentication with a key held in memory.

Conch's stock client signs RSA requests with C{ssh-rsa} (SHA-1), which
OpenSSH >= 8.8 refuses.  This client names and signs with C{rsa-sha2-512} or
C{rsa-sha2-256}, chosen from the server's C{server-sig-algs} extension
(RFC 8308, RFC 8332); SHA-1 only for a cluster that opts in
(C{allow_sha1_signatures}).  It also sends the signed request straight away
instead of first asking whether the key would be acceptable: one round trip
less per connection, and the only key we have is the one to try anyway.
"""

from __future__ import annotations

from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.service import SSHService
from twisted.conch.ssh.transport import SSHTransportBase
from twisted.internet.defer import Deferred, succeed

from gateway.ssh._conch import quiet_conch_logs

_RSA_SHA2 = (b"rsa-sha2-512", b"rsa-sha2-256")
_RSA_SHA1 = b"ssh-rsa"


def signature_algorithm(key: Key, server_sig_algs: bytes | None, allow_sha1: bool = False) -> bytes:
    """
    The public-key algorithm name to authenticate C{key} with.

    For RSA, the strongest SHA-2 algorithm the server lists.  When it lists
    none -- no C{server-sig-algs} at all (OpenSSH < 7.2, some other servers),
    or a list without them -- C{rsa-sha2-512}, which every OpenSSH since 7.2
    accepts whether or not it says so; C{ssh-rsa} (SHA-1) only if
    C{allow_sha1}, for the truly old server.  Other key types have exactly
    one name.
    """
    if key.type() != "RSA":
        return key.sshType()
    listed = server_sig_algs.split(b",") if server_sig_algs is not None else []
    for algorithm in _RSA_SHA2:
        if algorithm in listed:
            return algorithm
    return _RSA_SHA1 if allow_sha1 else _RSA_SHA2[0]


#: Conch's per-attempt chatter ("trying to auth with publickey", ...).
@quiet_conch_logs("gateway.ssh.auth")
class KeyAuthClient(userauth.SSHUserAuthClient):
    """Authenticate as C{user} with one private key, then start C{instance}."""

    #: Set by the transport's C{setService}, before the service starts.
    transport: SSHTransportBase

    preferredOrder = [b"publickey"]

    def __init__(self, user: str, private_key: Key, instance: SSHService, allow_sha1_signatures: bool = False) -> None:
        super().__init__(user.encode("utf-8"), instance)
        self._private_key = private_key
        self._allow_sha1 = allow_sha1_signatures
        self._tried = False
        #: The rsa-sha2 algorithm signed with when the server did not list
        #: it: a guess that a refusal should mention.
        self.unlisted_algorithm: bytes | None = None

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
        listed = self.transport.peerExtensions.get(b"server-sig-algs")
        algorithm = signature_algorithm(key, listed, self._allow_sha1)
        if algorithm in _RSA_SHA2 and algorithm not in (listed or b"").split(b","):
            self.unlisted_algorithm = algorithm
        blob = key.public().blob()
        session_id = self.transport.sessionID
        assert session_id is not None, "user authentication follows the first key exchange"
        signed = (
            NS(session_id)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(self.user)
            + NS(self.instance.name)
            + NS(b"publickey")
            + b"\x01"
            + NS(algorithm)
            + NS(blob)
        )
        signature = key.sign(signed, signatureType=algorithm)
        self.askForAuth(b"publickey", b"\x01" + NS(algorithm) + NS(blob) + NS(signature))
        return succeed(True)
