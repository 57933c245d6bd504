"""kafka-python as a group consumer: consumes a whole topic through subscribe(), commits, and a
second member of the same group then resumes from the committed offsets (reads nothing old).

Usage: groups_kafka_python.py ADDR TOPIC GROUP COUNT
"""
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata

ADDR, TOPIC, GROUP, COUNT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
PARTITIONS = 3
DEADLINE = time.time() + 60


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


admin = KafkaAdminClient(bootstrap_servers=ADDR)
admin.create_topics([NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1)])
admin.close()

producer = KafkaProducer(bootstrap_servers=ADDR, acks="all")
for i in range(COUNT):
    producer.send(TOPIC, value=f"v{i}".encode(), partition=i % PARTITIONS)
producer.flush(30)
producer.close()

tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]

# Start the group at offset 0 with a generation -1 commit (what admin tools do), so the test
# does not depend on ListOffsets for auto.offset.reset.
seed = KafkaConsumer(bootstrap_servers=ADDR, group_id=GROUP, enable_auto_commit=False)
seed.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
seed.close()

consumer = KafkaConsumer(
    TOPIC,
    bootstrap_servers=ADDR,
    group_id=GROUP,
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    session_timeout_ms=6000,
    heartbeat_interval_ms=500,
)
seen = set()
while len(seen) < COUNT:
    if time.time() > DEADLINE:
        fail(f"consumed {len(seen)} of {COUNT}")
    for _, records in consumer.poll(timeout_ms=500).items():
        for r in records:
            v = r.value.decode()
            if v in seen:
                fail(f"duplicate {v} at {r.partition}/{r.offset}")
            seen.add(v)
consumer.commit()
assigned = sorted(tp.partition for tp in consumer.assignment())
if assigned != list(range(PARTITIONS)):
    fail(f"the only member was assigned {assigned}")
committed = {tp.partition: consumer.committed(tp) for tp in tps}
if sum(committed.values()) != COUNT:
    fail(f"committed offsets {committed} do not add up to {COUNT}")
consumer.close()

# A new member of the same group resumes after the committed offsets: nothing old comes back.
again = KafkaConsumer(
    TOPIC,
    bootstrap_servers=ADDR,
    group_id=GROUP,
    enable_auto_commit=False,
    session_timeout_ms=6000,
    heartbeat_interval_ms=500,
)
quiet_until = time.time() + 8
while time.time() < quiet_until:
    for _, records in again.poll(timeout_ms=500).items():
        if records:
            fail(f"resumed member re-read {records[0].partition}/{records[0].offset}")
if sorted(tp.partition for tp in again.assignment()) != list(range(PARTITIONS)):
    fail(f"resumed member was assigned {again.assignment()}")
again.close()
print(f"ok: {COUNT} messages consumed once, offsets committed and respected")
