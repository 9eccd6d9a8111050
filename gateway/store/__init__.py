"""Where API-registered clusters are kept: the state file, or etcd shared by a fleet of gateways."""
