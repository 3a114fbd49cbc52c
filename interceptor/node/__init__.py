"""The node: the agent and the serve runtime they share, its lifecycle and health."""
