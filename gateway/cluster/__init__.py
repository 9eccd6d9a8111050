"""One cluster's SSH connections to its proxy nodes: links, failover, stream admission."""
