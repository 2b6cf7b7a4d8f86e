#!/usr/bin/env bash
# Instructions per enqueue -> lease -> complete cycle, counted by callgrind.
# Two runs with different cycle counts; the difference divided by the extra
# cycles cancels start-up and runtime set-up costs.
#
# Usage: bench/callgrind-queue.sh [small] [large]
set -euo pipefail
cd "$(dirname "$0")/.."
small=${1:-20000}
large=${2:-120000}
cargo build --release -p omnirelay-bench
bin=target/release/omnirelay-bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() {
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1" "$bin" queue-cycles "$1" 2>"$out/log.$1"
  grep -E '^summary:|^totals:' "$out/cg.$1" | head -1 | awk '{print $2}'
}
a=$(count "$small")
b=$(count "$large")
echo "instructions: ${small} cycles ${a}, ${large} cycles ${b}"
echo "instructions per cycle: $(( (b - a) / (large - small) ))"
