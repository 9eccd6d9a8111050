"""SOCKS5/4/4a: the sans-IO machine and its Twisted adapter."""
