"""
asyncssh's SOCKS forwarder (C{SSHClientConnection.forward_socks}), the third
proxy of the benchmark when asyncssh is installed (C{pip install -e '.[bench]'}).

    python bench/asyncssh_socks.py LISTEN_PORT SSH_HOST KEY_FILE KNOWN_HOSTS DEADLINE

Connects as root with asyncssh's default algorithms, listens for SOCKS on
127.0.0.1:LISTEN_PORT and stops by itself after DEADLINE seconds (or when the
connection ends).
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh


async def serve(port: int, host: str, key: str, known_hosts: str, deadline: float) -> None:
    async with asyncssh.connect(host, username="root", client_keys=[key], known_hosts=known_hosts) as connection:
        listener = await connection.forward_socks("127.0.0.1", port)
        try:
            await asyncio.wait_for(connection.wait_closed(), deadline)
        except TimeoutError:
            pass
        listener.close()


def main() -> None:
    port, host, key, known_hosts, deadline = sys.argv[1:6]
    asyncio.run(serve(int(port), host, key, known_hosts, float(deadline)))


if __name__ == "__main__":
    main()
