"""
Load client of the idle-streams benchmark: COUNT SOCKS5 connections (no
authentication, IPv4 CONNECT) through one proxy to a line-echo server
(bench/holdserver.py), CONCURRENCY of them being opened at a time; each is
checked with a b"ping\\n" and its echo, then held open.

    python bench/idleclient.py SOCKS_HOST:PORT TARGET_HOST:PORT COUNT [CONCURRENCY] [DEADLINE]

Protocol with the orchestrator (bench/idle.py):

 1. once every connection is open (or failed), ONE JSON line on stdout:
    {"phase": "open", "opened": N, "errors": {kind: n}, "seconds": s};
 2. it then waits for a line on stdin (meanwhile the orchestrator measures
    the proxy's memory), pings every open connection again (none may have
    died while idle), then sends b"bye\\n" on it: the server closes first
    (its side keeps the TIME_WAIT) and the end of the stream must come back
    through the proxy; prints a second JSON line:
    {"phase": "close", "alive": N, "errors": {kind: n}, "close_errors": {kind: n}, "seconds": s}.

Everything runs under one overall deadline (DEADLINE seconds, default 300);
on expiry it prints {"phase": "deadline", ...} and exits with status 3.
Stdlib only; the orchestrator raises the open-file limit it inherits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

from socks5client import socks5_connect

PING = b"ping\n"
BYE = b"bye\n"
STEP_TIMEOUT = 30.0


def error_kind(e: BaseException) -> str:
    text = str(e)[:60]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def count_error(errors: dict[str, int], e: BaseException) -> None:
    key = error_kind(e)
    errors[key] = errors.get(key, 0) + 1


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(PING)
    await writer.drain()
    echo = await reader.readline()
    if echo != PING:
        raise RuntimeError(f"bad echo {echo[:20]!r}")


async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Ask the server to close first and wait for the end of the stream to come back through the proxy."""
    writer.write(BYE)
    await writer.drain()
    rest = await reader.read()
    if rest:
        raise RuntimeError(f"data instead of the end: {rest[:20]!r}")


async def open_one(socks: tuple[str, int], target: tuple[str, int]):
    reader, writer = await socks5_connect(socks, target)
    try:
        await ping(reader, writer)
    except BaseException:
        writer.close()
        raise
    return reader, writer


class Idle:
    def __init__(self, socks: tuple[str, int], target: tuple[str, int], count: int, concurrency: int):
        self.socks, self.target, self.count, self.concurrency = socks, target, count, concurrency
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.phase = "open"

    async def open_all(self) -> dict:
        errors: dict[str, int] = {}
        gate = asyncio.Semaphore(self.concurrency)

        async def one() -> None:
            async with gate:
                try:
                    self.streams.append(await asyncio.wait_for(open_one(self.socks, self.target), STEP_TIMEOUT))
                except Exception as e:  # counted, not fatal: the report shows them
                    count_error(errors, e)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(self.count)))
        return {
            "phase": "open",
            "opened": len(self.streams),
            "errors": errors,
            "seconds": round(time.perf_counter() - started, 3),
        }

    async def check_and_close(self) -> dict:
        errors: dict[str, int] = {}
        close_errors: dict[str, int] = {}
        alive = 0
        gate = asyncio.Semaphore(self.concurrency)

        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal alive
            async with gate:
                try:
                    await asyncio.wait_for(ping(reader, writer), STEP_TIMEOUT)
                    alive += 1
                except Exception as e:
                    count_error(errors, e)
                    return
                try:
                    await asyncio.wait_for(bye(reader, writer), STEP_TIMEOUT)
                except Exception as e:
                    count_error(close_errors, e)

        started = time.perf_counter()
        await asyncio.gather(*(one(r, w) for r, w in self.streams))
        for _, writer in self.streams:
            writer.close()
        for _, writer in self.streams:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
        return {
            "phase": "close",
            "alive": alive,
            "errors": errors,
            "close_errors": close_errors,
            "seconds": round(time.perf_counter() - started, 3),
        }

    async def run(self) -> None:
        emit(await self.open_all())
        self.phase = "wait"
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        await stdin.readline()
        self.phase = "close"
        emit(await self.check_and_close())


async def main_async(idle: Idle, deadline: float) -> int:
    try:
        await asyncio.wait_for(idle.run(), deadline)
    except TimeoutError:
        for _, writer in idle.streams:
            writer.close()
        emit({"phase": "deadline", "during": idle.phase, "opened": len(idle.streams)})
        return 3
    return 0


def main() -> int:
    socks_host, socks_port = sys.argv[1].rsplit(":", 1)
    target_host, target_port = sys.argv[2].rsplit(":", 1)
    count = int(sys.argv[3])
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    deadline = float(sys.argv[5]) if len(sys.argv) > 5 else 300.0
    idle = Idle((socks_host, int(socks_port)), (target_host, int(target_port)), count, concurrency)
    return asyncio.run(main_async(idle, deadline))


if __name__ == "__main__":
    sys.exit(main())
