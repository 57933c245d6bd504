"""An idempotent acks=all producer (confluent-kafka) writing unique values to a Spate cluster
until STOPFILE exists, at about RATE messages a second, round robin over PARTITIONS partitions.
Every delivery report is written to OUTFILE as a line:
  ack PARTITION OFFSET VALUE MILLIS     (acknowledged)
  err VALUE MILLIS REASON               (failed: the application saw an error)
Exits 0 once everything produced has a report.

usage: cluster_produce.py BOOTSTRAP TOPIC PARTITIONS RATE STOPFILE OUTFILE
"""
import os
import sys
import time

from confluent_kafka import Producer

BOOTSTRAP, TOPIC = sys.argv[1], sys.argv[2]
PARTITIONS, RATE = int(sys.argv[3]), float(sys.argv[4])
STOPFILE, OUTFILE = sys.argv[5], sys.argv[6]
# Long enough to ride out several failovers in a row: a message fails only if no leader takes
# it for this long.
MESSAGE_TIMEOUT_MS = 60000

out = open(OUTFILE, "w", buffering=1)
producer = Producer({
    "bootstrap.servers": BOOTSTRAP,
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 1,
    "message.timeout.ms": MESSAGE_TIMEOUT_MS,
    "topic.metadata.refresh.interval.ms": 1000,
    "retry.backoff.ms": 50,
    "retry.backoff.max.ms": 200,
})


def on_delivery(err, msg):
    now = int(time.time() * 1000)
    if err is None:
        out.write(f"ack {msg.partition()} {msg.offset()} {msg.value().decode()} {now}\n")
    else:
        out.write(f"err {msg.value().decode()} {now} {str(err).replace(chr(10), ' ')}\n")


i = 0
interval = 1.0 / RATE
next_at = time.time()
while not os.path.exists(STOPFILE):
    while True:
        try:
            producer.produce(TOPIC, value=str(i).encode(), partition=i % PARTITIONS,
                             on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.05)
    i += 1
    next_at += interval
    producer.poll(max(0.0, next_at - time.time()))
left = producer.flush(MESSAGE_TIMEOUT_MS / 1000 + 10)
out.close()
if left:
    print(f"FAIL: {left} messages without a delivery report", file=sys.stderr)
    sys.exit(1)
print(i)
