"""
The gateway against OpenSSH ``ssh -D``, side by side in one run.

    make bench            (or: sudo .venv/bin/python -m bench [--quick])

Builds the namespace lab of the system tests (tests/netlab.py: a controller
namespace without a default route, a proxy namespace running the real sshd, an
internal namespace running the HTTP server), starts the gateway and
``ssh -D`` (OpenSSH defaults, and ``-c aes128-gcm@openssh.com``) in the
controller namespace against the same sshd with the same key, and measures,
through each SOCKS5 listener:

 - a 256 MiB download with curl (MB/s, median of runs);
 - short connections: a new SOCKS5 connection + a 1 KiB GET, 32 at a time
   (requests/s and p99 latency, bench/shortconn.py).

It prints one table with the ratios gateway / ssh -D.  Every load stops by
itself; the lab is removed at the end, also on failure.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench.common import HERE, INTERNAL, Row, start_gateway, start_ssh_d, table
from tests.netlab import Lab, lab_skip_reason

BIG = 256 * 1024 * 1024
SMALL = 1024
GATEWAY_PORT = 1080
GATEWAY_HTTP_PORT = 3128
SSH_DEFAULT_PORT = 1081
SSH_GCM_PORT = 1082


def download(lab: Lab, port: int, runs: int, size: int) -> float:
    """Median MB/s of `runs` downloads of `size` bytes through SOCKS port `port`."""
    speeds = []
    for _ in range(runs):
        done = lab.run(
            lab.ctl_ns,
            [
                "curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}",
                "--socks5-hostname", f"127.0.0.1:{port}", f"http://{INTERNAL}:8080/bytes/{size}",
            ],
            timeout=150,
            capture_output=True,
        )
        got, speed = done.stdout.split()
        if done.returncode != 0 or int(got) != size:
            raise RuntimeError(f"download through :{port} failed: {done.stderr.decode()}")
        speeds.append(float(speed) / 1e6)
    return statistics.median(speeds)


def upload(lab: Lab, port: int, runs: int, size: int, workdir: str) -> float:
    """Median MB/s of `runs` uploads of `size` bytes (POST to /sink) through SOCKS port `port`."""
    source = os.path.join(workdir, "upload.bin")
    if not os.path.exists(source) or os.path.getsize(source) != size:
        with open(source, "wb") as f:
            f.truncate(size)
    speeds = []
    for _ in range(runs):
        done = lab.run(
            lab.ctl_ns,
            [
                "curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w", "%{size_upload} %{speed_upload}",
                "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{source}",
                "--socks5-hostname", f"127.0.0.1:{port}", f"http://{INTERNAL}:8080/sink",
            ],
            timeout=150,
            capture_output=True,
        )
        sent, speed = done.stdout.split()
        if done.returncode != 0 or int(float(sent)) != size:
            raise RuntimeError(f"upload through :{port} failed: {done.stderr.decode()}")
        speeds.append(float(speed) / 1e6)
    return statistics.median(speeds)


def run_load(lab: Lab, script: str, port: int, count: int) -> dict:
    """Run a load client of bench/ (32 at a time, `count` 1 KiB GETs) against the proxy on `port`."""
    done = lab.run(
        lab.ctl_ns,
        [
            sys.executable, os.path.join(HERE, script),
            f"127.0.0.1:{port}", f"{INTERNAL}:8080", f"/bytes/{SMALL}", "32", str(count),
        ],
        timeout=180,
        capture_output=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} through :{port} failed: {done.stderr.decode()}")
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs (a smoke test)")
    parser.add_argument("--window", type=int, help="the gateway's window_size in bytes (default: its own)")
    args = parser.parse_args()
    reason = lab_skip_reason()
    if reason:
        print(f"bench needs the namespace lab: {reason}", file=sys.stderr)
        return 2
    runs, size, count = (1, 32 * 1024 * 1024, 200) if args.quick else (3, BIG, 2000)
    workdir = tempfile.mkdtemp(prefix="gateway-bench-")
    lab = Lab(os.path.join(workdir, "lab"))
    try:
        lab.start()
        start_gateway(lab, workdir, cluster_settings=f"window_size = {args.window}" if args.window else "")
        start_ssh_d(lab, SSH_DEFAULT_PORT)
        start_ssh_d(lab, SSH_GCM_PORT, ["-c", "aes128-gcm@openssh.com"])
        time.sleep(1)
        rows: list[Row] = []
        mib = size // (1024 * 1024)
        gw = download(lab, GATEWAY_PORT, runs, size)
        for label, port in (("defaults", SSH_DEFAULT_PORT), ("aes128-gcm", SSH_GCM_PORT)):
            ssh = download(lab, port, runs, size)
            rows.append(
                (f"{mib} MiB download, MB/s (ssh {label})", f"{gw:.0f}", f"{ssh:.0f}", f"{gw / ssh:.2f}",
                 f"median of {runs}")
            )
        gw_up = upload(lab, GATEWAY_PORT, runs, size, workdir)
        ssh_up = upload(lab, SSH_DEFAULT_PORT, runs, size, workdir)
        rows.append(
            (f"{mib} MiB upload, MB/s (ssh defaults)", f"{gw_up:.0f}", f"{ssh_up:.0f}", f"{gw_up / ssh_up:.2f}",
             f"median of {runs}")
        )
        gw_short = run_load(lab, "shortconn.py", GATEWAY_PORT, count)
        ssh_short = run_load(lab, "shortconn.py", SSH_DEFAULT_PORT, count)
        rows.append(
            ("short connections, req/s (32 concurrent)", f"{gw_short['rps']:.0f}", f"{ssh_short['rps']:.0f}",
             f"{gw_short['rps'] / ssh_short['rps']:.2f}", f"{count} requests each")
        )
        rows.append(
            ("short connections, p99 latency ms", f"{gw_short['p99_ms']:.1f}", f"{ssh_short['p99_ms']:.1f}",
             f"{gw_short['p99_ms'] / ssh_short['p99_ms']:.2f}", "lower is better")
        )
        keepalive = run_load(lab, "keepalive.py", GATEWAY_HTTP_PORT, count)
        rows.append(
            ("HTTP keep-alive req/s vs a new tunnel per request", f"{keepalive['rps']:.0f}",
             f"{gw_short['rps']:.0f}", f"{keepalive['rps'] / gw_short['rps']:.2f}",
             "both through the gateway; target >= 3")
        )
        print(table(rows))
        for name, result in (("gateway", gw_short), ("ssh -D", ssh_short)):
            if result["errors"]:
                print(f"{name} short-connection errors: {result['errors']}")
        return 0
    finally:
        lab.stop()


if __name__ == "__main__":
    sys.exit(main())
