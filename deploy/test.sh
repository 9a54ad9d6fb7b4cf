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

ensure_deps() {
    command -v dpkg-query >/dev/null 2>&1 || {
        echo "note: not a Debian system; make sure these are installed: $*" >&2
        return 0
    }
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ "$(id -u)" -eq 0 ]]; then
        echo "installing missing packages: ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        echo "missing packages: ${missing[*]}" >&2
        echo "install them with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
}
# etcd-client provides etcdctl, which the etcdctl suite drives.
ensure_deps librocksdb-dev libsnappy-dev libclang-dev protobuf-compiler etcd-client

if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
command -v etcdctl >/dev/null 2>&1 || { echo "etcdctl not found (package etcd-client)" >&2; exit 1; }

# Build everything first (debug profile): the end-to-end tests need every
# binary, including metastore-server from another crate.
cargo build --workspace --all-targets

# Each end-to-end test starts its own server and gateway: limit parallelism.
cargo test --workspace -- --test-threads=2 "$@"
