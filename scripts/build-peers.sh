#!/usr/bin/env bash
# Builds the e2e test peers from the Go module proxy, once per machine:
#   kube-apiserver (k8s.io/kubernetes) and etcd (go.etcd.io/etcd/server/v3).
# Binaries land in $INTERCEPTOR_CACHE/bin (default /var/cache/dns-interceptor/bin), named with
# their version, so a clean clone (CI) reuses them and a version bump rebuilds.
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
CACHE=${INTERCEPTOR_CACHE:-/var/cache/dns-interceptor}
BIN=$CACHE/bin
mkdir -p "$BIN"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# A throw-away module: k8s.io/kubernetes replaces its staging modules with local paths, which
# `go install` refuses; in our own module we point each of them at its published version.
# build NAME... : every NAME is a cmd/ package of one module, compiled together in one `go build`
# (shared packages compile once), each to $BIN/NAME-$VERSION.  Prints the paths.
build() {  # build MODULE VERSION NAME=PACKAGE...
  local mod=$1 ver=$2
  shift 2
  local missing=() spec
  for spec in "$@"; do
    [[ -x $BIN/${spec%%=*}-$ver ]] || missing+=("$spec")
  done
  if ((${#missing[@]})); then
    local work
    work=$(mktemp -d "$CACHE/build-${mod##*/}.XXXX")
    say "building ${missing[*]%%=*} $ver from the Go module proxy (once per machine; several minutes on 2 cores)"
    (
      cd "$work"
      go mod init peers >/dev/null 2>&1
      local gomod
      gomod=$(go mod download -json "$mod@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
      # Every `replace X => ./staging/...` (or ../x) of the peer becomes X => X@<its version>.
      local minor=${ver#v1.} m
      while read -r m; do
        case $mod in
          k8s.io/kubernetes) go mod edit -replace="$m=$m@v0.$minor" ;;
          *) go mod edit -replace="$m=$m@$ver" ;;
        esac
      done < <(grep -E '^\s*[a-z0-9./-]+ => \.\.?/' "$gomod" | awk '{print $1}' | sort -u)
      local pkgs=()
      for spec in "${missing[@]}"; do pkgs+=("${spec#*=}"); done
      go get "${pkgs[@]/%/@$ver}" >&2
      mkdir out
      say "compiling ${missing[*]%%=*}"
      # Static binaries (no cgo), as Kubernetes' own release builds most of them; the kubelet
      # loses only cadvisor's optional libpfm counters.
      CGO_ENABLED=0 go build -trimpath -o out/ "${pkgs[@]}" >&2
      for spec in "${missing[@]}"; do
        # `go build -o DIR/` names a binary after its package path's last element, or the one
        # before a major-version suffix (go.etcd.io/etcd/server/v3 -> server).
        local pkg=${spec#*=} elem
        elem=${pkg##*/}
        [[ $elem =~ ^v[0-9]+$ ]] && elem=$(basename "$(dirname "$pkg")")
        mv "out/$elem" "$BIN/${spec%%=*}-$ver"
      done
    )
    rm -rf "$work"
  fi
  for spec in "$@"; do echo "$BIN/${spec%%=*}-$ver"; done
}

build go.etcd.io/etcd/server/v3 "$ETCD_VERSION" etcd=go.etcd.io/etcd/server/v3
# The API server for the e2e tier; the node components for the cluster tier (make cluster).
build k8s.io/kubernetes "$K8S_VERSION" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
  kubelet=k8s.io/kubernetes/cmd/kubelet \
  kubectl=k8s.io/kubernetes/cmd/kubectl

# kustomize renders deploy/ for the manifest tests.  Its module has no replace directives, so
# a plain `go install` builds it; v5.8.1 still builds with Go 1.24 (v5.8.2+ need Go 1.26+).
KUSTOMIZE_VERSION=v5.8.1
kustomize_bin=$BIN/kustomize-$KUSTOMIZE_VERSION
if [[ ! -x $kustomize_bin ]]; then
  say "building kustomize $KUSTOMIZE_VERSION from the Go module proxy (once per machine)"
  kwork=$(mktemp -d "$CACHE/build-kustomize.XXXX")
  GOBIN=$kwork CGO_ENABLED=0 go install -trimpath "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2
  mv "$kwork/kustomize" "$kustomize_bin"
  rm -rf "$kwork"
fi
echo "$kustomize_bin"

# CoreDNS is a benchmark peer (tests/bench/peers.py), built only when asked for
# (`build-peers.sh coredns`), so the test tiers never wait for it.  Its module has no replace
# directives, so a plain `go install` builds it; v1.14.7 needs Go 1.25+ (`go` fetches that
# toolchain through the proxy if the local one is older).
COREDNS_VERSION=v1.14.7
if [[ " $* " == *" coredns "* ]]; then
  coredns_bin=$BIN/coredns-$COREDNS_VERSION
  if [[ ! -x $coredns_bin ]]; then
    say "building CoreDNS $COREDNS_VERSION from the Go module proxy (once per machine; minutes on 2 cores)"
    cwork=$(mktemp -d "$CACHE/build-coredns.XXXX")
    GOBIN=$cwork CGO_ENABLED=0 go install -trimpath "github.com/coredns/coredns@$COREDNS_VERSION" >&2
    mv "$cwork/coredns" "$coredns_bin"
    rm -rf "$cwork"
  fi
  echo "$coredns_bin"
fi
