#!/usr/bin/env bash
# Smoke test of a deployed dns-interceptor, for any cluster running deploy/ (deploy/kind/up.sh
# and the Vagrant VM run it; run it yourself after `kubectl apply -k ...`):
#
#  1. the DaemonSet is rolled out, and every agent answers /readyz and /metrics through the
#     API server's pod proxy (the network path a Prometheus would take to the node);
#  2. a pod with an ordinary resolv.conf (nameserver = kube-dns) resolves kubernetes.default
#     through glibc's search path, the full name with dig over UDP and TCP with the reply from
#     the server it asked, a name that does not exist as NXDOMAIN, and an external name (set
#     SMOKE_EXTERNAL=0 where the cluster has no internet);
#  3. those answers came through the interceptor: the agent's BPF counters for that pod and
#     its answer counters (resolver + in-kernel fast path) grew by at least that many queries,
#     and none of the pod's queries failed open.
#
# Environment: KUBECTL (default "kubectl"; e.g. "kubectl --context kind-dns-interceptor"),
# IMAGE (the agent image, default dns-interceptor:dev: the test pod uses its dig and getent),
# SMOKE_EXTERNAL (default 1), SMOKE_TIMEOUT (seconds per wait, default 300),
# SMOKE_CAPTURE_WAIT (seconds until the new pod must be captured, default 60),
# SMOKE_NAMESPACE and SMOKE_POD (the test pod, default dnsi-smoke; the namespace is deleted).
set -euo pipefail

read -r -a KUBECTL <<<"${KUBECTL:-kubectl}"
IMAGE=${IMAGE:-dns-interceptor:dev}
EXTERNAL=${SMOKE_EXTERNAL:-1}
TIMEOUT=${SMOKE_TIMEOUT:-300}
CAPTURE_WAIT=${SMOKE_CAPTURE_WAIT:-60}
NS=${SMOKE_NAMESPACE:-dnsi-smoke}
POD=${SMOKE_POD:-dnsi-smoke}
AGENTS=app.kubernetes.io/name=dns-interceptor

k() { "${KUBECTL[@]}" "$@"; }
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
ok() { printf '  ok  %s\n' "$*"; }
fail() {
  printf '\033[31mSMOKE TEST FAILED:\033[0m %s\n' "$*" >&2
  exit 1
}
in_pod() { k -n "$NS" exec "$POD" -- "$@"; }
proxy() { k get --raw "/api/v1/namespaces/kube-system/pods/$1/proxy/$2"; }

# The sum of every sample of metric $2 whose labels contain each of $3...: Prometheus text
# format on stdin-file $1, one sample per line ("name{labels} value").
metric() {
  local file=$1 name=$2
  shift 2
  awk -v name="$name" -v filters="$*" '
    BEGIN { n = split(filters, want, " ") }
    $1 == name || index($1, name "{") == 1 {
      for (i = 1; i <= n; i++) if (!index($1, want[i])) next
      sum += $2
    }
    END { printf "%d\n", sum }' "$file"
}

cleanup() {
  k delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  rm -rf "$work"
}
work=$(mktemp -d)
trap cleanup EXIT

say "waiting for the DaemonSet to roll out"
k -n kube-system rollout status ds/dns-interceptor --timeout="${TIMEOUT}s" \
  || fail "the DaemonSet did not become ready; see: ${KUBECTL[*]} -n kube-system logs -l $AGENTS"
mapfile -t agents < <(k -n kube-system get pods -l "$AGENTS" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
((${#agents[@]})) || fail "no agent pods (label $AGENTS)"
for a in "${agents[@]}"; do
  body=$(proxy "$a:8053" readyz) || fail "$a: /readyz did not answer 200: $body"
  ok "$a /readyz: $body"
  proxy "$a:9253" metrics >"$work/m" || fail "$a: /metrics did not answer"
  grep -q '^interceptor_build_info' "$work/m" || fail "$a: /metrics has no interceptor_build_info"
  ok "$a /metrics: $(grep -c '^interceptor_' "$work/m") interceptor samples"
done

say "starting a test pod"
k delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
k create namespace "$NS" >/dev/null
k -n "$NS" run "$POD" --image="$IMAGE" --image-pull-policy=IfNotPresent --restart=Never \
  --command -- sleep 1800 >/dev/null
k -n "$NS" wait --for=condition=Ready "pod/$POD" --timeout="${TIMEOUT}s" >/dev/null \
  || fail "the test pod did not start (image $IMAGE present on the nodes?)"
node=$(k -n "$NS" get pod "$POD" -o jsonpath='{.spec.nodeName}')
agent=$(k -n kube-system get pods -l "$AGENTS" --field-selector "spec.nodeName=$node" \
  -o jsonpath='{.items[0].metadata.name}')
[[ -n $agent ]] || fail "no agent on node $node"
ok "pod $NS/$POD on node $node, agent $agent"

# shellcheck disable=SC2016 # the $ are awk's, inside the pod
nameserver=$(in_pod awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
captured=$(k -n kube-system exec "$agent" -- printenv CAPTURE)
[[ $nameserver == "$captured" ]] \
  || fail "pods ask $nameserver but the agent captures $captured: set CAPTURE in the ConfigMap (deploy/base/config.env) to the kube-dns ClusterIP"
ok "pods ask $nameserver, the agent captures it"

# The agent attaches to a new pod's veth on the netlink event (or its 2 s resync); until
# then the pod's queries go straight to kube-dns.  Wait until the BPF program counts one.
deadline=$((SECONDS + CAPTURE_WAIT))
while :; do
  in_pod dig +short +time=2 +tries=1 kubernetes.default.svc.cluster.local >/dev/null || true
  proxy "$agent:9253" metrics >"$work/m"
  (($(metric "$work/m" interceptor_bpf_pod_queries_total "namespace=\"$NS\"" "pod=\"$POD\"") > 0)) && break
  ((SECONDS < deadline)) || fail "after $CAPTURE_WAIT s the agent has counted no query from $NS/$POD: its veth is not captured (agent log: ${KUBECTL[*]} -n kube-system logs $agent)"
  sleep 1
done
ok "the agent sees $NS/$POD's queries"

say "resolving from the pod"
cp "$work/m" "$work/before"
kubernetes_ip=$(k -n default get service kubernetes -o jsonpath='{.spec.clusterIP}')
queries=0

got=$(in_pod getent hosts kubernetes.default | awk '{ print $1; exit }')
[[ $got == "$kubernetes_ip" ]] || fail "getent hosts kubernetes.default: '$got', expected $kubernetes_ip"
ok "glibc search path: kubernetes.default -> $got"
queries=$((queries + 1))

got=$(in_pod dig +short +time=3 +tries=1 kubernetes.default.svc.cluster.local A)
[[ $got == "$kubernetes_ip" ]] || fail "dig (UDP) kubernetes.default.svc.cluster.local: '$got'"
got=$(in_pod dig +tcp +short +time=3 +tries=1 kubernetes.default.svc.cluster.local A)
[[ $got == "$kubernetes_ip" ]] || fail "dig (TCP) kubernetes.default.svc.cluster.local: '$got'"
ok "dig UDP and TCP: kubernetes.default.svc.cluster.local -> $kubernetes_ip"
queries=$((queries + 2))

out=$(in_pod dig +time=3 +tries=1 kubernetes.default.svc.cluster.local A)
grep -q "SERVER: $nameserver#53" <<<"$out" || fail "the reply did not come from $nameserver:
$out"
ok "the reply's source is the server the pod asked ($nameserver)"
out=$(in_pod dig +time=3 +tries=1 no-such-service.default.svc.cluster.local A)
grep -q 'status: NXDOMAIN' <<<"$out" || fail "a nonexistent service did not get NXDOMAIN:
$out"
ok "no-such-service.default.svc.cluster.local -> NXDOMAIN"
queries=$((queries + 2))

if [[ $EXTERNAL != 0 ]]; then
  out=$(in_pod dig +time=5 +tries=2 kubernetes.io A)
  if ! grep -q 'status: NOERROR' <<<"$out" || ! grep -qE '\sIN\s+A\s' <<<"$out"; then
    fail "kubernetes.io (forwarded upstream) did not resolve (SMOKE_EXTERNAL=0 skips it):
$out"
  fi
  ok "kubernetes.io (forwarded) -> $(awk '$4 == "A" { print $5; exit }' <<<"$out")"
  queries=$((queries + 1))
fi

say "checking that the interceptor answered"
proxy "$agent:9253" metrics >"$work/after"
delta() {  # delta METRIC FILTER...
  echo $(($(metric "$work/after" "$@") - $(metric "$work/before" "$@")))
}
pod_labels=("namespace=\"$NS\"" "pod=\"$POD\"")
seen=$(delta interceptor_bpf_pod_queries_total "${pod_labels[@]}")
passed=$(delta interceptor_bpf_pod_passed_total "${pod_labels[@]}")
answered=$(($(delta interceptor_requests_total) + $(delta interceptor_fastpath_total 'result="hit"')))
((seen >= queries)) || fail "the BPF program counted $seen DNS packets from $NS/$POD, expected >= $queries"
ok "BPF counted $seen DNS packets from $NS/$POD (>= $queries queries)"
((passed == 0)) || fail "$passed of $NS/$POD's packets bypassed the resolver (fail-open or rate limit)"
ok "none of them failed open"
((answered >= queries)) || fail "the agent answered $answered queries (resolver + fast path), expected >= $queries"
ok "the agent answered $answered queries (resolver + in-kernel fast path)"

say "interceptor stats on $node"
k -n kube-system exec "$agent" -- interceptor stats || fail "interceptor stats failed in $agent"

say "smoke test passed"
