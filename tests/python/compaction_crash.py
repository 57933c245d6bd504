"""Helper of tests/compaction_crash.rs (the broker is killed and restarted by the Rust test).

  produce BOOTSTRAP TOPIC ROUND KEYS UPDATES
      writes UPDATES values for every one of KEYS keys, in order ("r{ROUND}-u{n}"), with an
      idempotent acks=all producer; exits 0 once every value is acknowledged.
  read BOOTSTRAP TOPIC
      reads the partition from the start to its end offset and prints {key: last value} as
      JSON; exits 1 if offsets do not strictly increase.

usage: compaction_crash.py produce|read ...
"""
import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

DEADLINE_S = 60


def produce(bootstrap, topic, rnd, keys, updates):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                  "linger.ms": 5, "message.timeout.ms": DEADLINE_S * 1000,
                  # Batches well below the topic's max.message.bytes (small segments).
                  "batch.size": 16384})
    failed = []

    def report(err, msg):
        if err is not None:
            failed.append(str(err))

    for u in range(updates):
        for k in range(keys):
            while True:
                try:
                    p.produce(topic, key=f"key-{k}".encode(), value=f"r{rnd}-u{u}".encode(),
                              partition=0, on_delivery=report)
                    break
                except BufferError:
                    p.poll(0.05)
        p.poll(0)
    left = p.flush(DEADLINE_S)
    if left or failed:
        print(f"FAIL: {left} undelivered, {len(failed)} failed: {failed[:3]}", file=sys.stderr)
        sys.exit(1)


def read(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "crash-reader",
                  "enable.auto.commit": False})
    tp = TopicPartition(topic, 0)
    end = c.get_watermark_offsets(tp, timeout=10)[1]
    c.assign([TopicPartition(topic, 0, 0)])
    latest, last_offset, pos = {}, -1, 0
    deadline = time.time() + DEADLINE_S
    while pos < end and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            pos = max(pos, c.position([tp])[0].offset)
            continue
        if m.error():
            continue
        if m.offset() <= last_offset:
            print(f"FAIL: offset {m.offset()} after {last_offset}", file=sys.stderr)
            sys.exit(1)
        last_offset = m.offset()
        latest[m.key().decode()] = m.value().decode() if m.value() is not None else None
        pos = m.offset() + 1
    c.close()
    if pos < end:
        print(f"FAIL: read stopped at {pos} of {end}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(latest))


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        read(sys.argv[2], sys.argv[3])
