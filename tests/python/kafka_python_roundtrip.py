"""kafka-python against spate: produce to explicit partitions, consume with assign().

usage: kafka_python_roundtrip.py BOOTSTRAP TOPIC MESSAGES
"""
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

BOOTSTRAP, TOPIC, COUNT = sys.argv[1], sys.argv[2], int(sys.argv[3])
PARTITIONS = 3


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP)
admin.create_topics([NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1)])

producer = KafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
futures = []
for i in range(COUNT):
    futures.append(
        producer.send(
            TOPIC,
            key=f"k{i}".encode(),
            value=f"value-{i}".encode(),
            partition=i % PARTITIONS,
            headers=[("n", str(i).encode())],
        )
    )
producer.flush(30)
for f in futures:
    f.get(timeout=30)
producer.close()

consumer = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False,
                         auto_offset_reset="earliest")
consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
consumer.seek_to_beginning()
got = {p: [] for p in range(PARTITIONS)}
end = time.time() + 60
while sum(len(v) for v in got.values()) < COUNT and time.time() < end:
    for tp, msgs in consumer.poll(timeout_ms=500).items():
        for m in msgs:
            got[tp.partition].append(int(m.value.decode().split("-")[1]))
            if m.key != f"k{got[tp.partition][-1]}".encode():
                fail(f"wrong key {m.key!r}")
consumer.close()
for p in range(PARTITIONS):
    want = list(range(p, COUNT, PARTITIONS))
    if got[p] != want:
        fail(f"partition {p}: got {len(got[p])} messages, first diff at "
             f"{next((i for i, (a, b) in enumerate(zip(got[p], want)) if a != b), None)}")
print("OK")
