#!/usr/bin/env bash
# Builds bench/goclient into target/goclient/metastore-goclient (or $1)
# against Debian's packaged etcd client library, offline:
#   apt-get install golang-go golang-etcd-server-dev
# GOPATH mode over /usr/share/gocode, where those packages put their
# sources; Go's build cache stays under target/ so rebuilds are quick.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/target/goclient/metastore-goclient}"

command -v go >/dev/null 2>&1 || { echo "go not found (package golang-go)" >&2; exit 1; }
[[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 ]] ||
    { echo "etcd's Go client library not found (package golang-etcd-server-dev)" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")" "$ROOT/target/gocache"
cd "$ROOT/bench/goclient"
GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= GOCACHE="$ROOT/target/gocache" \
    go build -o "$OUT" .
