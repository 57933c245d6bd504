"""The log cleaner's benchmark (issue 19): cleaner throughput against the disk, and a
fixed-rate producer's latency while the cleaner runs against the same producer without it.

One single-node broker (`--cores 1`), on the disk that holds --dir:
1. the disk's sequential write bandwidth (fio, direct I/O, 1 MiB blocks), as the reference;
2. --rounds topics, each filled with --records keyed updates over --keys keys
   (confluent-kafka), created with `cleanup.policy=delete` so nothing cleans them yet;
3. per round, alternating: spate-perf at a fixed rate (acks=all, 1 KiB) on another topic (the
   baseline), then the same spate-perf run while that round's filled topic is switched to
   `cleanup.policy=compact` (IncrementalAlterConfigs): the cleaner rewrites it meanwhile. Its
   progress comes from the broker's Prometheus series (spate_cleaner_bytes_read_total,
   ..._reclaimed_total); the broker's fdatasync latency histogram gives the group commits' p99
   over each spate-perf run, and /proc/loadavg the machine's load;
4. a read of each cleaned topic: exactly one record per key, each the last value written.
Steps 2-4 run once per --throttles entry (`default`: the broker's own; a number: that many
MB/s as `--cleaner-io-bytes-per-sec`, 0 meaning no byte limit), each on a fresh broker.

Prints a JSON summary (and writes it with --json). Usage: scripts/bench-cleaner.sh [options].
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                   NewTopic)

# How long a step may take before the benchmark gives up (bounded waits only).
START_TIMEOUT_S = 30.0
CLEAN_TIMEOUT_S = 600.0
READ_TIMEOUT_S = 300.0
# The cleaner has finished once its bytes-read counter has not moved for this long.
CLEAN_QUIET_S = 3.0
METRICS_POLL_S = 0.25
# The cleaner looks for work this often during the benchmark (default 15 s would add up to 15 s
# of idle time to the measured cleaning).
CLEANER_BACKOFF_MS = 200
SEGMENT_BYTES = 64 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fio_write_mb_s(directory):
    """Sequential direct write bandwidth of the disk holding `directory`, in MB/s."""
    path = os.path.join(directory, "fio.bin")
    out = subprocess.run(
        ["fio", "--name=seqwrite", f"--filename={path}", "--rw=write", "--bs=1M",
         "--size=1G", "--direct=1", "--ioengine=libaio", "--iodepth=8", "--end_fsync=1",
         "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    os.unlink(path)
    job = json.loads(out)["jobs"][0]["write"]
    return job["bw_bytes"] / 1e6


class Broker:
    def __init__(self, binary, data_dir, throttle_bytes):
        self.port, self.metrics_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        args = [binary, "serve", "--data-dir", data_dir, "--listen", self.bootstrap,
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--cores", "1",
                "--cleaner-backoff-ms", str(CLEANER_BACKOFF_MS)]
        if throttle_bytes is not None:
            args += ["--cleaner-io-bytes-per-sec", str(throttle_bytes)]
        self.log_path = os.path.join(data_dir, "..", "spate.log")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"spate exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise SystemExit("spate did not start listening")

    def scrape(self):
        return urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def metric(self, name, topic):
        """Sum of a counter over the partitions of `topic`."""
        total = 0.0
        for line in self.scrape().splitlines():
            if line.startswith(name + "{") and f'topic="{topic}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def fsync_buckets(self):
        """The fdatasync latency histogram: {upper bound in s: cumulative count}."""
        out = {}
        for line in self.scrape().splitlines():
            if line.startswith("spate_fsync_latency_seconds_bucket{"):
                le = re.search(r'le="([^"]+)"', line).group(1)
                bound = float("inf") if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def fsync_p99_ms(before, after):
    """Upper bucket bound (ms) of the 99th percentile of the fdatasyncs between two scrapes."""
    bounds = sorted(after)
    delta = [after[b] - before.get(b, 0.0) for b in bounds]
    if not delta or delta[-1] <= 0:
        return None
    for b, c in zip(bounds, delta):
        if c >= 0.99 * delta[-1]:
            return round(b * 1000, 2)
    return None


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def fill(bootstrap, topic, records, keys, value_bytes):
    """Writes `records` updates round-robin over `keys` keys; returns the last value per key."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, 1, 1, config={
        "cleanup.policy": "delete", "segment.bytes": str(SEGMENT_BYTES),
        "min.cleanable.dirty.ratio": "0.01", "retention.ms": "-1"})])[topic]
    fut.result(timeout=30)
    p = Producer({"bootstrap.servers": bootstrap, "acks": "1", "linger.ms": 20,
                  "batch.size": 1 << 20, "queue.buffering.max.kbytes": 1 << 20,
                  "enable.idempotence": False})
    pad = b"x" * max(0, value_bytes - 16)
    errors = []
    last = {}

    def report(err, _msg):
        if err is not None:
            errors.append(err)
    for i in range(records):
        k = i % keys
        value = b"%015d|" % i + pad
        while True:
            try:
                p.produce(topic, value=value, key=b"key-%d" % k, on_delivery=report)
                break
            except BufferError:
                p.poll(0.05)
        last[k] = i
        if i % 10000 == 0:
            p.poll(0)
    left = p.flush(120)
    if left or errors:
        raise SystemExit(f"fill failed: {left} undelivered, errors {errors[:3]}")
    return last


def log_size(data_dir, topic):
    """Bytes of the topic's segment files (partition 0)."""
    d = os.path.join(data_dir, f"{topic}-0")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".log"))


def perf_run(perf, bootstrap, topic, rate, seconds, json_path):
    cmd = [perf, "produce", "--bootstrap-servers", bootstrap, "--topic", topic,
           "--record-size", "1024", "--acks", "all", "--rate", str(rate),
           "--duration-secs", str(seconds), "--warmup-secs", "1", "--json", json_path]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def perf_result(proc, json_path):
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"spate-perf failed: {err.decode()[-2000:]}")
    with open(json_path) as f:
        s = json.load(f)
    lat = s["latency"]
    return {"records_per_sec": round(s["records_per_sec"]), "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"], "p999_ms": lat["p999_ms"], "max_ms": lat["max_ms"]}


def compact(bootstrap, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("cleanup.policy", "compact",
                    incremental_operation=AlterConfigOpType.SET)])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(timeout=30)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cleaned_lines(log_path, topic):
    """The broker's "log cleaned" lines for `topic`, as dicts of their numeric fields."""
    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if "log cleaned" not in line or f"topic={topic} " not in line:
                continue
            out.append({k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)\b", line)})
    return out


def watch_cleaning(broker, topic):
    """Waits for the cleaner to start and go quiet (its Prometheus counters); returns (bytes
    read, reclaimed)."""
    deadline = time.monotonic() + CLEAN_TIMEOUT_S
    started = False
    last_read, last_change = 0.0, time.monotonic()
    while time.monotonic() < deadline:
        read = broker.metric("spate_cleaner_bytes_read_total", topic)
        now = time.monotonic()
        if read > last_read:
            started = True
            last_read, last_change = read, now
        elif started and now - last_change >= CLEAN_QUIET_S:
            reclaimed = broker.metric("spate_cleaner_bytes_reclaimed_total", topic)
            return last_read, reclaimed
        time.sleep(METRICS_POLL_S)
    raise SystemExit("the cleaner did not finish in time")


def read_back(bootstrap, topic, expect):
    """Reads the cleaned topic: one record per key, the last value written (the active
    segment is never cleaned, so its keys may appear more than once: only the last counts)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-cleaner-check",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    _, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    c.assign([TopicPartition(topic, 0, 0)])
    seen, records, last_offset = {}, 0, -1
    deadline = time.monotonic() + READ_TIMEOUT_S
    while last_offset < high - 1 and time.monotonic() < deadline:
        for m in c.consume(10000, timeout=1.0):
            if m.error():
                continue
            records += 1
            last_offset = m.offset()
            seen[int(m.key()[4:])] = int(m.value()[:15])
    c.close()
    wrong = sum(1 for k, i in expect.items() if seen.get(k) != i)
    return {"records_read": records, "keys": len(seen), "wrong_or_missing": wrong,
            "high_watermark": high}


def timed_perf(args, broker, json_path, during=None):
    """One spate-perf run, with the machine's load and the broker's fdatasync p99 over it;
    `during` runs meanwhile (the cleaning) and its result is returned too."""
    load = load1()
    fs = broker.fsync_buckets()
    perf = perf_run(args.perf, broker.bootstrap, "perf", args.rate, args.seconds, json_path)
    extra = during() if during else None
    res = perf_result(perf, json_path)
    res["fsync_p99_ms"] = fsync_p99_ms(fs, broker.fsync_buckets())
    res["load1_before"] = load
    return res, extra


def one_run(args, label, throttle_bytes, root):
    data = os.path.join(root, label, "data")
    os.makedirs(data)
    broker = Broker(args.spate, data, throttle_bytes)
    try:
        topics = [f"compacted-{i}" for i in range(args.rounds)]
        t0 = time.monotonic()
        expect = {t: fill(broker.bootstrap, t, args.records, args.keys, args.value_bytes)
                  for t in topics}
        fill_s = time.monotonic() - t0
        rounds = []
        for i, topic in enumerate(topics):
            base, _ = timed_perf(args, broker, os.path.join(root, label, f"base-{i}.json"))
            log_bytes = log_size(data, topic)
            seen = len(cleaned_lines(broker.log_path, topic))

            def clean():
                time.sleep(1.0)
                compact(broker.bootstrap, topic)
                return watch_cleaning(broker, topic)
            during, (read, reclaimed) = timed_perf(
                args, broker, os.path.join(root, label, f"with-{i}.json"), clean)
            # The cleaner's own timing of each cleaning (the metrics only bound it by their
            # poll).
            runs = cleaned_lines(broker.log_path, topic)[seen:]
            if not runs:
                raise SystemExit("no 'log cleaned' line in the broker's log")
            clean_s = sum(r["elapsed_ms"] for r in runs) / 1000.0
            written = sum(r["bytes_written"] for r in runs)
            rounds.append({
                "cleanings": len(runs),
                "cleaned_bytes_read": int(read),
                "cleaned_bytes_written": int(written),
                "cleaned_bytes_reclaimed": int(reclaimed),
                "cleaning_seconds": round(clean_s, 2),
                "deferred_seconds": round(sum(r.get("deferred_ms", 0) for r in runs) / 1000, 2),
                "log_bytes_before": log_bytes,
                # The log's bytes cleaned per second (the cleaner reads the dirty part twice:
                # once for the key map, once to copy) and its disk traffic per second.
                "cleaner_mb_s": round(log_bytes / 1e6 / max(clean_s, 1e-9), 1),
                "cleaner_io_mb_s": round((read + written) / 1e6 / max(clean_s, 1e-9), 1),
                "producer_without_cleaner": base,
                "producer_with_cleaner": during,
                "p99_ratio": round(during["p99_ms"] / max(base["p99_ms"], 1e-9), 2),
                "cleaning_within_producer_run": clean_s + 1.0 <= args.seconds,
                "read_back": read_back(broker.bootstrap, topic, expect[topic]),
            })
        return {"throttle_bytes_per_sec": throttle_bytes, "fill_seconds": round(fill_s, 1),
                "rounds": rounds}
    finally:
        broker.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spate", required=True)
    ap.add_argument("--label", default="", help="recorded in the summary (which binary)")
    ap.add_argument("--perf", required=True)
    ap.add_argument("--dir", default=None, help="where the data dirs go (default: a temp dir)")
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--rate", type=int, default=5000, help="spate-perf records/s (1 KiB)")
    ap.add_argument("--seconds", type=int, default=30, help="each spate-perf run")
    ap.add_argument("--throttles", default="default,0",
                    help="comma-separated cleaner I/O limits in MB/s, one broker each: "
                         "'default' for the broker's own, 0 for no byte limit")
    ap.add_argument("--rounds", type=int, default=2,
                    help="baseline/cleaning alternations per broker (one filled topic each)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="spate-bench-cleaner-", dir=args.dir)
    try:
        disk = fio_write_mb_s(root)
        runs = {}
        for mb in args.throttles.split(","):
            if mb == "default":
                label, limit = "default", None
            else:
                limit = int(float(mb) * 1e6)
                label = f"limit-{mb}MB/s" if limit else "no-byte-limit"
            runs[label] = one_run(args, label.replace("/", "_"), limit, root)
            for r in runs[label]["rounds"]:
                r["cleaner_vs_disk_write"] = round(r["cleaner_mb_s"] / disk, 2)
                r["cleaner_io_vs_disk_write"] = round(r["cleaner_io_mb_s"] / disk, 2)
        summary = {"label": args.label, "disk_write_mb_s": round(disk, 1),
                   "records": args.records,
                   "keys": args.keys, "value_bytes": args.value_bytes,
                   "producer_rate": args.rate, "runs": runs}
        text = json.dumps(summary, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        bad = [n for n, r in runs.items()
               if any(x["read_back"]["wrong_or_missing"] for x in r["rounds"])]
        return 1 if bad else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
