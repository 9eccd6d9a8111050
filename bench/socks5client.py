"""
The client half of a SOCKS5 CONNECT (no authentication, an IPv4 address),
shared by the load clients of bench/ (run as scripts: they import it as a
sibling module).  Stdlib only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct

#: Bytes of the bound address in a reply, by address type (a name: a length byte first).
_ADDRESS_SIZE = {1: 4, 4: 16}


async def socks5_connect(
    socks: tuple[str, int], target: tuple[str, int]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to C{target} through the SOCKS5 proxy at C{socks}; RuntimeError if refused."""
    reader, writer = await asyncio.open_connection(*socks)
    try:
        writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise RuntimeError("SOCKS greeting refused")
        address = ipaddress.IPv4Address(target[0]).packed
        writer.write(b"\x05\x01\x00\x01" + address + struct.pack(">H", target[1]))
        head = await reader.readexactly(4)
        if head[1] != 0:
            raise RuntimeError(f"SOCKS reply {head[1]}")
        size = _ADDRESS_SIZE.get(head[3])
        if size is None:
            size = (await reader.readexactly(1))[0]
        await reader.readexactly(size + 2)
    except BaseException:
        writer.close()
        raise
    return reader, writer
