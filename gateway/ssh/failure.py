"""
Why an attempt to reach a proxy node failed, in the kinds its back-off
tells apart (L{gateway.cluster.penalty}); set by the handshake
(L{gateway.ssh.handshake}) and the transport (L{gateway.ssh.transport}).
"""

from __future__ import annotations

import enum

__all__ = ["ConnectFailure"]


class ConnectFailure(enum.Enum):
    """
    Why an attempt to reach a proxy node failed, as far as its back-off cares:
    sshd's PerSourcePenalties counts every kind but C{PROTOCOL} and
    C{NETWORK} against the gateway's address (see gateway.cluster.penalty).
    """

    #: The node refused the key (or the user), or ended authentication.
    AUTH = "auth"
    #: The key exchange failed: no common algorithm, a bad signature, the node ended it.
    KEX = "kex"
    #: The node's host key (or host certificate) is not one the gateway accepts.
    HOSTKEY = "hostkey"
    #: sshd closed the connection at once ("Not allowed at this time": PerSourcePenalties, MaxStartups).
    DROPPED = "dropped"
    #: Not an SSH server at that address.
    PROTOCOL = "protocol"
    #: Refused, unreachable, timed out, reset, or closed with no SSH reason.
    NETWORK = "network"
