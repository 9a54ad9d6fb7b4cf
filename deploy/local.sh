#!/usr/bin/env bash
# Start one MetaStore node in the foreground: the shard server (one shard per
# core) and the etcd-compatible gateway in front of it. Ctrl-C (or SIGTERM)
# stops both cleanly.
#
#   ./deploy/local.sh [--engine memory|rocksdb] [--data-dir DIR]
#                     [--client-port PORT] [--shards N] [--server-port PORT]
#
# Then talk to it with any etcd v3 client, e.g.
#   ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 put foo bar
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ENGINE=rocksdb
DATA_DIR=./data
CLIENT_PORT=2379
SHARDS="$(nproc)"
SERVER_PORT=23790
READY_TIMEOUT=120

usage() {
    cat <<USAGE
Usage: $0 [options]

Starts one MetaStore node in the foreground (shard server + gateway).

Options:
  --engine memory|rocksdb  storage engine (default: rocksdb). memory keeps
                           everything in RAM only: a restart starts empty.
  --data-dir DIR           data directory (default: ./data)
  --client-port PORT       gateway port for etcd clients (default: 2379)
  --shards N               number of shards (default: nproc = $(nproc)); fixed
                           once the data directory holds data
  --server-port PORT       first shard port; shard i listens on PORT+i
                           (default: 23790)
  -h, --help               this help
USAGE
}

while (($#)); do
    case "$1" in
        --engine) ENGINE="${2:?--engine needs a value}"; shift 2 ;;
        --engine=*) ENGINE="${1#*=}"; shift ;;
        --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift 2 ;;
        --data-dir=*) DATA_DIR="${1#*=}"; shift ;;
        --client-port) CLIENT_PORT="${2:?--client-port needs a value}"; shift 2 ;;
        --client-port=*) CLIENT_PORT="${1#*=}"; shift ;;
        --shards) SHARDS="${2:?--shards needs a value}"; shift 2 ;;
        --shards=*) SHARDS="${1#*=}"; shift ;;
        --server-port) SERVER_PORT="${2:?--server-port needs a value}"; shift 2 ;;
        --server-port=*) SERVER_PORT="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

case "$ENGINE" in
    memory|rocksdb) ;;
    *) echo "--engine must be memory or rocksdb, not '$ENGINE'" >&2; exit 2 ;;
esac
for n in "$CLIENT_PORT" "$SHARDS" "$SERVER_PORT"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "not a number: $n" >&2; exit 2; }
done

# --- dependencies -----------------------------------------------------------
# shellcheck source=deploy/lib.sh
source "$ROOT/deploy/lib.sh"
ensure_deps librocksdb-dev libsnappy-dev libclang-dev protobuf-compiler libprotobuf-dev

ensure_cargo

# --- build (debug profile: the same artifacts the tests use) ----------------
(cd "$ROOT" && cargo build --workspace --bins)

SERVER_BIN="$ROOT/target/debug/metastore-server"
GATEWAY_BIN="$ROOT/target/debug/metastore-gateway"

mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/metastore-local.XXXXXX")"

SERVER_PID=""
GATEWAY_PID=""
stop_all() {
    trap - INT TERM EXIT
    local pid
    for pid in "$GATEWAY_PID" "$SERVER_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$RUN_DIR"
}
trap 'echo; echo "stopping MetaStore..."; stop_all; exit 0' INT TERM
trap stop_all EXIT

# Waits (with a deadline) for a line starting with $2 on fd $1, echoing what
# it reads.
wait_ready() {
    local fd=$1 prefix=$2 what=$3 line deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        if IFS= read -r -t 1 -u "$fd" line; then
            echo "$line"
            if [[ "$line" == "$prefix"* ]]; then
                READY_LINE="$line"
                return 0
            fi
        elif (($? <= 128)); then
            echo "$what exited before it was ready" >&2
            return 1
        fi
    done
    echo "$what not ready within ${READY_TIMEOUT}s" >&2
    return 1
}

# --- shard server -----------------------------------------------------------
mkfifo "$RUN_DIR/server.out" "$RUN_DIR/gateway.out"
"$SERVER_BIN" --engine "$ENGINE" --data-dir "$DATA_DIR" --shards "$SHARDS" \
    --host 127.0.0.1 --port "$SERVER_PORT" >"$RUN_DIR/server.out" &
SERVER_PID=$!
exec 5<"$RUN_DIR/server.out"
READY_LINE=""
wait_ready 5 "metastore-server ready:" "metastore-server" || exit 1
cat <&5 &   # keep draining the server's stdout

# --- gateway ----------------------------------------------------------------
"$GATEWAY_BIN" --listen "127.0.0.1:$CLIENT_PORT" --server "127.0.0.1:$SERVER_PORT" \
    >"$RUN_DIR/gateway.out" &
GATEWAY_PID=$!
exec 6<"$RUN_DIR/gateway.out"
wait_ready 6 "metastore-gateway ready on " "metastore-gateway" || exit 1
cat <&6 &

cat <<MSG

MetaStore is up ($ENGINE engine, $SHARDS shards, data in $DATA_DIR).
etcdctl can now talk to 127.0.0.1:$CLIENT_PORT, e.g.:
  ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:$CLIENT_PORT put foo bar
  ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:$CLIENT_PORT get foo
Press Ctrl-C to stop.
MSG
if [[ "$ENGINE" == memory ]]; then
    echo "Note: the memory engine keeps data in RAM only; it is gone after a restart."
fi

# Run until either process exits (then stop the other) or we are signalled.
set +e
wait -n "$SERVER_PID" "$GATEWAY_PID"
status=$?
set -e
if kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "metastore-gateway exited (status $status); stopping the server" >&2
else
    echo "metastore-server exited (status $status); stopping the gateway" >&2
fi
stop_all
exit 1
