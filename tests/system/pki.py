"""
A throw-away certificate authority for system tests (the C{cryptography}
package): a CA, a server certificate for 127.0.0.1 and localhost, and a
client certificate, as PEM files.  Used by L{tests.system.etcdlab} for etcd's
https client URLs; valid for a day, keys are P-256.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The client certificate's common name (the user name etcd takes from it when auth is on).
CLIENT_NAME = "gateway"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files of L{write_tls_files}: the CA, the server's pair and one client's pair."""

    ca_file: str
    server_cert: str
    server_key: str
    cert_file: str
    key_file: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: str, data: bytes, mode: int) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _write_pair(directory: str, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        _write(os.path.join(directory, f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM), 0o644),
        _write(os.path.join(directory, f"{name}-key.pem"), key_pem, 0o600),
    )


def write_tls_files(directory: str) -> TLSFiles:
    """A new CA, a server and a client certificate in C{directory} (created 0700)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("gwlab test CA", ca_key, "gwlab test CA", ca_key, [(x509.BasicConstraints(True, None), True)])
    leaf = (x509.BasicConstraints(False, None), True)
    server = _certificate(
        "127.0.0.1",
        server_key,
        "gwlab test CA",
        ca_key,
        [
            leaf,
            (x509.SubjectAlternativeName([x509.IPAddress(LOOPBACK), x509.DNSName("localhost")]), False),
            # clientAuth too: etcd's own HTTP/JSON gateway dials its gRPC server with this certificate.
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ],
    )
    client = _certificate(
        CLIENT_NAME,
        client_key,
        "gwlab test CA",
        ca_key,
        [leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )
    ca_file = _write(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM), 0o644)
    server_cert, server_key_file = _write_pair(directory, "server", server, server_key)
    cert_file, key_file = _write_pair(directory, "client", client, client_key)
    return TLSFiles(ca_file, server_cert, server_key_file, cert_file, key_file)
