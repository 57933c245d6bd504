#!/usr/bin/env bash
# The benchmark suite (issue 6): disk limit (fio), spate produce / consume / e2e, and the same
# produce and e2e runs against the peer broker (Tansu) when it is installed.
#
#   perf/bench.sh [--quick] [--secs N] [--out DIR] [--no-peer] [--no-spate]
#
# Every load runs against 127.0.0.1 and is bounded in time (--secs per run, default 10; --quick
# is 3). Results: DIR/*.json (one per run, spate-perf --json), DIR/results.md (the table, with
# ratios against fio and the peer), DIR/latency.svg (e2e percentile curves). DIR defaults to
# target/bench/<UTC time>.
#
# Environment:
#   TANSU     path of the tansu binary (default: `tansu` on PATH, else /work/tansu-build/root/bin)
#   BENCH_DIR where brokers and fio write (default: a fresh directory under target/; it must be on
#             a filesystem with O_DIRECT, such as ext4 or xfs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=10
QUICK=0
OUT=""
RUN_PEER=1
RUN_SPATE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; SECS=3 ;;
    --secs) SECS="${2:?--secs needs a number}"; shift ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --no-peer) RUN_PEER=0 ;;
    --no-spate) RUN_SPATE=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$SECS" in ''|*[!0-9]*) echo "bench.sh: --secs must be a whole number" >&2; exit 2 ;; esac
[ "$SECS" -ge 1 ] && [ "$SECS" -le 600 ] || { echo "bench.sh: --secs must be 1..600" >&2; exit 2; }

OUT=${OUT:-$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
mkdir -p "$ROOT/target"
WORK=${BENCH_DIR:-$(mktemp -d "$ROOT/target/bench-work.XXXXXX")}
mkdir -p "$WORK"
PERF=$ROOT/target/release/spate-perf
SPATE=$ROOT/target/release/spate
SPATE_PORT=19092
PEER_PORT=19093
WARMUP=1
PARTITIONS=2
CONNECTIONS=2
E2E_RECORD_BYTES=1024
# A broker must accept connections within this many seconds of starting.
START_TIMEOUT_SECS=30
BROKER_PID=""

log() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }

stop_broker() {
  if [ -n "$BROKER_PID" ]; then
    kill "$BROKER_PID" 2>/dev/null || true
    # Bounded wait, then force.
    for _ in $(seq 50); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
  fi
}

cleanup() {
  stop_broker
  if [ -z "${BENCH_DIR:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

wait_port() {
  local port=$1 deadline=$((SECONDS + START_TIMEOUT_SECS))
  while [ $SECONDS -lt $deadline ]; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if [ -n "$BROKER_PID" ] && ! kill -0 "$BROKER_PID" 2>/dev/null; then
      log "broker exited during start-up"; return 1
    fi
    sleep 0.2
  done
  log "nothing listens on 127.0.0.1:$port after ${START_TIMEOUT_SECS}s"
  return 1
}

# Records per batch as in the Iggy comparison (1,000), capped at 1 MB of values so a batch stays
# under the brokers' 1 MiB batch limit.
batch_bytes() { local b=$(( $1 * 1000 )); [ $b -gt 1000000 ] && b=1000000; echo $b; }

FAILED=()
# perf NAME ARGS...: one spate-perf run, its JSON in $OUT/NAME.json and output in $OUT/NAME.txt.
perf() {
  local name=$1; shift
  log "$name: spate-perf $*"
  if timeout $((SECS * 3 + 60)) "$PERF" "$@" --label "$name" --json "$OUT/$name.json" \
      > "$OUT/$name.txt" 2>&1; then
    tail -n 1 "$OUT/$name.txt" >&2
  else
    log "$name FAILED: $(tail -n 2 "$OUT/$name.txt" | tr '\n' ' ')"
    FAILED+=("$name")
    rm -f "$OUT/$name.json"
  fi
}

records_per_sec() { jq -r '.records_per_sec' "$OUT/$1.json" 2>/dev/null || echo 0; }

drop_page_cache() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then echo 1 > /proc/sys/vm/drop_caches; return 0; fi
  log "cannot drop the page cache (not root): 'disk' consume may be served from memory"
}

machine() {
  local model disk fs
  model=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
  disk=$(df -P "$WORK" | awk 'NR==2 {print $1}')
  fs=$(df -PT "$WORK" | awk 'NR==2 {print $2}')
  jq -n --arg cpu "$model" --arg cores "$(nproc)" --arg kernel "$(uname -r)" \
    --arg mem "$(free -g | awk '/Mem:/ {print $2}') GiB" --arg disk "$disk" --arg fs "$fs" \
    --arg rotational "$(cat "/sys/block/$(basename "$disk" | sed 's/[0-9]*$//')/queue/rotational" 2>/dev/null || echo '?')" \
    --arg secs "$SECS" --arg quick "$QUICK" \
    '{cpu:$cpu, cores:($cores|tonumber), kernel:$kernel, memory:$mem, disk:$disk, filesystem:$fs,
      rotational:$rotational, secs_per_run:($secs|tonumber), quick:($quick=="1")}' \
    > "$OUT/machine.json"
}

run_fio() {
  log "fio: sequential O_DIRECT write bandwidth"
  fio --name=seqwrite --directory="$WORK" --rw=write --bs=1M --size=2G --direct=1 \
    --ioengine=io_uring --iodepth=16 --runtime="$SECS" --time_based --output-format=json \
    > "$OUT/fio-seqwrite.json"
  log "fio: 4 KiB write + fdatasync latency"
  fio --name=syncwrite --directory="$WORK" --rw=write --bs=4k --size=256M --direct=1 \
    --ioengine=psync --fdatasync=1 --runtime="$SECS" --time_based --output-format=json \
    > "$OUT/fio-syncwrite.json"
  rm -f "$WORK"/seqwrite.* "$WORK"/syncwrite.*
}

# start_spate FLUSH: a fresh spate broker on $SPATE_PORT, data in $WORK/spate, flush policy FLUSH.
start_spate() {
  local flush=$1 fresh=${2:-fresh}
  [ "$fresh" = fresh ] && rm -rf "$WORK/spate"
  mkdir -p "$WORK/spate"
  "$SPATE" serve --listen "127.0.0.1:$SPATE_PORT" --data-dir "$WORK/spate" --flush "$flush" \
    >> "$OUT/spate-broker.log" 2>&1 &
  BROKER_PID=$!
  wait_port "$SPATE_PORT"
}

start_peer() {
  rm -rf "$WORK/tansu"
  mkdir -p "$WORK/tansu"
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$PEER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PEER_PORT" \
    --storage-engine "sqlite://$WORK/tansu/tansu.db" \
    >> "$OUT/tansu-broker.log" 2>&1 &
  BROKER_PID=$!
  wait_port "$PEER_PORT"
}

# produce_matrix TARGET ADDR FLUSH: 100 B / 1 KiB / 16 KiB records x acks 1 / -1.
produce_matrix() {
  local target=$1 addr=$2 flush=$3
  for acks in 1 -1; do
    for size in 100 1024 16384; do
      local name="$target-produce-${size}B-acks${acks}-$flush"
      perf "$name" produce -b "$addr" -t "$name" -p $PARTITIONS -c $CONNECTIONS -s "$size" \
        --batch-bytes "$(batch_bytes "$size")" --acks "$acks" --duration-secs "$SECS" \
        --warmup-secs $WARMUP
    done
  done
}

# e2e TARGET ADDR MAX_RUN: e2e at half the records/s of run MAX_RUN, acks=-1.
e2e_at_half() {
  local target=$1 addr=$2 max_run=$3
  local max rate
  max=$(records_per_sec "$max_run")
  rate=$(jq -n --argjson m "${max:-0}" '($m / 2) | floor')
  if [ "${rate:-0}" -lt 1 ]; then
    log "$target e2e skipped: no max rate from $max_run"; FAILED+=("$target-e2e"); return
  fi
  perf "$target-e2e" e2e -b "$addr" -t "$target-e2e" -p $PARTITIONS -c $CONNECTIONS \
    -s $E2E_RECORD_BYTES --batch-bytes "$(batch_bytes $E2E_RECORD_BYTES)" --acks -1 \
    --rate "$rate" --duration-secs "$SECS" --warmup-secs $WARMUP --fetch-max-wait-ms 100
}

log "building spate and spate-perf (release)"
cargo build --release -p spate -p spate-perf --bins >&2
machine
run_fio

if [ "$RUN_SPATE" = 1 ]; then
  if "$SPATE" serve --help >/dev/null 2>&1; then
    for flush in interval always; do
      start_spate "$flush"
      produce_matrix spate "127.0.0.1:$SPATE_PORT" "$flush"
      if [ "$flush" = interval ]; then
        src="spate-produce-1024B-acks1-interval"
        perf spate-consume-cache consume -b "127.0.0.1:$SPATE_PORT" -t "$src" -c $CONNECTIONS \
          --from earliest
        stop_broker
        drop_page_cache
        start_spate "$flush" keep
        perf spate-consume-disk consume -b "127.0.0.1:$SPATE_PORT" -t "$src" -c $CONNECTIONS \
          --from earliest
      else
        e2e_at_half spate "127.0.0.1:$SPATE_PORT" "spate-produce-${E2E_RECORD_BYTES}B-acks-1-always"
      fi
      stop_broker
    done
  else
    log "the spate binary has no 'serve' command yet: spate rows skipped"
    FAILED+=("spate (no broker)")
  fi
fi

if [ "$RUN_PEER" = 1 ]; then
  TANSU=${TANSU:-$(command -v tansu || echo /work/tansu-build/root/bin/tansu)}
  if [ -x "$TANSU" ]; then
    start_peer
    produce_matrix tansu "127.0.0.1:$PEER_PORT" sqlite
    e2e_at_half tansu "127.0.0.1:$PEER_PORT" "tansu-produce-${E2E_RECORD_BYTES}B-acks-1-sqlite"
    stop_broker
  else
    log "tansu not installed (cargo install tansu --features libsql): peer rows skipped"
  fi
fi

e2e_runs=()
for f in "$OUT"/*-e2e.json; do [ -e "$f" ] && e2e_runs+=("$f"); done
if [ ${#e2e_runs[@]} -gt 0 ]; then
  "$PERF" plot --out "$OUT/latency.svg" --title "e2e latency, acks=-1, half of max rate" \
    "${e2e_runs[@]}" || log "plot failed"
fi
python3 "$ROOT/perf/bench_report.py" "$OUT" > "$OUT/results.md"
cat "$OUT/results.md"
if [ ${#FAILED[@]} -gt 0 ]; then
  log "runs that failed or were skipped: ${FAILED[*]}"
fi
log "results in $OUT"
