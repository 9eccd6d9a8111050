"""
Many clusters at once: N registered clusters, all connected soon after start.

    sudo .venv/bin/python -m bench.clusters [--count 200]

In the namespace lab's controller namespace (loopback only) a farm of N
in-process Conch SSH servers (bench/proxyfarm.py, its own process) plays N
proxy nodes, each with its own port and host key.  Then, one after the other:

 - the gateway with N clusters C{[clusters.cNNN]} (one per farm node): seconds
   from spawning C{twistd} until C{GET /v1/clusters} on the control API reports
   all N "up", its CPU seconds until then, and its RSS;
 - the gateway with 1 cluster, the same way: RSS per cluster is
   (RSS_N - RSS_1) / (N - 1);
 - the OpenSSH way, which needs one C{ssh -N -D} process per cluster: N ssh
   processes started at once, seconds until all their SOCKS ports accept
   (ssh listens on -D only after authentication), their summed RSS (and PSS,
   which counts shared libraries once) and CPU seconds; also 1 ssh process.

Prints one table.  Everything started is stopped by pid; the lab is removed at
the end, also on failure.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import VENV_BIN, Row, cpu_seconds, rss_bytes, run_in_lab, ssh_d_argv, table, tail
from tests.system.netlab import Lab, stop_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCKS_PORT = 1095
CONTROL_PORT = 1096
SSH_BASE_PORT = 21000
TARGET_SECONDS = 10.0
DEADLINE = 60.0
POLL = 0.1
SETTLE = 1.0

# Run inside the controller namespace (stdlib only, so it starts fast).  Polls
# until every expected thing is up and prints one JSON line of monotonic
# timestamps (CLOCK_MONOTONIC is the same clock in every network namespace).
_POLLER = r"""
import json, os, socket, sys, time, urllib.request
mode, pid, deadline, poll = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
args = sys.argv[5:]
end = time.monotonic() + deadline
marks, last = {}, {}

def dead():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True

def mark(name):
    marks.setdefault(name, time.monotonic())

if mode == "api":
    url, expect = args[0], int(args[1])
    while time.monotonic() < end and not dead():
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                clusters = json.load(answer)["clusters"]
        except (OSError, ValueError):
            time.sleep(poll)
            continue
        mark("api")
        states = {}
        for c in clusters:
            states[c["state"]] = states.get(c["state"], 0) + 1
        last = {"states": states, "errors": sorted({c["last_error"] for c in clusters if c["last_error"]})[:5]}
        up = states.get("up", 0)
        if up:
            mark("first")
        if up * 2 >= expect:
            mark("half")
        if up >= expect and len(clusters) == expect:
            mark("all")
            break
        time.sleep(poll)
else:
    pending = {int(p) for p in args}
    expect = len(pending)
    while pending and time.monotonic() < end and not dead():
        for port in sorted(pending):
            s = socket.socket()
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", port))
                pending.discard(port)
            except OSError:
                pass
            finally:
                s.close()
        up = expect - len(pending)
        if up:
            mark("first")
        if up * 2 >= expect:
            mark("half")
        if not pending:
            mark("all")
            break
        time.sleep(poll)
    last = {"pending": len(pending)}
print(json.dumps({"marks": marks, "last": last}))
"""


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages divided among their users), in bytes."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def poll_until_up(lab: Lab, mode: str, pid: int, args: list[str]) -> dict:
    """Run the poller in the controller namespace; its marks, as monotonic seconds."""
    done = lab.run(
        lab.ctl_ns,
        [sys.executable, "-c", _POLLER, mode, str(pid), str(DEADLINE), str(POLL), *args],
        timeout=DEADLINE + 30,
        capture_output=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"poller failed: {done.stderr.decode(errors='replace')}")
    return json.loads(done.stdout)


# -- the farm ---------------------------------------------------------------------------------------------------


def start_farm(lab: Lab, workdir: str, count: int) -> tuple[subprocess.Popen, list[dict]]:
    """Start bench/proxyfarm.py with `count` nodes; its process and its nodes (port, host_key)."""
    out = os.path.join(workdir, "farm.json")
    log = os.path.join(workdir, "farm.log")
    with open(log, "wb") as logf:
        proc = lab.spawn(
            lab.ctl_ns,
            [
                sys.executable,
                "-m",
                "bench.proxyfarm",
                "--count",
                str(count),
                "--pubkey",
                lab.client_key_ed25519 + ".pub",
                "--out",
                out,
                "--deadline",
                "1800",
            ],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    end = time.monotonic() + 60
    while not os.path.exists(out):
        if proc.poll() is not None:
            raise RuntimeError(f"proxy farm exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > end:
            raise RuntimeError(f"proxy farm not listening after 60 s:\n{tail(log)}")
        time.sleep(0.1)
    with open(out) as f:
        nodes = json.load(f)["nodes"]
    if len(nodes) != count:
        raise RuntimeError(f"proxy farm wrote {len(nodes)} nodes, expected {count}")
    return proc, nodes


# -- the gateway ------------------------------------------------------------------------------------------------


def write_config(lab: Lab, workdir: str, name: str, nodes: list[dict]) -> str:
    """A gateway TOML with one cluster per node, a SOCKS listener and the control API (loopback: no token)."""
    lines = [
        "[gateway]",
        f'state_file = "{os.path.join(workdir, name + "-state.json")}"',
        "",
        "[listen]",
        f'socks = "tcp:{SOCKS_PORT}:interface=127.0.0.1"',
        'http = ""',
        f'control = "tcp:{CONTROL_PORT}:interface=127.0.0.1"',
    ]
    for i, node in enumerate(nodes):
        lines += [
            "",
            f"[clusters.c{i:03d}]",
            f'proxies = ["127.0.0.1:{node["port"]}"]',
            'user = "root"',
            f'key_file = "{lab.client_key_ed25519}"',
            f"host_keys = [{json.dumps(node['host_key'])}]",
            f'networks = ["10.{100 + i // 256}.{i % 256}.0/24"]',
        ]
    config = os.path.join(workdir, f"{name}.toml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    return config


def log_volume(log: str) -> tuple[int, int]:
    """Lines and bytes in a twistd log file and its rotated files (twistd rotates at 1 MB: LOG, LOG.1, ...)."""
    lines = size = 0
    directory, base = os.path.split(log)
    for name in os.listdir(directory):
        if name == base or (name.startswith(base + ".") and name[len(base) + 1 :].isdigit()):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            lines += data.count(b"\n")
            size += len(data)
    return lines, size


def measure_gateway(lab: Lab, workdir: str, name: str, nodes: list[dict], farm_pid: int) -> dict:
    """Start twistd gateway with one cluster per node; time until all up, CPU, RSS, log volume; stop it."""
    config = write_config(lab, workdir, name, nodes)
    log = os.path.join(workdir, f"{name}.log")
    argv = [os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", f"--logfile={log}", "gateway", f"--config={config}"]
    farm_cpu0 = cpu_seconds(farm_pid)
    t0 = time.monotonic()
    proc = lab.spawn(lab.ctl_ns, argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{CONTROL_PORT}/v1/clusters"
        got = poll_until_up(lab, "api", proc.pid, [url, str(len(nodes))])
        cpu = cpu_seconds(proc.pid) if proc.poll() is None else float("nan")
        farm_cpu = cpu_seconds(farm_pid) - farm_cpu0
        marks = got["marks"]
        if "all" not in marks:
            raise RuntimeError(
                f"gateway {name}: not all {len(nodes)} clusters up within {DEADLINE:.0f} s "
                f"(exit {proc.poll()}; last {got['last']}):\n{tail(log)}"
            )
        log_lines, log_bytes = log_volume(log)
        time.sleep(SETTLE)
        result = {
            "pid": proc.pid,
            "marks": {k: v - t0 for k, v in marks.items()},
            "seconds": marks["all"] - t0,
            "cpu": cpu,
            "rss": rss_bytes(proc.pid),
            "pss": pss_bytes(proc.pid),
            "log_lines": log_lines,
            "log_bytes": log_bytes,
            "farm_cpu": farm_cpu,
        }
    finally:
        stop_processes([proc])
    return result


# -- ssh -D -----------------------------------------------------------------------------------------------------


def measure_ssh(lab: Lab, workdir: str, name: str, nodes: list[dict], farm_pid: int) -> dict:
    """One ssh -N -D per node, all started at once; time until every -D port accepts, RSS, CPU; stop them."""
    known_hosts = os.path.join(workdir, f"{name}_known_hosts")
    with open(known_hosts, "w") as f:
        for node in nodes:
            f.write(f"[127.0.0.1]:{node['port']} {node['host_key']}\n")
    log = os.path.join(workdir, f"{name}.log")
    ports = [SSH_BASE_PORT + i for i in range(len(nodes))]
    procs: list[subprocess.Popen] = []
    with open(log, "ab") as logf:
        farm_cpu0 = cpu_seconds(farm_pid)
        t0 = time.monotonic()
        try:
            for node, port in zip(nodes, ports, strict=True):
                procs.append(
                    lab.spawn(
                        lab.ctl_ns,
                        ssh_d_argv(
                            lab, port, known_hosts, "root@127.0.0.1", "-o", "LogLevel=ERROR", "-p", str(node["port"])
                        ),
                        stdout=subprocess.DEVNULL,
                        stderr=logf,
                    )
                )
            spawned = time.monotonic() - t0
            got = poll_until_up(lab, "ports", procs[0].pid, [str(p) for p in ports])
            end = time.monotonic()
            cpu_now = sum(cpu_seconds(p.pid) for p in procs if p.poll() is None)
            farm_cpu = cpu_seconds(farm_pid) - farm_cpu0
            marks = got["marks"]
            dead = [p.pid for p in procs if p.poll() is not None]
            if "all" not in marks or dead:
                raise RuntimeError(
                    f"ssh -D: {got['last']} ports not listening after {end - t0:.1f} s, "
                    f"{len(dead)} ssh exited:\n{tail(log)}"
                )
            time.sleep(SETTLE)
            rss = [rss_bytes(p.pid) for p in procs]
            pss = [pss_bytes(p.pid) for p in procs]
            return {
                "marks": {k: v - t0 for k, v in marks.items()},
                "seconds": marks["all"] - t0,
                "spawn_seconds": spawned,
                "cpu": cpu_now,
                "rss": sum(rss),
                "pss": sum(pss),
                "processes": len(procs),
                "farm_cpu": farm_cpu,
            }
        finally:
            stop_processes(procs, timeout=10)


# -- the scenario -----------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def clusters_rows(lab: Lab, workdir: str, count: int = 200) -> list[Row]:
    """The many-clusters scenario on a started lab; its rows of the result table."""
    if count < 2:
        raise ValueError("count must be at least 2 (RSS per cluster compares N clusters with 1)")
    farm, nodes = start_farm(lab, workdir, count)
    try:
        gw = measure_gateway(lab, workdir, f"gateway-{count}", nodes, farm.pid)
        gw1 = measure_gateway(lab, workdir, "gateway-1", nodes[:1], farm.pid)
        ssh = measure_ssh(lab, workdir, f"ssh-{count}", nodes, farm.pid)
        ssh1 = measure_ssh(lab, workdir, "ssh-1", nodes[:1], farm.pid)
        if farm.poll() is not None:
            raise RuntimeError(f"proxy farm exited with {farm.returncode}")
    finally:
        stop_processes([farm])
    kib, mib = 1024, 1024 * 1024
    per_cluster_rss = (gw["rss"] - gw1["rss"]) / (count - 1)
    per_cluster_pss = (gw["pss"] - gw1["pss"]) / (count - 1)
    ssh_rss_each = ssh["rss"] / count
    ssh_pss_each = ssh["pss"] / count
    verdict = "met" if gw["seconds"] <= TARGET_SECONDS else "MISSED"
    gm, sm = gw["marks"], ssh["marks"]
    return [
        (
            f"{count} clusters: seconds until all connected",
            f"{gw['seconds']:.2f}",
            f"{ssh['seconds']:.2f}",
            _ratio(gw["seconds"], ssh["seconds"]),
            f"target <= {TARGET_SECONDS:.0f} s: {verdict}; from process start",
        ),
        (
            f"{count} clusters: seconds until first / half up",
            f"{gm['first']:.2f} / {gm['half']:.2f}",
            f"{sm['first']:.2f} / {sm['half']:.2f}",
            "-",
            f"gateway API answered at {gm['api']:.2f} s; ssh spawn loop {ssh['spawn_seconds']:.2f} s",
        ),
        (
            "1 cluster: seconds until connected",
            f"{gw1['seconds']:.2f}",
            f"{ssh1['seconds']:.2f}",
            _ratio(gw1["seconds"], ssh1["seconds"]),
            "from process start",
        ),
        (
            f"{count} clusters: CPU seconds until all connected",
            f"{gw['cpu']:.2f}",
            f"{ssh['cpu']:.2f}",
            _ratio(gw["cpu"], ssh["cpu"]),
            f"ssh -D: sum over its processes; proxy farm: {gw['farm_cpu']:.2f} / {ssh['farm_cpu']:.2f} s",
        ),
        (
            f"{count} clusters: RSS total, MiB",
            f"{gw['rss'] / mib:.1f}",
            f"{ssh['rss'] / mib:.1f}",
            _ratio(gw["rss"], ssh["rss"]),
            f"ssh -D: sum of {count} processes",
        ),
        (
            "1 cluster: RSS, MiB",
            f"{gw1['rss'] / mib:.1f}",
            f"{ssh1['rss'] / mib:.1f}",
            _ratio(gw1["rss"], ssh1["rss"]),
            "one process each",
        ),
        (
            "RSS per cluster, KiB",
            f"{per_cluster_rss / kib:.0f}",
            f"{ssh_rss_each / kib:.0f}",
            _ratio(per_cluster_rss, ssh_rss_each),
            f"gateway: (RSS_{count} - RSS_1) / {count - 1}; ssh -D: one process per cluster",
        ),
        (
            "PSS per cluster, KiB",
            f"{per_cluster_pss / kib:.0f}",
            f"{ssh_pss_each / kib:.0f}",
            _ratio(per_cluster_pss, ssh_pss_each),
            "PSS counts shared libraries once",
        ),
        (
            f"{count} clusters: gateway log until all up",
            f"{gw['log_lines']} lines",
            "-",
            "-",
            f"{gw['log_bytes'] / kib:.0f} KiB (twistd rotates at 1 MB); 1 cluster: {gw1['log_lines']} lines",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clusters")
    parser.add_argument("--count", type=int, default=200, help="number of clusters (2..2000, default 200)")
    args = parser.parse_args()
    if not 2 <= args.count <= 2000:
        parser.error("--count must be between 2 and 2000")
    rows = run_in_lab("bench.clusters", lambda lab, workdir: clusters_rows(lab, workdir, args.count))
    if rows is None:
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
