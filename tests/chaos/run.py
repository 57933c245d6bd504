"""One run of the fault harness: start the nodes, create the topic, start the workload, apply the
seeded nemesis schedule for --duration seconds, heal everything, let the producers drain, read
every partition to its end, and judge the history. Writes into --out: history.jsonl,
summary.json, timeline.svg, schedule.json and node<i>/ (data dir and spate.log).

Exit status: 0 clean, 1 anomalies found, 2 the harness could not run (the reason on stderr).

usage: python3 -m chaos.run --binary target/release/spate --duration 60 [--seed N] --out DIR
Replay a run's schedule with the same --seed (and the same --nodes, --nemesis, --duration).
Environment: SPATE_BIN (default --binary), SPATE_CHAOS_RUST_LOG (the nodes' RUST_LOG, info),
SPATE_CHAOS_WATCHDOG_SLACK_S (a run longer than --duration plus this is ended as hung, 600).
"""
import argparse
import faulthandler
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict

from . import admin, checker, history, nemesis, netns, nodes, workload

TOPIC = "chaos"
GROUP = "chaos-group"
# After the last fault ends, acks must resume within this (else the run reports it and the
# checker's unavailability window for that fault shows how long).
RECOVERY_TIMEOUT_S = 60.0
RECOVERY_POLL_S = 0.05
# A run that takes longer than its duration plus this is hung (a client library call that
# never returns): the watchdog, which needs no Python lock, prints every thread's stack and
# ends the process; the nodes die with it (nodes.Node sets PR_SET_PDEATHSIG).
WATCHDOG_SLACK_S = float(os.environ.get("SPATE_CHAOS_WATCHDOG_SLACK_S", "600"))
# Per node at least: a run must not fill a shared test disk.
MIN_FREE_DISK_BYTES = 2 << 30
# A run that asked for this many replica moves and saw none finish did not test moves (a
# client library that refuses the call, a cluster that refuses every move): it fails.
MOVES_FOR_A_VERDICT = 3


# Workers stop on their own within the producers' flush timeout; past this they are stuck.
WORKER_JOIN_TIMEOUT_S = workload.FLUSH_TIMEOUT_S + 30
# The final read's own deadline plus slack for its client calls (watermarks, close).
FINAL_READ_JOIN_TIMEOUT_S = workload.FINAL_READ_TIMEOUT_S + workload.WATERMARK_RETRY_S + 60


def record_stuck(h, proc, thread):
    """Records (and prints) where a client thread that did not end is waiting."""
    frame = sys._current_frames().get(thread.ident)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
    h.record("harness_error", error=f"{proc} did not end in time; its stack:\n{stack}"[:4000])
    print(f"chaos: {proc} did not end in time:\n{stack}", file=sys.stderr, flush=True)


def bounded_final_read(bootstrap, partitions, h):
    """Runs the final read in a daemon thread with a deadline: a client call that never
    returns is recorded as a harness error (with its stack) instead of hanging the run."""
    def read():
        try:
            workload.final_read(bootstrap, TOPIC, partitions, h)
        except Exception as e:  # a failed final read is judged as incomplete_read
            h.record("final_error", error=repr(e))

    t = threading.Thread(target=read, name="final-read", daemon=True)
    t.start()
    t.join(timeout=FINAL_READ_JOIN_TIMEOUT_S)
    if t.is_alive():
        record_stuck(h, "final", t)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python3 -m chaos.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.environ.get("SPATE_BIN", "target/release/spate"))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--duration", type=float, default=60.0,
                    help="seconds during which faults start")
    ap.add_argument("--seed", type=int, default=None,
                    help="schedule seed (default: random, printed and saved)")
    ap.add_argument("--nemesis", default="mixed",
                    help="comma-separated kinds, or `mixed` for every kind this setup allows")
    ap.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto",
                    help="namespaces (needed for partitions and slow links) or loopback")
    ap.add_argument("--flush", default="always", choices=("always", "interval", "never"))
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--group-consumers", type=int, default=2)
    ap.add_argument("--readers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=100.0, help="values per second per producer")
    ap.add_argument("--cores", type=int, default=1, help="--cores of each node")
    ap.add_argument("--allow-gaps", action="store_true",
                    help="offset gaps between consecutive polls are legitimate")
    ap.add_argument("--min-faults", type=int, default=0,
                    help="fail unless at least this many faults were injected")
    ap.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the nodes' data dirs (default: removed after a clean run)")
    return ap.parse_args(argv)


def choose_network(args):
    """Returns (use_netns, note)."""
    if args.network == "loopback":
        return False, "loopback (asked for)"
    ok, why = netns.available()
    if args.network == "netns" and not ok:
        raise SystemExit(f"--network netns: namespaces unavailable: {why}")
    if args.nodes == 1 and args.network == "auto":
        # One node has no links between nodes to cut: loopback unless namespaces are asked
        # for (then the node can be cut off from its clients and slowed).
        return False, "loopback (one node: kill, pause and restart faults only)"
    if not ok:
        return False, f"loopback: namespaces unavailable ({why}); kill and pause faults only"
    return True, "network namespaces"


def choose_kinds(args, use_netns):
    allowed = nemesis.available_kinds(args.nodes, use_netns)
    if args.nemesis == "mixed":
        return allowed
    kinds = tuple(k.strip() for k in args.nemesis.split(",") if k.strip())
    for k in kinds:
        if k in nemesis.PLANTED_KINDS:
            continue
        if k not in nemesis.ALL_KINDS:
            raise SystemExit(f"unknown nemesis {k!r}; known: {', '.join(nemesis.ALL_KINDS)}")
        if k not in allowed:
            raise SystemExit(f"nemesis {k!r} needs "
                             + ("more than one node" if k in nemesis.NEEDS_CLUSTER
                                and args.nodes == 1 else "network namespaces"))
    return kinds


def wait_for_ack(hist_path, since_t, h, stop_timeout_s):
    """Polls (bounded) until the history has an ack after since_t. The history file is
    flushed first; only its tail is scanned."""
    deadline = time.monotonic() + stop_timeout_s
    while time.monotonic() < deadline:
        h.flush()
        with open(hist_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode(errors="replace").splitlines()[1:]
        for line in reversed(tail):
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e["t"] <= since_t:
                break
            if e["type"] == "ack":
                return True
        time.sleep(RECOVERY_POLL_S)
    return False


def main(argv=None):
    args = parse_args(argv)
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        print(f"no spate binary at {binary} (cargo build --release)", file=sys.stderr)
        return 2
    if args.nodes > 1 and not nodes.binary_supports(binary, "--seeds"):
        print(f"{binary} has no --seeds flag: cluster mode needs issue 15 (replicated "
              "partitions); run with --nodes 1", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="spate-chaos-"))
    os.makedirs(out, exist_ok=True)
    if shutil.disk_usage(out).free < MIN_FREE_DISK_BYTES * args.nodes:
        print(f"less than {MIN_FREE_DISK_BYTES >> 30} GiB free per node in {out}",
              file=sys.stderr)
        return 2
    use_netns, network_note = choose_network(args)
    kinds = choose_kinds(args, use_netns)
    faults = nemesis.schedule(seed, args.duration, kinds, args.nodes)
    with open(os.path.join(out, "schedule.json"), "w") as fh:
        json.dump({"seed": seed, "kinds": kinds, "nodes": args.nodes,
                   "duration_s": args.duration, "faults": [asdict(f) for f in faults]},
                  fh, indent=1)
    print(f"chaos: seed {seed}, {len(faults)} faults planned ({', '.join(kinds)}), "
          f"{network_note}, output in {out}", flush=True)

    faulthandler.dump_traceback_later(args.duration + WATCHDOG_SLACK_S, exit=True)
    workload.log_clients_to(os.path.join(out, "clients.log"))
    hist_path = os.path.join(out, "history.jsonl")
    h = history.History(hist_path)
    h.record("meta", seed=seed, topic=TOPIC, partitions=args.partitions, nodes=args.nodes,
             nemesis=list(kinds), duration_s=args.duration, flush=args.flush,
             network=network_note, rate_per_producer=args.rate, binary=binary,
             argv=sys.argv[1:] if argv is None else argv)

    net = None
    cluster = None
    stop = threading.Event()
    workers = []
    # Workers still in a client call WORKER_JOIN_TIMEOUT_S after the stop, with a healthy
    # cluster (every node running, acks resumed): a finding, never a pass.
    stuck = []
    harness_error = None
    try:
        if use_netns:
            net = netns.Network(args.nodes, client_link=True)
            net.create()
        cluster = nodes.Nodes(binary, out, count=args.nodes, flush=args.flush, cores=args.cores,
                              hosts=[net.addr(i) for i in net.ids()] if net else None,
                              netns_names=[net.ns(i) for i in net.ids()] if net else None)
        cluster.start_all()
        workload.create_topic(cluster.bootstrap, TOPIC, args.partitions)
        for i in range(args.producers):
            workers.append(workload.ProducerWorker(f"p{i}", cluster.bootstrap, TOPIC, h, stop,
                                                   args.rate))
        for i in range(args.group_consumers):
            workers.append(workload.GroupConsumer(f"g{i}", cluster.bootstrap, TOPIC, GROUP, h,
                                                  stop))
        for i in range(args.readers):
            workers.append(workload.AssignedReader(f"r{i}", cluster.bootstrap, TOPIC,
                                                   args.partitions, h, stop))
        for w in workers:
            w.start()

        bootstrap = cluster.bootstrap
        nem = nemesis.Nemesis(
            cluster, h, net=net, partitions=args.partitions,
            leader_of=(lambda: admin.leader_of(bootstrap, TOPIC)) if args.nodes > 1 else None,
            replicas_of=lambda p: admin.replicas_of(bootstrap, TOPIC, p),
            mover=admin.Mover(bootstrap, TOPIC))
        t_start = time.monotonic()
        never = threading.Event()
        for fault in faults:
            delay = fault.at_s - (time.monotonic() - t_start)
            if delay > 0:
                never.wait(delay)
            for n in cluster:
                n.check_alive()
            print(f"chaos: fault {fault.id}/{len(faults)} {fault.kind} "
                  f"{fault.targets} {fault.duration_s:.1f} s", flush=True)
            nem.apply(fault, never)
        left = args.duration - (time.monotonic() - t_start)
        if left > 0:
            never.wait(left)
        for n in cluster:
            n.check_alive()
        cluster.ensure_running()
        recovered = wait_for_ack(hist_path, h.now(), h, RECOVERY_TIMEOUT_S)
        h.record("recovered", ok=recovered)
        if not recovered:
            print(f"chaos: no ack within {RECOVERY_TIMEOUT_S} s after the last fault",
                  file=sys.stderr, flush=True)
    except (nodes.NodeError, netns.NetnsError) as e:
        harness_error = e
        h.record("harness_error", error=str(e)[:2000])
    finally:
        stop.set()
        # One deadline for all workers (not one each: five stuck clients would add up to the
        # watchdog's slack). A worker still in a client call after it is left behind (daemon
        # threads; the process ends with os._exit) and its stack is recorded.
        join_deadline = time.monotonic() + WORKER_JOIN_TIMEOUT_S
        for w in workers:
            w.join(timeout=max(0.0, join_deadline - time.monotonic()))
        for w in workers:
            if w.is_alive():
                record_stuck(h, w.proc, w)
                stuck.append(w.proc)
        if harness_error is None and cluster is not None:
            bounded_final_read(cluster.bootstrap, args.partitions, h)
        if cluster is not None:
            for n in cluster:
                n.stop()
        if net is not None:
            net.destroy()
        h.close()

    for w in workers:
        if w.error is not None:
            print(f"chaos: worker {w.proc} failed: {w.error!r}", file=sys.stderr)
            harness_error = harness_error or w.error
    events = history.load(hist_path)
    # In a cluster every new partition leader writes a control batch (KRaft's LeaderChange),
    # which takes an offset consumers never see: gaps are how Kafka logs look then.
    gaps_are_anomalies = not args.allow_gaps and args.nodes == 1
    summary = checker.check(events, checker.Rules(gaps_are_anomalies=gaps_are_anomalies))
    summary["network"] = network_note
    failures = []
    injected = sum(summary["faults"].values())
    if injected < args.min_faults:
        failures.append(f"only {injected} faults injected, --min-faults {args.min_faults}")
    moves = summary.get("moves") or {}
    if moves.get("asked", 0) >= MOVES_FOR_A_VERDICT and moves.get("done", 0) == 0:
        failures.append(f"{moves['asked']} replica moves asked, none finished: the move "
                        "nemeses tested nothing")
    for proc in stuck:
        failures.append(f"{proc} still in a client call {WORKER_JOIN_TIMEOUT_S:.0f} s after "
                        "the stop (its stack is a harness_error in history.jsonl)")
    if not any(e["type"] == "recovered" and e["ok"] for e in events):
        failures.append(f"no ack within {RECOVERY_TIMEOUT_S} s after the faults ended")
    if failures:
        summary["ok"] = False
        summary["failures"] = failures
    if harness_error is not None:
        summary["ok"] = False
        summary["harness_error"] = str(harness_error)[:2000]
    checker.write_outputs(summary, events, out)
    print(checker.describe(summary), flush=True)
    for f in failures:
        print(f"chaos: FAILED: {f}", flush=True)
    print(f"chaos: history, summary.json and timeline.svg in {out}", flush=True)
    if harness_error is not None:
        print(f"chaos: harness error: {harness_error}", file=sys.stderr)
        return 2 if not isinstance(harness_error, nodes.NodeError) else 1
    if summary["ok"] and not args.keep_data and cluster is not None:
        for n in cluster:
            shutil.rmtree(n.data_dir, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # librdkafka handles still open in stuck client threads must not hold up the exit.
    os._exit(code)
