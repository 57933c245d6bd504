#!/usr/bin/env bash
# Group coordinator start-up time with a big `__consumer_offsets` (docs/benchmarks.md, "Log
# cleaner"): commits --commits offsets over --groups groups, then times restarts after SIGKILL
# and after a clean shutdown until every group answers OffsetFetch. usage:
#   scripts/bench-group-startup.sh [--commits N --groups G --partitions P --runs R --json FILE
#                                   --spate BINARY] [-- SERVE-FLAGS]  (see bench_group_startup.py)
# Without --spate it builds and uses this checkout's release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --spate "* ]]; then
  cargo build --release --bin spate
  target_dir=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)
  set -- --spate "$target_dir/release/spate" "$@"
fi
exec python3 scripts/bench_group_startup.py "$@"
