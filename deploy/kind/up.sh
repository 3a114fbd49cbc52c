#!/usr/bin/env bash
# dns-interceptor on a local kind cluster, end to end:
#   builds the image (deploy/Dockerfile), creates the cluster (deploy/kind/cluster.yaml) unless
#   it exists, loads the image into its nodes, deploys deploy/kind (the base with that image)
#   and runs deploy/smoke-test.sh from a pod.
#
# Needs, on a Linux host (5.11 or later): docker (a running engine), kind >= v0.30.0 and
# kubectl.  No kernel headers: the image carries the ones bcc compiles against.
#
#   deploy/kind/up.sh              # again after a change: rebuilds, reloads, restarts agents
#   kind delete cluster --name dns-interceptor
#
# Environment: KIND_CLUSTER (default dns-interceptor), IMAGE (default dns-interceptor:dev),
# SMOKE_EXTERNAL=0 to skip resolving an external name in the smoke test.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
CLUSTER=${KIND_CLUSTER:-dns-interceptor}
IMAGE=${IMAGE:-dns-interceptor:dev}
KUBECTL=(kubectl --context "kind-$CLUSTER")

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() {
  printf '\033[31merror:\033[0m %s\n' "$*" >&2
  exit 1
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (needed: docker, kind >= v0.30.0, kubectl)"
done
docker info >/dev/null 2>&1 || die "docker cannot reach a Docker engine (is it running? are you in the docker group?)"
[[ $IMAGE == *:dev ]] || die "deploy/kind deploys the image tagged :dev; IMAGE must end in :dev"

say "building $IMAGE"
docker build -f "$root/deploy/Dockerfile" -t "$IMAGE" "$root"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "kind cluster $CLUSTER exists"
  fresh=0
else
  say "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$here/cluster.yaml" --wait 5m
  fresh=1
fi

# The agent pins its maps in /sys/fs/bpf and the DaemonSet mounts it from the node.  A kind
# node is a privileged container: make sure bpffs is mounted there (systemd normally does).
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'
done

say "loading $IMAGE into the nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "deploying deploy/kind"
"${KUBECTL[@]}" apply -k "$here"
if ((!fresh)); then
  # Same tag, new image: the pods only pick it up when they are recreated.
  "${KUBECTL[@]}" -n kube-system rollout restart ds/dns-interceptor
fi

KUBECTL="${KUBECTL[*]}" IMAGE=$IMAGE "$root/deploy/smoke-test.sh"
