"""
The per-cluster SSH algorithm keys: C{kex_algorithms}, C{ciphers}, C{macs}
and C{host_key_algorithms}, for sites that must restrict further what the
gateway offers a proxy node (docs/ssh-algorithms.md).  Each is a list of
names, in the order to offer them, drawn from what the gateway offers by
default: a name it does not offer -- CBC, 3DES, SHA-1 MACs and exchanges,
ssh-dss, a typo -- is refused naming the key and the item, never silently
dropped.  A restriction cannot widen: C{chacha20-poly1305@openssh.com}
still goes only to a server that agrees to strict key exchange.
"""

from __future__ import annotations

from gateway.config.model import ConfigError
from gateway.config.values import Values, show
from gateway.ssh.handshake import OFFERED

__all__ = ["ALGORITHM_KEYS", "read_algorithms"]

#: The keys, as the schema names them.
ALGORITHM_KEYS = tuple(sorted(OFFERED))


def read_algorithms(values: Values, name: str) -> tuple[str, ...]:
    names = values.strings(name)
    if not names:
        raise values.error(name, "must name at least one algorithm (leave the key out for the defaults)")
    offered = [n.decode() for n in OFFERED[name]]
    seen: set[str] = set()
    for i, item in enumerate(names):
        where = f"{values.key(name)}[{i}]"
        if item not in offered:
            reason = f"{show(item)} is not one the gateway offers (it offers: {', '.join(offered)})"
            raise ConfigError(values.source, where, reason)
        if item in seen:
            raise ConfigError(values.source, where, f"{show(item)} is listed twice")
        seen.add(item)
    return tuple(names)
