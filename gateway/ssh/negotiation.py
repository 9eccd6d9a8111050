"""
Reading the server's KEXINIT against our offer, sans I/O: the copy Conch
negotiates from (L{with_aead_macs}), and, when a list has nothing in
common, the reason an operator can act on (L{no_common_reason}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS, getNS

from gateway.errors import peer_text
from gateway.ssh import kex
from gateway.ssh.packets import AEAD_CIPHERS

__all__ = ["no_common_reason", "with_aead_macs"]


def with_aead_macs(packet: bytes, ciphers: Sequence[bytes], macs: Sequence[bytes]) -> bytes:
    """
    C{packet} (the server's KEXINIT), or a copy in which a direction that
    will use an AEAD cipher but has no MAC in common lists our first MAC:
    an AEAD cipher implies its MAC and the name lists do not matter
    (OpenSSH PROTOCOL 1.6), but Conch would give up on the mismatch.
    """
    try:
        *lists, rest = getNS(packet[16:], 10)
    except Exception:
        return packet  # malformed: Conch will say so
    lists = list(lists)
    changed = False
    # Client to server: lists 2 (cipher) and 4 (MAC); server to client: 3 and 5.
    for cipher_list, mac_list in ((2, 4), (3, 5)):
        cipher = transport.ffs(list(ciphers), lists[cipher_list].split(b","))
        if cipher in AEAD_CIPHERS and transport.ffs(list(macs), lists[mac_list].split(b",")) is None:
            lists[mac_list] = b",".join([macs[0], lists[mac_list]])
            changed = True
    if not changed:
        return packet
    return packet[:16] + b"".join(NS(name_list) for name_list in lists) + rest


def no_common_reason(
    offers: Mapping[str, Sequence[bytes]], lists: list[bytes], cluster_lists: Mapping[str, Sequence[str]]
) -> str | None:
    """
    The first list of the server's KEXINIT (C{lists}, its ten name lists)
    that has nothing in common with ours (C{offers}, by the cluster key that
    may restrict each), named with both offers: Conch then disconnects
    saying only "couldn't match all kex parts", which tells an operator
    neither which nor why.  None when every list matches.
    """
    ciphers = [transport.ffs(list(offers["ciphers"]), lists[i].split(b",")) for i in (2, 3)]
    checks = [
        ("key exchange", "kex_algorithms", [0]),
        ("host key algorithm", "host_key_algorithms", [1]),
        ("cipher", "ciphers", [2, 3]),
        # An AEAD cipher needs no MAC (with_aead_macs).
        ("MAC", "macs", [i + 4 for i in (0, 1) if ciphers[i] not in AEAD_CIPHERS]),
    ]
    for what, key, indices in checks:
        ours = offers[key]
        for i in indices:
            if transport.ffs(list(ours), lists[i].split(b",")) is None:
                whose = f"the cluster's {key}" if cluster_lists.get(key) else "the gateway offers"
                ours_text = ",".join(name.decode() for name in ours if name not in kex.MARKERS)
                return (
                    f"no {what} in common with the proxy node ({whose}: {ours_text}; the node's: {peer_text(lists[i])})"
                )
    return None
