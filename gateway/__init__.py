"""
An SSH tunnel gateway: SOCKS5 and HTTP proxy listeners in front of one Twisted
Conch connection per cluster, so ordinary clients reach a cluster's private
addresses through its proxy node.
"""

__version__ = "0.1.0"
