"""
An asyncssh SSH server for interop tests (run as a script, in its own
process: asyncio and Twisted's reactor stay apart).  It listens on
127.0.0.1, prints its port, and serves direct-tcpip to 127.0.0.1 only, with
the key exchanges named on its command line (forced: the one way to test
mlkem768x25519-sha256 where OpenSSH here is older than 9.9).

    asyncssh_peer.py HOST_KEY AUTHORIZED_KEYS KEX_ALGS [REKEY_BYTES]
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh


class _Server(asyncssh.SSHServer):
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return dest_host == "127.0.0.1"  # asyncssh connects there itself; nowhere else


async def _serve(host_key: str, authorized: str, kex_algs: list[str], rekey_bytes: int) -> None:
    server = await asyncssh.create_server(
        _Server,
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        kex_algs=kex_algs,
        rekey_bytes=rekey_bytes,
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()  # until the test kills this process


if __name__ == "__main__":
    rekey = int(sys.argv[4]) if len(sys.argv) > 4 else 1 << 30
    asyncio.run(_serve(sys.argv[1], sys.argv[2], sys.argv[3].split(","), rekey))
