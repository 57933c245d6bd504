"""Group coordinator start-up time against the size of `__consumer_offsets` (issue 19).

One single-node broker (`--cores 1`):
1. a topic with --partitions partitions, then --commits offset commits over --groups groups,
   written as OffsetCommit v2 requests of one group and every partition each (generation -1:
   standalone consumers, as Kafka allows for an empty group), pipelined on --connections
   connections. Round r commits offset r * partitions + p to partition p of every group, so the
   last round's offsets are known exactly. The requests' latencies (send to response, with
   PIPELINE_DEPTH in flight per connection) are reported as percentiles: what the log
   cleaner working on `__consumer_offsets` meanwhile costs the commits;
2. start-up after SIGKILL, --runs times: the broker is killed (the first time right after the
   last commit was acknowledged, then once it answered), restarted, and timed from process
   start until every group answers an OffsetFetch (v2) with exactly its last committed offsets
   (COORDINATOR_LOAD_IN_PROGRESS is retried);
3. the broker is left running until its log cleaner has gone quiet on `__consumer_offsets`
   (its Prometheus bytes-read counter unchanged for longer than the cleaner's backoff; skipped
   for a binary without that series, such as one with the snapshot mechanism before it);
4. the same as 2 after a clean shutdown (SIGTERM), --runs times.
Each start-up reports the records the coordinator replayed (its "consumer offsets loaded"
lines) and the bytes and number of `__consumer_offsets` segment files on disk before the start.

Prints a JSON summary (and writes it with --json). Usage: scripts/bench-group-startup.sh
[options]; --spate picks the binary (another build, e.g. an older commit, to compare).
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from confluent_kafka.admin import AdminClient, NewTopic

START_TIMEOUT_S = 30.0
# A start-up that takes longer than this is reported as failed, not waited for.
READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 120.0
# The cleaner is done once its bytes-read counter stood still this long (longer than the
# broker's default cleaner backoff of 15 s), waited for at most SETTLE_TIMEOUT_S.
SETTLE_QUIET_S = 20.0
SETTLE_TIMEOUT_S = 600.0
# The series appears once the cleaner finished its first log (its first round starts a backoff
# after the start, and a paced pass over a dirty 80 MB partition takes seconds, more on a loaded
# machine); a binary still without it after this long has no such series.
SETTLE_SERIES_WAIT_S = 120.0
SOCKET_TIMEOUT_S = 60.0
# Requests in flight per connection (the broker's default allows 32).
PIPELINE_DEPTH = 16
# Retry interval while the coordinator is still loading.
LOADING_RETRY_S = 0.02
# Kafka error codes the start-up waits through.
COORDINATOR_LOAD_IN_PROGRESS = 14
COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
RETRIABLE = {COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR}
TOPIC = "bench-offsets"
CLIENT_ID = b"bench-group-startup"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kstr(b):
    return struct.pack(">h", len(b)) + b


def group_name(g):
    return b"bench-group-%04d" % g


def header(api_key, version, corr):
    return struct.pack(">hhi", api_key, version, corr) + kstr(CLIENT_ID)


def frame(payload):
    return struct.pack(">i", len(payload)) + payload


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock):
    (n,) = struct.unpack(">i", recv_exact(sock, 4))
    return recv_exact(sock, n)


class Reader:
    def __init__(self, b):
        self.b, self.p = b, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.b, self.p)
        self.p += struct.calcsize(fmt)
        return v if len(v) > 1 else v[0]

    def string(self):
        n = self.take(">h")
        if n < 0:
            return None
        s = self.b[self.p:self.p + n]
        self.p += n
        return s


def commit_request(corr, group, partitions_blob, partitions):
    body = (kstr(group) + struct.pack(">i", -1) + kstr(b"") + struct.pack(">q", -1)
            + struct.pack(">i", 1) + kstr(TOPIC.encode()) + struct.pack(">i", partitions)
            + partitions_blob)
    return frame(header(8, 2, corr) + body)


def commit_errors(resp):
    """Error codes of an OffsetCommit v2 response (after the correlation id)."""
    r = Reader(resp)
    r.take(">i")
    errors = []
    for _ in range(r.take(">i")):
        r.string()
        for _ in range(r.take(">i")):
            _, err = r.take(">ih")
            errors.append(err)
    return errors


def fetch_request(corr, group, partitions):
    body = (kstr(group) + struct.pack(">i", 1) + kstr(TOPIC.encode())
            + struct.pack(">i", partitions)
            + struct.pack(">%di" % partitions, *range(partitions)))
    return frame(header(9, 2, corr) + body)


def fetch_answer(resp):
    """(top-level error, {partition: (offset, error)}) of an OffsetFetch v2 response."""
    r = Reader(resp)
    r.take(">i")
    parts = {}
    for _ in range(r.take(">i")):
        r.string()
        for _ in range(r.take(">i")):
            p, off = r.take(">iq")
            r.string()
            parts[p] = (off, r.take(">h"))
    return r.take(">h"), parts


def find_coordinator_request(corr, group):
    return frame(header(10, 0, corr) + kstr(group))


def coordinators_ready(bootstrap, groups, partitions):
    """Waits until every group has a loaded coordinator (FindCoordinator creates
    `__consumer_offsets` on first use, as clients send it before committing)."""
    host, port = bootstrap.split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for g in range(groups):
            while True:
                sock.sendall(find_coordinator_request(g, group_name(g)))
                r = Reader(recv_frame(sock))
                r.take(">i")
                err = r.take(">h")
                if err == 0:
                    break
                if err not in RETRIABLE or time.monotonic() > deadline:
                    raise SystemExit(f"FindCoordinator for group {g}: error {err}")
                time.sleep(LOADING_RETRY_S)
            while True:
                sock.sendall(fetch_request(g, group_name(g), partitions))
                err, parts = fetch_answer(recv_frame(sock))
                errs = {e for _, e in parts.values()} | {err}
                if not errs & RETRIABLE:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"group {g}: coordinator not loaded")
                time.sleep(LOADING_RETRY_S)
    finally:
        sock.close()


def round_blob(rnd, partitions):
    """The partitions of one commit round: partition p at offset rnd * partitions + p."""
    return b"".join(struct.pack(">iqh", p, rnd * partitions + p, 0) for p in range(partitions))


def commit_worker(bootstrap, groups, rounds, partitions, errors, latencies):
    """Commits every round of `groups`; appends each request's latency (seconds from its send
    to its response; with PIPELINE_DEPTH requests in flight, so it includes queueing) to
    `latencies`."""
    host, port = bootstrap.split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        work = ((rnd, g) for rnd in range(rounds) for g in groups)
        blobs = {}
        in_flight = 0
        sent = collections.deque()
        corr = 0
        done = False
        while True:
            while not done and in_flight < PIPELINE_DEPTH:
                try:
                    rnd, g = next(work)
                except StopIteration:
                    done = True
                    break
                if rnd not in blobs:
                    blobs.clear()
                    blobs[rnd] = round_blob(rnd, partitions)
                corr += 1
                sent.append(time.monotonic())
                sock.sendall(commit_request(corr, group_name(g), blobs[rnd], partitions))
                in_flight += 1
            if in_flight == 0:
                return
            bad = [e for e in commit_errors(recv_frame(sock)) if e != 0]
            latencies.append(time.monotonic() - sent.popleft())
            if bad:
                errors.append(f"commit refused: error {bad[0]}")
                return
            in_flight -= 1
    except Exception as e:  # reported by the caller; a failed generator fails the benchmark
        errors.append(repr(e))
    finally:
        sock.close()


def generate(bootstrap, groups, partitions, commits, connections):
    rounds = commits // (groups * partitions)
    if rounds < 1:
        raise SystemExit("--commits must be at least --groups x --partitions")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(TOPIC, partitions, 1)])[TOPIC].result(timeout=60)
    coordinators_ready(bootstrap, groups, partitions)
    errors = []
    latencies = []
    threads = [threading.Thread(target=commit_worker, args=(
        bootstrap, list(range(i, groups, connections)), rounds, partitions, errors, latencies))
        for i in range(connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    if errors:
        raise SystemExit(f"generator failed: {errors[:3]}")
    return rounds, rounds * groups * partitions, took, latency_summary(latencies)


def latency_summary(latencies):
    """Milliseconds at the 50th, 99th and 99.9th percentiles and the maximum."""
    if not latencies:
        return {}
    ls = sorted(latencies)

    def at(q):
        return round(ls[min(len(ls) - 1, int(q * len(ls)))] * 1000, 2)
    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999),
            "max_ms": round(ls[-1] * 1000, 2), "requests": len(ls)}


class Broker:
    def __init__(self, binary, data_dir, log_path, extra):
        self.port, self.metrics_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        args = [binary, "serve", "--data-dir", data_dir, "--listen", self.bootstrap,
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--cores", "1"] + extra
        self.log = open(log_path, "wb")
        env = dict(os.environ, SPATE_LOG_LEVEL="spate_net::group=debug,info",
                   SPATE_LOG_FORMAT="text", NO_COLOR="1")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def connect(self):
        deadline = self.started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=SOCKET_TIMEOUT_S)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"spate exited with {self.proc.returncode}")
                time.sleep(0.01)
        raise SystemExit("spate did not start listening")

    def cleaner_bytes_read(self):
        """The cleaner's bytes read from `__consumer_offsets`, None without that series."""
        body = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        lines = [ln for ln in body.splitlines()
                 if ln.startswith("spate_cleaner_bytes_read_total{")
                 and 'topic="__consumer_offsets"' in ln]
        if not lines:
            return None
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    def settle(self):
        """Waits until the cleaner went quiet; returns the seconds waited (None: no cleaner
        series)."""
        start = time.monotonic()
        last, changed = None, start
        while time.monotonic() - start < SETTLE_TIMEOUT_S:
            now_read = self.cleaner_bytes_read()
            now = time.monotonic()
            if now_read is None:
                if now - start > SETTLE_SERIES_WAIT_S:
                    return None
            elif now_read != last:
                last, changed = now_read, now
            elif now - changed >= SETTLE_QUIET_S:
                return round(changed - start, 1)
            time.sleep(1.0)
        raise SystemExit("the cleaner did not go quiet in time")

    def stop(self, sig):
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise SystemExit("spate did not stop in time")
        self.log.close()


def wait_ready(broker, groups, partitions, last_round):
    """Seconds from process start until every group answers its last offsets; and until the
    first did."""
    sock = broker.connect()
    listening = time.monotonic() - broker.started
    pending = list(range(groups))
    first = None
    corr = 0
    deadline = broker.started + READY_TIMEOUT_S
    try:
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} groups not ready after {READY_TIMEOUT_S} s")
            window = pending[:PIPELINE_DEPTH]
            for g in window:
                corr += 1
                sock.sendall(fetch_request(corr, group_name(g), partitions))
            still = []
            for g in window:
                err, parts = fetch_answer(recv_frame(sock))
                errs = {e for _, e in parts.values()} | {err}
                if errs & RETRIABLE:
                    still.append(g)
                    continue
                want = {p: (last_round * partitions + p, 0) for p in range(partitions)}
                if err != 0 or parts != want:
                    raise SystemExit(f"group {g}: wrong offsets after start-up (error {err})")
                if first is None:
                    first = time.monotonic() - broker.started
            pending = still + pending[len(window):]
            if still:
                time.sleep(LOADING_RETRY_S)
    finally:
        sock.close()
    return time.monotonic() - broker.started, first, listening


def offsets_bytes(data_dir):
    """Bytes of `__consumer_offsets` segment files (either layout)."""
    total = 0
    for root, _, files in os.walk(data_dir):
        if "__consumer_offsets" in root:
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                         if f.endswith(".log"))
    return total


def offsets_segment_files(data_dir):
    """Segment files of `__consumer_offsets` (the cleaner merges small ones)."""
    return sum(1 for root, _, files in os.walk(data_dir) if "__consumer_offsets" in root
               for f in files if f.endswith(".log"))


def replayed(log_path):
    n = 0
    with open(log_path, errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if "consumer offsets loaded" in line:
                m = re.search(r"records=(\d+)", line)
                n += int(m.group(1)) if m else 0
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spate", required=True)
    ap.add_argument("--dir", default=None, help="where the data dir goes (default: a temp dir)")
    ap.add_argument("--commits", type=int, default=10_000_000)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=100, help="per group, per commit")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    ap.add_argument("broker_args", nargs="*", help="extra `spate serve` flags, after --")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="spate-bench-groups-", dir=args.dir)
    data = os.path.join(root, "data")
    os.makedirs(data)
    n = [0]

    def start():
        n[0] += 1
        log = os.path.join(root, f"spate-{n[0]}.log")
        return Broker(args.spate, data, log, args.broker_args), log

    def load1():
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])

    try:
        broker, _ = start()
        broker.connect().close()
        rounds, commits, gen_s, latency = generate(broker.bootstrap, args.groups,
                                                   args.partitions, args.commits,
                                                   args.connections)
        last = rounds - 1
        summary = {"label": args.label, "spate": args.spate, "commits": commits,
                   "groups": args.groups, "partitions_per_group": args.partitions,
                   "live_offsets": args.groups * args.partitions,
                   "generate_seconds": round(gen_s, 1),
                   "commits_per_sec": round(commits / gen_s),
                   "commit_request_latency": latency,
                   "load_after_generate": load1(), "starts": []}
        for how, sig in (("sigkill", signal.SIGKILL), ("clean", signal.SIGTERM)):
            if how == "clean":
                summary["cleaner_settled_after_s"] = broker.settle()
            for i in range(args.runs):
                broker.stop(sig)
                size = offsets_bytes(data)
                files = offsets_segment_files(data)
                load = load1()
                broker, log = start()
                ready, first, listening = wait_ready(broker, args.groups, args.partitions,
                                                     last)
                row = {"after": how, "run": i + 1, "ready_s": round(ready, 2),
                       "first_group_s": round(first, 2), "listening_s": round(listening, 2),
                       "records_replayed": replayed(log), "offsets_log_bytes": size,
                       "offsets_segment_files": files,
                       "load1": load}
                print(json.dumps(row), file=sys.stderr, flush=True)
                summary["starts"].append(row)
        broker.stop(signal.SIGTERM)
        text = json.dumps(summary, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        return 0
    finally:
        if args.keep:
            print(f"data kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
