"""Developer tooling, not shipped: the network-namespace node (the lab) and the demo."""
