"""A network partition, step by step: three `spate` nodes, each in its own network namespace;
the leader of a replicated partition is cut off from both peers (a tc blackhole filter each way)
while clients still reach it. Judged:

  - before the cut, acks=all writes are acknowledged;
  - during it, writes sent to the isolated leader are never acknowledged;
  - the majority side elects a new leader in a higher epoch and acknowledges writes;
  - after healing, the old leader rejoins the in-sync replicas, and the partition holds every
    acknowledged value exactly once, in order, and none of the values only the isolated leader
    took (its unacknowledged suffix was truncated).

Prints a JSON summary on stdout; exits 1 with the reason on stderr when a guarantee broke, 2
when namespaces are unavailable (the caller decides whether that is a failure).

usage (from tests/): python3 -m chaos.split_leader [--binary PATH] [--dir DIR]
"""
import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from . import netns, nodes

TOPIC = "split"
REPLICATION_FACTOR = 3
VALUES_PER_PHASE = 50
# Each wait for the cluster to change; failover is about a second, this is for a loaded machine.
CHANGE_TIMEOUT_S = 30.0
# How long writes sent to the isolated leader are given to be (wrongly) acknowledged.
ISOLATED_WRITE_TIMEOUT_MS = 4000
POLL_S = 0.1
# Writes sent straight to the isolated leader, one at a time (each waits up to the timeout).
ISOLATED_WRITES = 3


class Broken(Exception):
    pass


def wait_until(what, fn, timeout_s=CHANGE_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Broken(f"{what}: not within {timeout_s} s")
        time.sleep(POLL_S)


def partition0(bootstrap):
    """(leader, replicas, isrs) of partition 0 as the nodes in `bootstrap` tell it, or None."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    try:
        md = admin.list_topics(TOPIC, timeout=3)
    except Exception:  # a node that does not answer: ask again
        return None
    t = md.topics.get(TOPIC)
    if t is None or t.error is not None or 0 not in t.partitions:
        return None
    p = t.partitions[0]
    return p.leader, list(p.replicas), list(p.isrs)


def brokers_listed_by(addr):
    """The broker ids in the Metadata answer of the node at `addr` alone (a new client's first
    request goes to its bootstrap broker), or None when it did not answer."""
    admin = AdminClient({"bootstrap.servers": addr, "socket.timeout.ms": 2000})
    try:
        return set(admin.list_topics(timeout=5).brokers)
    except Exception:  # a node that does not answer: ask again
        return None


def produce(bootstrap, values, timeout_ms):
    """Sends `values` with an idempotent acks=all producer; returns {value: offset} of those
    acknowledged and the number that failed."""
    acked, failed = {}, [0]
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                  "linger.ms": 1, "message.timeout.ms": timeout_ms,
                  "topic.metadata.refresh.interval.ms": 1000})

    def report(err, msg):
        if err is None:
            acked[msg.value().decode()] = msg.offset()
        else:
            failed[0] += 1

    for v in values:
        p.produce(TOPIC, value=v.encode(), partition=0, on_delivery=report)
    p.flush(timeout_ms / 1000 + 10)
    return acked, failed[0]


def _crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _varint(n):
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        if z < 0x80:
            out.append(z)
            return bytes(out)
        out.append((z & 0x7F) | 0x80)
        z >>= 7


def _one_record_batch(value):
    body = (b"\x00" + _varint(0) + _varint(0) + _varint(-1) + _varint(len(value)) + value
            + _varint(0))
    record = _varint(len(body)) + body
    now = int(time.time() * 1000)
    after_crc = struct.pack(">hiqqqhii", 0, 0, now, now, -1, -1, -1, 1) + record
    crc = _crc32c(after_crc)
    batch_len = 4 + 1 + 4 + len(after_crc)
    return (struct.pack(">qiibI", 0, batch_len, -1, 2, crc)) + after_crc


def raw_produce(host, port, value, timeout_ms):
    """One acks=all Produce v3 of one record, sent to this broker only (no metadata, no
    redirection: a client library would find the new leader by itself). Returns the error code
    and base offset of the answer, or None when none came within the timeout."""
    batch = _one_record_batch(value.encode())
    topic = TOPIC.encode()
    body = (struct.pack(">hhi", -1, -1, timeout_ms) + struct.pack(">i", 1)
            + struct.pack(">h", len(topic)) + topic + struct.pack(">i", 1)
            + struct.pack(">ii", 0, len(batch)) + batch)
    header = struct.pack(">hhih", 0, 3, 7, 5) + b"split"
    frame = header + body
    try:
        with socket.create_connection((host, port), timeout=timeout_ms / 1000 + 2) as s:
            s.sendall(struct.pack(">i", len(frame)) + frame)
            head = s.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return None
            n = struct.unpack(">i", head)[0]
            resp = s.recv(n, socket.MSG_WAITALL)
    except OSError:
        return None
    # correlation id, topics [name, partitions [index, error, base offset, append time]]
    pos = 4 + 4
    name_len = struct.unpack_from(">h", resp, pos)[0]
    pos += 2 + name_len + 4
    _, err, base = struct.unpack_from(">ihq", resp, pos)
    return err, base


def read_all(bootstrap):
    """Every record of partition 0 up to its end offset: [(offset, value)]."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "split-reader",
                  "enable.auto.commit": False})
    tp = TopicPartition(TOPIC, 0)
    end = c.get_watermark_offsets(tp, timeout=10)[1]
    c.assign([TopicPartition(TOPIC, 0, 0)])
    out, pos = [], 0
    deadline = time.monotonic() + CHANGE_TIMEOUT_S * 2
    while pos < end and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None:
            pos = max(pos, c.position([tp])[0].offset)
            continue
        if m.error():
            continue
        out.append((m.offset(), m.value().decode()))
        pos = m.offset() + 1
    c.close()
    if pos < end:
        raise Broken(f"final read stopped at {pos} of {end}")
    return out


def scenario(binary, base_dir):
    summary = {}
    with netns.Network(REPLICATION_FACTOR, client_link=True) as net:
        ids = list(net.ids())
        cluster = nodes.Nodes(binary, base_dir, count=len(ids),
                              hosts=[net.addr(i) for i in ids],
                              netns_names=[net.ns(i) for i in ids])
        try:
            cluster.start_all()
            boot = cluster.bootstrap
            admin = AdminClient({"bootstrap.servers": boot})
            wait_until("every node registered",
                       lambda: len(admin.list_topics(timeout=5).brokers) == len(ids))
            for _, fut in admin.create_topics(
                    [NewTopic(TOPIC, 1, REPLICATION_FACTOR)], operation_timeout=10).items():
                fut.result()
            leader, replicas, _ = wait_until(
                "a leader and a full ISR",
                lambda: (lambda s: s if s and s[0] >= 0 and len(s[2]) == 3 else None)(
                    partition0(boot)))
            summary["leader_before"] = leader
            # The clients must reach this run's nodes and no others (a second network on the
            # same subnet once took them): every replica, in sync, has the partition's directory.
            for n in cluster:
                if not os.path.isdir(os.path.join(n.data_dir, f"{TOPIC}-0")):
                    raise nodes.NodeError(
                        f"{n.data_dir} holds no {TOPIC}-0 while the topic has a full ISR: the "
                        "clients reached another cluster")

            acked_a, failed = produce(boot, [f"a{i}" for i in range(VALUES_PER_PHASE)], 30000)
            if failed or len(acked_a) != VALUES_PER_PHASE:
                raise Broken(f"before the cut: {failed} writes failed")

            # Cut the leader off from its peers, both ways; clients still reach it.
            others = [i for i in ids if i != leader]
            for o in others:
                net.cut(leader, o, both_ways=True)
            cut_at = time.monotonic()
            node = cluster[leader - 1]
            answers = [raw_produce(node.host, node.port, f"x{i}", ISOLATED_WRITE_TIMEOUT_MS)
                       for i in range(ISOLATED_WRITES)]
            summary["isolated_write_answers"] = [a and a[0] for a in answers]
            acked_x = [a for a in answers if a is not None and a[0] == 0]
            if acked_x:
                raise Broken(f"the isolated leader acknowledged acks=all writes: {acked_x}")

            majority = ",".join(cluster[o - 1].addr for o in others)
            new = wait_until(
                "a new leader on the majority side",
                lambda: (lambda s: s if s and s[0] in others else None)(partition0(majority)))
            summary["new_leader"] = new[0]
            summary["new_leader_seen_after_s"] = round(time.monotonic() - cut_at, 3)
            # A new producer's first request (InitProducerId) may go to any broker it is told
            # of; the isolated one knows no controller and answers COORDINATOR_NOT_AVAILABLE,
            # which librdkafka retries, maybe there again. Clients see the isolated broker gone
            # once its session expired: produce from then on, as a new client would.
            #
            # Each majority node is asked itself, by a client that knows only it. One long-lived
            # client would not do: librdkafka sends Metadata to the broker it used last, so once
            # it has learned of the isolated broker and asked it (which still lists itself and
            # its peers from the metadata it applied before the cut), it keeps asking it.
            wait_until("the isolated broker leaves the majority's Metadata",
                       lambda: all(leader not in (brokers_listed_by(cluster[o - 1].addr)
                                                  or {leader})
                                   for o in others))
            summary["isolated_gone_after_s"] = round(time.monotonic() - cut_at, 3)
            acked_b, failed = produce(majority, [f"b{i}" for i in range(VALUES_PER_PHASE)],
                                      30000)
            if failed or len(acked_b) != VALUES_PER_PHASE:
                raise Broken(f"majority side: {failed} writes failed")

            net.heal_all()
            healed_at = time.monotonic()
            # Asked of the majority side: the healed node may still answer from its old view.
            wait_until("the old leader back in the ISR",
                       lambda: (lambda s: s if s and sorted(s[2]) == sorted(ids) else None)(
                           partition0(majority)))
            summary["rejoined_after_s"] = round(time.monotonic() - healed_at, 3)

            records = read_all(boot)
            values = [v for _, v in records]
            if len(set(values)) != len(values):
                raise Broken("a value was read twice")
            at = dict(records)
            for v, off in {**acked_a, **acked_b}.items():
                if at.get(off) != v:
                    raise Broken(f"acknowledged {v} at offset {off} reads as {at.get(off)}")
            stray = [v for v in values if v.startswith("x")]
            if stray:
                raise Broken(f"values only the isolated leader took were kept: {stray[:5]}")
            order = [int(v[1:]) + (VALUES_PER_PHASE if v[0] == "b" else 0) for v in values]
            if order != sorted(order):
                raise Broken("values out of order")
            summary["records"] = len(records)
            summary["ok"] = True
        finally:
            cluster.kill_all()
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m chaos.split_leader")
    ap.add_argument("--binary", default=os.environ.get("SPATE_BIN", "spate"))
    ap.add_argument("--dir", default=None, help="where node dirs go (default: a temp dir)")
    args = ap.parse_args(argv)
    ok, why = netns.available()
    if not ok:
        print(f"network namespaces unavailable: {why}", file=sys.stderr)
        return 2
    base = args.dir or tempfile.mkdtemp(prefix="spate-split-")
    try:
        summary = scenario(args.binary, base)
    except (Broken, nodes.NodeError) as e:
        print(f"FAIL: {e} (node dirs and logs in {base})", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
