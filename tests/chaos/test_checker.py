"""The checker must fail: one synthetic history per anomaly kind, each built from a clean one by
planting exactly that bug, is flagged with that kind (and only that kind); the clean one passes.

Run from tests/:  python3 -m unittest chaos.test_checker
"""
import json
import os
import tempfile
import unittest

from . import checker, history


class Synth:
    """Builds a clean history: producer p0 writes N values to 2 partitions, all acked; a group
    consumer reads and commits them; a final reader reads everything."""

    def __init__(self, n=6, partitions=2):
        self.events = []
        self.t = 0.0
        self.n = n
        self.partitions = partitions
        self.next_offset = [0] * partitions
        self.writes = []  # (value, partition, offset)

    def ev(self, type_, **fields):
        self.t += 0.01
        e = {"t": round(self.t, 6), "type": type_}
        e.update(fields)
        self.events.append(e)
        return e

    def produce(self):
        self.ev("meta", seed=7, topic="t", partitions=self.partitions)
        for seq in range(self.n):
            v = f"p0-{seq}"
            p = seq % self.partitions
            o = self.next_offset[p]
            self.next_offset[p] += 1
            self.ev("send", proc="p0", value=v, seq=seq)
            self.ev("ack", proc="p0", value=v, partition=p, offset=o)
            self.writes.append((v, p, o))
        return self

    def consume(self, proc="g0", group="g"):
        self.ev("assign", proc=proc, partitions=list(range(self.partitions)))
        for p in range(self.partitions):
            t0 = self.t
            self.ev("committed", proc=proc, group=group, partition=p, offset=-1001, t0=t0)
        for v, p, o in sorted(self.writes, key=lambda w: (w[1], w[2])):
            self.ev("poll", proc=proc, partition=p, offset=o, value=v)
            t0 = self.t
            self.ev("commit", proc=proc, group=group, partition=p, offset=o + 1, ok=True, t0=t0)
        return self

    def final(self):
        for p in range(self.partitions):
            self.ev("final_hwm", partition=p, low=0, high=self.next_offset[p])
        for v, p, o in sorted(self.writes, key=lambda w: (w[1], w[2])):
            self.ev("poll", proc="final", partition=p, offset=o, value=v)
        self.ev("final_done", complete=True)
        return self

    def clean(self):
        return self.produce().consume().final().events


def kinds(events, **rules):
    summary = checker.check(events, checker.Rules(**rules))
    return set(summary["anomalies"]), summary


def replace(events, pred, **changes):
    """Changes the first event matching pred."""
    for e in events:
        if pred(e):
            e.update(changes)
            return events
    raise AssertionError("no event to change")


def drop(events, pred):
    out, dropped = [], False
    for e in events:
        if not dropped and pred(e):
            dropped = True
            continue
        out.append(e)
    assert dropped, "no event to drop"
    return out


def is_final_poll(value):
    return lambda e: e["type"] == "poll" and e["proc"] == "final" and e["value"] == value


class CheckerTest(unittest.TestCase):
    def assertOnly(self, events, kind, **rules):
        found, summary = kinds(events, **rules)
        self.assertEqual(found, {kind}, json.dumps(summary["examples"], indent=1))
        self.assertFalse(summary["ok"])
        return summary

    def test_clean_history_passes(self):
        found, summary = kinds(Synth().clean())
        self.assertEqual(found, set(), summary["examples"])
        self.assertTrue(summary["ok"])
        self.assertEqual(summary["counts"]["acked"], 6)
        self.assertEqual(summary["counts"]["final_read"], 6)

    def test_ack_without_an_offset_is_judged_by_the_reads(self):
        # librdkafka reported one delivery without its offset (seen in a soak): no crash, no
        # anomaly while the value is read back.
        events = Synth().clean()
        ack = next(e for e in events if e["type"] == "ack")
        ack["offset"] = None
        found, summary = kinds(events)
        self.assertEqual(found, set(), summary["examples"])

    def test_lost_write(self):
        # The broker acknowledged p0-2 and later the log ends before it (truncated suffix).
        s = Synth().produce().consume()
        s.writes = [w for w in s.writes if w[0] != "p0-4"]
        s.next_offset[0] -= 1  # p0-4 was the last record of partition 0
        events = s.final().events
        self.assertOnly(events, "lost")

    def test_partition_gone_loses_its_writes(self):
        s = Synth().produce().consume()
        s.writes = [w for w in s.writes if w[1] == 0]
        s.partitions = 1
        events = s.final().events
        events.insert(-1, {"t": s.t, "type": "final_missing", "partition": 1,
                           "error": "Unknown partition"})
        summary = self.assertOnly(events, "lost")
        self.assertEqual(summary["anomalies"]["lost"], 3)

    def test_acked_but_never_read_at_all(self):
        s = Synth()
        s.produce()
        s.ev("send", proc="p0", value="p0-99", seq=99)
        s.ev("ack", proc="p0", value="p0-99", partition=1, offset=3)
        events = s.consume().final().events
        # The final reader's high watermark says 3 records: offset 3 was never there.
        self.assertOnly(events, "lost")

    def test_offset_value_changed_between_reads(self):
        events = Synth().clean()
        replace(events, is_final_poll("p0-2"), value="p0-4")
        found, _ = kinds(events)
        self.assertIn("changed", found)

    def test_duplicate(self):
        s = Synth().produce()
        # The same value stored twice: a retried batch written as a second copy.
        s.writes.append(("p0-3", 1, s.next_offset[1]))
        s.next_offset[1] += 1
        events = s.consume().final().events
        self.assertOnly(events, "duplicate")

    def test_non_monotonic_stream(self):
        s = Synth().produce().consume()
        v, p, o = s.writes[0]
        s.ev("poll", proc="g0", partition=p, offset=o, value=v)  # re-delivered, no reassign
        self.assertOnly(s.final().events, "non_monotonic")

    def test_reassignment_restarts_a_stream(self):
        s = Synth().produce().consume()
        v, p, o = s.writes[0]
        s.ev("assign", proc="g0", partitions=[p])
        s.ev("poll", proc="g0", partition=p, offset=o, value=v)
        found, _ = kinds(s.final().events)
        self.assertEqual(found, set())

    def test_skipped_offsets_and_the_rule_switch(self):
        events = Synth().clean()
        events = drop(events, lambda e: e["type"] == "poll" and e["proc"] == "g0"
                      and e["value"] == "p0-2")
        self.assertOnly(events, "skipped")
        found, _ = kinds(events, gaps_are_anomalies=False)
        self.assertEqual(found, set())

    def test_commit_goes_backwards(self):
        s = Synth().produce().consume()
        t0 = s.t
        s.ev("commit", proc="g1", group="g", partition=0, offset=1, ok=True, t0=t0)
        self.assertOnly(s.final().events, "commit_backwards")

    def test_failed_commit_below_is_fine(self):
        s = Synth().produce().consume()
        t0 = s.t
        s.ev("commit", proc="g1", group="g", partition=0, offset=1, ok=False, t0=t0,
             error="ILLEGAL_GENERATION")
        found, _ = kinds(s.final().events)
        self.assertEqual(found, set())

    def test_committed_offset_read_back_lower(self):
        s = Synth().produce().consume()
        t0 = s.t
        s.ev("committed", proc="g1", group="g", partition=1, offset=0, t0=t0)
        self.assertOnly(s.final().events, "commit_backwards")

    def test_aborted_read(self):
        s = Synth().produce()
        # p0-9 was sent, the client timed it out, a consumer read it, and it then vanished.
        s.ev("send", proc="p0", value="p0-9", seq=9)
        s.ev("nack", proc="p0", value="p0-9", error="_MSG_TIMED_OUT")
        s.ev("poll", proc="r0", partition=0, offset=s.next_offset[0], value="p0-9")
        s.ev("assign", proc="r0", partitions=[0])
        self.assertOnly(s.consume().final().events, "aborted_read")

    def test_unacknowledged_value_that_stays_is_fine(self):
        s = Synth().produce()
        s.ev("send", proc="p0", value="p0-9", seq=9)
        s.ev("nack", proc="p0", value="p0-9", error="_MSG_TIMED_OUT")
        s.writes.append(("p0-9", 0, s.next_offset[0]))
        s.next_offset[0] += 1
        found, _ = kinds(s.consume().final().events)
        self.assertEqual(found, set())

    def test_phantom(self):
        s = Synth().produce()
        s.writes.append(("never-sent", 1, s.next_offset[1]))
        s.next_offset[1] += 1
        self.assertOnly(s.consume().final().events, "phantom")

    def test_producer_reorder(self):
        s = Synth().produce()
        # p0-0 and p0-2 went to partition 0; the broker stored them in the wrong order.
        a = next(e for e in s.events if e["type"] == "ack" and e["value"] == "p0-0")
        b = next(e for e in s.events if e["type"] == "ack" and e["value"] == "p0-2")
        a["offset"], b["offset"] = b["offset"], a["offset"]
        s.writes = [(v, p, {"p0-0": 1, "p0-2": 0}.get(v, o)) for v, p, o in s.writes]
        self.assertOnly(s.consume().final().events, "producer_reorder")

    def test_producer_fatal(self):
        s = Synth().produce()
        s.ev("producer_fatal", proc="p0", error="OUT_OF_ORDER_SEQUENCE_NUMBER")
        self.assertOnly(s.consume().final().events, "producer_fatal")

    def test_offset_reset(self):
        s = Synth().produce().consume()
        s.ev("offset_reset", proc="r0", partition=0, error="fetch at 6 out of range")
        self.assertOnly(s.final().events, "offset_reset")

    def test_incomplete_final_read(self):
        events = drop(Synth().clean(), is_final_poll("p0-1"))
        self.assertOnly(events, "incomplete_read")
        events = [e for e in Synth().clean() if e["type"] != "final_done"]
        self.assertOnly(events, "incomplete_read")

    def test_unavailability_window_per_fault(self):
        s = Synth()
        s.ev("meta", seed=1)
        for i in range(10):  # acks at 1.0 .. 1.9
            s.t = 1.0 + i / 10 - 0.01
            s.ev("send", proc="p0", value=f"p0-{i}", seq=i)
            s.ev("ack", proc="p0", value=f"p0-{i}", partition=0, offset=i)
            s.writes.append((f"p0-{i}", 0, i))
        s.t = 2.0
        s.ev("fault_start", id=1, kind="kill", targets=[1])
        s.t = 3.0
        s.ev("fault_end", id=1, kind="kill")
        s.t = 4.5  # first ack after the fault
        s.ev("send", proc="p0", value="p0-10", seq=10)
        s.ev("ack", proc="p0", value="p0-10", partition=0, offset=10)
        s.writes.append(("p0-10", 0, 10))
        s.next_offset[0] = 11
        s.final()
        summary = checker.check(s.events)
        self.assertTrue(summary["ok"], summary["anomalies"])
        [pf] = summary["per_fault"]
        last_before = max(e["t"] for e in s.events if e["type"] == "ack" and e["t"] < 2.0)
        first_after = min(e["t"] for e in s.events if e["type"] == "ack" and e["t"] > 2.0)
        self.assertAlmostEqual(pf["unavailable_s"], first_after - last_before, places=3)
        self.assertEqual(summary["unavailability"]["kill"]["faults"], 1)

    def test_cli_on_a_saved_history_exits_non_zero_and_writes_outputs(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "history.jsonl")
            events = drop(Synth().clean(), is_final_poll("p0-5"))
            # The acked value is gone from the log: the final reader's watermark agrees.
            for e in events:
                if e["type"] == "final_hwm" and e["partition"] == 1:
                    e["high"] -= 1
            with open(path, "w") as fh:
                for e in events:
                    fh.write(json.dumps(e) + "\n")
                fh.write('{"t": 9, "type": "po')  # a torn last line is skipped
            self.assertEqual(checker.main([path]), 1)
            with open(os.path.join(d, "summary.json")) as fh:
                summary = json.load(fh)
            self.assertEqual(summary["anomalies"], {"lost": 1})
            self.assertEqual(summary["seed"], 7)
            with open(os.path.join(d, "timeline.svg")) as fh:
                self.assertTrue(fh.read().startswith("<svg"))
            clean = os.path.join(d, "clean.jsonl")
            with open(clean, "w") as fh:
                for e in Synth().clean():
                    fh.write(json.dumps(e) + "\n")
            self.assertEqual(checker.main([clean, "--out", d]), 0)

    def test_a_close_that_never_returned_is_reported(self):
        s = Synth()
        s.clean()
        s.ev("close_start", proc="g0")
        s.ev("close_start", proc="g1")
        s.ev("close_end", proc="g0", duration_s=0.25)
        summary = checker.check(s.events)
        self.assertEqual(summary["closes"],
                         {"started": 2, "max_s": 0.25, "unfinished": ["g1"]})
        self.assertIn("NEVER RETURNED: g1", checker.describe(summary))
        self.assertEqual(checker.check(Synth().clean())["closes"]["unfinished"], [])

    def test_history_round_trip(self):
        with tempfile.TemporaryDirectory() as d:
            h = history.History(os.path.join(d, "h.jsonl"))
            h.record("meta", seed=3)
            h.record("send", proc="p0", value="p0-0", seq=0)
            h.close()
            events = history.load(os.path.join(d, "h.jsonl"))
            self.assertEqual([e["type"] for e in events], ["meta", "send"])
            self.assertLessEqual(events[0]["t"], events[1]["t"])


if __name__ == "__main__":
    unittest.main()
