"""The etcd v3 backend: a fleet of gateways sharing one registry."""
