#!/usr/bin/env bash
# STORE benchmark: accepting mail with the PostgreSQL queue store against the embedded journal,
# for 1, 2 and 3 nodes, in one run. A benchmark, not a test.
#
#   scripts/bench-store.sh                      # 6,000 messages of 4 KiB per cell
#   BENCH_MESSAGES=1500 scripts/bench-store.sh  # quick run
#
# Environment:
#   BENCH_MESSAGES  messages per cell, split over the nodes (6000)   BENCH_SIZE  body bytes (4096)
#   BENCH_SESSIONS  injection sessions per node (10)                  BENCH_NODES "1 2 3"
#   BENCH_NO_BUILD=1  use the release binaries already built          BENCH_KEEP=1  keep the work dir
#
# What runs (loopback only): a private PostgreSQL cluster (initdb into the work dir, its own
# port on 127.0.28.1, fsync and synchronous_commit on, as the postgres user when run as root);
# N Moat nodes (release build) on 127.0.28.11.. with `sink.test` routed to `discard`, either
# each on its own embedded journal or all on the one database; `examples/loadgen` per node
# (plaintext, one connection per session, BENCH_SESSIONS sessions). The messages are accepted
# (durable before the 250) and discarded by the queue right after.
#
# Printed per cell: accepted msg/s over all nodes (wall clock of the parallel injection), the
# ratio postgres / embedded, and for postgres the database's committed transactions, WAL bytes
# and tuples written per message (pg_stat_database), measured over the cell including the
# deliveries; the queue is drained before the next cell.
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES="${BENCH_MESSAGES:-6000}"
SIZE="${BENCH_SIZE:-4096}"
SESSIONS="${BENCH_SESSIONS:-10}"
NODES="${BENCH_NODES:-1 2 3}"

if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
    cargo build --release --bin moat --example loadgen
fi
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
MOAT="$TARGET/release/moat"
LOADGEN="$TARGET/release/examples/loadgen"

work="$(mktemp -d /tmp/moat-bench-store.XXXXXX)"
chmod 777 "$work"
pids=()
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
as_pg() { if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    as_pg "$PGBIN/pg_ctl" -D "$work/pg" stop -m fast -w >/dev/null 2>&1 || true
    [[ -n "${BENCH_KEEP:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/pg" && chown postgres "$work/pg" 2>/dev/null || true
as_pg "$PGBIN/initdb" -D "$work/pg" -U moat -A trust -E UTF8 >/dev/null
PGPORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.28.1", 0)); print(s.getsockname()[1])')"
as_pg "$PGBIN/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
    -o "-h 127.0.28.1 -p $PGPORT -k $work -c fsync=on -c synchronous_commit=on -c max_connections=200" \
    start >/dev/null
as_pg "$PGBIN/createdb" -h 127.0.28.1 -p "$PGPORT" -U moat moat
URL="postgresql://moat@127.0.28.1:$PGPORT/moat"
psql_q() { psql -X -q -t -A -h 127.0.28.1 -p "$PGPORT" -U moat moat -c "$1"; }

# start_node STORE INDEX: a node on 127.0.28.(10+INDEX); waits for its own ready line.
start_node() {
    local store=$1 i=$2 ip="127.0.28.$((10 + $2))" dir="$work/node-$1-$2"
    mkdir -p "$dir"
    cat >"$dir/moat.toml" <<EOF
hostname = "node$i.bench.test"
data_dir = "$dir/data"

[[listener]]
name = "smtp"
address = "$ip:2525"
mode = "smtp"

[[domain]]
name = "sink.test"
route = "discard"

[limits]
max_connections = 2000
max_connections_per_ip = 2000

[queue]
store = "$store"
max_concurrent_deliveries = 50

[postgres]
url = "$URL"
node_id = "node$i"
pool_size = 24
EOF
    MOAT_LOG=warn "$MOAT" serve -c "$dir/moat.toml" >"$dir/out" 2>"$dir/log" &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 300); do
        grep -q "ready (pid $pid)" "$dir/out" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$dir/log" >&2; echo "node $i did not start" >&2; exit 1; }
        sleep 0.1
    done
    echo "node $i not ready in 30 s" >&2
    exit 1
}

stop_nodes() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}

declare -A rate
printf '%-9s %5s %10s %s\n' store nodes "msg/s" "per message (postgres): transactions, WAL bytes, tuples written"
for store in embedded postgres; do
    for n in $NODES; do
        if [[ $store == postgres ]]; then
            psql_q "DROP TABLE IF EXISTS moat_rcpt, moat_message, moat_node, moat_schema" >/dev/null
        fi
        for i in $(seq 1 "$n"); do start_node "$store" "$i"; done
        per=$((MESSAGES / n))
        if [[ $store == postgres ]]; then
            before="$(psql_q "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted, pg_current_wal_lsn() FROM pg_stat_database WHERE datname = 'moat'")"
        fi
        start=$(date +%s.%N)
        lg=()
        for i in $(seq 1 "$n"); do
            "$LOADGEN" "127.0.28.$((10 + i)):2525" -n "$per" -s "$SIZE" -c "$SESSIONS" \
                -t b@sink.test --threads 1 >"$work/lg-$store-$n-$i" 2>&1 &
            lg+=("$!")
        done
        for p in "${lg[@]}"; do wait "$p"; done
        end=$(date +%s.%N)
        for i in $(seq 1 "$n"); do
            grep -q "failed=0" "$work/lg-$store-$n-$i" || { cat "$work/lg-$store-$n-$i" >&2; echo "injection failed" >&2; exit 1; }
        done
        r=$(python3 -c "print(round($((per * n)) / ($end - $start)))")
        rate[$store-$n]=$r
        extra=""
        if [[ $store == postgres ]]; then
            for _ in $(seq 1 600); do
                [[ "$(psql_q "SELECT count(*) FROM moat_message")" == 0 ]] && break
                sleep 0.1
            done
            after="$(psql_q "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted, pg_current_wal_lsn() FROM pg_stat_database WHERE datname = 'moat'")"
            IFS='|' read -r x0 t0 l0 <<<"$before"
            IFS='|' read -r x1 t1 l1 <<<"$after"
            wal="$(psql_q "SELECT pg_wal_lsn_diff('$l1', '$l0')")"
            total=$((per * n))
            extra=$(python3 -c "print(f'{($x1-$x0)/$total:.2f} tx, {$wal/$total:.0f} B WAL, {($t1-$t0)/$total:.1f} tuples')")
        fi
        printf '%-9s %5s %10s %s\n' "$store" "$n" "$r" "$extra"
        stop_nodes
    done
done
echo
echo "postgres / embedded (accepted msg/s, same nodes, same run):"
for n in $NODES; do
    python3 -c "print(f'  {$n} node(s): {${rate[postgres-$n]} / ${rate[embedded-$n]}:.2f}x')"
done
