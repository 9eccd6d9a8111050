"""
Profile the gateway under one benchmark load: where its time goes, and how
many Python calls each request costs.

    sudo .venv/bin/python -m bench.profile [short|keepalive] [--count N] [--top K] [--save FILE]

Starts the lab, the nginx origin and the gateway under twistd's C{cProfile}
(C{--profile}), runs the load client (C{count} requests, 32 at a time),
stops the gateway so it writes its profile, and prints the total and
per-request function calls and the C{top} entries by own time.  cProfile
slows the gateway down, so rates measured here mean nothing: the calls per
request and the shares of time are what to compare before and after a
change.  Everything stops by itself and the lab is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import pstats
import sys

from bench.common import run_in_lab, run_load_client, start_gateway
from bench.origin import start_origin
from tests.system.netlab import Lab, stop_processes

SCRIPTS = {"short": ("shortconn.py", 1080), "keepalive": ("keepalive.py", 3128)}


def profile(lab: Lab, workdir: str, scenario: str, count: int) -> pstats.Stats:
    """The gateway's profile over C{count} requests of C{scenario}."""
    out = os.path.join(workdir, "gateway.prof")
    gateway = start_gateway(lab, workdir, twistd_options=(f"--profile={out}", "--profiler=cprofile", "--savestats"))
    origin = start_origin(lab, workdir, 1 << 20)
    try:
        script, port = SCRIPTS[scenario]
        run_load_client(lab, script, port, origin.target, origin.small, 32, 100)  # warm up: SSH up, caches
        result = run_load_client(lab, script, port, origin.target, origin.small, 32, count)
        print(f"{result['ok']} requests, errors: {result.get('errors') or 'none'}", file=sys.stderr)
    finally:
        origin.stop()
        stop_processes([gateway])
    return pstats.Stats(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("scenario", nargs="?", default="short", choices=sorted(SCRIPTS))
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--save", metavar="FILE", help="also write the profile here (for pstats or snakeviz)")
    args = parser.parse_args()
    stats = run_in_lab("bench.profile", lambda lab, workdir: profile(lab, workdir, args.scenario, args.count))
    if stats is None:
        return 2
    requests = args.count + 100
    print(f"{stats.total_calls} calls, {stats.total_calls / requests:.0f} per request (warm-up included)")  # type: ignore[attr-defined]
    if args.save:
        stats.dump_stats(args.save)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
