"""Benchmarks.  A package so that ``python -m tests.bench.<name>`` (what ``make bench`` runs)
can import the shared helpers in :mod:`tests.bench.common` by absolute name."""
