"""dns-interceptor: an eBPF-assisted transparent DNS interceptor for Kubernetes nodes."""

__version__ = "0.1.0"
