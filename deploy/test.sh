#!/usr/bin/env bash
# Runs every test of the workspace: unit tests and the end-to-end suites that
# start real metastore-server / metastore-gateway processes and drive them
# with the etcd-client crate and the real etcdctl, on both engines.
#
#   ./deploy/test.sh                 # everything
#   ./deploy/test.sh txn_nested      # extra arguments go to the test binaries
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=deploy/lib.sh
source "$ROOT/deploy/lib.sh"
# etcd-client provides etcdctl, which the etcdctl suite drives; etcd-server
# the etcd the differential suite compares with; golang-go and
# golang-etcd-server-dev build bench/goclient (etcd's Go client library),
# which the bench smoke suite runs, and the Go concurrency suite's program
# (which also uses golang-golang-x-sync-dev's errgroup).
had_etcd_server=$(dpkg-query -W -f='${Status}' etcd-server 2>/dev/null | grep -c "install ok installed" || true)
ensure_deps librocksdb-dev libsnappy-dev libclang-dev protobuf-compiler libprotobuf-dev etcd-client etcd-server \
    golang-go golang-etcd-server-dev golang-golang-x-sync-dev
# Installing etcd-server starts Debian's etcd service on 127.0.0.1:2379,
# MetaStore's port; the suite starts its own etcd on free ports.
if [[ "$had_etcd_server" == 0 ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi

ensure_cargo
command -v etcdctl >/dev/null 2>&1 || { echo "etcdctl not found (package etcd-client)" >&2; exit 1; }

# Build everything first (debug profile): the end-to-end tests need every
# binary, including metastore-server from another crate.
cargo build --workspace --all-targets

# Each end-to-end test starts its own server and gateway: limit parallelism.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace -- --test-threads=2 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One summary line over every test binary (cargo prints one per binary,
# the last of which is often an empty doc-test run).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
