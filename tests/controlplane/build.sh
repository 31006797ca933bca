#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# etcd) and helm from the Go module proxy, pinned by the go.mod/go.sum files in
# ./k8s, ./etcd and ./helm. Idempotent: binaries already in the cache are kept.
#
#   tests/controlplane/build.sh            # build what is missing, print bin dir
#   tests/controlplane/build.sh --print-bin-dir   # only print the bin dir
#
# Output: ${DISPARO_CACHE:-$HOME/.cache/disparo}/controlplane/<k8s version>/bin/
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'build.sh: %s\n' "$*" >&2; }

# Version of a required module, read from a tools module's go.mod (single source of truth).
modver() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$HERE/$1/go.mod"; }

K8S_VERSION=$(modver k8s k8s.io/kubernetes)
ETCD_VERSION=$(modver etcd go.etcd.io/etcd/server/v3)
HELM_VERSION=$(modver helm helm.sh/helm/v4)
[[ -n $K8S_VERSION && -n $ETCD_VERSION && -n $HELM_VERSION ]] ||
    die "could not read pinned versions from $HERE/{k8s,etcd,helm}/go.mod"

CACHE_ROOT=${DISPARO_CACHE:-$HOME/.cache/disparo}
BIN=$CACHE_ROOT/controlplane/$K8S_VERSION/bin

if [[ ${1:-} == --print-bin-dir ]]; then
    echo "$BIN"
    exit 0
fi

# ---- toolchain (checked only when something must be built) ----------------
GO_CHECKED=0
check_go() {
    ((GO_CHECKED)) && return
    GO_CHECKED=1
    command -v go >/dev/null 2>&1 || die "Go toolchain not found: install Go >= 1.26"
    GOVER=$(go env GOVERSION 2>/dev/null) || die "Go toolchain not found: install Go >= 1.26"
    if [[ $GOVER =~ ^go([0-9]+)\.([0-9]+) ]]; then
        if (( BASH_REMATCH[1] < 1 || (BASH_REMATCH[1] == 1 && BASH_REMATCH[2] < 26) )); then
            die "Go toolchain $GOVER is too old: install Go >= 1.26"
        fi
    else
        log "warning: cannot parse Go version '$GOVER', continuing"
    fi

    # Reproducible, offline-friendly settings: never auto-download another toolchain,
    # ignore any go.work above us, build only what go.mod/go.sum pin (read-only).
    export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly
    unset GOOS GOARCH
}

mkdir -p "$BIN"

# Serialize concurrent runs (e.g. two `scripts/cluster up`).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$BIN/.build.lock"
    flock 9
fi
# Leftovers of a killed build (we hold the lock, so nobody else is writing them).
rm -f "$BIN"/.*.tmp.*

TMPFILES=()
cleanup() {
    local f
    for f in "${TMPFILES[@]:-}"; do
        if [[ -n $f ]]; then rm -f "$f"; fi
    done
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A binary is up to date if it exists and its stamp names the pinned version.
uptodate() { [[ -x $BIN/$1 && -f $BIN/.$1.version && $(<"$BIN/.$1.version") == "$2" ]]; }

# Download the module graph needed for the given packages; turn network errors
# into a clear message.
fetch() {
    local dir=$1; shift
    local out
    if ! out=$(cd "$HERE/$dir" && go list -deps "$@" 2>&1 >/dev/null); then
        printf '%s\n' "$out" | tail -n 20 >&2
        if grep -qiE 'dial tcp|no such host|connection refused|i/o timeout|TLS handshake|network is unreachable|proxyconnect|Get "https?://|unexpected EOF|reading https?://' <<<"$out"; then
            die "cannot reach the Go module proxy ($(go env GOPROXY)) to download the modules pinned in $HERE/$dir/go.sum"
        fi
        die "go could not load $* in $HERE/$dir (see above)"
    fi
}

# build NAME VERSION MODULE_DIR PACKAGE LDFLAGS
build() {
    local name=$1 version=$2 dir=$3 pkg=$4 ldflags=$5
    if uptodate "$name" "$version"; then
        log "$name $version: cached ($BIN/$name)"
        return
    fi
    check_go
    local t0=$SECONDS
    log "$name $version: fetching modules..."
    fetch "$dir" "$pkg"
    local t1=$SECONDS
    log "$name $version: compiling (modules ready in $((t1 - t0))s)..."
    local tmp="$BIN/.$name.tmp.$$"
    TMPFILES+=("$tmp")
    (cd "$HERE/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp" "$pkg") ||
        die "go build of $name ($pkg) failed"
    mv -f "$tmp" "$BIN/$name"
    printf '%s\n' "$version" >"$BIN/.$name.version.tmp" && mv -f "$BIN/.$name.version.tmp" "$BIN/.$name.version"
    log "$name $version: built in $((SECONDS - t0))s (compile $((SECONDS - t1))s)"
}

# ---- version stamping ------------------------------------------------------
BUILD_DATE=$(date -u ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH} +%Y-%m-%dT%H:%M:%SZ)
k8s_minor=${K8S_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
K8S_LDFLAGS=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor"
    K8S_LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=$BUILD_DATE"
done
HELM_LDFLAGS="-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
HELM_LDFLAGS+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

T_ALL=$SECONDS
build etcd                    "$ETCD_VERSION" etcd go.etcd.io/etcd/server/v3                  ""
build helm                    "$HELM_VERSION" helm helm.sh/helm/v4/cmd/helm                    "$HELM_LDFLAGS"
build kube-apiserver          "$K8S_VERSION"  k8s  k8s.io/kubernetes/cmd/kube-apiserver          "$K8S_LDFLAGS"
build kube-controller-manager "$K8S_VERSION"  k8s  k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_LDFLAGS"
log "done in $((SECONDS - T_ALL))s: kubernetes $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION"
echo "$BIN"
