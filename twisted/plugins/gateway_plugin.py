"""The twistd dropin: C{twistd gateway} runs L{gateway.app.tap}."""

from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "gateway",
    "gateway.app.tap",
    "SSH tunnel gateway: SOCKS5/HTTP proxy listeners over one SSH connection per cluster",
    "gateway",
)
