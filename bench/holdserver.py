"""
Destination of the idle-streams benchmark: a TCP server that accepts any
number of connections, echoes every line it receives (so a client can check
its stream is still alive) and otherwise holds each connection open until the
client closes it.

    python bench/holdserver.py HOST PORT DEADLINE_SECONDS

A line ``bye`` makes the server close the connection first: then the TCP
TIME_WAIT state stays on this side (its listening port) and does not hold the
proxy node's ephemeral ports -- 10,000 streams closed from the client side
twice a minute would otherwise leave ~20,000 of its ~28,000 ports in
TIME_WAIT, and a third run would fail to connect.

Run in the lab's internal namespace, with the open-file limit the
orchestrator raised (bench.common.raise_file_limit).  It listens with a
large backlog, prints ``listening`` on stderr once it accepts, and stops by
itself after DEADLINE_SECONDS (at most 600) or on SIGTERM.
Stdlib only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

MAX_DEADLINE = 600.0
BACKLOG = 4096
MAX_LINE = 4096
#: the client's request to close first, so TIME_WAIT lands here and not on the proxy node's ports
BYE = b"bye\n"


async def serve(host: str, port: int, deadline: float) -> None:
    connections: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line == BYE:
                    break
                writer.write(line)
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            connections.discard(writer)
            writer.close()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(handle, host, port, backlog=BACKLOG, limit=MAX_LINE)
    sys.stderr.write(f"holdserver: listening on {host}:{port} for at most {deadline:.0f} s\n")
    sys.stderr.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), deadline)
    server.close()
    for writer in list(connections):
        writer.close()
    sys.stderr.write(f"holdserver: stopping, {len(connections)} connections still open\n")
    sys.stderr.flush()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    deadline = min(float(sys.argv[3]), MAX_DEADLINE)
    asyncio.run(serve(host, port, deadline))


if __name__ == "__main__":
    main()
