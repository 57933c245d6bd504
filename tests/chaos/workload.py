"""Workloads through real clients (confluent-kafka / librdkafka), each a thread that records
what it does and sees in the history:
  Producer        idempotent, acks=all, unique values "<proc>-<seq>", paced to a rate
  GroupConsumer   subscribes in a group, commits (synchronously) after every batch it reads,
                  reads back its committed offsets on every assignment
  AssignedReader  assigned every partition by hand, reads from the start, never commits
  final_read      after the faults: reads every partition from its low to its high watermark
"""
import logging
import threading
import time
import traceback

from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

# librdkafka gives up on a message after this long; it then counts as indeterminate (nack).
# Longer than any planned outage (a pause is at most nemesis.PAUSE_MAX_S).
MESSAGE_TIMEOUT_MS = 30000
# Consumers leave the group after this long without a heartbeat; pauses are longer.
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 1000
# Reconnect quickly after a restart, so unavailability measures the broker, not the backoff.
RECONNECT_BACKOFF_MS = 50
RECONNECT_BACKOFF_MAX_MS = 500
# The producer stops handing out values while this many await an outcome (an outage would
# otherwise fill librdkafka's queue with rate x outage values).
MAX_UNRESOLVED_PER_PRODUCER = 5000
CONSUME_BATCH = 500
CONSUME_TIMEOUT_S = 0.2
CLIENT_CALL_TIMEOUT_S = 10.0
FINAL_READ_TIMEOUT_S = 120.0
# How long the final reader keeps asking for a partition's watermarks (a cluster that just
# healed may still be electing its leader).
WATERMARK_RETRY_S = 30.0
WATERMARK_RETRY_BACKOFF_S = 0.2
FLUSH_TIMEOUT_S = 60.0
# Longest single poll(): under confluent-kafka's 200 ms slicing (see ProducerWorker._drain).
POLL_SLICE_S = 0.1
FATAL_FLUSH_TIMEOUT_S = 5.0


# librdkafka's own log lines (connection refused during every fault, etc.) go here; the
# runner points it at a file in the run's directory.
CLIENT_LOGGER = logging.getLogger("chaos.clients")
CLIENT_LOGGER.propagate = False


def log_clients_to(path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    CLIENT_LOGGER.addHandler(handler)
    CLIENT_LOGGER.setLevel(logging.INFO)


def common_conf(bootstrap):
    return {
        "logger": CLIENT_LOGGER,
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.ms": RECONNECT_BACKOFF_MS,
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        "socket.connection.setup.timeout.ms": 5000,
        "topic.metadata.refresh.interval.ms": 5000,
    }


def create_topic(bootstrap, topic, partitions, deadline_s=60.0):
    admin = AdminClient(common_conf(bootstrap))
    deadline = time.monotonic() + deadline_s
    while True:
        fut = admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=-1)])[topic]
        try:
            fut.result(timeout=CLIENT_CALL_TIMEOUT_S)
            return
        except KafkaException as e:
            if e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            if time.monotonic() > deadline:
                raise


class Worker(threading.Thread):
    def __init__(self, name, history, stop_event):
        super().__init__(name=name, daemon=True)
        self.proc = name
        self.history = history
        self.stop_event = stop_event
        self.error = None

    def run(self):
        try:
            self.work()
        except Exception as e:  # recorded and re-raised by the runner: a harness failure
            self.error = e
            self.history.record("worker_error", proc=self.proc, error=repr(e),
                                traceback=traceback.format_exc())

    def close_consumer(self, consumer):
        """consumer.close() between close_start and close_end (with its duration): a close
        that never returns leaves a close_start alone, which the runner reports."""
        t0 = time.monotonic()
        self.history.record("close_start", proc=self.proc)
        consumer.close()
        self.history.record("close_end", proc=self.proc,
                            duration_s=round(time.monotonic() - t0, 3))


class ProducerWorker(Worker):
    def __init__(self, name, bootstrap, topic, history, stop_event, rate_per_s):
        super().__init__(name, history, stop_event)
        self.bootstrap = bootstrap
        self.topic = topic
        self.rate_per_s = rate_per_s
        self.unresolved = 0
        self.seq = 0
        self.session = 0

    def _client(self):
        conf = common_conf(self.bootstrap)
        conf.update({
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": MESSAGE_TIMEOUT_MS,
            "error_cb": self._on_error,
        })
        self.fatal = None
        return Producer(conf)

    def _on_error(self, err):
        if err.fatal():
            self.fatal = err

    def _on_delivery(self, err, msg):
        self.unresolved -= 1
        value = msg.value().decode()
        if err is None:
            self.history.record("ack", proc=self.proc, value=value, partition=msg.partition(),
                                offset=msg.offset())
        else:
            self.history.record("nack", proc=self.proc, value=value, error=err.name())

    def work(self):
        producer = self._client()
        interval = 1.0 / self.rate_per_s
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            if self.fatal is not None:
                # The idempotent producer's state is broken (a finding): record it, let the
                # outstanding values resolve, and carry on with a new producer.
                self.history.record("producer_fatal", proc=self.proc,
                                    error=self.fatal.name() + ": " + self.fatal.str())
                # A fatal producer fails what it still holds: those come back as nacks.
                self._drain(producer, FATAL_FLUSH_TIMEOUT_S)
                self.session += 1
                producer = self._client()
                continue
            if self.unresolved >= MAX_UNRESOLVED_PER_PRODUCER:
                self._guard(producer.poll, POLL_SLICE_S)
                continue
            value = f"{self.proc}-{self.seq}"
            self.history.record("send", proc=self.proc, value=value, seq=self.seq)
            self.unresolved += 1
            try:
                producer.produce(self.topic, value=value.encode(), key=value.encode(),
                                 on_delivery=self._on_delivery)
            except BufferError:
                self.unresolved -= 1
                self.history.record("nack", proc=self.proc, value=value, error="BufferError")
            except KafkaException as e:
                self.unresolved -= 1
                self.history.record("nack", proc=self.proc, value=value, error=e.args[0].name())
                if e.args[0].fatal() and self.fatal is None:
                    self.fatal = e.args[0]
            self.seq += 1
            self._guard(producer.poll, 0)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay <= 0:
                next_at = time.monotonic()
            while delay > 0 and self.fatal is None:
                # Paces the rate and serves delivery reports meanwhile.
                self._guard(producer.poll, min(delay, POLL_SLICE_S))
                delay = next_at - time.monotonic()
        self._drain(producer, FLUSH_TIMEOUT_S)

    def _drain(self, producer, timeout_s):
        """flush(), as poll() calls of POLL_SLICE_S until nothing is outstanding or the
        timeout. confluent-kafka's flush() (and poll() of 200 ms or more) calls librdkafka in
        200 ms slices and does not stop when a callback failed: a fatal error sets its
        KafkaException as the pending Python exception, and the next slice runs delivery
        callbacks with it still set. Their first checked C call then fails with SystemError
        after doing its work (once a lock's acquire in History.record: taken, never released,
        and the run hung). One shorter poll() is one librdkafka call, which stops at the
        failure and raises it."""
        deadline = time.monotonic() + timeout_s
        while len(producer) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._guard(producer.poll, min(left, POLL_SLICE_S))

    def _guard(self, call, arg):
        """poll/flush raise the producer's fatal error: keep it for the loop to handle."""
        try:
            call(arg)
        except KafkaException as e:
            if not e.args[0].fatal():
                raise
            if self.fatal is None:
                self.fatal = e.args[0]


class GroupConsumer(Worker):
    def __init__(self, name, bootstrap, topic, group, history, stop_event):
        super().__init__(name, history, stop_event)
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.consumer = None

    def _on_assign(self, consumer, partitions):
        self.history.record("assign", proc=self.proc, partitions=[p.partition for p in partitions])
        t0 = self.history.now()
        try:
            committed = consumer.committed(partitions, timeout=CLIENT_CALL_TIMEOUT_S)
        except KafkaException as e:
            self.history.record("committed_error", proc=self.proc, error=str(e))
            return
        for tp in committed:
            if tp.error is None:
                self.history.record("committed", proc=self.proc, group=self.group,
                                    partition=tp.partition, offset=tp.offset, t0=t0)

    def _on_revoke(self, consumer, partitions):
        self.history.record("revoke", proc=self.proc, partitions=[p.partition for p in partitions])

    def work(self):
        conf = common_conf(self.bootstrap)
        conf.update({
            "group.id": self.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
        })
        consumer = Consumer(conf)
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        try:
            while not self.stop_event.is_set():
                msgs = consumer.consume(CONSUME_BATCH, timeout=CONSUME_TIMEOUT_S)
                next_offsets = {}
                for m in msgs:
                    if m.error():
                        self.history.record("consumer_error", proc=self.proc,
                                            error=m.error().name())
                        continue
                    self.history.record("poll", proc=self.proc, partition=m.partition(),
                                        offset=m.offset(), value=m.value().decode())
                    next_offsets[m.partition()] = m.offset() + 1
                if next_offsets:
                    self._commit(consumer, next_offsets)
        finally:
            self.close_consumer(consumer)

    def _commit(self, consumer, next_offsets):
        tps = [TopicPartition(self.topic, p, o) for p, o in sorted(next_offsets.items())]
        t0 = self.history.now()
        try:
            result = consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            for tp in tps:
                self.history.record("commit", proc=self.proc, group=self.group,
                                    partition=tp.partition, offset=tp.offset, ok=False, t0=t0,
                                    error=e.args[0].name())
            return
        for tp in result:
            self.history.record("commit", proc=self.proc, group=self.group,
                                partition=tp.partition, offset=tp.offset,
                                ok=tp.error is None, t0=t0,
                                **({} if tp.error is None else {"error": tp.error.name()}))


class AssignedReader(Worker):
    def __init__(self, name, bootstrap, topic, partitions, history, stop_event):
        super().__init__(name, history, stop_event)
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions

    def work(self):
        conf = common_conf(self.bootstrap)
        # "error": a fetch refused as out of range comes to us (recorded) instead of a silent
        # jump back to the start; the reader then seeks to the start itself.
        conf.update({"group.id": f"chaos-reader-{self.proc}", "enable.auto.commit": False,
                     "auto.offset.reset": "error"})
        consumer = Consumer(conf)
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING)
                         for p in range(self.partitions)])
        self.history.record("assign", proc=self.proc, partitions=list(range(self.partitions)))
        try:
            while not self.stop_event.is_set():
                for m in consumer.consume(CONSUME_BATCH, timeout=CONSUME_TIMEOUT_S):
                    if m.error():
                        if m.error().code() == KafkaError._AUTO_OFFSET_RESET:
                            self.history.record("offset_reset", proc=self.proc,
                                                partition=m.partition(), error=m.error().str())
                            # A partition in this error state cannot seek: assign it anew.
                            tp = TopicPartition(self.topic, m.partition(), OFFSET_BEGINNING)
                            consumer.incremental_unassign([tp])
                            consumer.incremental_assign([tp])
                            continue
                        self.history.record("consumer_error", proc=self.proc,
                                            error=m.error().name())
                        continue
                    self.history.record("poll", proc=self.proc, partition=m.partition(),
                                        offset=m.offset(), value=m.value().decode())
        finally:
            self.close_consumer(consumer)


def final_read(bootstrap, topic, partitions, history, proc="final"):
    """Reads every partition from its low to its high watermark (taken once, after the faults
    and the producers stopped). Records final_hwm per partition and final_done."""
    conf = common_conf(bootstrap)
    conf.update({"group.id": "chaos-final", "enable.auto.commit": False,
                 "auto.offset.reset": "earliest"})
    consumer = Consumer(conf)
    try:
        marks, missing = {}, []
        # A cluster may still be electing when the faults end (the last one healed a moment
        # ago): a partition without a leader now is asked again until WATERMARK_RETRY_S has
        # passed, and only then judged missing.
        retry_deadline = time.monotonic() + WATERMARK_RETRY_S
        for p in range(partitions):
            while True:
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                               timeout=CLIENT_CALL_TIMEOUT_S)
                    break
                except KafkaException as e:
                    if time.monotonic() < retry_deadline:
                        history.record("final_retry", partition=p, error=e.args[0].str())
                        time.sleep(WATERMARK_RETRY_BACKOFF_S)
                        continue
                    # The partition is gone (e.g. its data dir was lost and the topic came
                    # back with fewer partitions) or never got a leader again: what was
                    # acknowledged there is judged lost.
                    history.record("final_missing", partition=p, error=e.args[0].str())
                    missing.append(p)
                    low = None
                    break
            if low is None:
                continue
            marks[p] = (low, high)
            history.record("final_hwm", partition=p, low=low, high=high)
        todo = {p for p, (low, high) in marks.items() if high > low}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in marks.items()])
        history.record("assign", proc=proc, partitions=sorted(marks))
        deadline = time.monotonic() + FINAL_READ_TIMEOUT_S
        while todo and time.monotonic() < deadline:
            batch = consumer.consume(CONSUME_BATCH, timeout=CONSUME_TIMEOUT_S)
            if not batch:
                # A control batch (a cluster's new leader writes one) takes an offset that is
                # never delivered: a partition is read once the position passed its high mark.
                for tp in consumer.position([TopicPartition(topic, p) for p in sorted(todo)]):
                    if tp.offset >= marks[tp.partition][1]:
                        todo.discard(tp.partition)
            for m in batch:
                if m.error():
                    history.record("consumer_error", proc=proc, error=m.error().name())
                    continue
                p = m.partition()
                history.record("poll", proc=proc, partition=p, offset=m.offset(),
                               value=m.value().decode())
                if m.offset() >= marks[p][1] - 1:
                    todo.discard(p)
        history.record("final_done", complete=not todo,
                       **({"reason": f"partitions {sorted(todo)} not read to the end in "
                                     f"{FINAL_READ_TIMEOUT_S} s"} if todo else {}))
    finally:
        consumer.close()
