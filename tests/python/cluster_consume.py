"""Reads every partition of TOPIC from the start up to its end offset (taken at start) and
prints each record as a line "PARTITION OFFSET VALUE".

usage: cluster_consume.py BOOTSTRAP TOPIC
"""
import sys
import time

from confluent_kafka import Consumer, TopicPartition

BOOTSTRAP, TOPIC = sys.argv[1], sys.argv[2]
DEADLINE_S = 120
c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "unused", "enable.auto.commit": False})
md = c.list_topics(TOPIC, timeout=10)
parts = list(md.topics[TOPIC].partitions)
ends = {p: c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in parts}
c.assign([TopicPartition(TOPIC, p, 0) for p in parts])
pos = {p: 0 for p in parts}
out = []
deadline = time.time() + DEADLINE_S
# Control records (a new leader's first batch) take offsets but are never delivered, so a
# partition is done when the next offset to read passes the end, or nothing is left below it.
while any(pos[p] < ends[p] for p in parts) and time.time() < deadline:
    m = c.poll(0.5)
    if m is None:
        for p in parts:
            if pos[p] < ends[p]:
                got = c.position([TopicPartition(TOPIC, p)])[0].offset
                if got >= ends[p]:
                    pos[p] = got
        continue
    if m.error():
        continue
    out.append(f"{m.partition()} {m.offset()} {m.value().decode()}")
    pos[m.partition()] = m.offset() + 1
c.close()
if any(pos[p] < ends[p] for p in parts):
    print("FAIL: did not reach the end offsets", pos, ends, file=sys.stderr)
    sys.exit(1)
sys.stdout.write("\n".join(out) + ("\n" if out else ""))
