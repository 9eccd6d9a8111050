"""
More cores (issue 15): one gateway process against two sharing one
listening socket, and ``ssh -D``, in the same run, alternating; beside
them two processes with a socket each (C{SO_REUSEPORT}) and one process
with two SSH connections (C{connections = 2}), which tells the gateway's
second core from sshd's second process.

    sudo .venv/bin/python -m bench --only workers [--quick]

The gateways are started the way systemd socket activation starts them
(bench/socketlaunch.py: one socket, each child handed it as descriptor 3
with C{LISTEN_FDS}/C{LISTEN_PID}), listening with the endpoint string
C{systemd:domain=INET:index=0}: the one-worker gateway runs through the same
launcher, so the setups differ only in the number of processes (and sockets,
and SSH connections).  Each worker
has its own SSH connection to the proxy node (sshd runs one process per
connection).  Per load it reports the rate, p99, the proxy's summed CPU per
1,000 streams (or per GiB), and how busy each process was (CPU seconds /
wall seconds; 1.0 is one whole core): the load client, nginx and sshd share
the machine's cores with the proxies, so these say what a bigger host would
do with the same processes.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import HERE, Row, cpu_seconds, run_load_client, twistd_argv, write_config
from bench.origin import Origin
from tests.system.netlab import Lab, LabTimeout, stop_processes

#: The endpoint string of a socket handed over by socket activation (systemd's first descriptor).
SYSTEMD_SOCKS = "systemd:domain=INET:index=0"
#: Each setup's label: its number of workers, whether each has its own SO_REUSEPORT socket, its port, and
#: extra [clusters.bench] lines (two SSH connections in one worker: two sshd processes, as two workers have).
SETUPS = {
    "1 worker": (1, False, 1090, ""),
    "1 worker, connections = 2": (1, False, 1093, "connections = 2"),
    "2 workers": (2, False, 1091, ""),
    "2 workers, SO_REUSEPORT": (2, True, 1092, ""),
}


@dataclass
class Target:
    """A proxy under test: its label, SOCKS port and the pids whose CPU counts as the proxy's."""

    label: str
    port: int
    pids: list[int]


@dataclass
class Sample:
    """One load through one target: the load's own result, its wall time, and CPU seconds per process."""

    result: dict
    wall: float
    cpu: dict[str, float] = field(default_factory=dict)

    def proxy_cpu(self) -> float:
        return sum(seconds for name, seconds in self.cpu.items() if name.startswith("proxy"))


def children(pid: int) -> list[int]:
    """The direct children of C{pid} (Linux's C{/proc/PID/task/PID/children})."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def start_workers(lab: Lab, workdir: str, label: str) -> tuple[subprocess.Popen, Target]:
    """The gateway processes of C{SETUPS[label]}, each listening and serving."""
    count, reuseport, port, cluster_settings = SETUPS[label]
    name = f"workers-{port}"
    config = write_config(lab, workdir, name=name, socks=SYSTEMD_SOCKS, http="", cluster_settings=cluster_settings)
    launcher = lab.spawn(
        lab.ctl_ns,
        [
            sys.executable,
            os.path.join(HERE, "socketlaunch.py"),
            f"127.0.0.1:{port}",
            str(count),
            "socks",
            *(["--reuseport"] if reuseport else []),
            "--",
            *twistd_argv(workdir, f"{name}-{{i}}", config),
        ],
        stdout=subprocess.DEVNULL,
    )
    logs = [os.path.join(workdir, f"{name}-{i}.log") for i in range(1, count + 1)]
    deadline = time.monotonic() + 30
    while not all(_logged(log, "socks listener on") for log in logs):
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise LabTimeout(f"{name}: the workers did not start (see {logs})")
        time.sleep(0.1)
    return launcher, Target(label, port, children(launcher.pid))


def _logged(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return text in f.read()
    except OSError:
        return False


def _busy_pids(lab: Lab, target: Target, origin: Origin) -> dict[str, int]:
    """The processes whose CPU a sample records: the proxy's, nginx's and each of sshd's (by pid)."""
    pids = {f"proxy {i}": pid for i, pid in enumerate(target.pids, 1)}
    if origin.proc is not None:
        pids["nginx"] = origin.proc.pid
    pids.update({f"sshd {pid}": pid for pid in lab.ns_pids(lab.proxy_ns["a"])})
    return pids


def machine_cpu() -> tuple[float, float]:
    """
    CPU seconds the machine's cores have been busy so far (C{/proc/stat}):
    in processes, and in interrupts (the network stack's softirqs: here
    every packet crosses loopback or a veth pair).
    """
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + steal) / tick, (irq + softirq) / tick


def sampled(lab: Lab, target: Target, origin: Origin, load: Callable[[], dict]) -> Sample:
    """Run C{load()}, recording its wall time and the CPU seconds of every process that took part."""
    pids = _busy_pids(lab, target, origin)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = machine_cpu()
    started = time.monotonic()
    result = load()
    wall = time.monotonic() - started
    (processes, interrupts), (processes_before, interrupts_before) = machine_cpu(), machine_before
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    # The load client (and curl) are this process's only children reaped meanwhile.
    cpu["client"] = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
    # What else the machine's processes ran meanwhile: other users' work, this process, kernel threads.
    cpu["others"] = max(0.0, processes - processes_before - sum(cpu.values()))
    cpu["softirq"] = interrupts - interrupts_before
    return Sample(result, wall, cpu)


def short(lab: Lab, origin: Origin, port: int, count: int) -> dict:
    """The short-connection load (bench/shortconn.py): C{count} requests, 32 at a time."""
    return run_load_client(lab, "shortconn.py", port, origin.target, origin.small, 32, count)


def parallel_downloads(lab: Lab, origin: Origin, port: int, streams: int) -> dict:
    """C{streams} curls downloading C{/big} at once through SOCKS port C{port}; bytes moved in all."""
    got: list[int] = []

    def one() -> None:
        done = lab.run(
            lab.ctl_ns,
            ["curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w", "%{size_download}"]
            + ["--socks5-hostname", f"127.0.0.1:{port}", origin.url(origin.big)],
            timeout=150,
        )
        if done.returncode != 0:
            raise RuntimeError(f"download through :{port} failed: {done.stderr.decode()}")
        got.append(int(done.stdout))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"bytes": sum(got), "ok": len(got)}


def busy(samples: list[Sample]) -> str:
    """
    Each process's median busy share (CPU s / wall s) over C{samples}, sshd's
    processes one by one (those that worked); C{others} is what else the
    machine's processes ran meanwhile, C{softirq} its interrupts (all of it
    summed, 2.0 would be both cores of this machine).
    """
    names = sorted({name for s in samples for name in s.cpu})
    shares = {name: statistics.median(s.cpu.get(name, 0.0) / s.wall for s in samples) for name in names}
    sshd = sorted((share for name, share in shares.items() if name.startswith("sshd")), reverse=True)
    parts = [f"{name} {share:.2f}" for name, share in shares.items() if not name.startswith("sshd")]
    parts.append("sshd " + "+".join(f"{share:.2f}" for share in sshd if share >= 0.02))
    return ", ".join(parts)


def short_rows(samples: dict[str, list[Sample]], count: int, rounds: int) -> list[Row]:
    """The short-connection rows: medians of each target's rounds, ratios against one worker."""
    one = "1 worker"
    rows: list[Row] = []

    def median(label: str, value: Callable[[Sample], float]) -> float:
        return statistics.median(value(s) for s in samples[label])

    base = median(one, lambda s: s.result["rps"])
    for label, runs in samples.items():
        rps = median(label, lambda s: s.result["rps"])
        errors = sum(sum(s.result["errors"].values()) for s in runs)
        rows += [
            (
                f"short connections, req/s ({label})",
                f"{rps:.0f}",
                " ".join(f"{s.result['rps']:.0f}" for s in runs),
                f"{rps / base:.2f}",
                f"median of {rounds}, {count} requests 32 at a time; per round beside; ratio vs {one}"
                + (f"; {errors} errors" if errors else ""),
            ),
            (
                f"short connections, p99 ms ({label})",
                f"{median(label, lambda s: s.result['p99_ms']):.1f}",
                " ".join(f"{s.result['p99_ms']:.1f}" for s in runs),
                "",
                "",
            ),
            (
                f"short connections, proxy CPU s per 1,000 ({label})",
                f"{median(label, lambda s: s.proxy_cpu() / count * 1000):.3f}",
                "",
                "",
                "summed over the proxy's processes",
            ),
            (f"short connections, busy ({label})", "", "", "", busy(runs)),
        ]
    return rows


def download_rows(samples: dict[str, list[Sample]], streams: int, rounds: int) -> list[Row]:
    """The parallel-download rows: aggregate MB/s and the proxy's CPU s/GiB, medians of the rounds."""
    rows: list[Row] = []
    for label, runs in samples.items():
        rates = [s.result["bytes"] / s.wall / 1e6 for s in runs]
        gib = statistics.median(s.proxy_cpu() / (s.result["bytes"] / (1 << 30)) for s in runs)
        mib = runs[0].result["bytes"] // streams >> 20
        rows += [
            (
                f"{streams} parallel {mib} MiB downloads, MB/s in all ({label})",
                f"{statistics.median(rates):.0f}",
                " ".join(f"{r:.0f}" for r in rates),
                "",
                f"median of {rounds}; proxy CPU {gib:.2f} s/GiB",
            ),
            (f"{streams} parallel downloads, busy ({label})", "", "", "", busy(runs)),
        ]
    return rows


def workers_rows(lab: Lab, workdir: str, origin: Origin, ssh_d: Target, quick: bool) -> list[Row]:
    """
    1 and 2 gateway workers and C{ssh_d}, alternating (the order rotates each
    round): the short-connection load, then (unless C{quick}) two parallel
    downloads.
    """
    rounds, count = (1, 300) if quick else (5, 5000)
    launchers: list[subprocess.Popen] = []
    try:
        targets = []
        for label in SETUPS:
            launcher, target = start_workers(lab, workdir, label)
            launchers.append(launcher)
            targets.append(target)
        targets.append(ssh_d)
        for target in targets:  # warm up: SSH connections up in every worker, caches
            short(lab, origin, target.port, 200)
        shorts: dict[str, list[Sample]] = {t.label: [] for t in targets}
        downloads: dict[str, list[Sample]] = {t.label: [] for t in targets}
        for round_ in range(rounds):
            order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
            for target in order:
                shorts[target.label].append(
                    sampled(lab, target, origin, lambda t=target: short(lab, origin, t.port, count))
                )
            if not quick:
                for target in order:
                    downloads[target.label].append(
                        sampled(lab, target, origin, lambda t=target: parallel_downloads(lab, origin, t.port, 2))
                    )
    finally:
        stop_processes(launchers)
    rows = short_rows(shorts, count, rounds)
    if not quick:
        rows += download_rows(downloads, 2, rounds)
    return rows
