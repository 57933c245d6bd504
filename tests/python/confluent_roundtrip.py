"""confluent-kafka (librdkafka) against spate: AdminClient creates topics, an idempotent
producer writes with each compression codec, an assign()-based consumer reads everything back
in order per partition, and AdminClient deletes the topics.

usage: confluent_roundtrip.py BOOTSTRAP MESSAGES_PER_CODEC
"""
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP = sys.argv[1]
COUNT = int(sys.argv[2])
PARTITIONS = 3
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
DEADLINE_S = 60


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
topics = [f"cf-{codec}" for codec in CODECS]
for topic, fut in admin.create_topics(
    [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics],
    operation_timeout=10,
).items():
    fut.result()
for topic, fut in admin.create_topics([NewTopic(topics[0], num_partitions=1)]).items():
    try:
        fut.result()
        fail("creating an existing topic succeeded")
    except KafkaException as e:
        if "TOPIC_ALREADY_EXISTS" not in str(e.args[0]):
            fail(f"unexpected error for a duplicate topic: {e}")
md = admin.list_topics(timeout=10)
for t in topics:
    if t not in md.topics or len(md.topics[t].partitions) != PARTITIONS:
        fail(f"topic {t} missing or wrong partition count in metadata")

for codec, topic in zip(CODECS, topics):
    errors = []
    acked = [0]

    def on_delivery(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked[0] += 1

    producer = Producer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "enable.idempotence": True,
            "compression.type": codec,
            "linger.ms": 5,
        }
    )
    for i in range(COUNT):
        producer.produce(
            topic,
            key=f"k{i % 97}".encode(),
            value=f"{codec}-{i}".encode() * 3,
            headers=[("h", f"{i}".encode())],
            on_delivery=on_delivery,
        )
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(30) != 0:
        fail(f"{codec}: messages left unflushed")
    if errors or acked[0] != COUNT:
        fail(f"{codec}: {len(errors)} delivery errors ({errors[:3]}), {acked[0]} acked")

    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": "unused-assign-only",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen = {}
    last = {}
    end = time.time() + DEADLINE_S
    while len(seen) < COUNT and time.time() < end:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            fail(f"{codec}: consume error {msg.error()}")
        value = msg.value().decode()
        unit = value[: len(value) // 3]
        i = int(unit.split("-")[1])
        if unit * 3 != value or msg.key() != f"k{i % 97}".encode():
            fail(f"{codec}: corrupted message {value!r} key {msg.key()!r}")
        if dict(msg.headers() or [])["h"] != f"{i}".encode():
            fail(f"{codec}: wrong header on message {i}")
        p = msg.partition()
        if p in last and msg.offset() != last[p] + 1:
            fail(f"{codec}: partition {p} offsets jump {last[p]} -> {msg.offset()}")
        last[p] = msg.offset()
        seen[i] = seen.get(i, 0) + 1
    consumer.close()
    if len(seen) != COUNT or any(n != 1 for n in seen.values()):
        fail(f"{codec}: read {len(seen)} distinct of {COUNT}")
    print(f"{codec}: {COUNT} messages produced idempotently and read back")

for topic, fut in admin.delete_topics(topics, operation_timeout=10).items():
    fut.result()
end = time.time() + DEADLINE_S
while time.time() < end:
    md = admin.list_topics(timeout=10)
    if not any(t in md.topics for t in topics):
        break
    time.sleep(0.1)
else:
    fail("deleted topics still listed")
print("OK")
