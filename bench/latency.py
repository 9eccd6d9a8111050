"""
Sequential short requests: the latency of one new stream at a time, through
the gateway and through OpenSSH ``ssh -D``, against the same sshd.

Each request is a new SOCKS5 connection, a CONNECT and a 1 KiB GET read to
the end (bench/shortconn.py with a concurrency of 1), 200 in a row.  Run
one at a time, nothing hides a stall behind other requests: sshd sets no
TCP_NODELAY on forwarding-only connections, so its small packets (the open
confirmation, the close, a reply's last segment) wait for the client's
delayed ACK, about 40 ms -- the row counts the requests over 30 ms.

The origin is nginx serving a static 1 KiB file when ``/usr/sbin/nginx`` is
installed (a C, event-driven server: what is measured is the tunnel), else
the lab's Python HTTP server (threaded, ~1 ms of its own per request); the
note column says which.  nginx runs in the internal namespace as one
foreground process (no master, no daemon), started and stopped here by pid.

    sudo .venv/bin/python -m bench --only latency

Takes a few seconds per proxy (longer when the stall is there: 200 x 44 ms).
"""

from __future__ import annotations

import os
import subprocess
import textwrap

from bench.common import INTERNAL, Row, run_load_client, stop_processes, tail
from tests.system.netlab import Lab, wait_for_port

NGINX = "/usr/sbin/nginx"
NGINX_PORT = 8081
REQUESTS = 200
SIZE = 1024
STALL_MS = 30


def start_nginx(lab: Lab, workdir: str) -> subprocess.Popen:
    """nginx in internal-a on INTERNAL:NGINX_PORT, serving C{/1k}: SIZE bytes."""
    base = os.path.join(workdir, "nginx")
    os.makedirs(os.path.join(base, "www"), exist_ok=True)
    with open(os.path.join(base, "www", "1k"), "wb") as f:
        f.write(b"x" * SIZE)
    config = os.path.join(base, "nginx.conf")
    with open(config, "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                daemon off;
                master_process off;
                worker_processes 1;
                pid {base}/nginx.pid;
                error_log {base}/error.log;
                events {{ worker_connections 1024; }}
                http {{
                    access_log off;
                    server {{
                        listen {INTERNAL}:{NGINX_PORT};
                        root {base}/www;
                    }}
                }}
                """
            )
        )
    proc = lab.spawn(lab.internal_ns["a"], [NGINX, "-p", base, "-e", f"{base}/error.log", "-c", config])
    try:
        wait_for_port(lab, lab.internal_ns["a"], INTERNAL, NGINX_PORT, timeout=10)
    except Exception as e:
        stop_processes([proc])
        raise RuntimeError(f"nginx did not start: {e}\n{tail(os.path.join(base, 'error.log'))}") from e
    return proc


def latency_rows(lab: Lab, workdir: str, gateway_port: int, ssh_d_port: int) -> list[Row]:
    """Median latency and stalls of REQUESTS sequential short requests through each SOCKS port."""
    nginx = start_nginx(lab, workdir) if os.path.exists(NGINX) else None
    try:
        if nginx is not None:
            origin, target, path = "nginx, static 1 KiB file", f"{INTERNAL}:{NGINX_PORT}", "/1k"
        else:
            origin, target, path = "Python origin (no nginx)", f"{INTERNAL}:8080", f"/bytes/{SIZE}"
        gw = run_load_client(lab, "shortconn.py", gateway_port, target, path, 1, REQUESTS)
        other = run_load_client(lab, "shortconn.py", ssh_d_port, target, path, 1, REQUESTS)
    finally:
        stop_processes([nginx])
    errors = {name: r["errors"] for name, r in (("gateway", gw), ("ssh -D", other)) if r["errors"]}
    note = f"{REQUESTS} one at a time; origin: {origin}" + (f"; errors: {errors}" if errors else "")
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
