# One entry point per job.  Every target installs what it needs first (scripts/setup.sh is
# idempotent), so `make demo` and `make test` work on a fresh Debian bookworm machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit process lab e2e lint bench fuzz soak clean peers cluster cluster-down

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m devlab.demo

lint: setup
	$(VENV)/bin/ruff check interceptor devlab tests
	$(VENV)/bin/ruff format --check interceptor devlab tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	clang-format --dry-run --Werror bpf/*.c bpf/lib/*.h

# The tiers, cheapest first (docs/testing.md): unit is pure Python and needs neither root nor
# Go; process runs real programs without root; lab needs root (netns, BPF); e2e needs root
# and a real API server; cluster needs root and the one-node cluster.
unit: setup
	$(PY) -m pytest tests/unit -q

process: setup peers
	$(PY) -m pytest tests/process -q

lab: setup
	$(PY) -m pytest tests/lab -q

e2e: setup peers
	$(PY) -m pytest tests/e2e -q

# The full suite: lint, types, the unit, process, lab and e2e tiers, then the cluster tier
# (a real node: kubelet, containerd, CNI, kube-proxy, CoreDNS, the DaemonSet).  The e2e and
# cluster tiers need Kubernetes components, built once per machine from the Go module proxy
# (cached).  The cluster tier runs last, on its own: its kube-proxy rules and pins must not
# meet the lab's.
# --no-skip: everything is installed here, so a skipped test fails the run.
test: lint peers
	$(PY) -m pytest tests -q --no-skip --ignore=tests/cluster
	$(PY) -m pytest tests/cluster -q --no-skip
	CLUSTER_CNI=bridge CLUSTER_PROXY_MODE=nftables $(PY) -m pytest -q --no-skip $(BRIDGE_TIER)

# The second variant (a flannel-style bridge, kube-proxy in nftables mode): what depends on
# the CNI and the proxy (capture, resolution, the smoke test, service changes, what is left
# alone, removal and the rules); churn and rollouts run once, on ptp and iptables.
BRIDGE_TIER := $(addprefix tests/cluster/,test_1_agent.py test_2_resolution.py \
	test_3_smoke.py test_4_services.py test_5_not_captured.py test_8_removal.py)

# A real one-node cluster with the interceptor deployed (idempotent; prints the two exports).
# CLUSTER_CNI=bridge for a flannel-style bridge, CLUSTER_PROXY_MODE=nftables for kube-proxy.
cluster: setup
	@$(PY) -m tests.cluster.node up

cluster-down: setup
	@$(PY) -m tests.cluster.node down

peers:
	@bash scripts/build-peers.sh >/dev/null

# Benchmarks print their figures; they are not pass/fail tests.  All but the first need root.
# peers (issue 7: vs dnsmasq, unbound, CoreDNS; builds CoreDNS once) and ndots (issue 5) also
# write docs/bench/{peers.md,latency.png,ndots.md}; a quick look without touching them:
#   .venv/bin/python -m tests.bench.peers --seconds 3 --out /tmp/bench
bench: setup
	$(PY) -m tests.bench.serve_vs_dnsmasq
	$(PY) -m tests.bench.datapath
	$(PY) -m tests.bench.peers
	$(PY) -m tests.bench.peers --workload cached
	$(PY) -m tests.bench.ndots
	$(PY) -m tests.bench.fairness
	$(PY) -m tests.bench.agent_rss
	$(PY) -m tests.bench.memory

# The long runs: a million fuzzed packets along each path (about 9 minutes), and the soak
# (ten minutes of load with restarts and churn).
fuzz: setup
	$(PY) -m tests.bench.fuzz --packets 1000000

soak: setup
	$(PY) -m tests.bench.soak --out bench-results

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
