"""Prometheus figures of the BPF datapath, read from the pinned per-CPU maps at scrape time.

The collector takes its reader as a constructor argument (client_python's ProcessCollector
pattern): the agent hands it a :class:`~interceptor.ops.counters.CounterReader` over its
pins, tests hand it a fake.  Nothing is counted in Python: every figure is the kernel's,
summed over CPUs when scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from interceptor.ops.catalog import COUNTER_SETS, CounterSet
from interceptor.ops.counters import Snapshot

log = logging.getLogger(__name__)

POD_COUNTERS = (
    ("queries", "interceptor_bpf_pod_queries", "DNS packets from the pod to a captured server"),
    (
        "redirected",
        "interceptor_bpf_pod_redirected",
        "The pod's DNS packets steered to the resolver",
    ),
    (
        "passed",
        "interceptor_bpf_pod_passed",
        "The pod's DNS packets left untouched (fail-open, rate limit)",
    ),
)


class BpfCollector(Collector):
    """``interceptor_bpf_events_total{reason}`` (and every other counter set),
    ``interceptor_bpf_pod_{queries,redirected,passed}_total{namespace,pod}`` and
    ``interceptor_datapath_interfaces``."""

    def __init__(
        self,
        read: Callable[[], Snapshot | None],
        counter_sets: Iterable[CounterSet] = COUNTER_SETS,
    ) -> None:
        self.read = read
        self.counter_sets = list(counter_sets)

    def collect(self) -> Iterable[Metric]:
        try:
            snap = self.read()
        except Exception as exc:  # a scrape must not fail because one map is unreadable
            log.warning("reading the BPF maps for metrics failed: %s", exc)
            return
        if snap is None:
            return
        for cs in self.counter_sets:
            counts = snap.counters.get(cs.map_name)
            if counts is None:
                continue
            family = CounterMetricFamily(cs.metric, cs.doc, labels=[cs.label])
            for label in cs.labels:
                family.add_metric([label], float(counts.get(label, 0)))
            yield family
        for attr, name, doc in POD_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["namespace", "pod"])
            for pod in snap.pods:
                family.add_metric([pod.namespace, pod.name], float(pod.count(attr)))
            yield family
        yield GaugeMetricFamily(
            "interceptor_datapath_interfaces",
            "Host interfaces (pod veths) carrying the programs",
            value=float(snap.interfaces),
        )


PROGRAMMING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def programming_histogram(registry: CollectorRegistry | None) -> Histogram:
    """``interceptor_datapath_programming_seconds``: one observation per reconcile pass that
    changed the datapath (attach, detach, pod entries)."""
    return Histogram(
        "interceptor_datapath_programming_seconds",
        "Time to bring the tc programs and pod maps in step with the node's pods",
        buckets=PROGRAMMING_BUCKETS,
        registry=registry,
    )
