"""Reads every message of every partition of TOPIC from the start up to its end offset (taken
at start) and prints the values, one per line; with --offsets each line is
"PARTITION OFFSET VALUE".

usage: consume_all.py BOOTSTRAP TOPIC [--offsets]
"""
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

BOOTSTRAP, TOPIC = sys.argv[1], sys.argv[2]
WITH_OFFSETS = "--offsets" in sys.argv[3:]
DEADLINE_S = 120
c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "unused", "enable.auto.commit": False})
md = c.list_topics(TOPIC, timeout=10)
parts = list(md.topics[TOPIC].partitions)
# Metadata reaches every node of a cluster a little apart (as in Kafka): right after a topic is
# recreated or a node restarts, the client may hold metadata from a node that does not list the
# partition yet, and librdkafka answers _UNKNOWN_PARTITION locally. Retriable, for a bounded time.
RETRIABLE = {KafkaError._UNKNOWN_PARTITION, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
             KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
             KafkaError.UNKNOWN_TOPIC_OR_PART}
WATERMARK_RETRY_S = 30


def end_offset(p):
    give_up = time.time() + WATERMARK_RETRY_S
    while True:
        try:
            return c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1]
        except KafkaException as e:
            if e.args[0].code() not in RETRIABLE or time.time() > give_up:
                raise
            time.sleep(0.2)
            c.list_topics(TOPIC, timeout=10)


ends = {p: end_offset(p) for p in parts}
c.assign([TopicPartition(TOPIC, p, 0) for p in parts])
pos = {p: 0 for p in parts}
out = []
deadline = time.time() + DEADLINE_S
# Control records (a cluster's new leader writes one) take offsets but are never delivered, so
# a partition is done when the position passes its end.
while any(pos[p] < ends[p] for p in parts) and time.time() < deadline:
    m = c.poll(0.5)
    if m is None:
        for p in parts:
            if pos[p] < ends[p]:
                pos[p] = max(pos[p], c.position([TopicPartition(TOPIC, p)])[0].offset)
        continue
    if m.error():
        continue
    value = m.value().decode()
    out.append(f"{m.partition()} {m.offset()} {value}" if WITH_OFFSETS else value)
    pos[m.partition()] = m.offset() + 1
c.close()
if any(pos[p] < ends[p] for p in parts):
    print("FAIL: did not reach the end offsets", pos, ends, file=sys.stderr)
    sys.exit(1)
sys.stdout.write("\n".join(out) + ("\n" if out else ""))
