#!/usr/bin/env bash
# Provisions the Vagrant "cluster" VM (Debian bookworm), in two steps the Vagrantfile runs:
#
#   provision.sh kernel    the newest Debian kernel and its headers (the VM reboots after it),
#                          so the running kernel has headers: bcc compiles against them
#   provision.sh cluster   single-node k3s, the agent image built in the VM and imported into
#                          k3s's containerd, deploy/vagrant applied, deploy/smoke-test.sh run
#
# Root, from the synced repository at /vagrant.  Idempotent: `vagrant provision` runs it again
# (rebuilding the image and restarting the agent).
set -euo pipefail

K3S_VERSION=v1.34.4+k3s1  # Kubernetes 1.34, as the e2e tests' kube-apiserver
IMAGE=docker.io/library/dns-interceptor:dev
export DEBIAN_FRONTEND=noninteractive
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

kernel() {
  say "installing the newest kernel with its headers (the VM reboots next)"
  apt-get update -q
  apt-get install -y -q --no-install-recommends linux-image-amd64 linux-headers-amd64
}

cluster() {
  cd /vagrant
  local kver
  kver=$(uname -r)
  say "installing packages (headers for $kver, podman to build the image)"
  apt-get update -q
  apt-get install -y -q "linux-headers-$kver" podman curl ca-certificates \
    || die "no linux-headers-$kver: was the VM rebooted after 'provision.sh kernel'?"

  # The DaemonSet mounts the node's bpffs; systemd mounts it at boot, this is a safety net.
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

  if ! command -v k3s >/dev/null; then
    say "installing k3s $K3S_VERSION"
    curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION=$K3S_VERSION \
      INSTALL_K3S_EXEC="server --disable=traefik --disable=servicelb --disable=metrics-server --write-kubeconfig-mode=0644" \
      sh -
  fi
  say "waiting for the node and kube-dns"
  local deadline=$((SECONDS + 300))
  until kubectl get nodes >/dev/null 2>&1 && kubectl -n kube-system get deploy coredns >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "k3s did not come up in 5 minutes (journalctl -u k3s)"
    sleep 2
  done
  kubectl wait --for=condition=Ready node --all --timeout=300s
  kubectl -n kube-system rollout status deploy/coredns --timeout=300s

  # --network host: the build's RUN steps use the VM's network, so podman sets up no bridge or
  # firewall rules of its own next to k3s's.  The full name is the one the pods ask for.
  say "building $IMAGE"
  podman build --network host -f deploy/Dockerfile -t "$IMAGE" .
  local tar
  tar=$(mktemp --suffix=.tar)
  podman save --format docker-archive -o "$tar" "$IMAGE"
  k3s ctr images import "$tar"
  rm -f "$tar"

  say "deploying deploy/vagrant"
  local existed=0
  kubectl -n kube-system get ds dns-interceptor >/dev/null 2>&1 && existed=1
  kubectl apply -k deploy/vagrant
  if ((existed)); then
    kubectl -n kube-system rollout restart ds/dns-interceptor  # same tag, new image
  fi

  IMAGE=dns-interceptor:dev deploy/smoke-test.sh
  cat <<EOF

dns-interceptor runs on this VM's k3s.  From the host:
  vagrant ssh -c 'kubectl -n kube-system get pods -l app.kubernetes.io/name=dns-interceptor'
  vagrant ssh -c 'sudo kubectl -n kube-system exec ds/dns-interceptor -- interceptor stats'
  vagrant provision     # rebuild, redeploy and test again after a change
EOF
}

case ${1:-} in
  kernel) kernel ;;
  cluster) cluster ;;
  *) die "usage: $0 kernel|cluster" ;;
esac
