"""
What every benchmark scenario shares: the addresses of the namespace lab,
starting the gateway and ``ssh -D`` in its controller namespace, reading a
process's memory, and printing the one result table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from typing import TypeVar

from tests.system.netlab import Lab, lab_skip_reason, wait_for_port

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
INTERNAL = "10.251.0.10"

T = TypeVar("T")

#: One row of the result table: scenario, gateway, the other proxy (named in
#: the scenario), ratio gateway / other, note.
Row = tuple[str, str, str, str, str]


def raise_file_limit(wanted: int = 65536) -> None:
    """
    Raise this process's open-file limit (root may raise the hard limit too),
    so every daemon and client the lab starts inherits room for the
    10,000-stream scenario: each stream is a descriptor in the client, the
    gateway, sshd and the destination.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_in_lab(prog: str, scenario: Callable[[Lab, str], T]) -> T | None:
    """
    Run C{scenario(lab, workdir)} on a namespace lab of its own, removed
    afterwards also on failure.  None (with the reason on stderr) where the
    lab cannot run: not root, or no C{ip netns}/sshd.
    """
    reason = lab_skip_reason()
    if reason:
        print(f"{prog} needs the namespace lab: {reason}", file=sys.stderr)
        return None
    workdir = tempfile.mkdtemp(prefix="gateway-bench-")
    lab = Lab(os.path.join(workdir, "lab"))
    raise_file_limit()  # before the lab: its daemons inherit it (10,000 streams)
    try:
        lab.start()
        return scenario(lab, workdir)
    finally:
        lab.stop()


def start_gateway(
    lab: Lab,
    workdir: str,
    *,
    name: str = "bench",
    socks_port: int = 1080,
    http_port: int | None = 3128,
    gateway_settings: str = "",
    cluster_settings: str = "",
    listen_options: str = "",
    twistd_options: tuple[str, ...] = (),
) -> subprocess.Popen:
    """
    Start C{twistd gateway} in the controller namespace with one cluster,
    C{bench}, whose proxy node is the lab's proxy-a sshd.  Extra TOML lines
    go into C{[gateway]} and C{[clusters.bench]}; C{listen_options} is
    appended to the listeners' endpoint strings (e.g. C{":backlog=1024"});
    C{twistd_options} go before the plugin name (e.g. C{--profile=FILE}).
    """
    http = f"tcp:{http_port}:interface=127.0.0.1{listen_options}" if http_port else ""  # "": no HTTP proxy
    config = write_config(
        lab,
        workdir,
        name=name,
        socks=f"tcp:{socks_port}:interface=127.0.0.1{listen_options}",
        http=http,
        gateway_settings=gateway_settings,
        cluster_settings=cluster_settings,
    )
    proc = lab.spawn(lab.ctl_ns, twistd_argv(workdir, name, config, twistd_options))
    wait_for_port(lab, lab.ctl_ns, "127.0.0.1", socks_port, timeout=20)
    return proc


def write_config(
    lab: Lab, workdir: str, *, name: str, socks: str, http: str, gateway_settings: str = "", cluster_settings: str = ""
) -> str:
    """
    Write C{workdir/NAME.toml}: listeners on endpoint strings C{socks} and
    C{http} (C{""}: none) and the one cluster C{bench} (see L{start_gateway});
    its path.
    """
    config = os.path.join(workdir, f"{name}.toml")
    with open(config, "w") as f:
        f.write(
            textwrap.dedent(
                """
                [gateway]
                {gateway_settings}

                [listen]
                socks = "{socks}"
                http = "{http}"

                [clusters.bench]
                proxies = ["{proxy}:22"]
                user = "root"
                key_file = "{key}"
                known_hosts = "{known_hosts}"
                networks = ["10.251.0.0/24"]
                {cluster_settings}
                """
            ).format(
                gateway_settings=gateway_settings,
                socks=socks,
                http=http,
                proxy=lab.proxy_addr["a"],
                key=lab.client_key_ed25519,
                known_hosts=lab.known_hosts,
                cluster_settings=cluster_settings,
            )
        )
    return config


def twistd_argv(workdir: str, name: str, config: str, twistd_options: tuple[str, ...] = ()) -> list[str]:
    """C{twistd gateway} in the foreground on C{config}, logging to C{workdir/NAME.log}."""
    return [
        os.path.join(VENV_BIN, "twistd"),
        "-n",
        "--pidfile=",
        f"--logfile={os.path.join(workdir, name + '.log')}",
        *twistd_options,
        "gateway",
        f"--config={config}",
    ]


def ssh_d_argv(lab: Lab, port: int, known_hosts: str, destination: str, *extra: str) -> list[str]:
    """OpenSSH C{ssh -N -D 127.0.0.1:port DESTINATION} with the gateway's key, checking C{known_hosts}."""
    return [
        "ssh",
        "-N",
        "-F",
        "/dev/null",
        "-D",
        f"127.0.0.1:{port}",
        "-i",
        lab.client_key_ed25519,
        "-o",
        "BatchMode=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        *extra,
        destination,
    ]


def start_ssh_d(lab: Lab, port: int, extra: list[str] = ()) -> subprocess.Popen:
    """OpenSSH C{ssh -N -D 127.0.0.1:port} to proxy-a with the gateway's key and known_hosts."""
    proc = lab.spawn(lab.ctl_ns, ssh_d_argv(lab, port, lab.known_hosts, f"root@{lab.proxy_addr['a']}", *extra))
    wait_for_port(lab, lab.ctl_ns, "127.0.0.1", port, timeout=20)
    return proc


def run_load_client(
    lab: Lab, script: str, proxy_port: int, target: str, path: str, concurrency: int, count: int
) -> dict:
    """
    Run a load client of bench/ (C{script}: C{count} GETs of C{path} from
    C{target}, C{concurrency} at a time) in the controller namespace against
    the proxy on C{proxy_port}; its JSON result.
    """
    done = lab.run(
        lab.ctl_ns,
        [
            sys.executable,
            os.path.join(HERE, script),
            f"127.0.0.1:{proxy_port}",
            target,
            path,
            str(concurrency),
            str(count),
        ],
        timeout=180,
        capture_output=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} through :{proxy_port} failed: {done.stderr.decode()}")
    return json.loads(done.stdout)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: str, lines: int = 20) -> str:
    """The last lines of a log file, for an error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


def table(rows: list[Row]) -> str:
    header = ("scenario", "gateway", "other", "ratio", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
