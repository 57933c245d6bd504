#!/usr/bin/env bash
# The log cleaner's benchmark: cleaner MB/s against the disk's write bandwidth, and a fixed-rate
# acks=all producer's p99 while the cleaner runs against without, alternating (docs/benchmarks.md,
# "Log cleaner"). usage: scripts/bench-cleaner.sh [--records N --keys K --rate R --seconds S
#   --throttles MB,MB --rounds N --json FILE --dir DIR --spate BIN --perf BIN]
#   (see scripts/bench_cleaner.py). Without --spate/--perf it builds this checkout's binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --spate "* || " $* " != *" --perf "* ]]; then
  cargo build --release -p spate -p spate-perf
  target_dir=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)
  [[ " $* " == *" --spate "* ]] || set -- --spate "$target_dir/release/spate" "$@"
  [[ " $* " == *" --perf "* ]] || set -- --perf "$target_dir/release/spate-perf" "$@"
fi
exec python3 scripts/bench_cleaner.py "$@"
