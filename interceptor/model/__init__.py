"""The service map: Kubernetes objects in, DNS records and precomputed answers out.  No I/O."""
