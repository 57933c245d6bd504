#!/usr/bin/env bash
# The log cleaner's benchmark: cleaner MB/s against the disk's write bandwidth, and a fixed-rate
# acks=all producer's p99 while the cleaner runs against without (docs/benchmarks.md, "Log
# cleaner"). usage: scripts/bench-cleaner.sh [--records N --keys K --rate R --seconds S
#                   --throttle-mb-s M --json FILE --dir DIR]   (see scripts/bench_cleaner.py)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin spate -p spate-perf
target_dir=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)
exec python3 scripts/bench_cleaner.py --spate "$target_dir/release/spate" \
  --perf "$target_dir/release/spate-perf" "$@"
