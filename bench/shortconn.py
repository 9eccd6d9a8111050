"""
Load client for the short-connection benchmark: COUNT requests, CONCURRENCY
at a time, each a new SOCKS5 connection, a CONNECT to the target and a
small HTTP/1.0 GET read to the end.  Prints one JSON line: requests per
second, latency percentiles (ms), how many took over 30 ms, and errors.

    python bench/shortconn.py SOCKS_HOST:PORT TARGET_HOST:PORT PATH CONCURRENCY COUNT

Run in the same namespace as the proxy under test; it stops by itself after
COUNT requests (or a 120 s overall deadline).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from socks5client import socks5_connect


async def one_request(socks: tuple[str, int], target: tuple[str, int], path: str) -> float:
    started = time.perf_counter()
    reader, writer = await socks5_connect(socks, target)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {target[0]}\r\n\r\n".encode())
        body = await reader.read()
        if not body.startswith(b"HTTP/1.") or b" 200 " not in body[:16]:
            raise RuntimeError("bad HTTP response")
    finally:
        writer.close()
    return time.perf_counter() - started


async def run(socks, target, path, concurrency: int, count: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                latencies.append(await asyncio.wait_for(one_request(socks, target, path), 30))
            except Exception as e:  # counted, not fatal: the report shows them
                key = type(e).__name__ + ": " + str(e)[:60]
                errors[key] = errors.get(key, 0) + 1

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 120)
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "over_30ms": sum(1 for latency in latencies if latency > 0.030),
        "ok": len(latencies),
        "errors": errors,
    }


def main() -> None:
    socks_host, socks_port = sys.argv[1].rsplit(":", 1)
    target_host, target_port = sys.argv[2].rsplit(":", 1)
    result = asyncio.run(
        run(
            (socks_host, int(socks_port)),
            (target_host, int(target_port)),
            sys.argv[3],
            int(sys.argv[4]),
            int(sys.argv[5]),
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
