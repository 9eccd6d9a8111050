"""
The gateway the system tests of clients without proxy credentials share
(tests/system/test_names.py, test_browsers.py): one namespace lab and one real
`twistd gateway` process, built by the first test that asks, stopped at
interpreter exit.

Two clusters without a token on the same network (10.251.0.0/24, proxy-a and
proxy-b, whose internal hosts share 10.251.0.10 and name themselves in
their answers), each with a SOCKS and an HTTP listener of its own; the shared
listeners on 1080 / 3128, where qualified names pick the cluster; a third
cluster with a token on the same network (qualified names still need its
credentials); the control API on 8765 with a bearer token.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass

from tests.system.netlab import Lab
from tests.system.support import INTERNAL, VENV_BIN, GatewayProcess, curl, defaults_table, shared_lab

SOCKS = 1080
HTTP = 3128
CONTROL = 8765
CONTROL_TOKEN = "control-token-names"
#: The cluster with a token (on proxy-a, so its answers are internal-a's).
TOKEN_CLUSTER = "cluster-t"
TOKEN = "token-t"
DOMAIN = "gw.internal"
#: The internal host as a qualified name's HOST.
DASHED = INTERNAL.replace(".", "-")


@dataclass(frozen=True)
class Tenant:
    """One tokenless cluster: its names and its own listeners."""

    name: str
    alias: str
    socks: int
    http: int
    #: What its internal host answers at / (the namespace's name).
    served: str

    def url(self, path: str = "/") -> str:
        """C{path} on its internal host, by address."""
        return f"http://{INTERNAL}:8080{path}"

    def qualified(self, host: str = DASHED, label: str | None = None) -> str:
        """C{HOST.CLUSTER.gw.internal}, the cluster written as C{label} (default: its name)."""
        return f"{host}.{label or self.name}.{DOMAIN}"


TENANTS = {
    "a": Tenant("cluster-a", "net-aaaa", 10801, 31281, "internal-a"),
    "b": Tenant("cluster-b", "net-bbbb", 10802, 31282, "internal-b"),
}


class NamesGateway:
    """The shared lab and gateway (see the module docstring); L{get} builds it once."""

    def __init__(self, lab: Lab, gateway: GatewayProcess, workdir: str) -> None:
        self.lab = lab
        self.gateway = gateway
        self.workdir = workdir

    @classmethod
    def get(cls) -> NamesGateway:
        """The running lab and gateway; SkipTest without a lab, an error if it once failed to start."""
        lab, gateway, workdir = shared_lab("names_lab", "these tests", cls._start_gateway)
        return cls(lab, gateway, workdir)

    @staticmethod
    def _start_gateway(lab: Lab, workdir: str) -> GatewayProcess:
        token_file = os.path.join(workdir, "control-token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(CONTROL_TOKEN + "\n")
        tables = "".join(
            f"""
[clusters.{t.name}]
aliases = ["{t.alias}"]
proxies = ["{lab.proxy_addr[key]}:22"]
networks = ["10.251.0.0/24"]
hostnames = ["*.cluster.internal"]
socks = "tcp:{t.socks}:interface=127.0.0.1"
http = "tcp:{t.http}:interface=127.0.0.1"
"""
            for key, t in TENANTS.items()
        )
        gateway = GatewayProcess(
            lab,
            workdir,
            "gateway",
            f"""
[listen]
socks = "tcp:{SOCKS}:interface=127.0.0.1"
http = "tcp:{HTTP}:interface=127.0.0.1"

[gateway]
control_token_file = "{token_file}"

{defaults_table(lab)}
{tables}
[clusters.{TOKEN_CLUSTER}]
proxies = ["{lab.proxy_addr["a"]}:22"]
networks = ["10.251.0.0/24"]
token = "{TOKEN}"
""",
            SOCKS,
            HTTP,
            extra_args=[
                f"--control=tcp:{CONTROL}:interface=127.0.0.1",
                f"--state-file={os.path.join(workdir, 'state.json')}",
            ],
        )
        gateway.wait_listening()
        gateway.wait_up([t.name for t in TENANTS.values()] + [TOKEN_CLUSTER])
        return gateway

    # -- clients in the ctl namespace --------------------------------------------

    def curl(self, *args: str, max_time: float = 20) -> tuple[int, bytes, bytes]:
        return curl(self.lab, *args, max_time=max_time)

    def python(self, code: str, *args: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
        """C{code} run by this venv's Python in the ctl namespace, with C{args}: status, stdout, stderr."""
        done = self.lab.run(self.lab.ctl_ns, [sys.executable, "-c", code, *args], timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    def ctl(self, *args: str) -> tuple[int, str, str]:
        """`gateway-ctl` against the control API, with its token: status, stdout, stderr."""
        argv = [os.path.join(VENV_BIN, "gateway-ctl"), "--url", f"http://127.0.0.1:{CONTROL}", *args]
        done = self.lab.run(
            self.lab.ctl_ns, argv, timeout=30, env=dict(os.environ, GATEWAY_CONTROL_TOKEN=CONTROL_TOKEN)
        )
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def cluster_status(self, name: str) -> dict:
        status, out, err = self.ctl("--json", "show", name)
        if status != 0:
            raise AssertionError(f"gateway-ctl show {name}: {status} {err}")
        return json.loads(out)["status"]

    def cluster_file(self, **keys: object) -> str:
        """A cluster table for `gateway-ctl add`, on proxy-b (its key read by gateway-ctl, host keys inline)."""
        lab = self.lab
        table = {
            "proxies": [f"{lab.proxy_addr['b']}:22"],
            "user": "root",
            "key_file": lab.client_key_ed25519,
            "host_keys": lab.host_key_lines["proxy-b"],
            "networks": ["10.251.0.0/24"],
            **keys,
        }
        fd, path = tempfile.mkstemp(prefix="cluster-", suffix=".json", dir=self.workdir)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f)
        return path

    def log(self) -> str:
        return self.gateway.read_log()
