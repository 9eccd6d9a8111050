"""Which bound addresses a control API without a token may listen on."""

from __future__ import annotations

from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from gateway.control.loopback import is_local_address, is_loopback_host


class LocalAddressTests(SynchronousTestCase):
    def test_loopback_tcp(self) -> None:
        for address in [
            IPv4Address("TCP", "127.0.0.1", 8080),
            IPv4Address("TCP", "127.1.2.3", 8080),
            IPv6Address("TCP", "::1", 8080),
            IPv6Address("TCP", "::ffff:127.0.0.1", 8080),
        ]:
            self.assertTrue(is_local_address(address), address)

    def test_other_interfaces(self) -> None:
        for address in [
            IPv4Address("TCP", "0.0.0.0", 8080),
            IPv6Address("TCP", "::", 8080),
            IPv4Address("TCP", "10.0.0.1", 8080),
            IPv6Address("TCP", "::ffff:10.0.0.1", 8080),
        ]:
            self.assertFalse(is_local_address(address), address)

    def test_unix(self) -> None:
        self.assertTrue(is_local_address(UNIXAddress("/run/gateway/control.sock")))
        self.assertTrue(is_local_address(UNIXAddress(b"/run/gateway/control.sock")))
        # A Linux abstract socket has no file permissions; an unnamed one is no path either.
        self.assertFalse(is_local_address(UNIXAddress("\0gateway-control")))
        self.assertFalse(is_local_address(UNIXAddress(b"\0gateway-control")))
        self.assertFalse(is_local_address(UNIXAddress(None)))

    def test_anything_else(self) -> None:
        self.assertFalse(is_local_address(HostnameAddress(b"localhost", 8080)))

    def test_loopback_host(self) -> None:
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "::1"]:
            self.assertTrue(is_loopback_host(host), host)
        for host in ["", "0.0.0.0", "127.0.0.1.nip.io", "::", "localhost.example"]:
            self.assertFalse(is_loopback_host(host), host)
