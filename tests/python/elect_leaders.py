"""Preferred (or unclean) leader election through a real Kafka admin client.

usage: elect_leaders.py CLIENT BOOTSTRAP TOPIC TYPE PARTITION...
  CLIENT: confluent (confluent-kafka's AdminClient) or kafka-python (KafkaAdminClient)
  TYPE:   preferred or unclean
Prints one line per partition the broker answered: "PARTITION CODE" (0: election initiated,
84: not needed, 80: preferred leader not available, 83: no eligible leader). Exits 0 once the
answer is read, whatever the codes; the test judges them.
"""
import sys

CLIENT, BOOTSTRAP, TOPIC, TYPE = sys.argv[1:5]
PARTITIONS = [int(p) for p in sys.argv[5:]]
TIMEOUT_S = 30

if CLIENT == "confluent":
    from confluent_kafka import ElectionType, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    kind = ElectionType.PREFERRED if TYPE == "preferred" else ElectionType.UNCLEAN
    tps = [TopicPartition(TOPIC, p) for p in PARTITIONS]
    # (Passing request_timeout trips a bug in confluent-kafka 2.16's C binding.)
    result = admin.elect_leaders(kind, tps).result(timeout=TIMEOUT_S)
    for tp, err in sorted(result.items(), key=lambda kv: kv[0].partition):
        # A KafkaError, or a KafkaException wrapping one.
        if err is None:
            code = 0
        elif hasattr(err, "code"):
            code = err.code()
        else:
            code = err.args[0].code()
        print(tp.partition, code)
elif CLIENT == "kafka-python":
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=TIMEOUT_S * 1000)
    kind = 0 if TYPE == "preferred" else 1
    resp = admin.elect_leaders(kind, {TOPIC: PARTITIONS}, raise_errors=False)
    rows = []
    for topic in resp.replica_election_results:
        for p in topic.partition_result:
            rows.append((p.partition_id, p.error_code))
    for partition, code in sorted(rows):
        print(partition, code)
    admin.close()
else:
    sys.exit(f"unknown client {CLIENT}")
