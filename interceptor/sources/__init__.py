"""Feeds for the service map: a YAML file (offline, demo, tests) or the Kubernetes API."""
