"""Judges a recorded history (see history.py) and writes its summary.

Anomaly kinds (each is a broken guarantee; any one fails the run):
  lost              an acknowledged value is not in the final read (or its offset is past the end)
  changed           one offset was seen holding two different values (reads, or read vs. ack)
  duplicate         one value was seen at two different offsets
  non_monotonic     a consumer's stream of one partition went back or repeated an offset
  skipped           a consumer's stream jumped over offsets (rule `gaps_are_anomalies`, on for a
                    single node, whose topic here has no compaction or control batches, so
                    every offset holds a record; off for a cluster: each new partition leader
                    writes a control batch)
  commit_backwards  a successful commit is below one that completed before it was sent, or a
                    committed offset read back is below a commit acknowledged before the read
  aborted_read      a value was read, never acknowledged, and is gone from the final read
  phantom           a value was read that no producer ever sent
  producer_reorder  one producer's acknowledged values in one partition are out of send order
  producer_fatal    the idempotent producer hit a fatal error (its sequence state was broken)
  offset_reset      the broker refused a consumer's fetch at an offset the consumer had reached
                    by reading (OFFSET_OUT_OF_RANGE): records it served went away, if only
                    for a while
  incomplete_read   the final read did not cover [low, high) of every partition, so lost
                    writes cannot be judged

Unavailability (reported, not judged): for each fault, the longest time with no ack among the
gaps between consecutive acks that overlap the fault's window.

usage: python3 -m chaos.checker HISTORY [--out DIR] [--allow-gaps]
"""
import argparse
import bisect
import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass

from . import history as history_mod

ANOMALY_KINDS = (
    "lost",
    "changed",
    "duplicate",
    "non_monotonic",
    "skipped",
    "commit_backwards",
    "aborted_read",
    "phantom",
    "producer_reorder",
    "producer_fatal",
    "offset_reset",
    "incomplete_read",
)

# Examples kept per anomaly kind in the summary: enough to replay, small enough to read.
MAX_EXAMPLES_PER_KIND = 10
FINAL_READER = "final"


@dataclass
class Rules:
    # Offsets are dense in Spate today; a log with compaction or transaction markers has
    # legitimate gaps, and then this rule is switched off.
    gaps_are_anomalies: bool = True


class Findings:
    def __init__(self):
        self.counts = defaultdict(int)
        self.examples = defaultdict(list)

    def add(self, kind, **detail):
        assert kind in ANOMALY_KINDS, kind
        self.counts[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES_PER_KIND:
            self.examples[kind].append(detail)


def _partition_key(p):
    return int(p)


def check(events, rules=None):
    """Returns the summary dict; summary["ok"] is False when any anomaly was found."""
    rules = rules or Rules()
    f = Findings()
    meta = next((e for e in events if e["type"] == "meta"), {})

    sent = {}  # value -> (proc, seq, t)
    acked = {}  # value -> (partition, offset, t)
    nacked = {}
    ack_times = []
    seen_at = defaultdict(set)  # (partition, offset) -> values read or acked there
    positions = defaultdict(set)  # value -> {(partition, offset)} read
    final_positions = defaultdict(set)  # (partition) -> offsets the final reader read
    final_values = set()
    final_hwm = {}
    final_done = None
    streams = {}  # (proc, partition) -> last offset read
    commits = defaultdict(list)  # (group, partition) -> [(t0, t, offset)] successful
    committed_reads = []
    faults = {}
    polls = 0
    poll_times = []
    counts = defaultdict(int)

    for e in events:
        ty = e["type"]
        counts[ty] += 1
        if ty == "send":
            sent[e["value"]] = (e["proc"], e.get("seq"), e["t"])
        elif ty == "ack":
            p, o = _partition_key(e["partition"]), e["offset"]
            if e["value"] in acked:
                f.add("duplicate", value=e["value"], how="acknowledged twice",
                      first=acked[e["value"]][:2], second=(p, o))
            acked[e["value"]] = (p, o, e["t"])
            ack_times.append(e["t"])
            # librdkafka can report a delivery without its offset (None): the value is still
            # judged lost or not by the reads; only the offset checks skip it.
            if o is not None:
                seen_at[(p, o)].add(e["value"])
        elif ty == "nack":
            nacked[e["value"]] = e.get("error")
        elif ty == "producer_fatal":
            f.add("producer_fatal", proc=e["proc"], error=e.get("error"), t=e["t"])
        elif ty == "offset_reset":
            f.add("offset_reset", proc=e["proc"], partition=e.get("partition"),
                  error=e.get("error"), t=e["t"])
            # The reader starts over from the beginning: one anomaly, not a second one for
            # the jump back.
            streams.pop((e["proc"], _partition_key(e["partition"])), None)
        elif ty in ("assign", "revoke"):
            for p in e.get("partitions", []):
                streams.pop((e["proc"], _partition_key(p)), None)
        elif ty == "poll":
            polls += 1
            poll_times.append(e["t"])
            p, o, v, proc = _partition_key(e["partition"]), e["offset"], e["value"], e["proc"]
            seen_at[(p, o)].add(v)
            positions[v].add((p, o))
            if proc == FINAL_READER:
                final_positions[p].add(o)
                final_values.add(v)
            last = streams.get((proc, p))
            if last is not None:
                if o <= last:
                    f.add("non_monotonic", proc=proc, partition=p, previous=last, offset=o,
                          t=e["t"])
                elif o > last + 1 and rules.gaps_are_anomalies:
                    f.add("skipped", proc=proc, partition=p, previous=last, offset=o,
                          missing=o - last - 1, t=e["t"])
            streams[(proc, p)] = o
        elif ty == "commit":
            if e.get("ok"):
                commits[(e["group"], _partition_key(e["partition"]))].append(
                    (e.get("t0", e["t"]), e["t"], e["offset"], e["proc"]))
        elif ty == "committed":
            committed_reads.append(e)
        elif ty == "fault_start":
            faults[e["id"]] = {"id": e["id"], "kind": e["kind"], "start": e["t"], "end": None,
                               "targets": e.get("targets", [])}
        elif ty == "fault_end":
            if e["id"] in faults:
                faults[e["id"]]["end"] = e["t"]
        elif ty == "final_hwm":
            final_hwm[_partition_key(e["partition"])] = (e["low"], e["high"])
        elif ty == "final_missing":
            final_hwm[_partition_key(e["partition"])] = (0, 0)
        elif ty == "final_done":
            final_done = e

    end_t = events[-1]["t"] if events else 0.0

    # Offsets whose value changed, and values at two offsets.
    for (p, o), values in seen_at.items():
        if len(values) > 1:
            f.add("changed", partition=p, offset=o, values=sorted(values))
    for v, where in positions.items():
        if len(where) > 1:
            f.add("duplicate", value=v, offsets=sorted(where))
        if v not in sent:
            f.add("phantom", value=v, offsets=sorted(where))

    # Lost writes and aborted reads are judged per partition, where the final read covered
    # [low, high) completely (a partition that no longer exists counts as read and empty).
    judged = set()
    if final_done is None:
        f.add("incomplete_read", reason="no final read in the history")
    else:
        for p, (low, high) in sorted(final_hwm.items()):
            # With gaps (control batches) the final reader's own completion is the judge.
            missing = ([o for o in range(low, high) if o not in final_positions[p]]
                       if rules.gaps_are_anomalies else [])
            if missing:
                f.add("incomplete_read", partition=p, low=low, high=high,
                      missing=len(missing), first_missing=missing[:5])
            else:
                judged.add(p)
        if not final_done.get("complete"):
            f.add("incomplete_read", reason=final_done.get("reason", "final reader gave up"))
    for v, (p, o, t) in acked.items():
        if p in judged and v not in final_values:
            f.add("lost", value=v, partition=p, offset=o, acked_at=t,
                  high_watermark=final_hwm[p][1])
    for v, where in positions.items():
        if (v in sent and v not in acked and v not in final_values
                and all(p in judged for p, _ in where)):
            f.add("aborted_read", value=v, offsets=sorted(where), nack=nacked.get(v))

    # One producer's acks in one partition follow its send order (idempotence keeps order).
    by_producer = defaultdict(list)
    for v, (p, o, t) in acked.items():
        proc, seq, _ = sent.get(v, (None, None, None))
        if proc is not None and seq is not None and o is not None:
            by_producer[(proc, p)].append((seq, o, v))
    for (proc, p), rows in by_producer.items():
        rows.sort()
        for (s1, o1, v1), (s2, o2, v2) in zip(rows, rows[1:]):
            if o2 <= o1:
                f.add("producer_reorder", proc=proc, partition=p, earlier=(v1, o1),
                      later=(v2, o2))

    # Committed offsets never go backwards: against commits that completed before a commit
    # was sent, and against what a consumer reads back as committed.
    floors = {key: _completion_floor(rows) for key, rows in commits.items()}
    for (group, p), rows in commits.items():
        for t0, t, off, proc in rows:
            floor = floors[(group, p)](t0)
            if floor is not None and off < floor:
                f.add("commit_backwards", group=group, partition=p, offset=off,
                      earlier_commit=floor, proc=proc, t=t)
    for e in committed_reads:
        p = _partition_key(e["partition"])
        t0 = e.get("t0", e["t"])
        floor = floors[(e["group"], p)](t0) if (e["group"], p) in floors else None
        if floor is not None and e["offset"] < floor:
            f.add("commit_backwards", group=e["group"], partition=p, read_back=e["offset"],
                  acknowledged_commit=floor, proc=e["proc"], t=e["t"])

    # Unavailability: the longest no-ack gap overlapping each fault's window.
    ack_times.sort()
    per_fault = []
    for fault in sorted(faults.values(), key=lambda x: x["start"]):
        start = fault["start"]
        end = fault["end"] if fault["end"] is not None else end_t
        longest = _longest_gap(ack_times, start, end, end_t)
        per_fault.append({"id": fault["id"], "kind": fault["kind"], "start": start,
                          "end": end, "targets": fault["targets"],
                          "unavailable_s": round(longest, 3)})
    by_kind = defaultdict(list)
    for pf in per_fault:
        by_kind[pf["kind"]].append(pf["unavailable_s"])
    unavailability = {
        kind: {"faults": len(v), "median_s": round(statistics.median(v), 3),
               "max_s": round(max(v), 3)}
        for kind, v in sorted(by_kind.items())
    }

    anomalies = {k: f.counts[k] for k in ANOMALY_KINDS if f.counts[k]}
    indeterminate = sum(1 for v in sent if v not in acked and v not in nacked)
    return {
        "ok": not anomalies,
        "seed": meta.get("seed"),
        "meta": meta,
        "duration_s": round(end_t, 3),
        "rules": {"gaps_are_anomalies": rules.gaps_are_anomalies},
        "counts": {
            "sent": len(sent),
            "acked": len(acked),
            "nacked": len(nacked),
            "no_outcome": indeterminate,
            "polled": polls,
            "final_read": sum(len(v) for v in final_positions.values()),
            "commits_ok": sum(len(v) for v in commits.values()),
            "commits_failed": counts["commit"] - sum(len(v) for v in commits.values()),
        },
        "faults": {k: len(v) for k, v in sorted(by_kind.items())},
        # Replica moves the nemesis asked for: refused, finished in time, still running.
        "moves": {
            "asked": sum(1 for e in events if e["type"] == "move"),
            "refused": sum(1 for e in events if e["type"] == "move" and e.get("error")),
            "done": sum(1 for e in events if e["type"] == "move_end" and e.get("done")),
        },
        "closes": _closes(events),
        "unavailability": unavailability,
        "per_fault": per_fault,
        "anomalies": anomalies,
        "examples": {k: f.examples[k] for k in anomalies},
    }


def _closes(events):
    """Consumers' close() calls (workload close_start/close_end): how many, the longest, and
    the processes whose close never returned."""
    started = {e["proc"] for e in events if e["type"] == "close_start"}
    ended = [e for e in events if e["type"] == "close_end"]
    return {
        "started": len(started),
        "max_s": max((e["duration_s"] for e in ended), default=None),
        "unfinished": sorted(started - {e["proc"] for e in ended}),
    }


def _completion_floor(rows):
    """For commits (t0, t, offset, proc): a function giving the highest offset among the
    commits acknowledged before a time, or None."""

    done = sorted(rows, key=lambda r: r[1])
    times = [r[1] for r in done]
    best, prefix_max = None, []
    for r in done:
        best = r[2] if best is None else max(best, r[2])
        prefix_max.append(best)

    def floor(before):
        i = bisect.bisect_left(times, before)
        return prefix_max[i - 1] if i > 0 else None

    return floor


def _longest_gap(ack_times, start, end, run_end):
    """Longest interval between consecutive acks (or the window's edges when there are none
    on a side) that overlaps [start, end]."""

    i = bisect.bisect_left(ack_times, start)
    prev = ack_times[i - 1] if i > 0 else start
    longest = 0.0
    j = i
    while j < len(ack_times):
        longest = max(longest, ack_times[j] - prev)
        prev = ack_times[j]
        if ack_times[j] > end:
            break
        j += 1
    else:
        # No ack after the window: unavailable until the end of the history.
        longest = max(longest, run_end - prev)
    return longest


def write_outputs(summary, events, out_dir):
    from . import timeline

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
        fh.write("\n")
    with open(os.path.join(out_dir, "timeline.svg"), "w", encoding="utf-8") as fh:
        fh.write(timeline.render(events, summary))


def describe(summary):
    c = summary["counts"]
    lines = [
        f"seed {summary['seed']}  duration {summary['duration_s']} s",
        f"sent {c['sent']}  acked {c['acked']}  nacked {c['nacked']}  "
        f"no outcome {c['no_outcome']}  polled {c['polled']}  final read {c['final_read']}  "
        f"commits ok {c['commits_ok']} failed {c['commits_failed']}",
        "faults: " + (", ".join(f"{k} {v}" for k, v in summary["faults"].items()) or "none"),
    ]
    m = summary.get("moves") or {}
    if m.get("asked"):
        lines.append(f"moves: asked {m['asked']}, refused {m['refused']}, done {m['done']}")
    cl = summary.get("closes") or {}
    if cl.get("started"):
        lines.append(f"consumer closes: {cl['started']}, longest {cl['max_s']} s"
                     + (f", NEVER RETURNED: {', '.join(cl['unfinished'])}"
                        if cl["unfinished"] else ""))
    for kind, u in summary["unavailability"].items():
        lines.append(f"  unavailable during {kind}: median {u['median_s']} s, "
                     f"max {u['max_s']} s over {u['faults']}")
    if summary["ok"]:
        lines.append("anomalies: none")
    else:
        lines.append("ANOMALIES: " + ", ".join(f"{k} {v}" for k, v in
                                               summary["anomalies"].items()))
        for kind, ex in summary["examples"].items():
            for x in ex[:3]:
                lines.append(f"  {kind}: {json.dumps(x)}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m chaos.checker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("history")
    ap.add_argument("--out", help="where summary.json and timeline.svg go "
                    "(default: the history's directory)")
    ap.add_argument("--allow-gaps", action="store_true",
                    help="offset gaps between consecutive polls are legitimate "
                    "(compaction, transaction markers)")
    args = ap.parse_args(argv)
    events = history_mod.load(args.history)
    summary = check(events, Rules(gaps_are_anomalies=not args.allow_gaps))
    write_outputs(summary, events, args.out or os.path.dirname(os.path.abspath(args.history)))
    print(describe(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
