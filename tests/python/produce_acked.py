"""Produces numbered messages with acks=all until killed or COUNT is reached, printing the
number of each acknowledged message on stdout (one per line, flushed).

usage: produce_acked.py BOOTSTRAP TOPIC COUNT
"""
import sys

from confluent_kafka import Producer

BOOTSTRAP, TOPIC, COUNT = sys.argv[1], sys.argv[2], int(sys.argv[3])
producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "linger.ms": 1,
                     "message.timeout.ms": 5000, "enable.idempotence": True})


def on_delivery(err, msg):
    if err is None:
        sys.stdout.write(msg.value().decode() + "\n")
        sys.stdout.flush()


for i in range(COUNT):
    while True:
        try:
            producer.produce(TOPIC, value=str(i).encode(), on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)
producer.flush(30)
