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
build() {  # build NAME PACKAGE MODULE VERSION
  local name=$1 pkg=$2 mod=$3 ver=$4 out="$BIN/$1-$4"
  if [[ -x $out ]]; then
    echo "$out"
    return
  fi
  local work
  work=$(mktemp -d "$CACHE/build-$name.XXXX")
  trap 'rm -rf "$work"' RETURN
  say "building $name $ver from the Go module proxy (once per machine; several minutes on 2 cores)"
  (
    cd "$work"
    go mod init peers >/dev/null 2>&1
    local gomod
    gomod=$(go mod download -json "$mod@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    # Every `replace X => ./staging/...` (or ../x) of the peer becomes X => X@<its version>.
    local minor=${ver#v1.}
    while read -r m; do
      case $mod in
        k8s.io/kubernetes) go mod edit -replace="$m=$m@v0.$minor" ;;
        *) go mod edit -replace="$m=$m@$ver" ;;
      esac
    done < <(grep -E '^\s*[a-z0-9./-]+ => \.\.?/' "$gomod" | awk '{print $1}' | sort -u)
    go get "$pkg@$ver" >&2
    say "compiling $name"
    CGO_ENABLED=0 go build -trimpath -o "$out.tmp" "$pkg" >&2
    mv "$out.tmp" "$out"
  )
  echo "$out"
}

build etcd go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes "$K8S_VERSION"

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
