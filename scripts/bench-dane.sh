#!/usr/bin/env bash
# DANE cost per delivery (RFC 7672), against a verified delivery without DANE: a benchmark,
# not a test. Prints medians; see examples/bench_dane.rs for what each line measures.
#
#   scripts/bench-dane.sh                        # 20,000 calls x 5 rounds
#   BENCH_CALLS=2000 BENCH_ROUNDS=3 scripts/bench-dane.sh
#   BENCH_NO_BUILD=1 scripts/bench-dane.sh       # reuse the release build
#
# Uses 127.0.0.75 (the signed zones' DNS server) only.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ ${BENCH_NO_BUILD:-} != 1 ]]; then
    cargo build --release --example bench_dane
fi
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench_dane"
