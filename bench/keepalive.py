"""
Load client for the HTTP keep-alive benchmark: COUNT small GETs, CONCURRENCY
client connections at a time, each connection sending its requests one after
another in absolute-form through the gateway's HTTP proxy with keep-alive (so
the gateway reuses one tunnel per connection).  Prints one JSON line.

    python bench/keepalive.py PROXY_HOST:PORT TARGET_HOST:PORT PATH CONCURRENCY COUNT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def connection(proxy: tuple[str, int], target: str, path: str, requests: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(*proxy)
    request = f"GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    try:
        for _ in range(requests):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def run(proxy, target: str, path: str, concurrency: int, count: int) -> dict:
    latencies: list[float] = []
    per_connection = max(1, count // concurrency)
    started = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(connection(proxy, target, path, per_connection, latencies) for _ in range(concurrency))), 120
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000 if latencies else 0.0,
        "ok": len(latencies),
    }


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    print(json.dumps(asyncio.run(run((host, int(port)), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))))


if __name__ == "__main__":
    main()
