"""Figures: the hot path's plain counters and their Prometheus export."""
