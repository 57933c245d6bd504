"""A confluent-kafka group member for tests/groups.rs.

Usage: groups_consumer.py ADDR TOPIC GROUP OUT_FILE STOP_FILE MAX_SECONDS [INSTANCE_ID]

With INSTANCE_ID the member is static (group.instance.id): closing it does not leave the
group, and a restart with the same id takes its place back.

Commits synchronously after every message, so the only messages another member may see again
are those read but not yet committed. Writes one line per event to OUT_FILE (line-buffered):
  A <partitions>         assignment received
  R <partitions>         partitions revoked
  M <partition> <offset> <value>   message consumed
  C <partition> <next offset>      commit acknowledged by the coordinator
  F <partition> <offset> <error>   commit refused
Stops (closing the consumer, which leaves the group) once STOP_FILE exists.
"""
import os
import sys
import time

from confluent_kafka import Consumer, KafkaException

addr, topic, group, out_path, stop_path, max_seconds = sys.argv[1:7]
out = open(out_path, "a", buffering=1)


def parts(ps):
    return ",".join(str(p.partition) for p in ps)


config = {
        "bootstrap.servers": addr,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": "range",
        "topic.metadata.refresh.interval.ms": 1000,
}
if len(sys.argv) > 7:
    config["group.instance.id"] = sys.argv[7]
consumer = Consumer(config)
consumer.subscribe(
    [topic],
    on_assign=lambda c, ps: out.write(f"A {parts(ps)}\n"),
    on_revoke=lambda c, ps: out.write(f"R {parts(ps)}\n"),
)
deadline = time.time() + float(max_seconds)
while time.time() < deadline and not os.path.exists(stop_path):
    m = consumer.poll(0.2)
    if m is None:
        continue
    if m.error():
        out.write(f"E {m.error()}\n")
        continue
    out.write(f"M {m.partition()} {m.offset()} {m.value().decode()}\n")
    try:
        consumer.commit(message=m, asynchronous=False)
        out.write(f"C {m.partition()} {m.offset() + 1}\n")
    except KafkaException as e:
        out.write(f"F {m.partition()} {m.offset()} {e}\n")
consumer.close()
out.write("X\n")
