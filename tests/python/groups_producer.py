"""Produces m0, m1, ... round-robin over PARTITIONS partitions, one every INTERVAL_MS, until
STOP_FILE exists or COUNT messages were sent, then flushes. Each acknowledged message is
written to OUT_FILE as: P <partition> <offset> <value>.

Usage: groups_producer.py ADDR TOPIC PARTITIONS COUNT INTERVAL_MS OUT_FILE STOP_FILE
"""
import os
import sys
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

addr, topic, partitions, count, interval_ms, out_path, stop_path = sys.argv[1:8]
partitions, count, interval = int(partitions), int(count), int(interval_ms) / 1000.0
out = open(out_path, "a", buffering=1)
errors = []


def delivered(err, msg):
    if err is not None:
        errors.append(err)
    else:
        out.write(f"P {msg.partition()} {msg.offset()} {msg.value().decode()}\n")


admin = AdminClient({"bootstrap.servers": addr})
try:
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(20)
except KafkaException as e:
    if "TOPIC_ALREADY_EXISTS" not in str(e):
        raise
p = Producer({"bootstrap.servers": addr, "acks": "all", "linger.ms": 0})
for i in range(count):
    if os.path.exists(stop_path):
        break
    p.produce(topic, value=f"m{i}".encode(), partition=i % partitions, on_delivery=delivered)
    p.poll(0)
    time.sleep(interval)
left = p.flush(30)
if left or errors:
    sys.exit(f"producer: {left} undelivered, errors: {errors[:5]}")
out.write("DONE\n")
