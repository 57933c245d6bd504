#!/usr/bin/env bash
# A/B: produce throughput of the broker before (base) and after (new) batch validation.
set -u
PERF=$(dirname "$0")/../target/release/spate-perf
for round in 1 2; do
for codec in none lz4 zstd; do
for size in 100 1024; do
for which in base new; do
  bin=${BASE_SPATE:?path to the spate binary to compare against}; [ $which = new ] && bin=$(dirname "$0")/../target/release/spate
  d=$(mktemp -d ${AB_DIR:-/tmp}/data.XXXX)
  $bin serve --cores 2 --listen 127.0.0.1:19092 --metrics-listen off --data-dir $d --flush interval >/dev/null 2>&1 &
  pid=$!
  for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/19092) 2>/dev/null && break; sleep 0.05; done
  out=$($PERF produce -b 127.0.0.1:19092 -t ab -p 2 -c 2 -s $size -a 1 --compression $codec -d 5 --warmup-secs 1 --json ${AB_DIR:-/tmp}/r.json 2>&1 | tail -1)
  rps=$(python3 -c "import json;print(json.load(open('${AB_DIR:-/tmp}/r.json'))['records_per_sec'])" 2>/dev/null)
  echo "round=$round codec=$codec size=$size $which records_per_sec=$rps"
  kill $pid; wait $pid 2>/dev/null; rm -rf $d
done; done; done; done
