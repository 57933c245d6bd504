#!/usr/bin/env bash
# Storage-engine benchmarks in one run: fio's sequential O_DIRECT write bandwidth on the disk the
# engine writes to (block sizes 1 KiB, 16 KiB, 1 MiB; plus a group-commit-shaped run with an
# fdatasync every 512 KiB), then the criterion append and read benches, then a table of the
# engine's figures as ratios of fio's.
#
# Usage: scripts/bench-engine.sh [criterion filter]
#   SPATE_BENCH_DIR  directory on the disk under test (default: a new dir under $TMPDIR or /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v fio >/dev/null || { echo "fio is not installed (apt-get install fio)" >&2; exit 1; }
BASE=${SPATE_BENCH_DIR:-${TMPDIR:-/tmp}}
DIR=$(mktemp -d -p "$BASE" spate-bench.XXXXXX)
export SPATE_BENCH_DIR="$DIR"
OUT="$DIR/results"
mkdir -p "$OUT"
trap 'rm -rf "$DIR"' EXIT

fio_run() { # name, extra fio args...
  local name=$1; shift
  fio --name="$name" --filename="$DIR/fio.dat" --rw=write --direct=1 --ioengine=io_uring \
    --size=1G --runtime=4 --time_based --output-format=json "$@" >"$OUT/fio-$name.json"
  rm -f "$DIR/fio.dat"
}
echo "fio: sequential O_DIRECT writes in $DIR"
fio_run 1k --bs=1k --iodepth=4
fio_run 16k --bs=16k --iodepth=4
fio_run 1m --bs=1m --iodepth=4
fio_run 16k-fdatasync512k --bs=16k --iodepth=1 --fdatasync=32

echo "criterion: engine append and read benches"
cargo bench --bench engine_append --bench engine_read -- --noplot "$@" | tee "$OUT/criterion.txt" \
  | grep -E "^(append|read)/|thrpt:" || true

python3 - "$OUT" target/criterion <<'PY'
import json, os, sys
out, crit = sys.argv[1], sys.argv[2]
def fio(name):
    j = json.load(open(os.path.join(out, f"fio-{name}.json")))
    return j["jobs"][0]["write"]["bw_bytes"] / 1e6
def bench(group, bid, nbytes):
    p = os.path.join(crit, group, bid, "new", "estimates.json")
    if not os.path.exists(p):
        return None
    ns = json.load(open(p))["mean"]["point_estimate"]
    return nbytes / ns * 1e3
ref = {"1KiB": fio("1k"), "16KiB": fio("16k"), "1MiB": fio("1m")}
best = ref["1MiB"]
synced = fio("16k-fdatasync512k")
print()
print(f"fio MB/s: 1k {ref['1KiB']:.0f}, 16k {ref['16KiB']:.0f}, 1m {best:.0f}; "
      f"16k with fdatasync every 512 KiB {synced:.0f}")
print()
print("| batch | policy | engine MB/s | / fio same block size | / fio 1 MiB | / fio synced 512 KiB |")
print("|---|---|---|---|---|---|")
for size, nbytes in [("1KiB", 1 << 10), ("16KiB", 16 << 10), ("1MiB", 1 << 20)]:
    for policy in ["always", "interval", "never"]:
        mb = bench(f"append_{size}", policy, nbytes)
        if mb is None:
            continue
        print(f"| {size} | {policy} | {mb:.0f} | {mb/ref[size]:.2f} | {mb/best:.2f} | {mb/synced:.2f} |")
for src in ["disk", "cache"]:
    mb = bench("read_sequential-1MiB-fetch", src, 1 << 20)
    if mb is not None:
        print(f"| read 1 MiB fetches | {src} | {mb:.0f} | | {mb/best:.2f} | |")
PY
