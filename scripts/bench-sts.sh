#!/usr/bin/env bash
# MTA-STS benchmark (RFC 8461, sending side). A benchmark, not a test.
#
#   scripts/bench-sts.sh                        # 5,000 messages per run, 3 repeats
#   BENCH_MESSAGES=1000 BENCH_REPEAT=1 scripts/bench-sts.sh   # quick run
#
# Environment (passed on to examples/bench_sts.rs):
#   BENCH_MESSAGES   messages per run (5000)        BENCH_REPEAT    runs per case, medians (3)
#   BENCH_SESSIONS   injection sessions (10)        BENCH_SIZE      body bytes (4096)
#   BENCH_DECISIONS  calls per micro timing (100000) BENCH_WARMUP   warm-up messages (200)
#   BENCH_STALL      seconds without progress before a run fails (30)
#   BENCH_MAX_OTHER  a run during which other processes used more than this % of the machine
#                    is run again (15), up to BENCH_TRIES attempts (3); other engineers'
#                    builds on a 2-core VM otherwise decide the 5% verdict
#   BENCH_MICRO_ONLY=1  only part 1 (no Moat process)
#   BENCH_PHASES     both (default), end-to-end or drain (see below)
#   BENCH_DATA_DIR   where the work dir and Moat's spool go (temp dir; /dev/shm: no disk syncs)
#   BENCH_KEEP=1     keep the work dir (Moat config and log)
#   BENCH_MONO_TIMES=1  print each run's interval in CLOCK_MONOTONIC seconds, to profile per
#                    case: perf record -k CLOCK_MONOTONIC -g -p <moat pid printed>, then
#                    perf report --time START,END
#   BENCH_NO_BUILD=1 skip cargo build and run the release binaries already there
#
# Uses loopback addresses 127.0.0.70-74 and port 2525 on 127.0.0.70/71 only; nothing else.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

if [[ ${BENCH_NO_BUILD:-} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --bin moat --example bench_sts)
fi
BIN=$CARGO_TARGET_DIR/release/examples/bench_sts
[[ -x $BIN ]] || { echo "bench-sts: $BIN missing (build it or unset BENCH_NO_BUILD)" >&2; exit 1; }
export MOAT_BIN=${MOAT_BIN:-$CARGO_TARGET_DIR/release/moat}

cat <<EOF
MTA-STS benchmark: what a cached policy decision costs per message, and whether relaying to a
domain with a cached enforce policy stays within 5% of relaying to a domain without a policy.
Moat $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'), $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')
1. micro: Sts::policy_for + Applied::requirement + Policy::matches_mx in a loop, caches warm
   (policy in memory, TXT answer in hickory's cache), and policy_for for a domain without a
   record (a cached NXDOMAIN: what every delivery to a domain without a policy pays).
2. throughput: the release \`moat serve\` relays ${BENCH_MESSAGES:-5000} messages of ${BENCH_SIZE:-4096} bytes (${BENCH_SESSIONS:-10} plaintext
   injection sessions) to an in-process STARTTLS sink, once to sts.bench.test (enforce policy,
   cached) and once to plain.bench.test (no policy; a [[tls_policy]] level = "verify" rule
   gives it the same verified-TLS work), ${BENCH_REPEAT:-3} time(s) each, order alternating.
   end-to-end: rate = messages at the sink / (last arrival - first injection).
   drain: the sink holds its banner while the messages are injected, then is released:
   rate = messages / (last arrival - release), i.e. delivery alone from a full queue.
   Sender CPU per message from /proc/<pid>/stat over the same interval.
   Client, sink, DNS, policy host and Moat share the machine: compare ratios, not absolutes.

EOF
exec "$BIN"
