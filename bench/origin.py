"""
The origin the benchmarks fetch from and upload to: nginx (Debian's
``nginx-light``; ``make bench`` installs it when root) in the internal
namespace, or the lab's Python HTTP server where nginx is not installed.

Why nginx: the Python server spends a thread and a log line per request --
about as much CPU as the proxies under test on two cores, which pulls every
ratio toward 1.  nginx serves from the page cache with sendfile, one
foreground process (no master, no daemon), started and stopped here by pid:

 - ``/1k``: 1 KiB, the short-request scenarios;
 - ``/big``: a sparse file of the transfer size, the download;
 - ``/sink``: ``return 204`` with no size limit, the upload (nginx reads and
   discards the body).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from dataclasses import dataclass

from bench.common import INTERNAL, tail
from tests.system.netlab import Lab, stop_processes, wait_for_port

NGINX = "/usr/sbin/nginx"
NGINX_PORT = 8081
SMALL = 1024


@dataclass
class Origin:
    """Where the benchmark's requests go: C{target} is C{host:port}; paths for each kind of request."""

    label: str
    target: str
    small: str
    big: str
    sink: str
    proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://{self.target}{path}"

    def stop(self) -> None:
        stop_processes([self.proc])


def python_origin(size: int) -> Origin:
    """The lab's own Python server (internal-a:8080): its C{/bytes/N} and C{/sink}."""
    return Origin("Python origin", f"{INTERNAL}:8080", f"/bytes/{SMALL}", f"/bytes/{size}", "/sink")


def start_origin(lab: Lab, workdir: str, size: int) -> Origin:
    """nginx when installed (serving a C{size}-byte C{/big}), else L{python_origin}."""
    if not os.path.exists(NGINX):
        return python_origin(size)
    base = os.path.join(workdir, "nginx")
    www = os.path.join(base, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(b"x" * SMALL)
    with open(os.path.join(www, "big"), "wb") as f:
        f.truncate(size)  # sparse: zeros, as the Python server's /bytes/N
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
                events {{ worker_connections 4096; }}
                http {{
                    access_log off;
                    sendfile on;
                    keepalive_requests 100000;
                    server {{
                        listen {INTERNAL}:{NGINX_PORT} backlog=4096;
                        root {www};
                        location = /sink {{ client_max_body_size 0; return 204; }}
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
    return Origin("nginx", f"{INTERNAL}:{NGINX_PORT}", "/1k", "/big", "/sink", proc)
