"""The integration tier: real sshd (and real clients) in network namespaces the tests create."""
