"""How the gateway writes a host and port, in logs, errors and status."""

from __future__ import annotations


def host_port(host: str, port: int) -> str:
    """C{host:port}, or C{[host]:port} for an IPv6 address: the form of URLs and OpenSSH."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
