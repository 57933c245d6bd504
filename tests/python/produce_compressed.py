"""Produces COUNT messages with confluent-kafka (librdkafka) for each compression codec given,
values "CODEC-i", and fails unless every one is acknowledged.

usage: produce_compressed.py BOOTSTRAP TOPIC COUNT CODEC...
"""
import sys

from confluent_kafka import Producer

BOOTSTRAP, TOPIC, COUNT, CODECS = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
failed = []
for codec in CODECS:
    p = Producer({
        "bootstrap.servers": BOOTSTRAP,
        "compression.type": codec,
        "linger.ms": 50,
        "message.timeout.ms": 20000,
    })

    def done(err, msg):
        if err is not None:
            failed.append(f"{codec}: {err}")

    for i in range(COUNT):
        p.produce(TOPIC, value=f"{codec}-{i}".encode() * 1, key=f"k{i}".encode(), on_delivery=done)
    if p.flush(30) != 0:
        failed.append(f"{codec}: messages left unflushed")
if failed:
    print("FAIL:", failed[:5], file=sys.stderr)
    sys.exit(1)
