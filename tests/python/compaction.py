"""Compacted topics and topic configs with real clients (confluent-kafka, kcat, kafka-python).

1. AdminClient: a topic with Kafka Streams' changelog configs is created; an unimplemented
   config is refused with INVALID_CONFIG naming it; APPEND adds compact to cleanup.policy.
2. Keyless produce to a compacted topic fails with INVALID_RECORD (the other partition of the
   same producer's traffic is unaffected).
3. 1,000,000 updates over 10,000 keys (and tombstones for 100 of them) to a compacted topic
   with small segments; once the cleaner ran, confluent-kafka and kcat read from the start
   exactly the last value of every key, offsets strictly increasing with gaps, and the
   tombstones go once delete.retention.ms has passed.
4. offsetsForTimes on records with rising timestamps answers each record's own offset.
5. LogAppendTime: the broker's clock replaces the producer's timestamp.
6. kafka-python's legacy AlterConfigs replaces all of a topic's overrides.

usage: compaction.py BOOTSTRAP
"""
import subprocess
import sys
import time

from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

BOOTSTRAP = sys.argv[1]
UPDATES = 1_000_000
KEYS = 10_000
TOMBSTONED = 100
DELETE_RETENTION_MS = 3000
DEADLINE_S = 60


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


admin = AdminClient({"bootstrap.servers": BOOTSTRAP})


def create(name, partitions=1, config=None):
    fut = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=10,
    )[name]
    fut.result()


def describe(name):
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    return admin.describe_configs([res])[res].result()


# 1. Configs at creation, refusals, APPEND.
create(
    "streams-changelog",
    config={
        "cleanup.policy": "compact",
        "message.timestamp.type": "CreateTime",
        "min.compaction.lag.ms": "86400000",
        "segment.bytes": "52428800",
    },
)
create(
    "debezium-history",
    config={"cleanup.policy": "delete", "retention.ms": "9223372036854775807", "retention.bytes": "-1"},
)
try:
    create("zstd-topic", config={"compression.type": "zstd"})
    fail("an unimplemented config was accepted")
except KafkaException as e:
    err = e.args[0]
    if err.code() != KafkaError.INVALID_CONFIG or "Spate does not implement" not in err.str():
        fail(f"unimplemented config: {err}")
try:
    create("unknown-config", config={"no.such.config": "1"})
    fail("an unknown config was accepted")
except KafkaException as e:
    if e.args[0].code() != KafkaError.INVALID_CONFIG:
        fail(f"unknown config: {e}")

d = describe("streams-changelog")
if d["cleanup.policy"].value != "compact" or getattr(d["cleanup.policy"].source, "value", d["cleanup.policy"].source) != 1:
    fail(f"cleanup.policy described as {d['cleanup.policy']}")
if d["delete.retention.ms"].value != "86400000" or not d["delete.retention.ms"].is_default:
    fail(f"delete.retention.ms described as {d['delete.retention.ms']}")

create("plain", partitions=2)
res = ConfigResource(
    ConfigResource.Type.TOPIC,
    "plain",
    incremental_configs=[
        ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.APPEND)
    ],
)
admin.incremental_alter_configs([res])[res].result()
policy = describe("plain")["cleanup.policy"].value
if policy != "delete,compact":
    fail(f"APPEND compact gave cleanup.policy={policy}")
log("configs: create, refuse, describe, APPEND ok")

# 2. Keyless records on a compacted topic: INVALID_RECORD; keyed ones on the same topic pass.
results = []
p = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 0, "retries": 0})
p.produce("plain", value=b"no key", partition=0, on_delivery=lambda e, m: results.append(("keyless", e)))
p.flush(10)
p.produce("plain", key=b"k", value=b"keyed", partition=1, on_delivery=lambda e, m: results.append(("keyed", e)))
p.flush(10)
got = dict(results)
if got.get("keyless") is None or got["keyless"].code() != KafkaError.INVALID_RECORD:
    fail(f"keyless produce to a compacted topic: {got.get('keyless')}")
if got.get("keyed", "missing") is not None:
    fail(f"keyed produce beside it: {got.get('keyed')}")
log("keyless produce refused with INVALID_RECORD")

# 3. One million updates over ten thousand keys.
TOPIC = "compacted"
create(
    TOPIC,
    config={
        "cleanup.policy": "compact",
        "segment.bytes": "2097152",
        "max.message.bytes": "1048588",
        "segment.ms": "1000",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": str(DELETE_RETENTION_MS),
    },
)
started = time.time()
producer = Producer(
    {
        "bootstrap.servers": BOOTSTRAP,
        "linger.ms": 20,
        "batch.size": 1000000,
        "queue.buffering.max.messages": 2000000,
        "compression.type": "lz4",
        "enable.idempotence": True,
    }
)
errors = []


def on_delivery(err, _msg):
    if err is not None:
        errors.append(err)


latest = {}
for i in range(UPDATES):
    key = f"k{i % KEYS:05d}"
    value = f"v{i}"
    latest[key] = value
    while True:
        try:
            producer.produce(TOPIC, key=key.encode(), value=value.encode(), on_delivery=on_delivery)
            break
        except BufferError:
            producer.poll(0.05)
    if i % 50000 == 0:
        producer.poll(0)
tombstoned = [f"k{i:05d}" for i in range(TOMBSTONED)]
for key in tombstoned:
    producer.produce(TOPIC, key=key.encode(), value=None, on_delivery=on_delivery)
    latest[key] = None
producer.flush(60)
if errors:
    fail(f"{len(errors)} produce errors, first {errors[0]}")
log(f"produced {UPDATES} updates and {TOMBSTONED} tombstones in {time.time() - started:.1f}s")


def read_all(consumer_id):
    """Every record of the partition from its start to the high watermark, via confluent-kafka."""
    c = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"compaction-check-{consumer_id}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.message.max.bytes": 1048576,
        }
    )
    _, high = c.get_watermark_offsets(TopicPartition(TOPIC, 0), timeout=10)
    c.assign([TopicPartition(TOPIC, 0, 0)])
    out = []
    deadline = time.time() + 30
    while time.time() < deadline:
        m = c.poll(1.0)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                if m.offset() >= high:
                    break
                continue
            fail(f"consume: {m.error()}")
        out.append((m.offset(), m.key().decode(), None if m.value() is None else m.value().decode()))
        if m.offset() + 1 >= high:
            break
    else:
        fail("reading the compacted topic did not finish")
    c.close()
    return out


def check(records, want_tombstones):
    """None if `records` is the compacted log we want, else why not."""
    offsets = [o for o, _, _ in records]
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        return "offsets not strictly increasing"
    seen = {}
    for _, k, v in records:
        if k == "filler":
            continue
        if k in seen:
            return f"key {k} appears more than once"
        seen[k] = v
    for k, v in latest.items():
        if v is None:
            if k in seen and (seen[k] is not None or not want_tombstones):
                return f"tombstoned key {k} still has {seen[k]!r}"
        elif seen.get(k) != v:
            return f"key {k}: {seen.get(k)!r}, latest {v!r}"
    extra = set(seen) - set(latest)
    if extra:
        return f"unexpected keys {sorted(extra)[:5]}"
    return None


def roll_and_wait(want_tombstones, what):
    """Appends a filler record now and then (so the segment holding the last updates rolls
    and becomes cleanable) until the log reads as compacted, within the deadline."""
    deadline = time.time() + DEADLINE_S
    n = 0
    while True:
        producer.produce(TOPIC, key=b"filler", value=b"x", on_delivery=on_delivery)
        producer.flush(10)
        records = read_all(f"{what}-{n}")
        why = check(records, want_tombstones)
        if why is None:
            return records
        if time.time() > deadline:
            fail(f"{what}: not compacted after {DEADLINE_S}s ({len(records)} records): {why}")
        n += 1
        time.sleep(0.5)


started = time.time()
records = roll_and_wait(True, "cleaned")
last_offset = records[-1][0]
if len(records) >= last_offset + 1 or last_offset < UPDATES:
    fail(f"{len(records)} records up to offset {last_offset}: no gaps")
log(f"cleaned in {time.time() - started:.1f}s: {len(records)} records up to offset {last_offset}")

# kcat reads the same compacted log.
out = subprocess.run(
    ["kcat", "-C", "-b", BOOTSTRAP, "-t", TOPIC, "-p", "0", "-o", "beginning", "-e", "-q",
     "-Z", "-f", "%o %k %s\n"],
    capture_output=True, text=True, timeout=60,
)
if out.returncode != 0:
    fail(f"kcat: {out.stderr}")
kcat_records = []
for line in out.stdout.splitlines():
    o, k, v = line.split(" ", 2)
    kcat_records.append((int(o), k, None if v == "NULL" else v))
why = check(kcat_records, True)
if why is not None:
    fail(f"kcat read: {why}")
log(f"kcat reads {len(kcat_records)} records, the latest of every key")

records = roll_and_wait(False, "tombstones")
log(f"tombstones gone after delete.retention.ms: {len(records)} records")

# 4. offsetsForTimes at record granularity: records of one batch with rising timestamps.
create("times")
base = int(time.time() * 1000) - 60_000
tp = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 100})
for i in range(50):
    tp.produce("times", key=b"t", value=str(i).encode(), partition=0, timestamp=base + 10 * i)
tp.flush(10)
c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "times"})
# One partition per call: librdkafka keeps one timestamp per partition of a request.
for i in range(50):
    a = c.offsets_for_times([TopicPartition("times", 0, base + 10 * i)], timeout=10)[0]
    if a.error or a.offset != i:
        fail(f"offsetsForTimes({base + 10 * i}) = {a.offset} ({a.error}), want {i}")
c.close()
log("offsetsForTimes answers every record's own offset")

# 5. LogAppendTime.
create("append-time", config={"message.timestamp.type": "LogAppendTime"})
before = int(time.time() * 1000)
tp.produce("append-time", key=b"a", value=b"old", partition=0, timestamp=1234)
tp.flush(10)
c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": "append-time", "auto.offset.reset": "earliest"})
c.assign([TopicPartition("append-time", 0, 0)])
deadline = time.time() + 20
m = None
while m is None and time.time() < deadline:
    m = c.poll(1.0)
if m is None or m.error():
    fail(f"reading append-time: {m and m.error()}")
kind, ts = m.timestamp()
if kind != TIMESTAMP_LOG_APPEND_TIME or ts < before or ts > int(time.time() * 1000):
    fail(f"LogAppendTime topic: timestamp {kind} {ts}, produced at {before}")
c.close()
log("LogAppendTime stamps the broker's time")

# 6. kafka-python sends the legacy AlterConfigs (API key 33) when told to; it re-sends the
# topic's other overrides itself (the broker replaces all of them: tests/compaction.rs checks
# that with raw requests).
from kafka.admin import ConfigResource as KpResource, ConfigResourceType, KafkaAdminClient

kp = KafkaAdminClient(bootstrap_servers=BOOTSTRAP)
result = kp.alter_configs(
    [KpResource(ConfigResourceType.TOPIC, "plain", configs={"retention.ms": "3600000"})],
    incremental=False,
    raise_on_unknown=False,
)
if result.get("topic", {}).get("plain") != "OK":
    fail(f"legacy AlterConfigs: {result}")
d = describe("plain")
if d["retention.ms"].value != "3600000" or d["cleanup.policy"].value != "delete,compact":
    fail(f"after AlterConfigs: retention.ms={d['retention.ms'].value} cleanup.policy={d['cleanup.policy'].value}")
refused = None
try:
    refused = kp.alter_configs(
        [KpResource(ConfigResourceType.TOPIC, "plain", configs={"flush.ms": "10"})],
        incremental=False,
        raise_on_unknown=False,
    )
except Exception as e:  # noqa: BLE001 - whichever way the client reports it
    refused = e
if "Error 40" not in str(refused) or "Spate does not implement" not in str(refused):
    fail(f"legacy AlterConfigs of an unimplemented config: {refused!r}")
if describe("plain")["flush.ms"].value == "10":
    fail("a refused legacy AlterConfigs changed the topic")
kp.close()
log("legacy AlterConfigs through kafka-python")
print("OK")
