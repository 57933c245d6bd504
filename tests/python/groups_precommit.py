"""Commits offset OFFSET for partitions 0..PARTITIONS-1 of TOPIC as group GROUP without joining
it (a generation -1 commit, as admin tools do), and reads them back.

Usage: groups_precommit.py ADDR GROUP TOPIC PARTITIONS OFFSET
"""
import sys

from confluent_kafka import Consumer, TopicPartition

addr, group, topic, partitions, offset = sys.argv[1:6]
tps = [TopicPartition(topic, p, int(offset)) for p in range(int(partitions))]
c = Consumer({"bootstrap.servers": addr, "group.id": group, "enable.auto.commit": False})
c.commit(offsets=tps, asynchronous=False)
got = c.committed([TopicPartition(topic, p) for p in range(int(partitions))], timeout=10)
for tp in got:
    assert tp.error is None and tp.offset == int(offset), tp
c.close()
print("committed", len(got))
