"""The control plane: the contract, its HTTP API, the registry of API clusters, their store, metrics."""
