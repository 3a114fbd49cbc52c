"""Answering one query: the listener, the hot path and the resolver's decision, then what
the decision uses (autopath, the cache, the upstream forwarder)."""
