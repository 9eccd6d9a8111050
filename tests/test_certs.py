"""
Host certificates: L{gateway.ssh.certs} (decoding, CA signature, what OpenSSH
checks) and L{HostKeyPolicy.verify_certificate} (trusted CAs from
C{host_ca_keys} and C{@cert-authority}, C{@revoked}, the fallback to a known
plain key).  The certificates are made by ssh-keygen, as an operator makes
them, except those no ssh-keygen option makes (critical options on a host
certificate, a hostile key id), which L{build} signs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import struct
import subprocess

from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.trial.unittest import SynchronousTestCase

from gateway.ssh.certs import (
    CERT_ALGORITHMS,
    FOREVER,
    SHA1_CERT_ALGORITHM,
    CertificateError,
    check_host_certificate,
    is_certificate_algorithm,
    parse_certificate,
    signature_algorithm,
)
from gateway.ssh.hostkeys import HostKeyError, HostKeyPolicy, fingerprint
from gateway.testing import generate_key

#: The injected clock: 2027-01-15T08:00:00Z.
NOW = 1_800_000_000
HOUR = 3600
ED25519_CERT = b"ssh-ed25519-cert-v01@openssh.com"
#: The host-key algorithm each ssh-keygen key type is certified under.
ALGORITHM = {
    "ed25519": ED25519_CERT,
    "ecdsa-256": b"ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-384": b"ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-521": b"ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "rsa": b"rsa-sha2-512-cert-v01@openssh.com",
}


def _hex_time(seconds: int) -> str:
    return f"0x{seconds:x}"


#: Valid from an hour before NOW to an hour after.
VALID = f"{_hex_time(NOW - HOUR)}:{_hex_time(NOW + HOUR)}"


class Keygen:
    """Keys and certificates made by ssh-keygen in a directory."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def _run(self, *args: str) -> None:
        subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True, timeout=60)

    def key(self, name: str, kind: str = "ed25519") -> str:
        """The private key file C{name} (made on first use): ed25519, ecdsa-BITS or rsa."""
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            kind, _, bits = kind.partition("-")
            self._run("-t", kind, *(["-b", bits or "2048"] if kind != "ed25519" else []), "-N", "", "-f", path)
        return path

    def public(self, name: str) -> Key:
        return Key.fromFile(self.key(name) + ".pub")

    def line(self, name: str) -> str:
        """The public key C{name} as "TYPE BASE64"."""
        with open(self.key(name) + ".pub") as f:
            return " ".join(f.read().split()[:2])

    def certify(
        self,
        host: str = "host",
        ca: str = "ca",
        *,
        user: bool = False,
        key_id: str = "node-1",
        principals: str | None = "10.0.0.1",
        validity: str = VALID,
        signed_with: str | None = None,
    ) -> bytes:
        """The blob of C{host}'s key signed by C{ca} (ssh-keygen -s CA -h -I ID -n PRINCIPALS -V VALIDITY)."""
        public = self.key(host) + ".pub"
        args = ["-s", self.key(ca), "-I", key_id, "-V", validity, "-z", "7"]
        args += [] if user else ["-h"]
        args += ["-n", principals] if principals else []
        args += ["-t", signed_with] if signed_with else []
        self._run(*args, public)
        with open(self.key(host) + "-cert.pub") as f:
            return base64.b64decode(f.read().split()[1])


def build(
    ca: Key,
    key: Key,
    *,
    key_id: bytes = b"node-1",
    principals: tuple[bytes, ...] = (b"10.0.0.1",),
    critical: tuple[tuple[bytes, bytes], ...] = (),
    valid: tuple[int, int] = (0, FOREVER),
) -> bytes:
    """An Ed25519 host certificate as PROTOCOL.certkeys lays it out, signed by C{ca} (a private key)."""
    plain = key.blob()
    body = (
        NS(ED25519_CERT)
        + NS(os.urandom(32))
        + plain[len(NS(key.sshType())) :]
        + struct.pack(">QL", 1, 2)
        + NS(key_id)
        + NS(b"".join(NS(p) for p in principals))
        + struct.pack(">QQ", *valid)
        + NS(b"".join(NS(name) + NS(data) for name, data in critical))
        + NS(b"")
        + NS(b"")
        + NS(ca.public().blob())
    )
    return body + NS(ca.sign(body))


class KeygenTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        if shutil.which("ssh-keygen") is None:
            self.skipTest("needs ssh-keygen")
        self.keygen = Keygen(os.path.abspath(self.mktemp()))
        self.ca = self.keygen.public("ca")
        self.known_hosts = os.path.abspath(self.mktemp())

    def policy(self, *lines: str, **options: object) -> HostKeyPolicy:
        """A policy reading a known_hosts file of C{lines}."""
        with open(self.known_hosts, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        return HostKeyPolicy(known_hosts=self.known_hosts, **options)  # type: ignore[arg-type]

    def authority(self, pattern: str = "10.0.0.1", ca: str = "ca") -> str:
        return f"@cert-authority {pattern} {self.keygen.line(ca)}"

    def assertRefused(
        self, policy: HostKeyPolicy, blob: bytes, reason: str, host: str = "10.0.0.1", port: int = 22
    ) -> str:
        """verify_certificate refuses C{blob} naming the key id, the CA's fingerprint and C{reason}."""
        e = self.assertRaises(HostKeyError, policy.verify_certificate, host, port, ED25519_CERT, blob, NOW)
        text = str(e)
        self.assertIn("key id 'node-1', serial 7", text)
        self.assertIn(f"CA ssh-ed25519 {fingerprint(self.ca)}", text)
        self.assertIn(reason, text)
        return text


class ParseTests(KeygenTestCase):
    """What ssh-keygen writes decodes, with its signature, for every key type."""

    def test_fields(self) -> None:
        cert = parse_certificate(self.keygen.certify(principals="10.0.0.1,node.example"), ED25519_CERT)
        cert.verify_signature()
        self.assertEqual(cert.key, self.keygen.public("host"))
        self.assertEqual(cert.ca_key, self.ca)
        self.assertEqual((cert.key_id, cert.serial, cert.cert_type), (b"node-1", 7, 2))
        self.assertEqual(cert.principals, (b"10.0.0.1", b"node.example"))
        self.assertEqual((cert.valid_after, cert.valid_before), (NOW - HOUR, NOW + HOUR))
        self.assertEqual((cert.critical_options, cert.signature_algorithm), ((), b"ssh-ed25519"))
        check_host_certificate(cert, "10.0.0.1", NOW)

    def test_key_types(self) -> None:
        """Each host key type under its algorithm, signed by each CA type."""
        for ca, ca_kind in (("ca", "ed25519"), ("ca-ecdsa", "ecdsa-384"), ("ca-rsa", "rsa")):
            self.keygen.key(ca, ca_kind)
            for kind, algorithm in ALGORITHM.items():
                self.keygen.key(kind, kind)
                cert = parse_certificate(self.keygen.certify(kind, ca), algorithm)
                cert.verify_signature()
                self.assertEqual((cert.key, cert.ca_key), (self.keygen.public(kind), self.keygen.public(ca)))

    def test_rsa_names(self) -> None:
        """One RSA certificate type, under each RSA algorithm; the exchange is signed with the plain names."""
        self.keygen.key("rsa", "rsa")
        blob = self.keygen.certify("rsa")
        for algorithm in (b"rsa-sha2-512-cert-v01@openssh.com", b"rsa-sha2-256-cert-v01@openssh.com"):
            self.assertEqual(parse_certificate(blob, algorithm).key_type, SHA1_CERT_ALGORITHM)
        self.assertEqual(signature_algorithm(b"rsa-sha2-256-cert-v01@openssh.com"), b"rsa-sha2-256")
        self.assertEqual(signature_algorithm(ED25519_CERT), b"ssh-ed25519")
        self.assertEqual(signature_algorithm(b"rsa-sha2-512"), b"rsa-sha2-512")
        self.assertTrue(all(is_certificate_algorithm(a) for a in (*CERT_ALGORITHMS, SHA1_CERT_ALGORITHM)))
        self.assertFalse(is_certificate_algorithm(b"ssh-ed25519"))

    def test_other_algorithm(self) -> None:
        """A certificate must be of the agreed type: an Ed25519 one cannot answer an agreed RSA one."""
        blob = self.keygen.certify()
        for agreed in (b"rsa-sha2-512-cert-v01@openssh.com", b"ssh-ed25519"):
            e = self.assertRaises(CertificateError, parse_certificate, blob, agreed)
            self.assertIn(f"but {agreed.decode()} was agreed on", str(e))

    def test_bad_signature(self) -> None:
        blob = bytearray(self.keygen.certify())
        blob[60] ^= 1  # in the certified key
        cert = parse_certificate(bytes(blob), ED25519_CERT)
        e = self.assertRaises(CertificateError, cert.verify_signature)
        self.assertEqual(str(e), "bad signature: the CA's signature does not verify")

    def test_hostile_bytes(self) -> None:
        """Every truncation and every flipped byte is a CertificateError, never another exception."""
        blob = self.keygen.certify()
        for end in range(len(blob)):
            self.assertRaises(CertificateError, parse_certificate, blob[:end], ED25519_CERT)
        self.assertRaises(CertificateError, parse_certificate, blob + b"\0", ED25519_CERT)
        for i in range(len(blob)):
            changed = blob[:i] + bytes([blob[i] ^ 0x41]) + blob[i + 1 :]
            with self.subTest(i=i):
                try:
                    parse_certificate(changed, ED25519_CERT).verify_signature()
                except CertificateError:
                    continue
                self.fail(f"byte {i} changed and the certificate still verifies")


class CheckTests(KeygenTestCase):
    """Each reason HostKeyPolicy.verify_certificate refuses for, and what it accepts."""

    def test_cert_authority(self) -> None:
        policy = self.policy(self.authority())
        accepted = policy.verify_certificate("10.0.0.1", 22, ED25519_CERT, self.keygen.certify(), NOW)
        self.assertEqual(accepted.key, self.keygen.public("host"))
        self.assertEqual((accepted.key_id, accepted.serial, accepted.refused), ("node-1", 7, None))
        self.assertEqual(str(accepted), f"key id 'node-1', serial 7, CA ssh-ed25519 {fingerprint(self.ca)}")

    def test_host_ca_keys(self) -> None:
        policy = HostKeyPolicy(ca_keys=[self.ca])
        policy.verify_certificate("10.0.0.1", 22, ED25519_CERT, self.keygen.certify(), NOW)
        e = self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, self.keygen.public("host"))
        self.assertIn("offered a plain host key, but only certificates by host_ca_keys are trusted", str(e))

    def test_expired(self) -> None:
        blob = self.keygen.certify(validity=f"{_hex_time(NOW - 2 * HOUR)}:{_hex_time(NOW)}")
        self.assertRefused(self.policy(self.authority()), blob, "refused: expired (valid until 2027-01-15T08:00:00Z)")

    def test_not_yet_valid(self) -> None:
        blob = self.keygen.certify(validity=f"{_hex_time(NOW + 1)}:forever")
        self.assertRefused(self.policy(self.authority()), blob, "not yet valid (valid from 2027-01-15T08:00:01Z)")

    def test_forever(self) -> None:
        blob = self.keygen.certify(validity="always:forever")
        self.policy(self.authority()).verify_certificate("10.0.0.1", 22, ED25519_CERT, blob, NOW)

    def test_principals(self) -> None:
        """The host as configured, lower-cased, exactly (no patterns); the port is not part of it."""
        policy = self.policy(self.authority("*"))
        blob = self.keygen.certify(principals="node.example,10.0.0.1")
        for host, port in (("node.example", 22), ("NODE.Example", 2222), ("10.0.0.1", 2222)):
            policy.verify_certificate(host, port, ED25519_CERT, blob, NOW)
        self.assertRefused(
            policy, blob, "wrong principal: 10.0.0.2 is not among 'node.example', '10.0.0.1'", "10.0.0.2"
        )
        wildcard = self.keygen.certify(principals="*.example")
        self.assertRefused(policy, wildcard, "wrong principal: node.example is not among '*.example'", "node.example")

    def test_no_principals(self) -> None:
        """An empty list names every host, as in OpenSSH."""
        policy = self.policy(self.authority("*"))
        policy.verify_certificate("anything.example", 22, ED25519_CERT, self.keygen.certify(principals=None), NOW)

    def test_user_certificate(self) -> None:
        blob = self.keygen.certify(user=True)
        self.assertRefused(self.policy(self.authority()), blob, "a user certificate, not a host certificate")

    def test_unknown_ca(self) -> None:
        blob = self.keygen.certify()
        text = self.assertRefused(self.policy(self.authority(ca="other")), blob, "unknown CA: not in ")
        self.assertIn(f"the @cert-authority lines for 10.0.0.1 in {self.known_hosts}", text)
        self.assertRefused(self.policy(self.authority("10.0.0.2")), blob, "unknown CA")
        self.assertRefused(
            HostKeyPolicy(ca_keys=[self.keygen.public("other")]), blob, "unknown CA: not in host_ca_keys"
        )
        self.assertRefused(HostKeyPolicy(pinned=[generate_key().public()]), blob, "unknown CA: no CA is trusted")

    def test_hashed_pattern(self) -> None:
        salt = os.urandom(20)
        digest = hmac.new(salt, b"[10.0.0.1]:2222", hashlib.sha1).digest()
        hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
        policy = self.policy(self.authority(hashed))
        blob = self.keygen.certify()
        policy.verify_certificate("10.0.0.1", 2222, ED25519_CERT, blob, NOW)
        self.assertRefused(policy, blob, "unknown CA")  # port 22: another name

    def test_port(self) -> None:
        """[host]:port first; the bare host only when no line names [host]:port (OpenSSH's retry)."""
        blob = self.keygen.certify(principals="node.example")
        policy = self.policy(self.authority("*.example"))
        policy.verify_certificate("node.example", 2222, ED25519_CERT, blob, NOW)
        policy = self.policy(self.authority("[node.example]:2222", ca="other"), self.authority("node.example"))
        self.assertRefused(policy, blob, "unknown CA", "node.example", 2222)
        policy.verify_certificate("node.example", 22, ED25519_CERT, blob, NOW)

    def test_revoked_ca(self) -> None:
        """A revoked CA refuses even where host_ca_keys trusts it, and no plain key stands in."""
        line = f"10.0.0.1 {self.keygen.line('host')}"
        policy = self.policy(line, f"@revoked * {self.keygen.line('ca')}", ca_keys=[self.ca])
        self.assertRefused(
            policy, self.keygen.certify(), f"refused: its CA key is marked @revoked in {self.known_hosts}"
        )

    def test_revoked_key(self) -> None:
        revoked = f"@revoked 10.0.0.1 {self.keygen.line('host')}"
        policy = self.policy(self.authority(), revoked)
        self.assertRefused(policy, self.keygen.certify(), "refused: its key (ssh-ed25519 SHA256:")
        e = self.assertRaises(HostKeyError, policy.verify, "10.0.0.1", 22, self.keygen.public("host"))
        self.assertIn("is marked @revoked", str(e))  # the plain key too
        # a line for another host does not apply
        self.policy(self.authority(), revoked.replace("10.0.0.1", "10.0.0.2")).verify_certificate(
            "10.0.0.1", 22, ED25519_CERT, self.keygen.certify(), NOW
        )

    def test_plain_key_fallback(self) -> None:
        """As in OpenSSH: a refused certificate whose key is a known plain host key is accepted, with the reason."""
        blob = self.keygen.certify(validity=f"{_hex_time(NOW - 2 * HOUR)}:{_hex_time(NOW - HOUR)}")
        policy = self.policy(self.authority(), f"10.0.0.1 {self.keygen.line('host')}")
        accepted = policy.verify_certificate("10.0.0.1", 22, ED25519_CERT, blob, NOW)
        self.assertEqual(accepted.key, self.keygen.public("host"))
        self.assertIn("refused: expired", accepted.refused or "")
        text = self.assertRefused(self.policy(self.authority()), blob, "refused: expired")
        self.assertIn(f"nor is its key a known plain host key (no host key for 10.0.0.1 in {self.known_hosts}", text)

    def test_sha1_ca(self) -> None:
        self.keygen.key("ca-rsa", "rsa")
        blob = self.keygen.certify(ca="ca-rsa", signed_with="ssh-rsa")
        ca = self.keygen.public("ca-rsa")
        e = self.assertRaises(
            HostKeyError, HostKeyPolicy(ca_keys=[ca]).verify_certificate, "10.0.0.1", 22, ED25519_CERT, blob, NOW
        )
        self.assertIn(f"CA ssh-rsa {fingerprint(ca)}", str(e))
        self.assertIn("signed by the CA with ssh-rsa (SHA-1): set allow_sha1_signatures = true", str(e))
        HostKeyPolicy(ca_keys=[ca], allow_sha1_signatures=True).verify_certificate(
            "10.0.0.1", 22, ED25519_CERT, blob, NOW
        )

    def test_bad_signature(self) -> None:
        blob = bytearray(self.keygen.certify())
        blob[60] ^= 1
        for policy in (self.policy(self.authority()), HostKeyPolicy(accept_any=True)):
            self.assertRefused(policy, bytes(blob), "refused: bad signature")

    def test_malformed(self) -> None:
        e = self.assertRaises(
            HostKeyError, HostKeyPolicy(ca_keys=[self.ca]).verify_certificate, "h", 22, ED25519_CERT, b"\0\0", NOW
        )
        self.assertEqual(str(e), "unusable host certificate from h: malformed certificate: truncated")

    def refusal(self, ca: Key, blob: bytes) -> str:
        """Why a policy trusting CA C{ca} for 10.0.0.1 refuses certificate C{blob}."""
        policy = HostKeyPolicy(ca_keys=[ca.public()])
        return str(self.assertRaises(HostKeyError, policy.verify_certificate, "10.0.0.1", 22, ED25519_CERT, blob, NOW))

    def test_critical_option(self) -> None:
        ca = generate_key()
        blob = build(ca, generate_key().public(), critical=((b"force-command", NS(b"true")),))
        self.assertIn("refused: unsupported critical option 'force-command'", self.refusal(ca, blob))

    def test_hostile_key_id(self) -> None:
        """The CA's key id is escaped in the message: no line break or terminal control reaches the log."""
        ca = generate_key()
        blob = build(ca, generate_key().public(), key_id=b"x\n\x1b[2J" + b"y" * 500, principals=(b"other",))
        refusal = self.refusal(ca, blob)
        self.assertIn("key id 'x\\n\\x1b[2J", refusal)
        self.assertNotIn("\n", refusal)
        self.assertLess(len(refusal), 600)

    def test_accept_any(self) -> None:
        blob = self.keygen.certify(user=True, validity=f"{_hex_time(NOW - 2 * HOUR)}:{_hex_time(NOW - HOUR)}")
        accepted = HostKeyPolicy(accept_any=True).verify_certificate("10.0.0.1", 22, ED25519_CERT, blob, NOW)
        self.assertEqual(accepted.key, self.keygen.public("host"))


class AlgorithmOrderTests(KeygenTestCase):
    SUPPORTED = [b"ssh-ed25519", b"rsa-sha2-512", *CERT_ALGORITHMS]

    def test_certificates_first_where_a_ca_is_trusted(self) -> None:
        policy = self.policy(self.authority("10.0.0.*"), f"10.0.0.9 {self.keygen.line('host')}")
        self.assertEqual(
            policy.preferred_algorithms("10.0.0.1", 22, self.SUPPORTED),
            [*CERT_ALGORITHMS, b"ssh-ed25519", b"rsa-sha2-512"],
        )
        self.assertEqual(policy.preferred_algorithms("10.0.1.1", 22, self.SUPPORTED), self.SUPPORTED)
        self.assertEqual(
            HostKeyPolicy(ca_keys=[self.ca]).preferred_algorithms("h", 22, self.SUPPORTED)[0], ED25519_CERT
        )
