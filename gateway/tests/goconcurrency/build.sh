#!/usr/bin/env bash
# Builds gateway/tests/goconcurrency (etcd's clientv3/concurrency recipes
# against a MetaStore endpoint, run by gateway/tests/go_concurrency.rs) into
# $1 (default target/goconcurrency/metastore-goconcurrency), offline, against
# Debian's packaged etcd client library, as bench/goclient/build.sh does:
#   apt-get install golang-go golang-etcd-server-dev
# GOPATH mode over /usr/share/gocode, where those packages put their
# sources; Go's build cache stays under target/ so rebuilds are quick.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="${1:-$ROOT/target/goconcurrency/metastore-goconcurrency}"

command -v go >/dev/null 2>&1 || { echo "go not found (package golang-go)" >&2; exit 1; }
[[ -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3/concurrency ]] ||
    { echo "etcd's Go client library not found (package golang-etcd-server-dev)" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")" "$ROOT/target/gocache"
cd "$ROOT/gateway/tests/goconcurrency"
GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= GOCACHE="$ROOT/target/gocache" \
    go build -o "$OUT" .
