"""
The gateway against OpenSSH ``ssh -D``, side by side in one run.

    make bench            (or: sudo .venv/bin/python -m bench [--quick])

Builds the namespace lab of the system tests (tests/system/netlab.py: a controller
namespace without a default route, a proxy namespace running the real sshd, an
internal namespace running the HTTP server), starts the gateway and
``ssh -D`` (OpenSSH defaults, and ``-c aes128-gcm@openssh.com``) in the
controller namespace against the same sshd with the same key, and measures,
through each SOCKS5 listener:

 - transfer: a 256 MiB download and upload with curl (MB/s, median of runs);
 - short: a new SOCKS5 connection + a 1 KiB GET, 32 at a time (requests/s
   and p99 latency, bench/shortconn.py);
 - latency: 200 such requests one at a time, median latency and how many
   took over 30 ms (delayed-ACK stalls; bench/latency.py, nginx as the
   origin when installed);
 - keepalive: the same GETs in absolute-form through the HTTP proxy on
   kept-alive connections, against a new tunnel per request;
 - workers: the short load and two parallel downloads through one gateway
   process and through two sharing one socket (and the variants of
   bench/workers.py), and ssh -D, with each process's share of a core;
 - idle: 10,000 concurrent idle streams, memory per stream (bench/idle.py);
 - clusters: 200 clusters, time until all are connected, memory per cluster
   (bench/clusters.py, in-process Conch proxy nodes).

``--only idle,clusters`` runs some of them; ``--quick`` is a smoke run.
It prints one table with the ratios gateway / ssh -D.  Every load stops by
itself; the lab is removed at the end, also on failure.  Needs root.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from bench.clusters import clusters_rows
from bench.common import HERE, Row, cpu_seconds, run_in_lab, run_load_client, start_gateway, start_ssh_d, table
from bench.idle import idle_rows
from bench.latency import latency_rows
from bench.origin import Origin, start_origin
from bench.workers import Target, workers_rows
from tests.system.netlab import Lab, wait_for_port

BIG = 256 * 1024 * 1024
GATEWAY_PORT = 1080
GATEWAY_HTTP_PORT = 3128
SSH_DEFAULT_PORT = 1081
SSH_GCM_PORT = 1082
ASYNCSSH_PORT = 1083
SSH_CIPHER_PORT = 1084
SCENARIOS = ("transfer", "short", "latency", "keepalive", "workers", "idle", "clusters")

T = TypeVar("T")


@dataclass(frozen=True)
class Proxy:
    """One SOCKS proxy under test: its label in the table, its port, its process (for its CPU time)."""

    label: str
    port: int
    pid: int


def download(lab: Lab, origin: Origin, port: int, runs: int, size: int) -> float:
    """Median MB/s of `runs` downloads of `size` bytes through SOCKS port `port`."""
    speeds = []
    for _ in range(runs):
        done = lab.run(
            lab.ctl_ns,
            [
                "curl",
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{speed_download}",
                "--socks5-hostname",
                f"127.0.0.1:{port}",
                origin.url(origin.big),
            ],
            timeout=150,
            capture_output=True,
        )
        got, speed = done.stdout.split()
        if done.returncode != 0 or int(got) != size:
            raise RuntimeError(f"download through :{port} failed: {done.stderr.decode()}")
        speeds.append(float(speed) / 1e6)
    return statistics.median(speeds)


def upload(lab: Lab, origin: Origin, port: int, runs: int, size: int, workdir: str) -> float:
    """Median MB/s of `runs` uploads of `size` bytes (POST to the origin's sink) through SOCKS port `port`."""
    source = os.path.join(workdir, "upload.bin")
    if not os.path.exists(source) or os.path.getsize(source) != size:
        with open(source, "wb") as f:
            f.truncate(size)
    speeds = []
    for _ in range(runs):
        done = lab.run(
            lab.ctl_ns,
            [
                "curl",
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{size_upload} %{speed_upload}",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                f"@{source}",
                "--socks5-hostname",
                f"127.0.0.1:{port}",
                origin.url(origin.sink),
            ],
            timeout=150,
            capture_output=True,
        )
        sent, speed = done.stdout.split()
        if done.returncode != 0 or int(float(sent)) != size:
            raise RuntimeError(f"upload through :{port} failed: {done.stderr.decode()}")
        speeds.append(float(speed) / 1e6)
    return statistics.median(speeds)


def measured(proxy: Proxy, run: Callable[[], T]) -> tuple[T, float]:
    """C{run()}'s result, and the CPU seconds C{proxy}'s process spent meanwhile."""
    before = cpu_seconds(proxy.pid)
    result = run()
    return result, cpu_seconds(proxy.pid) - before


def run_load(lab: Lab, origin: Origin, script: str, port: int, count: int) -> dict:
    """Run a load client of bench/ (32 at a time, `count` 1 KiB GETs) against the proxy on `port`."""
    return run_load_client(lab, script, port, origin.target, origin.small, 32, count)


def transfer_rows(lab: Lab, workdir: str, origin: Origin, runs: int, size: int, proxies: list[Proxy]) -> list[Row]:
    """
    C{size} bytes down and up through the gateway (C{proxies[0]}) and each
    other proxy: MB/s, and CPU seconds per GiB moved.
    """
    mib = size // (1024 * 1024)
    gib = runs * size / (1 << 30)
    rows: list[Row] = []
    directions = (
        ("download", partial(download, lab, origin)),
        ("upload", partial(upload, lab, origin, workdir=workdir)),
    )
    for direction, measure in directions:
        results = [measured(p, partial(measure, p.port, runs, size)) for p in proxies]
        (gw, gw_cpu), others = results[0], results[1:]
        for proxy, (other, other_cpu) in zip(proxies[1:], others, strict=True):
            rows.append(
                (
                    f"{mib} MiB {direction}, MB/s (vs {proxy.label})",
                    f"{gw:.0f}",
                    f"{other:.0f}",
                    f"{gw / other:.2f}",
                    f"median of {runs}",
                )
            )
            rows.append(
                (
                    f"{mib} MiB {direction}, proxy CPU s/GiB (vs {proxy.label})",
                    f"{gw_cpu / gib:.2f}",
                    f"{other_cpu / gib:.2f}",
                    f"{gw_cpu / other_cpu:.2f}" if other_cpu else "-",
                    "lower is better",
                )
            )
    return rows


def start_asyncssh(lab: Lab) -> subprocess.Popen | None:
    """asyncssh's SOCKS forwarder on ASYNCSSH_PORT, when asyncssh is installed."""
    if importlib.util.find_spec("asyncssh") is None:
        return None
    proc = lab.spawn(
        lab.ctl_ns,
        [
            sys.executable,
            os.path.join(HERE, "asyncssh_socks.py"),
            str(ASYNCSSH_PORT),
            lab.proxy_addr["a"],
            lab.client_key_ed25519,
            lab.known_hosts,
            "3600",
        ],
    )
    wait_for_port(lab, lab.ctl_ns, "127.0.0.1", ASYNCSSH_PORT, timeout=30)
    return proc


def short_rows(gw: dict, others: list[tuple[str, dict]], count: int) -> list[Row]:
    """Rate, p99 latency and CPU per 1,000 streams of a new tunnel per request, with any errors in the note."""
    rows: list[Row] = []
    for label, other in others:
        errors = {name: r["errors"] for name, r in (("gateway", gw), (label, other)) if r["errors"]}
        rows += [
            (
                f"short connections, req/s (vs {label})",
                f"{gw['rps']:.0f}",
                f"{other['rps']:.0f}",
                f"{gw['rps'] / other['rps']:.2f}",
                f"{count} requests, 32 at a time" + (f"; errors: {errors}" if errors else ""),
            ),
            (
                f"short connections, p99 ms (vs {label})",
                f"{gw['p99_ms']:.1f}",
                f"{other['p99_ms']:.1f}",
                f"{gw['p99_ms'] / other['p99_ms']:.2f}",
                "lower is better",
            ),
            (
                f"short connections, proxy CPU s per 1,000 (vs {label})",
                f"{gw['cpu'] / count * 1000:.2f}",
                f"{other['cpu'] / count * 1000:.2f}",
                f"{gw['cpu'] / other['cpu']:.2f}" if other["cpu"] else "-",
                "lower is better",
            ),
        ]
    return rows


def short_load(lab: Lab, origin: Origin, proxy: Proxy, count: int) -> dict:
    """The short-connection load through C{proxy}, with the CPU seconds its process spent (C{"cpu"})."""
    result, cpu = measured(proxy, partial(run_load, lab, origin, "shortconn.py", proxy.port, count))
    return {**result, "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs (a smoke test)")
    parser.add_argument("--window", type=int, help="the gateway's window_size in bytes (default: its own)")
    parser.add_argument(
        "--cipher",
        help="force this cipher on the gateway (its cluster's ciphers key) and add an `ssh -D -c` with it",
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(only - set(SCENARIOS)))}")
    # Enough requests that each load lasts a few seconds: shorter runs swing by 20 % on this VM.
    runs, size, count = (1, 32 * 1024 * 1024, 200) if args.quick else (3, BIG, 5000)
    idle_streams, clusters = (1000, 20) if args.quick else (10_000, 200)

    def scenarios(lab: Lab, workdir: str) -> list[Row]:
        settings = [f"window_size = {args.window}"] if args.window else []
        if args.cipher:
            settings.append(f'ciphers = ["{args.cipher}"]')
        gateway = start_gateway(lab, workdir, cluster_settings="\n".join(settings))
        proxies = [
            Proxy("gateway", GATEWAY_PORT, gateway.pid),
            Proxy("ssh -D", SSH_DEFAULT_PORT, start_ssh_d(lab, SSH_DEFAULT_PORT).pid),
            Proxy(
                "ssh -D -c aes128-gcm",
                SSH_GCM_PORT,
                start_ssh_d(lab, SSH_GCM_PORT, ["-c", "aes128-gcm@openssh.com"]).pid,
            ),
        ]
        if args.cipher:
            forced = start_ssh_d(lab, SSH_CIPHER_PORT, ["-c", args.cipher])
            proxies.append(Proxy(f"ssh -D -c {args.cipher.split('@')[0]}", SSH_CIPHER_PORT, forced.pid))
        asyncssh = start_asyncssh(lab)
        if asyncssh is not None:
            proxies.append(Proxy("asyncssh", ASYNCSSH_PORT, asyncssh.pid))
        else:
            print("asyncssh is not installed: no asyncssh rows (pip install -e '.[bench]')", file=sys.stderr)
        origin = start_origin(lab, workdir, size)
        print(f"origin: {origin.label} at {origin.target}", file=sys.stderr)
        time.sleep(1)
        rows: list[Row] = []
        try:
            if "transfer" in only:
                rows += transfer_rows(lab, workdir, origin, runs, size, proxies)
            if "short" in only or "keepalive" in only:
                gw_short = short_load(lab, origin, proxies[0], count)
            if "short" in only:
                short_others = [(p.label, short_load(lab, origin, p, count)) for p in proxies[1:]]
                rows += short_rows(gw_short, short_others, count)
            if "latency" in only:
                rows += latency_rows(lab, origin, GATEWAY_PORT, SSH_DEFAULT_PORT)
            if "keepalive" in only:
                keepalive = run_load(lab, origin, "keepalive.py", GATEWAY_HTTP_PORT, 3 * count)
                rows.append(
                    (
                        "HTTP keep-alive req/s vs a new tunnel per request",
                        f"{keepalive['rps']:.0f}",
                        f"{gw_short['rps']:.0f}",
                        f"{keepalive['rps'] / gw_short['rps']:.2f}",
                        "both through the gateway; target >= 3",
                    )
                )
            if "workers" in only:
                ssh_d = Target(proxies[1].label, proxies[1].port, [proxies[1].pid])
                rows += workers_rows(lab, workdir, origin, ssh_d, args.quick)
        finally:
            origin.stop()
        if "idle" in only:
            rows += idle_rows(lab, workdir, idle_streams)
        if "clusters" in only:
            rows += clusters_rows(lab, workdir, clusters)
        rows.append(("origin", origin.label, "", "", origin.target))
        return rows

    rows = run_in_lab("bench", scenarios)
    if rows is None:
        return 2
    print(table(rows))
    print("other: the proxy named in brackets; where none is named, ssh -D with OpenSSH's defaults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
