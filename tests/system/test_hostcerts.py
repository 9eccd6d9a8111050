"""
Host certificates against real OpenSSH sshd (9.2) in the namespace lab
(tests/system/netlab.py): extra sshds in proxy-a's namespace, each with
C{HostCertificate} naming a certificate of proxy-a's Ed25519 host key made
by ssh-keygen (C{-s CA -h -I ID -n PRINCIPALS -V VALIDITY}), and one
`twistd gateway` whose clusters trust the test CA through known_hosts
C{@cert-authority} lines or C{host_ca_keys}, and hold no plain host key, so
that only the certificate can let a connection up.

The certificate that checks out lets its clusters up and carries traffic;
an expired one, one for another principal, a user certificate, one signed by
a C{@revoked} CA and one whose key is C{@revoked} are refused, each with a log
line naming the certificate's key id and the CA's fingerprint and the reason.
Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from twisted.conch.ssh.keys import Key
from twisted.trial.unittest import TestCase

from gateway.ssh.hostkeys import fingerprint
from tests.system.netlab import Lab
from tests.system.support import CONNECT_TIMEOUT, INTERNAL, GatewayProcess, curl, shared_lab

DAY = 86400
NETWORKS = 'networks = ["10.251.0.0/24"]\n'

#: One sshd per certificate: name -> (port, which of proxy-a's host keys, key id, ssh-keygen options).
#: Principals name the proxy node's address as the clusters configure it.
CERTIFICATES = {
    "ok": (2201, "ed25519", "node-ok", ["-h", "-n", "{addr}", "-V", "-1h:+1d"]),
    # sshd signs the exchange with rsa-sha2-512 under rsa-sha2-512-cert-v01@openssh.com
    "rsa": (2207, "rsa", "node-rsa", ["-h", "-n", "{addr}", "-V", "-1h:+1d"]),
    "ecdsa": (2208, "ecdsa", "node-ecdsa", ["-h", "-n", "{addr}", "-V", "-1h:+1d"]),
    "expired": (2202, "ed25519", "node-expired", ["-h", "-n", "{addr}", "-V", "0x{past:x}:0x{recent:x}"]),
    "principal": (2203, "ed25519", "node-elsewhere", ["-h", "-n", "node.elsewhere,10.250.9.9", "-V", "-1h:+1d"]),
    "user": (2204, "ed25519", "node-user", ["-n", "{addr}", "-V", "-1h:+1d"]),  # no -h: a user certificate
    "revoked-ca": (2205, "ed25519", "node-revoked-ca", ["-h", "-n", "{addr}", "-V", "-1h:+1d"]),
    "revoked-key": (2206, "ed25519", "node-revoked-key", ["-h", "-n", "{addr}", "-V", "-1h:+1d"]),
}
#: The clusters that come up (c-inline: the "ok" sshd, its CA in host_ca_keys).
ACCEPTED = ["c-ok", "c-rsa", "c-ecdsa", "c-inline"]

#: What each refused cluster's log line says after the key id and CA.
REFUSALS = {
    "expired": "refused: expired (valid until ",
    "principal": "refused: wrong principal: 10.250.1.2 is not among 'node.elsewhere', '10.250.9.9'",
    "user": "refused: a user certificate, not a host certificate",
    "revoked-ca": "refused: its CA key is marked @revoked in ",
    "revoked-key": "refused: its key (ssh-ed25519 SHA256:",
}


def _keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True, timeout=60)


class HostCertificateTests(TestCase):
    lab: Lab
    gateway: GatewayProcess
    workdir: str

    def setUp(self) -> None:
        self.lab, self.gateway, self.workdir = shared_lab("hostcerts", "host certificate tests", type(self).build)

    @classmethod
    def build(cls, lab: Lab, workdir: str) -> GatewayProcess:
        addr = lab.proxy_addr["a"]
        certs = os.path.join(workdir, "certs")
        os.makedirs(certs, exist_ok=True)
        for ca in ("ca", "ca-revoked"):
            _keygen("-t", "ed25519", "-N", "", "-C", ca, "-f", os.path.join(certs, ca))
        now = int(time.time())
        tables = []
        for name, (port, key_type, key_id, options) in CERTIFICATES.items():
            with open(os.path.join(lab.workdir, f"hostkey-proxy-a-{key_type}.pub")) as f:
                host_line = " ".join(f.read().split()[:2])
            # each certificate of the same host key needs its own .pub to sign
            public = os.path.join(certs, f"{name}.pub")
            with open(public, "w") as f:
                f.write(host_line + "\n")
            ca = "ca-revoked" if name == "revoked-ca" else "ca"
            args = [o.format(addr=addr, past=now - 2 * DAY, recent=now - DAY) for o in options]
            _keygen("-s", os.path.join(certs, ca), "-I", key_id, "-z", str(port), *args, public)
            lab.start_sshd(f"cert-{name}", lab.proxy_ns["a"], addr, port, f'HostCertificate "{certs}/{name}-cert.pub"')
            lines = [f"@cert-authority * {cls.ca_line(certs, ca)}"]
            if name == "revoked-ca":
                lines.append(f"@revoked * {cls.ca_line(certs, ca)}")
            if name == "revoked-key":
                lines.append(f"@revoked [{addr}]:{port} {host_line}")
            known_hosts = os.path.join(workdir, f"known_hosts-{name}")
            with open(known_hosts, "w") as f:
                f.write("\n".join(lines) + "\n")
            tables.append(
                f'[clusters.c-{name}]\nproxies = ["{addr}:{port}"]\nknown_hosts = "{known_hosts}"\n{NETWORKS}'
            )
        # the CA inline, beside no known_hosts at all
        tables.append(
            f'[clusters.c-inline]\nproxies = ["{addr}:2201"]\nhost_ca_keys = ["{cls.ca_line(certs, "ca")}"]\n{NETWORKS}'
        )
        gateway = GatewayProcess(
            lab,
            workdir,
            "gateway",
            f"""
[listen]
socks = "tcp:1080:interface=127.0.0.1"
http  = "tcp:3128:interface=127.0.0.1"

[defaults]
user = "root"
key_file = "{lab.client_key_ed25519}"
connect_timeout = {CONNECT_TIMEOUT}

{"".join(tables)}
""",
            1080,
            3128,
        )
        gateway.wait_listening()
        gateway.wait_up(ACCEPTED)
        return gateway

    @staticmethod
    def ca_line(certs: str, ca: str) -> str:
        with open(os.path.join(certs, f"{ca}.pub")) as f:
            return " ".join(f.read().split()[:2])

    def ca_fingerprint(self, ca: str) -> str:
        return fingerprint(Key.fromFile(os.path.join(self.workdir, "certs", f"{ca}.pub")))

    def test_accepted(self) -> None:
        """@cert-authority (each key type) and host_ca_keys: up with no plain key known, and carrying traffic."""
        for cluster in ACCEPTED:
            status, out, err = curl(
                self.lab, "--socks5-hostname", "127.0.0.1:1080", "-U", f"{cluster}:", f"http://{INTERNAL}:8080/"
            )
            self.assertEqual((status, out), (0, b"internal-a\n"), err)

    def test_refused(self) -> None:
        """Each bad certificate: a log line with its key id, the CA's fingerprint and the reason; never up."""
        deadline = time.monotonic() + 30
        missing = dict(REFUSALS)
        while missing and time.monotonic() < deadline:
            log = self.gateway.read_log()
            for name, reason in list(missing.items()):
                port, _, key_id, _ = CERTIFICATES[name]
                ca = "ca-revoked" if name == "revoked-ca" else "ca"
                line = (
                    f"host certificate of [{self.lab.proxy_addr['a']}]:{port} "
                    f"(key id '{key_id}', serial {port}, CA ssh-ed25519 {self.ca_fingerprint(ca)}) {reason}"
                )
                if line in log:
                    del missing[name]
            time.sleep(0.2)
        self.assertEqual(missing, {}, self.gateway.read_log()[-4000:])
        log = self.gateway.read_log()
        for name in REFUSALS:
            self.assertIsNone(re.search(rf"cluster c-{re.escape(name)} up\b", log))
        status, _, err = curl(
            self.lab, "--socks5-hostname", "127.0.0.1:1080", "-U", "c-expired:", f"http://{INTERNAL}:8080/"
        )
        self.assertEqual(status, 97, err)
        self.assertIn(b"(4)", err)  # host unreachable: no SSH connection
