"""
The destination grammar: normalisation (case, trailing dot, IDNA, numeric
look-alikes, zone ids) and cluster-qualified names.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from gateway.destinations import QualifiedName, canonical_host, normalise_host, split_qualified
from gateway.errors import Reason, StreamError

DOMAIN = "gw.internal"


class NormaliseTests(SynchronousTestCase):
    def test_case_and_trailing_dot(self) -> None:
        self.assertEqual(canonical_host("API.SVC.TEST."), "api.svc.test")
        self.assertEqual(canonical_host("Ambari.Cluster-A.GW.Internal"), "ambari.cluster-a.gw.internal")

    def test_idna(self) -> None:
        """Non-ASCII names become A-labels as browsers send them (UTS 46: width and case folded)."""
        self.assertEqual(canonical_host("Bücher.Example"), "xn--bcher-kva.example")
        self.assertEqual(canonical_host("xn--bcher-kva.example"), "xn--bcher-kva.example")
        self.assertEqual(canonical_host("Ａ.example"), "a.example")
        self.assertEqual(canonical_host("faß.de"), "xn--fa-hia.de")  # IDNA 2008, not transitional
        e = self.assertRaises(StreamError, canonical_host, "☃.example")
        self.assertEqual(e.reason, Reason.BAD_REQUEST)
        self.assertNotIn("☃", e.detail)  # escaped: details stay ASCII

    def test_addresses(self) -> None:
        self.assertEqual(normalise_host("[2001:DB8::1]"), ipaddress.IPv6Address("2001:db8::1"))
        self.assertEqual(normalise_host("::ffff:10.0.0.1"), ipaddress.IPv4Address("10.0.0.1"))
        for host in ("fe80::1%eth0", "[fe80::1%25eth0]", "10.1", "0x0a000001", "[10.0.0.1]", "a b", ""):
            e = self.assertRaises(StreamError, normalise_host, host)
            self.assertEqual(e.reason, Reason.BAD_REQUEST, host)


class QualifiedNameTests(SynchronousTestCase):
    def test_not_qualified(self) -> None:
        for name in ("api.svc.test", "gw.internal", "x.gw.internal.example", "x.gwinternal"):
            self.assertEqual(split_qualified(name, DOMAIN), [], name)

    def test_dashed_ipv4(self) -> None:
        [reading] = split_qualified("10-0-0-5.cluster-a.gw.internal", DOMAIN)
        self.assertEqual(reading, QualifiedName("cluster-a", "10-0-0-5"))
        self.assertEqual(reading.destination(), ipaddress.IPv4Address("10.0.0.5"))

    def test_dashed_ipv6(self) -> None:
        for host, address in (
            ("fd00--5", "fd00::5"),
            ("2001-db8-0-0-0-0-0-1", "2001:db8::1"),
            ("--1", "::1"),
            ("--ffff-a00-5", "10.0.0.5"),  # IPv4-mapped, as everywhere
        ):
            [reading] = split_qualified(f"{host}.a.{DOMAIN}", DOMAIN)
            self.assertEqual(reading.destination(), ipaddress.ip_address(address), host)

    def test_names(self) -> None:
        """What does not read as an address is a name; dots make several readings."""
        [reading] = split_qualified(f"dead-beef.a.{DOMAIN}", DOMAIN)
        self.assertEqual(reading.destination(), "dead-beef")
        [reading] = split_qualified(f"10-0-0-500.a.{DOMAIN}", DOMAIN)
        self.assertEqual(reading.destination(), "10-0-0-500")
        readings = split_qualified(f"ambari.svc.net.a.{DOMAIN}", DOMAIN)
        self.assertEqual(
            readings,
            [
                QualifiedName("svc.net.a", "ambari"),
                QualifiedName("net.a", "ambari.svc"),
                QualifiedName("a", "ambari.svc.net"),
            ],
        )

    def test_host_read_lazily(self) -> None:
        """A reading whose HOST is no valid destination fails only when it is the one chosen."""
        readings = split_qualified(f"x.1.c.{DOMAIN}", DOMAIN)
        self.assertEqual([r.cluster for r in readings], ["1.c", "c"])
        self.assertEqual(readings[0].destination(), "x")
        self.assertRaises(StreamError, readings[1].destination)  # "x.1" looks numeric

    def test_nothing_before_the_cluster(self) -> None:
        e = self.assertRaises(StreamError, split_qualified, f"cluster-a.{DOMAIN}", DOMAIN)
        self.assertEqual(e.reason, Reason.BAD_REQUEST)
        self.assertIn("HOST.CLUSTER.gw.internal", e.detail)

    def test_other_domain(self) -> None:
        [reading] = split_qualified("10-0-0-5.a.clusters.example.org", "clusters.example.org")
        self.assertEqual(reading.destination(), ipaddress.IPv4Address("10.0.0.5"))
