"""Measures synchronous OffsetCommit round trips (append to __consumer_offsets, fdatasync,
reply) with confluent-kafka: CLIENTS consumers, each in its own group, commit in a loop for
SECONDS and the script prints commits/s and latency percentiles. Not a test: a measurement.

Usage: groups_commit_rate.py ADDR SECONDS CLIENTS
"""
import sys
import threading
import time

from confluent_kafka import Consumer, TopicPartition

addr, seconds, clients = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
latencies = []
lock = threading.Lock()


def run(i):
    c = Consumer({"bootstrap.servers": addr, "group.id": f"rate-{i}", "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition("rate", 0, 0)], asynchronous=False)  # warm up
    mine = []
    offset = 1
    end = time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        c.commit(offsets=[TopicPartition("rate", 0, offset)], asynchronous=False)
        mine.append(time.perf_counter() - t)
        offset += 1
    c.close()
    with lock:
        latencies.extend(mine)


threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
latencies.sort()
n = len(latencies)
pct = lambda q: latencies[min(n - 1, int(q * n))] * 1000
print(
    f"clients={clients} commits={n} rate={n / seconds:.0f}/s "
    f"p50={pct(0.5):.2f}ms p99={pct(0.99):.2f}ms max={latencies[-1] * 1000:.2f}ms"
)
