"""kafka-python's KafkaAdminClient moving replicas (AlterPartitionReassignments) and listing
moves (ListPartitionReassignments) on a Spate cluster.

usage: reassign.py BOOTSTRAP alter TOPIC PARTITION REPLICAS|cancel
         prints "PARTITION ERROR" (ERROR: the error class name, or None)
       reassign.py BOOTSTRAP list
         prints "TOPIC PARTITION REPLICAS ADDING REMOVING" per move (lists comma-joined, - if empty)
       reassign.py BOOTSTRAP logdirs TOPIC
         prints "BROKER PARTITION SIZE" per partition of TOPIC each broker holds (DescribeLogDirs)
"""
import sys

from kafka import TopicPartition
from kafka.admin import KafkaAdminClient

BOOTSTRAP, WHAT = sys.argv[1], sys.argv[2]
admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=30000)


def joined(ids):
    return ",".join(str(i) for i in ids) or "-"


if WHAT == "alter":
    topic, partition, target = sys.argv[3], int(sys.argv[4]), sys.argv[5]
    replicas = None if target == "cancel" else [int(x) for x in target.split(",")]
    result = admin.alter_partition_reassignments({TopicPartition(topic, partition): replicas})
    for tp, err in sorted(result.items()):
        print(tp.partition, None if err is None else err.__name__)
elif WHAT == "list":
    moves = admin.list_partition_reassignments()
    for tp, m in sorted(moves.items()):
        print(tp.topic, tp.partition, joined(m["replicas"]), joined(m["adding_replicas"]),
              joined(m["removing_replicas"]))
elif WHAT == "logdirs":
    topic = sys.argv[3]
    for reply in sorted(admin.describe_log_dirs(topic_partitions=[topic]),
                        key=lambda r: r["broker"]):
        for d in reply["log_dirs"]:
            for t in d["topics"]:
                if t["name"] != topic:
                    continue
                for p in t["partitions"]:
                    print(reply["broker"], p["partition_index"], p["partition_size"])
else:
    sys.exit("unknown command " + WHAT)
admin.close()
