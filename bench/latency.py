"""
Sequential short requests: the latency of one new stream at a time, through
the gateway and through OpenSSH ``ssh -D``, against the same sshd.

Each request is a new SOCKS5 connection, a CONNECT and a 1 KiB GET read to
the end (bench/shortconn.py with a concurrency of 1), 200 in a row.  Run
one at a time, nothing hides a stall behind other requests: sshd sets no
TCP_NODELAY on forwarding-only connections, so its small packets (the open
confirmation, the close, a reply's last segment) wait for the client's
delayed ACK, about 40 ms -- the row counts the requests over 30 ms.

The origin is the run's (L{bench.origin}): nginx serving a static 1 KiB file
when it is installed, else the lab's Python HTTP server (threaded, ~1 ms of
its own per request); the note column says which.

    sudo .venv/bin/python -m bench --only latency

Takes a few seconds per proxy (longer when the stall is there: 200 x 44 ms).
"""

from __future__ import annotations

from bench.common import Row, run_load_client
from bench.origin import Origin
from tests.system.netlab import Lab

REQUESTS = 200
STALL_MS = 30


def latency_rows(lab: Lab, origin: Origin, gateway_port: int, ssh_d_port: int) -> list[Row]:
    """Median latency and stalls of REQUESTS sequential short requests through each SOCKS port."""
    gw = run_load_client(lab, "shortconn.py", gateway_port, origin.target, origin.small, 1, REQUESTS)
    other = run_load_client(lab, "shortconn.py", ssh_d_port, origin.target, origin.small, 1, REQUESTS)
    errors = {name: r["errors"] for name, r in (("gateway", gw), ("ssh -D", other)) if r["errors"]}
    note = f"{REQUESTS} one at a time; origin: {origin.label}" + (f"; errors: {errors}" if errors else "")
    stalls_ratio = f"{gw['over_30ms'] / other['over_30ms']:.2f}" if other["over_30ms"] else "-"
    return [
        (
            "sequential short requests, median ms",
            f"{gw['p50_ms']:.1f}",
            f"{other['p50_ms']:.1f}",
            f"{gw['p50_ms'] / other['p50_ms']:.2f}",
            note,
        ),
        (
            f"sequential short requests over {STALL_MS} ms",
            str(gw["over_30ms"]),
            str(other["over_30ms"]),
            stalls_ratio,
            f"of {REQUESTS}; lower is better",
        ),
    ]
