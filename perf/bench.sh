#!/usr/bin/env bash
# The benchmark suite (issue 6): disk limit (fio), spate produce / consume / e2e, and the same
# produce and e2e runs against the peer broker (Tansu) when it is installed; then the replicated
# section (issue 17): three `spate serve --cores 1` nodes on 127.0.0.1.
#
#   perf/bench.sh [--quick] [--secs N] [--out DIR] [--no-peer] [--no-spate] [--no-cluster]
#   perf/bench.sh cluster [--secs N] [--out DIR]     # fio and the replicated section alone
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
#   BENCH_SEGMENT_BYTES  the spate broker's --segment-bytes (default 1073741824, its own default)
#   BENCH_FIO_NEAR_SECS  seconds of the fio sequential-write run made just before every produce
#             run (default 3; 0 turns it off): the disk of a virtual machine follows its host,
#             so a reference measured minutes earlier can be off by a third
#   BENCH_SPATE, BENCH_PERF  the broker and load-generator binaries (default: target/release/),
#             so that two builds can be compared in one session
#   BENCH_E2E_RUNS  how many spate e2e runs, each on a fresh broker (default 3)
#   BENCH_CLUSTER_E2E_LINGER_MS, BENCH_CLUSTER_E2E_BATCH_BYTES  the producer's linger and batch
#             size in the cluster e2e runs (default 5 ms and 1 MB, as the single-node e2e; at
#             half the replicated maximum over 6 partitions a 1 MB batch takes about 30 ms to
#             fill, so most records wait out the whole linger)
#   BENCH_CLUSTER_PARTS   which parts of the replicated section run (default "rows e2e failover
#             idle many catchup"); with --out of an earlier run, its fio result is reused
#   BENCH_MANY_SHAPES     batch shapes of the 6 vs 1,000 partitions pair (default "mixed 16384
#             65536": the 1 MB vs 6 KB batches pair, then both rows at 16 KiB and at 64 KiB)
#   BENCH_IDLE_PROFILE    set: after the idle measurement, `perf record` node 1 for 15 s into
#             DIR/cluster-idle-node1.perf.data and a flat report beside it
#   BENCH_NODE_FLUSH      every cluster node's --flush (default always)
#   BENCH_NODE_ARGS       more arguments for every cluster node, split on spaces (for example
#             "--thread-affinity false": three `--cores 1` nodes otherwise all pin their shard to
#             CPU 0)
#   BENCH_NODE_CPUSETS    each cluster node's --cpuset, for nodes 1, 2, 3 in order, split on
#             spaces (for example "0 1 0" spreads the three one-core nodes over both CPUs)
#   BENCH_FAILOVER_KILLS  leader kills in the failover run (default 20)
#   BENCH_FAILOVER_RATE   its fixed rate, records/s of 1 KiB (default 20000)
#   BENCH_CATCHUP_GB      what the restarted follower misses, GB of record values (default 5)
#   BENCH_CATCHUP_RATE    the fixed rate whose p99 is compared with and without the catch-up,
#             records/s of 1 KiB (default 20000)
#   BENCH_CATCHUP_THROTTLE  the nodes' --replication-throttle-bytes-per-sec in the catch-up run
#             (default: the broker's default; 0 = unthrottled)
#   BENCH_MAX_BYTES_PER_RUN  a produce run also stops after this many bytes of record values
#             (default 12000000000, or a third of the free space if less), so a fast broker
#             cannot fill the disk, yet measures a few seconds; each spate run gets a
#             fresh data directory, deleted after it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECS=10
QUICK=0
OUT=""
RUN_PEER=1
RUN_SPATE=1
RUN_CLUSTER=1
while [ $# -gt 0 ]; do
  case "$1" in
    cluster) RUN_SPATE=0; RUN_PEER=0; RUN_CLUSTER=1 ;;
    --no-cluster) RUN_CLUSTER=0 ;;
    --quick) QUICK=1; SECS=3 ;;
    --secs) SECS="${2:?--secs needs a number}"; shift ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --no-peer) RUN_PEER=0 ;;
    --no-spate) RUN_SPATE=0 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
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
PERF=${BENCH_PERF:-$ROOT/target/release/spate-perf}
SPATE=${BENCH_SPATE:-$ROOT/target/release/spate}
# Long enough that the fastest rows measure seconds, not a fraction of one after warm-up.
DEFAULT_MAX_BYTES_PER_RUN=12000000000
if [ -n "${BENCH_MAX_BYTES_PER_RUN:-}" ]; then
  MAX_BYTES_PER_RUN=$BENCH_MAX_BYTES_PER_RUN
else
  third_free=$(( $(df -PB1 "$WORK" | awk 'NR==2 {print $4}') / 3 ))
  MAX_BYTES_PER_RUN=$(( third_free < DEFAULT_MAX_BYTES_PER_RUN ? third_free : DEFAULT_MAX_BYTES_PER_RUN ))
fi
WARMUP=0.5
FIO_NEAR_SECS=${BENCH_FIO_NEAR_SECS:-3}
E2E_RUNS=${BENCH_E2E_RUNS:-3}
case "$E2E_RUNS" in ''|*[!0-9]*|0) echo "bench.sh: BENCH_E2E_RUNS must be 1 or more" >&2; exit 2 ;; esac
case "$FIO_NEAR_SECS" in ''|*[!0-9]*) echo "bench.sh: BENCH_FIO_NEAR_SECS must be a whole number" >&2; exit 2 ;; esac
PARTITIONS=2
CONNECTIONS=2
E2E_RECORD_BYTES=1024
# The broker's default segment size (1 GiB, Kafka's too): the engine pre-allocates only 16 MiB
# ahead of the write position, so large segments cost no disk up front. Override with
# BENCH_SEGMENT_BYTES (256 MiB was used until 2026-11-22 04:12 UTC; smaller segments roll more
# often, and each roll holds appends for about a millisecond).
SEGMENT_BYTES=${BENCH_SEGMENT_BYTES:-1073741824}
# A broker must accept connections within this many seconds of starting.
START_TIMEOUT_SECS=30
BROKER_PID=""

log() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }

# A port nobody listens on now. Brokers bind with SO_REUSEPORT, so a fixed port could silently
# be shared with another broker on the machine and split our connections between the two.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

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
  stop_cluster
  if [ -z "${BENCH_DIR:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
# A signal ends the suite (the EXIT trap cleans up); without the exit the script would go on.
trap 'exit 130' INT TERM

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
  if timeout "${PERF_TIMEOUT:-$((SECS * 3 + 60))}" "$PERF" "$@" --label "$name" --json "$OUT/$name.json" \
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

# remove PATH...: deletes what a run left behind, then waits until the file system has let go of
# it. This disk is mounted with online discard: ext4 discards freed blocks when the journal
# commits, and a commit that a run's fdatasync needs waited behind the discards of the previous
# run's 12 GB (e2e stalls of 10-30 ms right after a deletion). syncfs waits for that commit.
remove() {
  rm -rf "$@"
  local t0=$SECONDS
  sync -f "$WORK"
  [ $((SECONDS - t0)) -lt 2 ] || log "the file system took $((SECONDS - t0)) s to release deleted data"
}

# fio_seqwrite SECS FILE: the disk's sequential O_DIRECT write bandwidth, as fio JSON in FILE.
fio_seqwrite() {
  fio --name=seqwrite --directory="$WORK" --rw=write --bs=1M --size=1G --direct=1 \
    --ioengine=io_uring --iodepth=16 --runtime="$1" --time_based --output-format=json \
    > "$2"
  remove "$WORK"/seqwrite.*
}

# fio_near NAME: the same fio run, shorter, just before produce run NAME; its ratio to the disk
# is taken against this one (see BENCH_FIO_NEAR_SECS).
fio_near() {
  [ "$FIO_NEAR_SECS" -gt 0 ] || return 0
  fio_seqwrite "$FIO_NEAR_SECS" "$OUT/fio-near-$1.json" \
    || { log "fio before $1 failed"; rm -f "$OUT/fio-near-$1.json"; }
}

run_fio() {
  log "fio: sequential O_DIRECT write bandwidth"
  fio_seqwrite "$SECS" "$OUT/fio-seqwrite.json"
  log "fio: 4 KiB write + fdatasync latency"
  fio --name=syncwrite --directory="$WORK" --rw=write --bs=4k --size=64M --direct=1 \
    --ioengine=psync --fdatasync=1 --runtime="$SECS" --time_based --output-format=json \
    > "$OUT/fio-syncwrite.json"
  remove "$WORK"/seqwrite.* "$WORK"/syncwrite.*
}

# start_spate FLUSH [keep]: a spate broker on a free port (in $ADDR), data in $WORK/spate (wiped
# unless "keep"), flush policy FLUSH.
start_spate() {
  local flush=$1 fresh=${2:-fresh} port
  if [ "$fresh" = fresh ]; then remove "$WORK/spate"; fi
  mkdir -p "$WORK/spate"
  port=$(free_port)
  "$SPATE" serve --listen "127.0.0.1:$port" --data-dir "$WORK/spate" --flush "$flush" \
    --segment-bytes $SEGMENT_BYTES \
    >> "$OUT/spate-broker.log" 2>&1 &
  BROKER_PID=$!
  ADDR="127.0.0.1:$port"
  wait_port "$port"
}

start_peer() {
  local port
  remove "$WORK/tansu"
  mkdir -p "$WORK/tansu"
  port=$(free_port)
  # Tansu reads the sqlite URL's path relative to its working directory.
  (cd "$WORK/tansu" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "sqlite://tansu.db" \
    >> "$OUT/tansu-broker.log" 2>&1) &
  BROKER_PID=$!
  ADDR="127.0.0.1:$port"
  wait_port "$port"
}

# Refuses to start a run that could fill the (shared) disk: it needs twice the per-run cap free.
enough_space() {
  local avail
  avail=$(df -PB1 "$WORK" | awk 'NR==2 {print $4}')
  if [ "$avail" -lt $((MAX_BYTES_PER_RUN * 2)) ]; then
    log "only $avail bytes free under $WORK: skipping $1 (needs $((MAX_BYTES_PER_RUN * 2)))"
    FAILED+=("$1 (disk full)")
    return 1
  fi
}

# produce NAME SIZE ACKS: one produce run against $ADDR.
produce() {
  local name=$1 size=$2 acks=$3
  enough_space "$name" || return 0
  fio_near "$name"
  perf "$name" produce -b "$ADDR" -t "$name" -p $PARTITIONS -c $CONNECTIONS -s "$size" \
    --batch-bytes "$(batch_bytes "$size")" --acks "$acks" --duration-secs "$SECS" \
    --warmup-secs $WARMUP --records $((MAX_BYTES_PER_RUN / size))
}

# e2e TARGET MAX_RUN [RUN_NAME]: e2e against $ADDR at half the records/s of run MAX_RUN,
# acks=-1; the run is named RUN_NAME (default TARGET-e2e).
e2e_at_half() {
  local target=$1 max_run=$2 run=${3:-$1-e2e}
  local max rate
  max=$(records_per_sec "$max_run")
  rate=$(jq -n --argjson m "${max:-0}" '($m / 2) | floor')
  if [ "${rate:-0}" -lt 1 ]; then
    log "$run skipped: no max rate from $max_run"; FAILED+=("$run"); return
  fi
  enough_space "$run" || return 0
  perf "$run" e2e -b "$ADDR" -t "$run" -p $PARTITIONS -c $CONNECTIONS \
    -s $E2E_RECORD_BYTES --batch-bytes "$(batch_bytes $E2E_RECORD_BYTES)" --acks -1 \
    --rate "$rate" --duration-secs "$SECS" --warmup-secs $WARMUP --fetch-max-wait-ms 100 \
    --records $((MAX_BYTES_PER_RUN / E2E_RECORD_BYTES))
}

# ---- The replicated section: three nodes on this machine ----------------------------------

# Three `spate serve --cores 1` nodes (3 nodes on 2 cores: each node's shard is one thread, as
# a one-core node of a real cluster; the cluster service thread is unpinned), flush `always`,
# data under $WORK/cluster/n<ID> on the same disk as the single-node runs.
C_PARTITIONS=6
C_CONNECTIONS=6
FAILOVER_KILLS=${BENCH_FAILOVER_KILLS:-20}
FAILOVER_RATE=${BENCH_FAILOVER_RATE:-20000}
CATCHUP_GB=${BENCH_CATCHUP_GB:-5}
CATCHUP_RATE=${BENCH_CATCHUP_RATE:-20000}
CATCHUP_THROTTLE=${BENCH_CATCHUP_THROTTLE:-}
for v in FAILOVER_KILLS FAILOVER_RATE CATCHUP_GB CATCHUP_RATE; do
  case "${!v}" in ''|*[!0-9]*) echo "bench.sh: BENCH_$v must be a whole number" >&2; exit 2 ;; esac
done
# How long a node may take to rejoin, and a partition to get a leader and a full ISR.
CLUSTER_READY_SECS=60
declare -a NODE_PID NODE_PORT NODE_RPC
# Settings added to every node's command line (the catch-up run's throttle).
NODE_EXTRA_ARGS=()
CADDR=""
SEEDS=""

start_node() {
  local i=$1
  local sets=(${BENCH_NODE_CPUSETS:-}) cpuset=()
  [ -z "${sets[$((i - 1))]:-}" ] || cpuset=(--cpuset "${sets[$((i - 1))]}")
  mkdir -p "$WORK/cluster/n$i"
  "$SPATE" serve --node-id "$i" --listen "127.0.0.1:${NODE_PORT[$i]}" \
    --rpc-listen "127.0.0.1:${NODE_RPC[$i]}" --seeds "$SEEDS" --data-dir "$WORK/cluster/n$i" \
    --cores 1 --flush "${BENCH_NODE_FLUSH:-always}" --segment-bytes "$NODE_SEGMENT_BYTES" \
    --max-batch-bytes "$NODE_MAX_BATCH_BYTES" --metrics-listen off \
    ${cpuset[@]+"${cpuset[@]}"} ${NODE_EXTRA_ARGS[@]+"${NODE_EXTRA_ARGS[@]}"} ${BENCH_NODE_ARGS:-} \
    >> "$OUT/cluster-node$i.log" 2>&1 &
  NODE_PID[$i]=$!
}

kill_node() {
  local i=$1
  [ -n "${NODE_PID[$i]:-}" ] || return 0
  kill -9 "${NODE_PID[$i]}" 2>/dev/null || true
  wait "${NODE_PID[$i]}" 2>/dev/null || true
  NODE_PID[$i]=""
}

# alive_nodes: how many brokers the cluster lists as alive (0 if nobody answers).
alive_nodes() {
  "$SPATE" cluster info -b "$CADDR" --json 2>/dev/null \
    | jq '[.brokers[] | select(.alive)] | length' 2>/dev/null || echo 0
}

wait_alive() {
  local want=$1 deadline=$((SECONDS + CLUSTER_READY_SECS))
  while [ "$(alive_nodes)" != "$want" ]; do
    [ $SECONDS -lt $deadline ] || { log "cluster: $want nodes not alive after ${CLUSTER_READY_SECS}s"; return 1; }
    sleep 0.2
  done
}

# start_cluster [SEGMENT_BYTES MAX_BATCH_BYTES]: a fresh cluster (default: SEGMENT_BYTES and
# the broker's default largest batch, 8 MiB).
start_cluster() {
  stop_cluster
  NODE_SEGMENT_BYTES=${1:-$SEGMENT_BYTES}
  NODE_MAX_BATCH_BYTES=${2:-8388608}
  remove "$WORK/cluster"
  local i seeds=() addrs=()
  for i in 1 2 3; do
    NODE_PORT[$i]=$(free_port); NODE_RPC[$i]=$(free_port)
    seeds+=("$i@127.0.0.1:${NODE_RPC[$i]}"); addrs+=("127.0.0.1:${NODE_PORT[$i]}")
  done
  SEEDS=$(IFS=,; echo "${seeds[*]}")
  CADDR=$(IFS=,; echo "${addrs[*]}")
  for i in 1 2 3; do start_node "$i"; done
  wait_alive 3
}

stop_cluster() {
  local i
  for i in 1 2 3; do
    [ -n "${NODE_PID[$i]:-}" ] || continue
    kill "${NODE_PID[$i]}" 2>/dev/null || true
  done
  for i in 1 2 3; do
    [ -n "${NODE_PID[$i]:-}" ] || continue
    for _ in $(seq 50); do kill -0 "${NODE_PID[$i]}" 2>/dev/null || break; sleep 0.1; done
    kill_node "$i"
  done
}

# describe TOPIC: the topic's partitions as JSON lines {partition, leader, isr}.
describe() {
  "$SPATE" topic describe "$1" -b "$CADDR" --json 2>/dev/null \
    | jq -c '(if type == "array" then .[0] else . end).partitions[] | {partition, leader, isr}'
}

# wait_topic TOPIC ISR [SECS]: until every partition has a leader and ISR members (at most SECS,
# default CLUSTER_READY_SECS).
wait_topic() {
  local topic=$1 isr=$2 deadline=$((SECONDS + ${3:-$CLUSTER_READY_SECS})) lines bad
  while :; do
    lines=$(describe "$topic" || true)
    bad=$(printf '%s\n' "$lines" | jq -s --argjson n "$isr" \
      'if length == 0 then 1 else map(select(.leader < 0 or (.isr | length) < $n)) | length end')
    [ "$bad" = 0 ] && return 0
    [ $SECONDS -lt $deadline ] || { log "$topic: not every partition led with $isr in sync after ${3:-$CLUSTER_READY_SECS}s"; return 1; }
    sleep 0.2
  done
}

# wait_preferred TOPIC SECS: until every partition is led by its first (preferred) replica.
wait_preferred() {
  local topic=$1 deadline=$((SECONDS + $2)) off
  while :; do
    off=$("$SPATE" topic describe "$topic" -b "$CADDR" --json 2>/dev/null \
      | jq '[(if type == "array" then .[0] else . end).partitions[]
             | select(.leader != .replicas[0])] | length' 2>/dev/null || echo -1)
    [ "$off" = 0 ] && return 0
    [ $SECONDS -lt $deadline ] || { log "$topic: $off partitions not on their preferred leader after $2s"; return 1; }
    sleep 1
  done
}

# create_topic TOPIC PARTITIONS [SECS]
create_topic() {
  "$SPATE" topic create "$1" --partitions "$2" --replication-factor 3 -b "$CADDR" \
    > /dev/null && wait_topic "$1" 3 "${3:-}"
}

# Each replica pre-allocates up to 16 MiB of its segment (the engine's PREALLOCATE_AHEAD_BYTES,
# capped at the segment size): 3,000 partitions x 3 replicas would take 141 GiB of this disk
# at the default segment size, 1,000 x 3 47 GiB. A segment must hold the largest batch
# (--max-batch-bytes, 8 MiB by default) with room to spare, so the idle run uses 2 MiB
# segments and 1 MiB batches (it produces nothing; 18 GiB pre-allocated), the 6 vs 1,000
# partitions pair 4 MiB segments and 2 MiB batches (both rows, so they compare; spate-perf's
# batches here are at most 1 MB).
IDLE_SEGMENT_BYTES=2097152
IDLE_MAX_BATCH_BYTES=1048576
MANY_SEGMENT_BYTES=4194304
MANY_MAX_BATCH_BYTES=2097152
# Many partitions take longer to elect than a few: the bound for the 1,000 and 3,000 ones.
MANY_READY_SECS=${BENCH_MANY_READY_SECS:-300}
# How long a produce run waits for the balancer to put every partition on its preferred leader.
MANY_SETTLE_SECS=${BENCH_MANY_SETTLE_SECS:-90}

# cluster_produce NAME ADDR ACKS [ARGS...]: the 1 KiB flush-always produce row, C_PARTITIONS
# partitions over C_CONNECTIONS connections.
produce_row() {
  local name=$1 addr=$2 acks=$3; shift 3
  enough_space "$name" || return 0
  fio_near "$name"
  perf "$name" produce -b "$addr" -t "$name" -p $C_PARTITIONS -c $C_CONNECTIONS -s 1024 \
    --batch-bytes "$(batch_bytes 1024)" --acks "$acks" --duration-secs "$SECS" \
    --warmup-secs $WARMUP --records $((MAX_BYTES_PER_RUN / 3 / 1024)) "$@"
}

# cpu_ticks PID: user + system clock ticks of a process so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# idle_cpu NAME SECS: each node's CPU, % of one core, over SECS seconds, to $OUT/NAME.json.
idle_cpu() {
  local name=$1 secs=$2 i hz before=() after=()
  hz=$(getconf CLK_TCK)
  for i in 1 2 3; do before[$i]=$(cpu_ticks "${NODE_PID[$i]}"); done
  sleep "$secs"
  for i in 1 2 3; do after[$i]=$(cpu_ticks "${NODE_PID[$i]}"); done
  jq -n --argjson secs "$secs" --argjson hz "$hz" \
    --argjson d "[$((after[1] - before[1])), $((after[2] - before[2])), $((after[3] - before[3]))]" \
    '{secs: $secs, cpu_pct_of_one_core: [$d[] / $hz / $secs * 100]}' > "$OUT/$name.json"
  log "$name: $(jq -c .cpu_pct_of_one_core "$OUT/$name.json") % of one core per node"
}

# node_of_leader TOPIC PARTITION: the id of the node leading it (-1: none).
node_of_leader() {
  describe "$1" | jq -r --argjson p "$2" 'select(.partition == $p) | .leader'
}

failover_run() {
  local name=cluster-failover k leader t_kill secs pid
  start_cluster || { FAILED+=("$name (cluster)"); return; }
  create_topic "$name" 1 || { FAILED+=("$name (topic)"); stop_cluster; return; }
  : > "$OUT/$name-kills.txt"
  # A kill cycle: 3 s steady, kill, 2 s, restart, back in the ISR, ~10 s in all.
  secs=$((FAILOVER_KILLS * 12 + 10))
  log "$name: $FAILOVER_KILLS leader kills under a fixed-rate idempotent producer, at most ${secs}s"
  timeout $((secs + 120)) "$PERF" produce -b "$CADDR" -t "$name" -c 1 -s 1024 --acks all \
    --idempotent --rate "$FAILOVER_RATE" --duration-secs "$secs" --label "$name" \
    --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 &
  pid=$!
  SECONDS_START_FAILOVER=$SECONDS
  for k in $(seq "$FAILOVER_KILLS"); do
    sleep 3
    if [ $((SECONDS + 12)) -ge $((SECONDS_START_FAILOVER + secs)) ]; then
      log "$name: stopping after $((k - 1)) kills (the run is ending)"; break
    fi
    leader=$(node_of_leader "$name" 0)
    case "$leader" in 1|2|3) ;; *) log "$name: no leader to kill ($leader)"; continue ;; esac
    t_kill=$(date +%s%3N)
    kill_node "$leader"
    echo "$t_kill $leader" >> "$OUT/$name-kills.txt"
    sleep 2
    start_node "$leader"
    wait_topic "$name" 3 || break
  done
  wait "$pid" || { log "$name FAILED: $(tail -n 2 "$OUT/$name.txt" | tr '\n' ' ')"; FAILED+=("$name"); }
  tail -n 1 "$OUT/$name.txt" >&2
  stop_cluster
}

idle_run() {
  start_cluster $IDLE_SEGMENT_BYTES $IDLE_MAX_BATCH_BYTES || { FAILED+=("cluster-idle (cluster)"); return; }
  sleep 5
  idle_cpu cluster-idle-empty 20
  log "cluster-idle: creating 3,000 partitions, replication factor 3"
  local t0=$SECONDS ready=true
  # Measured even if the partitions are not all led by then: that cost is what 3,000 cost.
  create_topic cluster-idle 3000 "$MANY_READY_SECS" || { ready=false; FAILED+=("cluster-idle (not all led)"); }
  local ready_secs=$((SECONDS - t0)) balanced=true
  log "cluster-idle: all led with 3 in sync: $ready, after ${ready_secs}s"
  # The leader balancer moves leaders to their preferred replicas in rounds (every 30 s):
  # leadership moves are not the steady state, so the measurement starts once it is done.
  wait_preferred cluster-idle "$MANY_READY_SECS" || balanced=false
  log "cluster-idle: every partition led by its preferred replica: $balanced, after $((SECONDS - t0))s"
  echo "{\"ready\": $ready, \"secs\": $ready_secs, \"balanced\": $balanced, \"balanced_secs\": $((SECONDS - t0))}" \
    > "$OUT/cluster-idle-create.json"
  sleep 10
  idle_cpu cluster-idle-3000 20
  if [ -n "${BENCH_IDLE_PROFILE:-}" ] && command -v perf >/dev/null 2>&1; then
    # After the measurement, not during it: sampling costs the sampled process. (`command`:
    # the function `perf` below runs spate-perf.)
    log "cluster-idle: profiling node 1 for 15 s"
    command perf record -F 999 -g -p "${NODE_PID[1]}" -o "$OUT/cluster-idle-node1.perf.data" \
      -- sleep 15 > /dev/null 2>&1 || true
    command perf report -i "$OUT/cluster-idle-node1.perf.data" --stdio --no-children \
      --percent-limit 0.5 --sort sym > "$OUT/cluster-idle-node1-profile.txt" 2>/dev/null || true
  fi
  stop_cluster
}

# leaderships: "became leader" lines in the node logs so far (they are appended to across
# cluster runs, so a difference counts what happened in between).
leaderships() {
  cat "$OUT"/cluster-node[123].log 2>/dev/null | grep -c "became leader" || true
}

many_partitions_run() {
  # Three connections (one per leader) in every row. Shapes (BENCH_MANY_SHAPES):
  #   mixed: about 2 MB of values per request in both rows (6 partitions: two 1 MB batches;
  #          1,000: 333 batches of 5 records), so the rows differ in batch size as well;
  #   BYTES: both rows with batches of BYTES (16384 is Kafka's default batch.size; a producer
  #          with the sticky partitioner, KIP-480, fills one partition's batch at a time, so
  #          1,000 partitions need not mean small batches). Rows cluster-produce-p6-bBYTES.
  local n shape bb name before taken
  for shape in ${BENCH_MANY_SHAPES:-mixed 16384 65536}; do
    for n in 6 1000; do
      if [ "$shape" = mixed ]; then
        name=cluster-produce-p$n
        bb=$([ "$n" = 6 ] && batch_bytes 1024 || echo 6000)
      else
        name=cluster-produce-p$n-b$shape
        bb=$shape
      fi
      start_cluster $MANY_SEGMENT_BYTES $MANY_MAX_BATCH_BYTES || { FAILED+=("$name (cluster)"); continue; }
      create_topic "cluster-p$n" "$n" "$MANY_READY_SECS" \
        || { FAILED+=("$name (topic)"); stop_cluster; continue; }
      # Settled first: the leader balancer's moves after creation are not the steady state.
      wait_preferred "cluster-p$n" "$MANY_SETTLE_SECS" || true
      enough_space "$name" || { stop_cluster; continue; }
      before=$(leaderships)
      perf "$name" produce -b "$CADDR" -t "cluster-p$n" -c 3 -s 1024 --batch-bytes "$bb" \
        --acks all --duration-secs "$SECS" --warmup-secs $WARMUP \
        --records $((MAX_BYTES_PER_RUN / 3 / 1024))
      # Leaderships taken during the run (elections and transfers): each costs the producer
      # NOT_LEADER_OR_FOLLOWER retries (their count is in $name.json).
      taken=$(($(leaderships) - before))
      echo "{\"leaderships_during_run\": $taken}" > "$OUT/$name-leaderships.json"
      log "$name: $taken leaderships taken during the run"
      stop_cluster
    done
  done
}

catchup_run() {
  local name=cluster-catchup victim t0 size0 chunk=0 deadline poller throttle
  throttle=${CATCHUP_THROTTLE:-default}
  NODE_EXTRA_ARGS=()
  [ -z "$CATCHUP_THROTTLE" ] || NODE_EXTRA_ARGS=(--replication-throttle-bytes-per-sec "$CATCHUP_THROTTLE")
  start_cluster || { FAILED+=("$name (cluster)"); NODE_EXTRA_ARGS=(); return; }
  create_topic "$name" 3 || { FAILED+=("$name (topic)"); stop_cluster; return; }
  perf "$name-baseline" produce -b "$CADDR" -t "$name" -c 3 -s 1024 --acks all --idempotent \
    --rate "$CATCHUP_RATE" --duration-secs "$SECS" --warmup-secs $WARMUP
  victim=3
  log "$name: SIGKILL node $victim, then ${CATCHUP_GB} GB it misses"
  kill_node $victim
  sleep 3
  PERF_TIMEOUT=900 perf "$name-fill" produce -b "$CADDR" -t "$name" -c 3 -s 1024 \
    --batch-bytes "$(batch_bytes 1024)" --acks all --idempotent \
    --records $((CATCHUP_GB * 1000000000 / 1024)) --duration-secs 800
  sync -f "$WORK"
  size0=$(du -sb "$WORK/cluster/n$victim" | cut -f1)
  rm -f "$OUT/$name-caught.txt"
  t0=$(date +%s%3N)
  start_node $victim
  # The moment every partition has three in-sync replicas again, and the follower's size then.
  (
    deadline=$((SECONDS + 900))
    while [ $SECONDS -lt $deadline ]; do
      lines=$(describe "$name" || true)
      if [ -n "$lines" ] && [ -z "$(printf '%s\n' "$lines" | jq -c 'select((.isr | length) < 3)')" ]; then
        echo "$(date +%s%3N) $(du -sb "$WORK/cluster/n$victim" | cut -f1)" > "$OUT/$name-caught.txt"
        exit 0
      fi
      sleep 0.2
    done
  ) &
  poller=$!
  # Fixed-rate produce in 5 s pieces while the follower catches up (throttled as the nodes
  # are: BENCH_CATCHUP_THROTTLE, else the broker's default).
  deadline=$((SECONDS + 900))
  while [ $SECONDS -lt $deadline ] && [ ! -s "$OUT/$name-caught.txt" ]; do
    chunk=$((chunk + 1))
    perf "$name-during-$chunk" produce -b "$CADDR" -t "$name" -c 3 -s 1024 --acks all \
      --idempotent --rate "$CATCHUP_RATE" --duration-secs 5
  done
  kill "$poller" 2>/dev/null || true
  wait "$poller" 2>/dev/null || true
  if [ -s "$OUT/$name-caught.txt" ]; then
    read -r t1 size1 < "$OUT/$name-caught.txt"
    jq -n --argjson gb "$CATCHUP_GB" --argjson ms "$((t1 - t0))" --argjson b0 "$size0" \
      --argjson b1 "$size1" --argjson pieces "$chunk" --arg throttle "$throttle" \
      '{missed_gb: $gb, ms: $ms, bytes: ($b1 - $b0), pieces: $pieces, throttle: $throttle,
        mb_per_sec: (($b1 - $b0) / 1e6 / ($ms / 1000))}' > "$OUT/$name-result.json"
    log "$name: $(jq -c . "$OUT/$name-result.json")"
  else
    log "$name: the follower did not catch up within 900 s"; FAILED+=("$name")
  fi
  stop_cluster
  NODE_EXTRA_ARGS=()
}

cluster_section() {
  if ! "$SPATE" serve --help 2>/dev/null | grep -q -- --seeds; then
    log "the spate binary cannot form a cluster (no --seeds): replicated section skipped"
    FAILED+=("cluster (no --seeds)")
    return
  fi
  local parts=" ${BENCH_CLUSTER_PARTS:-rows e2e failover idle many catchup} "
  # The single-node rows of the same shape, in the same run.
  local acks
  [[ "$parts" == *" rows "* ]] && for acks in 1 -1; do
    start_spate always
    produce_row "single-produce-1024B-acks$acks-always" "$ADDR" "$acks"
    stop_broker
  done
  [[ "$parts" == *" rows "* ]] && for acks in 1 -1; do
    start_cluster || { FAILED+=("cluster (start)"); return; }
    produce_row "cluster-produce-1024B-acks$acks-always" "$CADDR" "$acks" --replication-factor 3
    stop_cluster
  done
  local max rate i
  max=$(records_per_sec cluster-produce-1024B-acks-1-always)
  rate=$(jq -n --argjson m "${max:-0}" '($m / 2) | floor')
  [[ "$parts" == *" e2e "* ]] && for i in $(seq "$E2E_RUNS"); do
    if [ "${rate:-0}" -lt 1 ]; then FAILED+=("cluster-e2e"); break; fi
    start_cluster || { FAILED+=("cluster-e2e (cluster)"); continue; }
    perf "cluster-e2e$([ "$i" -gt 1 ] && echo "-$i")" e2e -b "$CADDR" -t e2e \
      -p $C_PARTITIONS -c $C_CONNECTIONS --replication-factor 3 -s 1024 \
      --batch-bytes "${BENCH_CLUSTER_E2E_BATCH_BYTES:-$(batch_bytes 1024)}" \
      --linger-ms "${BENCH_CLUSTER_E2E_LINGER_MS:-5}" --acks -1 --rate "$rate" \
      --duration-secs "$SECS" --warmup-secs $WARMUP --fetch-max-wait-ms 100
    stop_cluster
  done
  [[ "$parts" != *" failover "* ]] || failover_run
  [[ "$parts" != *" idle "* ]] || idle_run
  [[ "$parts" != *" many "* ]] || many_partitions_run
  [[ "$parts" != *" catchup "* ]] || catchup_run
  remove "$WORK/cluster"
}

log "building spate and spate-perf (release)"
cargo build --release -p spate -p spate-perf --bins >&2
machine
if [ -n "${BENCH_CLUSTER_PARTS:-}" ] && [ -s "$OUT/fio-seqwrite.json" ]; then
  log "fio: reusing $OUT/fio-seqwrite.json"
else
  run_fio
fi

if [ "$RUN_SPATE" = 1 ]; then
  if "$SPATE" serve --help >/dev/null 2>&1; then
    for flush in interval always; do
      for acks in 1 -1; do
        for size in 100 1024 16384; do
          name="spate-produce-${size}B-acks${acks}-$flush"
          start_spate "$flush"
          produce "$name" "$size" "$acks"
          if [ "$name" = spate-produce-1024B-acks1-interval ]; then
            # Read back what that run wrote: first from the broker's cache, then after a
            # restart (empty cache, and the page cache dropped when we may) from disk.
            perf spate-consume-cache consume -b "$ADDR" -t "$name" -c $CONNECTIONS \
              --from earliest --duration-secs "$SECS"
            stop_broker
            drop_page_cache
            start_spate "$flush" keep
            perf spate-consume-disk consume -b "$ADDR" -t "$name" -c $CONNECTIONS \
              --from earliest --duration-secs "$SECS"
          fi
          stop_broker
        done
      done
    done
    # Several e2e runs, each on a fresh broker: one run's tail can hide or show a hiccup of
    # the shared machine, so the report gives every run.
    for i in $(seq "$E2E_RUNS"); do
      start_spate always
      e2e_at_half spate "spate-produce-${E2E_RECORD_BYTES}B-acks-1-always" \
        "spate-e2e$([ "$i" -gt 1 ] && echo "-$i")"
      stop_broker
    done
    rm -rf "$WORK/spate"
  else
    log "the spate binary has no 'serve' command: spate rows skipped"
    FAILED+=("spate (no broker)")
  fi
fi

if [ "$RUN_PEER" = 1 ]; then
  TANSU=${TANSU:-$(command -v tansu || echo /work/tansu-build/root/bin/tansu)}
  if [ -x "$TANSU" ]; then
    # Tansu has no flush setting: one run per shape, named "sqlite" for its storage engine.
    for acks in 1 -1; do
      for size in 100 1024 16384; do
        start_peer
        produce "tansu-produce-${size}B-acks${acks}-sqlite" "$size" "$acks"
        stop_broker
      done
    done
    start_peer
    e2e_at_half tansu "tansu-produce-${E2E_RECORD_BYTES}B-acks-1-sqlite"
    stop_broker
    rm -rf "$WORK/tansu"
  else
    log "tansu not installed (cargo install tansu --features libsql): peer rows skipped"
  fi
fi

if [ "$RUN_CLUSTER" = 1 ]; then
  cluster_section
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
