"""What the nemesis asks of the cluster itself, through Kafka's admin APIs: who leads a
partition (to aim "leader" faults), and moving a partition's replicas (AlterPartitionReassignments
through kafka-python, the admin client that has it). Every call is bounded; a call that fails
answers None or False rather than raising, since a fault is running meanwhile."""
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

# One admin call's bound; the nemesis keeps going when it is exceeded.
ADMIN_CALL_TIMEOUT_S = 5.0
# How often a move's progress is asked for while waiting for it to finish.
MOVE_POLL_S = 0.5


def leader_of(bootstrap, topic, partition=0):
    """The node leading `partition` of `topic` in the Metadata of some reachable node, or None
    (no leader now, or nobody answered in time)."""
    try:
        md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(
            topic, timeout=ADMIN_CALL_TIMEOUT_S)
    except KafkaException:
        return None
    t = md.topics.get(topic)
    if t is None or t.error is not None or partition not in t.partitions:
        return None
    leader = t.partitions[partition].leader
    return leader if leader >= 0 else None


def replicas_of(bootstrap, topic, partition):
    """The replicas of a partition as Metadata lists them, or None."""
    try:
        md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(
            topic, timeout=ADMIN_CALL_TIMEOUT_S)
    except KafkaException:
        return None
    t = md.topics.get(topic)
    if t is None or t.error is not None or partition not in t.partitions:
        return None
    return list(t.partitions[partition].replicas)


def _harness_bugs():
    from kafka.errors import KafkaConfigurationError
    return (TypeError, AttributeError, ImportError, KafkaConfigurationError)


HARNESS_BUGS = _harness_bugs()


class Mover:
    """Moves partitions of one topic with AlterPartitionReassignments and waits for them with
    ListPartitionReassignments (kafka-python; confluent-kafka has neither call)."""

    def __init__(self, bootstrap, topic):
        self.bootstrap = bootstrap
        self.topic = topic

    def _admin(self):
        from kafka.admin import KafkaAdminClient
        return KafkaAdminClient(bootstrap_servers=self.bootstrap.split(","),
                                request_timeout_ms=int(ADMIN_CALL_TIMEOUT_S * 1000))

    def move(self, partition, replicas):
        """Asks for the move; the error (text) if it was refused or nobody answered."""
        from kafka import TopicPartition
        try:
            admin = self._admin()
            try:
                res = admin.alter_partition_reassignments(
                    {TopicPartition(self.topic, partition): list(replicas)},
                    timeout_ms=int(ADMIN_CALL_TIMEOUT_S * 1000))
            finally:
                admin.close()
        except HARNESS_BUGS:
            raise  # a wrong call of the client library: the run would test nothing
        except Exception as e:  # kafka-python raises many kinds; all mean "not now"
            return f"{type(e).__name__}: {e}"[:300]
        err = next(iter(res.values()), None) if res else None
        return None if err is None else str(err)[:300]

    def wait(self, partition, deadline):
        """Waits until no reassignment of `partition` is in progress (True) or `deadline`
        (time.monotonic()) passes (False)."""
        from kafka import TopicPartition
        tp = TopicPartition(self.topic, partition)
        while time.monotonic() < deadline:
            try:
                admin = self._admin()
                try:
                    ongoing = admin.list_partition_reassignments(
                        [tp], timeout_ms=int(ADMIN_CALL_TIMEOUT_S * 1000))
                finally:
                    admin.close()
                if tp not in ongoing:
                    return True
            except Exception:
                pass
            time.sleep(MOVE_POLL_S)
        return False
