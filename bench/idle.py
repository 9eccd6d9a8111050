"""
Idle streams: COUNT (default 10,000) concurrent, idle tunneled connections on
one cluster, through the gateway and, side by side, through OpenSSH ``ssh -D``.
Target: no errors, gateway RSS under 90 MB (issue 15; issue 6 asked for 200); the table also gives the memory
per stream of each.

    sudo .venv/bin/python -m bench.idle [--count N]

In the namespace lab (tests/system/netlab.py) it starts

 - bench/holdserver.py in the internal namespace (10.251.0.10:9000): echoes
   lines, otherwise holds every connection open;
 - its own gateway (``idle-gateway``, SOCKS5 on 127.0.0.1:1090, with
   ``max_clients`` and ``max_streams`` raised to 20000 -- the defaults, 4096
   and 1024, would refuse most of the streams -- listen backlog 1024 and no
   HTTP listener);
 - its own ``ssh -N -D 127.0.0.1:1091`` to the same sshd with the same key;

and for each proxy: one warm-up stream (the SSH connection is up, the code
paths are warm), its RSS, then bench/idleclient.py opens COUNT SOCKS5
connections (200 at a time), each checked with a ping echoed end to end, the
RSS with all of them open and idle, then every connection is pinged again
(none may have died while idle) and closed from the server's side (the end
must come back through the proxy).  The proxy node's sshd (the
listener's descendants: one privileged and one user process per SSH
connection) is measured too, as is each process's open-file limit.

File descriptors: every stream is a descriptor in the client, the gateway or
ssh, sshd and the hold server, so bench.common.raise_file_limit() must run
before lab.start() -- the lab's daemons and everything spawned later inherit
the limit (bench/__main__.py must call it too before running this scenario).

Every step is bounded (client deadline, line time-outs, process waits); the
gateway, ssh and hold server of this scenario are stopped at the end, the lab
by its owner (main() here: lab.stop() in finally).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

from bench.common import (
    HERE,
    INTERNAL,
    Row,
    rss_bytes,
    run_in_lab,
    start_gateway,
    start_ssh_d,
    table,
    tail,
)
from tests.system.netlab import Lab, stop_processes, wait_for_port

HOLD_PORT = 9000
GATEWAY_PORT = 1090
SSH_PORT = 1091
CONCURRENCY = 200
#: the hold server stops by itself after this long, whatever happens here
HOLD_DEADLINE = 600
#: the whole client run (open, idle, check, close) for one proxy
CLIENT_DEADLINE = 300
#: idle time with every stream open before memory is measured
SETTLE_SECONDS = 3.0
RSS_TARGET_MB = 90
MB = 1e6


def _limits(pid: int) -> int:
    """Soft open-file limit of a process (from /proc/PID/limits)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return 1 << 62 if soft == "unlimited" else int(soft)
    raise RuntimeError(f"no open-file limit for pid {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        out += children
        frontier += children
    return out


def _sshd_rss(lab: Lab) -> int:
    """RSS of the proxy-a sshd's sessions (all descendants of the listener), in bytes."""
    total = 0
    for pid in _descendants(lab.sshd_pid("proxy-a")):
        try:
            total += rss_bytes(pid)
        except (OSError, RuntimeError):
            pass
    return total


class Client:
    """bench/idleclient.py in the controller namespace, driven line by line."""

    def __init__(self, lab: Lab, port: int, count: int, log: str):
        self.log = log
        with open(log, "ab") as logf:
            self.proc = lab.spawn(
                lab.ctl_ns,
                [
                    sys.executable,
                    os.path.join(HERE, "idleclient.py"),
                    f"127.0.0.1:{port}",
                    f"{INTERNAL}:{HOLD_PORT}",
                    str(count),
                    str(CONCURRENCY),
                    str(CLIENT_DEADLINE),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logf,
            )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def result(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"idleclient gave no result within {timeout:.0f} s") from None
        if not line:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"idleclient exited ({self.proc.returncode}): {tail(self.log)}")
        record = json.loads(line)
        if record.get("phase") == "deadline":
            raise RuntimeError(f"idleclient hit its deadline: {record}")
        return record

    def release(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        self.proc.stdin.close()

    def stop(self) -> None:
        stop_processes([self.proc], timeout=5)


def _measure(lab: Lab, workdir: str, name: str, proc: subprocess.Popen, port: int, count: int) -> dict:
    """One proxy: warm-up stream, RSS, COUNT idle streams, RSS, check, close, RSS."""
    slug = name.replace(" ", "").replace("-", "")
    limit = _limits(proc.pid)
    if limit < count + 100:
        raise RuntimeError(f"{name} (pid {proc.pid}) may open only {limit} files, {count} streams need more")
    warm = Client(lab, port, 1, os.path.join(workdir, f"idleclient-{slug}-warmup.log"))
    try:
        first = warm.result(60)
        warm.release()
        second = warm.result(60)
        warm.proc.wait(timeout=10)
    finally:
        warm.stop()
    if first["opened"] != 1 or second["alive"] != 1:
        raise RuntimeError(f"warm-up stream through {name} failed: {first} {second}")
    time.sleep(1)
    base, sshd_base = rss_bytes(proc.pid), _sshd_rss(lab)

    client = Client(lab, port, count, os.path.join(workdir, f"idleclient-{slug}.log"))
    try:
        opened = client.result(CLIENT_DEADLINE + 10)
        time.sleep(SETTLE_SECONDS)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}) with the streams open")
        loaded, sshd_loaded, fds = rss_bytes(proc.pid), _sshd_rss(lab), _fds(proc.pid)
        client.release()
        closed = client.result(CLIENT_DEADLINE + 10)
        client.proc.wait(timeout=30)
    finally:
        client.stop()
    time.sleep(2)
    after = rss_bytes(proc.pid) if proc.poll() is None else 0
    return {
        "limit": limit,
        "base": base,
        "loaded": loaded,
        "after": after,
        "fds": fds,
        "sshd_base": sshd_base,
        "sshd_loaded": sshd_loaded,
        "opened": opened["opened"],
        "open_errors": opened["errors"],
        "open_seconds": opened["seconds"],
        "alive": closed["alive"],
        "check_errors": closed["errors"],
        "close_errors": closed["close_errors"],
        "alive_after": proc.poll() is None,
    }


def measure_idle(lab: Lab, workdir: str, count: int = 10_000) -> dict[str, dict]:
    """Run the scenario through the gateway and ``ssh -D``; their measurements by name."""
    hold = gateway = ssh = None
    hold_log = os.path.join(workdir, "holdserver.log")
    try:
        with open(hold_log, "ab") as logf:
            hold = lab.spawn(
                lab.internal_ns["a"],
                [
                    sys.executable,
                    "-I",
                    os.path.join(HERE, "holdserver.py"),
                    INTERNAL,
                    str(HOLD_PORT),
                    str(HOLD_DEADLINE),
                ],
                stdout=logf,
                stderr=logf,
            )
        wait_for_port(lab, lab.proxy_ns["a"], INTERNAL, HOLD_PORT, timeout=15)
        gateway = start_gateway(
            lab,
            workdir,
            name="idle-gateway",
            socks_port=GATEWAY_PORT,
            http_port=None,
            gateway_settings="max_clients = 20000",
            cluster_settings="max_streams = 20000",
            listen_options=":backlog=1024",
        )
        ssh = start_ssh_d(lab, SSH_PORT)
        sshd_limit = _limits(lab.sshd_pid("proxy-a"))
        if sshd_limit < count + 100:
            raise RuntimeError(f"the proxy node's sshd may open only {sshd_limit} files")
        results = {}
        for name, proc, port in (("gateway", gateway, GATEWAY_PORT), ("ssh -D", ssh, SSH_PORT)):
            try:
                results[name] = _measure(lab, workdir, name, proc, port, count)
            except Exception as e:
                log = os.path.join(workdir, "idle-gateway.log") if name == "gateway" else hold_log
                raise RuntimeError(f"idle streams through {name}: {e}\n--- {log} ---\n{tail(log)}") from e
            results[name]["sshd_limit"] = sshd_limit
        return results
    finally:
        stop_processes([gateway, ssh, hold])


def rows(results: dict[str, dict], count: int) -> list[Row]:
    gw, ssh = results["gateway"], results["ssh -D"]

    def mb(v: float) -> str:
        return f"{v / MB:.1f}"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "-"

    def per_stream(r: dict) -> float:
        return (r["loaded"] - r["base"]) / max(1, r["opened"])

    def errors(r: dict) -> int:
        return sum(sum(r[k].values()) for k in ("open_errors", "check_errors", "close_errors"))

    ok = gw["loaded"] < RSS_TARGET_MB * MB
    return [
        (
            f"{count} idle streams: RSS MB",
            mb(gw["loaded"]),
            mb(ssh["loaded"]),
            ratio(gw["loaded"], ssh["loaded"]),
            f"target < {RSS_TARGET_MB} MB: {'ok' if ok else 'MISSED'}",
        ),
        (
            "idle streams: RSS MB before (1 warm-up stream)",
            mb(gw["base"]),
            mb(ssh["base"]),
            ratio(gw["base"], ssh["base"]),
            "after the warm-up stream closed",
        ),
        (
            "idle streams: bytes per stream",
            f"{per_stream(gw):.0f}",
            f"{per_stream(ssh):.0f}",
            ratio(per_stream(gw), per_stream(ssh)),
            "(RSS with all open - before) / streams",
        ),
        (
            "idle streams: RSS MB after all closed",
            mb(gw["after"]),
            mb(ssh["after"]),
            ratio(gw["after"], ssh["after"]),
            "2 s after the last close",
        ),
        (
            "idle streams: proxy sshd bytes per stream",
            f"{(gw['sshd_loaded'] - gw['sshd_base']) / count:.0f}",
            f"{(ssh['sshd_loaded'] - ssh['sshd_base']) / count:.0f}",
            "-",
            "the node's sshd sessions, for each",
        ),
        (
            "idle streams: seconds to open all",
            f"{gw['open_seconds']:.1f}",
            f"{ssh['open_seconds']:.1f}",
            ratio(gw["open_seconds"], ssh["open_seconds"]),
            f"{CONCURRENCY} at a time, each pinged",
        ),
        (
            "idle streams: open fds with all open",
            str(gw["fds"]),
            str(ssh["fds"]),
            ratio(gw["fds"], ssh["fds"]),
            f"limit {gw['limit']} / {ssh['limit']}; sshd {gw['sshd_limit']}",
        ),
        (
            "idle streams: opened / alive after idle",
            f"{gw['opened']}/{gw['alive']}",
            f"{ssh['opened']}/{ssh['alive']}",
            "-",
            f"of {count}",
        ),
        ("idle streams: errors", str(errors(gw)), str(errors(ssh)), "-", "open + ping after idle + close; must be 0"),
    ]


def idle_rows(lab: Lab, workdir: str, count: int = 10_000) -> list[Row]:
    """The idle-streams rows of the result table (see the module docstring)."""
    return rows(measure_idle(lab, workdir, count), count)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--count", type=int, default=10_000, help="idle streams per proxy (default 10000)")
    args = parser.parse_args()
    if not 1 <= args.count <= 15_000:
        # OpenSSH allows 16384 channels per connection; beyond, sshd dies with
        # "channel_new: internal error: channels_alloc 16390 too big", and every stream with it.
        parser.error("--count must be 1 to 15000 (OpenSSH allows at most 16384 channels per connection)")
    results = run_in_lab("bench.idle", lambda lab, workdir: measure_idle(lab, workdir, args.count))
    if results is None:
        return 2
    print(table(rows(results, args.count)))
    for name, r in results.items():
        for kind in ("open", "check", "close"):
            errs = r[f"{kind}_errors"]
            if errs:
                print(f"{name} {kind} errors: {errs}")
    bad = [
        name
        for name, r in results.items()
        if r["open_errors"]
        or r["check_errors"]
        or r["close_errors"]
        or r["alive"] != args.count
        or not r["alive_after"]
    ]
    if bad or results["gateway"]["loaded"] >= RSS_TARGET_MB * MB:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
