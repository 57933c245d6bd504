#!/usr/bin/env bash
# A/B of produce throughput: a base broker binary against this tree's, alternating, a fresh
# broker and data directory per run (`--cores 2 --flush interval`), spate-perf produce with
# 2 partitions, 2 connections, acks=1, for uncompressed, lz4 and zstd batches of 100 B and
# 1 KiB records. Prints one line per run and the new/base ratio of the means per row.
#
#   BASE_SPATE=/path/to/old/spate scripts/ab-validate.sh
#
# Environment: BASE_SPATE (required), NEW_SPATE (default: this tree's release build, under
# CARGO_TARGET_DIR or target/), PERF (spate-perf, same default), AB_ROUNDS (2), AB_CODECS
# ("none lz4 zstd"), AB_SIZES ("100 1024"), AB_SECS (5 measured, after 1 s of warm-up),
# AB_DIR (where data directories go, default /tmp), AB_PORT (19092).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
base=${BASE_SPATE:?path to the spate binary to compare against}
new=${NEW_SPATE:-$target/release/spate}
perf=${PERF:-$target/release/spate-perf}
port=${AB_PORT:-19092}
dir=${AB_DIR:-/tmp}
results=$(mktemp "$dir/ab-results.XXXX")
for round in $(seq "${AB_ROUNDS:-2}"); do
for codec in ${AB_CODECS:-none lz4 zstd}; do
for size in ${AB_SIZES:-100 1024}; do
for which in base new; do
  bin=$base; [ "$which" = new ] && bin=$new
  d=$(mktemp -d "$dir/ab-data.XXXX")
  "$bin" serve --cores 2 --listen "127.0.0.1:$port" --metrics-listen off --data-dir "$d" \
    --flush interval >/dev/null 2>&1 &
  pid=$!
  # Bounded wait for the listener (50 x 0.1 s).
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  "$perf" produce -b "127.0.0.1:$port" -t ab -p 2 -c 2 -s "$size" -a 1 --compression "$codec" \
    -d "${AB_SECS:-5}" --warmup-secs 1 --json "$d.json" >/dev/null 2>&1
  rps=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['records_per_sec'])" \
    "$d.json" 2>/dev/null || echo 0)
  echo "round=$round codec=$codec size=$size $which records_per_sec=$rps" | tee -a "$results"
  kill "$pid"; wait "$pid" 2>/dev/null; rm -rf "$d" "$d.json"
done; done; done; done
python3 - "$results" <<'EOF'
import collections, re, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.search(r"codec=(\S+) size=(\S+) (base|new) records_per_sec=(\S+)", line)
    if m:
        runs[(m[1], int(m[2]), m[3])].append(float(m[4]))
print("codec size   base M rec/s        new M rec/s         new/base")
for codec, size in sorted({(c, s) for c, s, _ in runs}):
    b, n = runs[(codec, size, "base")], runs[(codec, size, "new")]
    fmt = lambda v: ", ".join(f"{x / 1e6:.2f}" for x in v)
    ratio = (sum(n) / len(n)) / (sum(b) / len(b)) if b and n and sum(b) else float("nan")
    print(f"{codec:5} {size:5}  {fmt(b):18}  {fmt(n):18}  {ratio:.2f}x")
EOF
rm -f "$results"
