"""confluent-kafka's AdminClient against a Spate cluster: creates TOPIC with PARTITIONS
partitions and replication factor RF, then waits until every partition has a leader and prints
each partition's leader, replicas and in-sync replicas as JSON.

usage: cluster_admin.py BOOTSTRAP TOPIC PARTITIONS RF
"""
import json
import sys
import time

from confluent_kafka.admin import AdminClient, NewTopic

BOOTSTRAP, TOPIC, PARTITIONS, RF = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
DEADLINE_S = 30

admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
for _, fut in admin.create_topics(
    [NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=RF)], operation_timeout=10
).items():
    fut.result()

deadline = time.time() + DEADLINE_S
while True:
    md = admin.list_topics(TOPIC, timeout=10)
    t = md.topics.get(TOPIC)
    parts = {} if t is None or t.error is not None else t.partitions
    if len(parts) == PARTITIONS and all(p.leader >= 0 and len(p.isrs) == RF for p in parts.values()):
        break
    if time.time() > deadline:
        print("FAIL: partitions without a leader or a full ISR:",
              {i: (p.leader, p.replicas, p.isrs) for i, p in parts.items()}, file=sys.stderr)
        sys.exit(1)
    time.sleep(0.1)
print(json.dumps({str(i): {"leader": p.leader, "replicas": p.replicas, "isrs": p.isrs}
                  for i, p in sorted(parts.items())}))
