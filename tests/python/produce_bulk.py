"""Writes COUNT messages of SIZE bytes to partition PARTITION of TOPIC with acks=all, waits for
every delivery report and prints how many were acknowledged; exits 1 if any failed.

usage: produce_bulk.py BOOTSTRAP TOPIC PARTITION COUNT SIZE
"""
import sys

from confluent_kafka import Producer

BOOTSTRAP, TOPIC = sys.argv[1], sys.argv[2]
PARTITION, COUNT, SIZE = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "linger.ms": 5,
                     "message.timeout.ms": 30000, "enable.idempotence": True})
acked, failed = 0, []


def on_delivery(err, msg):
    global acked
    if err is None:
        acked += 1
    else:
        failed.append(str(err))


for i in range(COUNT):
    # Different bytes per message, so nothing on the way compresses them.
    value = (b"bulk%08d" % i) * (SIZE // 12 + 1)
    while True:
        try:
            producer.produce(TOPIC, value=value[:SIZE], partition=PARTITION,
                             on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)
left = producer.flush(60)
print(acked)
if failed or left:
    print(f"FAIL: {len(failed)} failed ({failed[:3]}), {left} without a report", file=sys.stderr)
    sys.exit(1)
