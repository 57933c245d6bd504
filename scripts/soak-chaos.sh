#!/usr/bin/env bash
# Soak: the fault harness (tests/chaos/) against the release binary for a chosen time.
# usage: scripts/soak-chaos.sh SECONDS [options of `python3 -m chaos.run`, e.g. --seed N,
#        --nemesis kill,pause, --flush interval, --nodes 3 (needs the cluster), --out DIR]
# Exits non-zero on any anomaly; the output directory (printed) holds history.jsonl, the seed,
# summary.json, timeline.svg and each node's log. A run's schedule replays with its --seed.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:?usage: scripts/soak-chaos.sh SECONDS [options of python3 -m chaos.run]}
shift
cargo build --release --bin spate
target_dir=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)
cd tests
exec python3 -m chaos.run --binary "$target_dir/release/spate" --duration "$seconds" "$@"
