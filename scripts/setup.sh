#!/usr/bin/env bash
# Installs everything dns-interceptor needs on a Debian bookworm (12) host and leaves a
# virtual environment at .venv with the `interceptor` console script.
# Idempotent: a second run only checks.  Needs root for apt and /lib/modules.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

APT_PACKAGES=(
  python3 python3-venv python3-bpfcc   # bcc's Python bindings, for Debian's /usr/bin/python3
  linux-headers-amd64                  # bcc compiles BPF C against kernel headers
  iproute2                             # ip netns / tc, used by tests and the demo
  bind9-dnsutils                       # dig
  dnsperf                              # benchmarks
  dnsmasq-base unbound                 # real DNS servers: test upstreams and benchmark peers
  clang-format                         # style check for bpf/
  nftables iptables                    # tests prove no rules are ever created
  shellcheck ruby                      # tests check deploy/ scripts and the Vagrantfile
  musl-tools                           # an Alpine-style stub resolver (musl) for the lab tier
  # The local Kubernetes node (make cluster, the cluster test tier): container runtime and
  # CNI plugins, image builders, and the conntrack tool kube-proxy calls.
  containerd runc containernetworking-plugins podman buildah mmdebstrap conntrack
  gcc libc6-dev                        # the sandbox (pause) image's static binary
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# unbound's package starts a system resolver where an init system exists; we only want the
# binary (benchmark peer), never a service listening on the node's port 53.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled unbound >/dev/null 2>&1; then
  systemctl disable --now unbound >/dev/null 2>&1 || true
fi

# bcc needs /lib/modules/$(uname -r)/build.  This kernel ships no headers and no kheaders;
# Debian's generic linux-headers-amd64 works for the helpers and structs BPF programs use.
kdir="/lib/modules/$(uname -r)"
if [[ ! -e "$kdir/build/include/generated" || ! -e "$kdir/source/include/linux/kconfig.h" ]]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=${hdr%-amd64}-common
  if [[ -z $hdr || ! -d $common ]]; then
    echo "no /usr/src/linux-headers-*-amd64 (and -common) after installing linux-headers-amd64" >&2
    exit 1
  fi
  # Debian splits the headers: generated, arch-specific files in -amd64 (build), the
  # source tree's headers in -common (source), as its own /lib/modules links do.
  say "linking kernel headers: $kdir/build -> $hdr, $kdir/source -> $common"
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

# The venv uses Debian's Python because python3-bpfcc is built for it; only the bcc package
# is linked in (not all of dist-packages) so PyPI dependencies stay isolated.
PY=/usr/bin/python3
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
  say "creating .venv with $PY"
  rm -rf .venv
  "$PY" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
  say "installing dns-interceptor and its Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

.venv/bin/python -c 'import bcc, dnslib, pyroute2, kubernetes, prometheus_client' \
  || { echo "the venv cannot import its dependencies" >&2; exit 1; }
say "ready: .venv/bin/interceptor"
