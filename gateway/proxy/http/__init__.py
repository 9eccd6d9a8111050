"""The HTTP proxy (CONNECT and absolute-form): the sans-IO machines and their Twisted adapter."""
