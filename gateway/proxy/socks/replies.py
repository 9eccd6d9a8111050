"""
RFC 1928's words for SOCKS5 reply codes, in a module of their own.

Both sides print them: the gateway's SOCKS machine (L{gateway.proxy.socks.machine})
and C{gateway-connect} (L{gateway.scripts.connect}), which Sahara and Ansible
start once per SSH connection.  Importing the machine pulls in routing, the
configuration and Twisted (~200 ms); this module imports nothing, so the
script shares the one table without paying for any of that.
"""

#: RFC 1928's words for each reply code, for clients that print them.
SOCKS5_REPLY_TEXT: dict[int, str] = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
