"""Reads every message of every partition of TOPIC from the start and prints the values, one
per line, once no partition has anything left up to its end offset at start.

usage: consume_all.py BOOTSTRAP TOPIC
"""
import sys
import time

from confluent_kafka import Consumer, TopicPartition

BOOTSTRAP, TOPIC = sys.argv[1], sys.argv[2]
c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "unused", "enable.auto.commit": False})
md = c.list_topics(TOPIC, timeout=10)
parts = list(md.topics[TOPIC].partitions)
ends = {p: c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in parts}
c.assign([TopicPartition(TOPIC, p, 0) for p in parts])
pos = {p: 0 for p in parts}
out = []
deadline = time.time() + 60
while any(pos[p] < ends[p] for p in parts) and time.time() < deadline:
    m = c.poll(0.5)
    if m is None or m.error():
        continue
    out.append(m.value().decode())
    pos[m.partition()] = m.offset() + 1
c.close()
if any(pos[p] < ends[p] for p in parts):
    print("FAIL: did not reach the end offsets", pos, ends, file=sys.stderr)
    sys.exit(1)
sys.stdout.write("\n".join(out) + ("\n" if out else ""))
