"""Compacted topic under replication (tests/cluster_compaction.rs drives it).

usage:
  compaction_replicas.py BOOTSTRAP TOPIC produce EXPECTED_JSON
      creates TOPIC (1 partition, replication factor 3, cleanup.policy=compact, 1 MiB
      segments, min.cleanable.dirty.ratio 0.01), writes 200,000 updates over 2,000 keys with an
      idempotent acks=all producer, and writes the last acknowledged value of every key to
      EXPECTED_JSON.
  compaction_replicas.py BOOTSTRAP TOPIC read EXPECTED_JSON
      reads the partition from its start (from whichever replica leads it now) and checks:
      exactly the expected last value of every key, offsets strictly increasing, and fewer
      than half the updates left (the log was cleaned). Prints the records read and the gaps.
"""
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP, TOPIC, MODE, EXPECTED = sys.argv[1:5]
UPDATES = 200_000
KEYS = 2_000
# Records with about 100-byte values: 200,000 of them fill about twenty 1 MiB segments.
VALUE_PAD = "v" * 90
POLL_SLICE_S = 0.1
DEADLINE_S = 120.0


def produce():
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    configs = {
        "cleanup.policy": "compact",
        "segment.bytes": "1048576",
        "max.message.bytes": "262144",
        "min.cleanable.dirty.ratio": "0.01",
    }
    futures = admin.create_topics([NewTopic(TOPIC, 1, 3, config=configs)])
    futures[TOPIC].result(timeout=60)
    acked = {}
    failed = []

    def on_delivery(err, msg):
        if err is not None:
            failed.append(str(err))
        else:
            acked[msg.key().decode()] = (msg.offset(), msg.value().decode())

    p = Producer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # Under the topic's max.message.bytes.
            "batch.size": 65536,
        }
    )
    for i in range(UPDATES):
        key = f"k{i % KEYS}"
        while True:
            try:
                p.produce(TOPIC, key=key, value=f"{i}-{VALUE_PAD}", on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(POLL_SLICE_S)
        if i % 1000 == 0:
            p.poll(0)
    deadline = time.monotonic() + DEADLINE_S
    while len(p) > 0 and time.monotonic() < deadline:
        p.poll(POLL_SLICE_S)
    if failed or len(p) > 0:
        sys.exit(f"produce failed: {failed[:5]}, {len(p)} undelivered")
    # The last acknowledged value of each key is the one at its highest offset.
    expected = {k: v for k, (o, v) in acked.items()}
    with open(EXPECTED, "w") as f:
        json.dump(expected, f)
    print(f"produced {UPDATES} updates over {len(expected)} keys")


def read():
    with open(EXPECTED) as f:
        expected = json.load(f)
    c = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # The end is reached at EOF, not at the last record: a new leader's control batch
            # (its epoch's first) takes offsets no consumer is handed.
            "enable.partition.eof": True,
        }
    )
    tp = TopicPartition(TOPIC, 0)
    _, high = c.get_watermark_offsets(tp, timeout=30)
    c.assign([TopicPartition(TOPIC, 0, 0)])
    latest = {}
    last = -1
    gaps = 0
    records = 0
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if time.monotonic() > deadline:
            sys.exit(f"read only to offset {last} of {high}")
        m = c.poll(POLL_SLICE_S)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                if m.offset() >= high:
                    break
                continue
            sys.exit(f"read error: {m.error()}")
        if m.offset() <= last:
            sys.exit(f"offset {m.offset()} after {last}")
        if m.offset() > last + 1:
            gaps += 1
        last = m.offset()
        records += 1
        latest[m.key().decode()] = m.value().decode()
    c.close()
    if latest != expected:
        wrong = [k for k in expected if latest.get(k) != expected[k]][:5]
        sys.exit(f"{len(latest)} keys read, {len(expected)} expected; differing: {wrong}")
    # Cleaned, the log keeps the last record of every key below the cleaning point and the
    # uncleaned tail (the active segment, about a twentieth of the updates).
    if records >= UPDATES // 2:
        sys.exit(f"{records} records of {UPDATES} read: the log was not cleaned")
    print(f"read {records} records to offset {last}: {len(latest)} keys, {gaps} gaps")


if MODE == "produce":
    produce()
elif MODE == "read":
    read()
else:
    sys.exit(f"unknown mode {MODE}")
