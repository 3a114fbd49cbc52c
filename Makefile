# One entry point per job.  Every target installs what it needs first (scripts/setup.sh is
# idempotent), so `make demo` and `make test` work on a fresh Debian bookworm machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit integration lint bench clean peers

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/interceptor demo

lint: setup
	$(VENV)/bin/ruff check interceptor tests
	$(VENV)/bin/ruff format --check interceptor tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	clang-format --dry-run --Werror bpf/*.c bpf/lib/*.h

unit: setup
	$(PY) -m pytest tests/unit -q

# The full suite: lint, types, unit, integration (root) and e2e tiers.  The e2e tier needs
# kube-apiserver and etcd, built once per machine from the Go module proxy (cached).
test: lint peers
	$(PY) -m pytest tests -q

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
	$(PY) -m tests.bench.ndots

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
