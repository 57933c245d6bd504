"""The history of a run: one JSON object a line, appended by every worker thread.

Each event has `t`, seconds on the monotonic clock since the history was opened, and `type`.
Event types (fields beside t/type):
  meta         seed, topic, partitions, nodes, nemesis, ... (first line)
  send         proc, value, seq                    a producer handed a value to its client
  ack          proc, value, partition, offset      the broker acknowledged it
  nack         proc, value, error                  the client gave up on it (indeterminate)
  producer_fatal proc, error                       the idempotent producer hit a fatal error
  assign       proc, partitions                    a consumer got partitions (stream restarts)
  revoke       proc, partitions
  poll         proc, partition, offset, value      one record a consumer read
  commit       proc, group, partition, offset, ok, t0, error?   a commit and its outcome
  committed    proc, group, partition, offset, t0  a committed offset read back from the broker
  fault_start  id, kind, targets, params
  fault_end    id, kind
  move         partition, replicas, error          a move (reassignment) was asked for
  move_end     partition, done                     it finished (done) or the wait ended
  offset_reset proc, partition, error              a reader's fetch was refused as out of range
  consumer_error, committed_error  proc, error     client errors, recorded, not judged
  final_hwm    partition, low, high                watermarks the final reader reads up to
  final_retry  partition, error                    the final reader asks a partition's watermarks again
  final_missing partition, error                   a partition the final reader cannot find
  final_done   complete, reason?                   the final reader finished (or gave up)
  recovered    ok                                  acks resumed after the last fault (or not)
  worker_error, harness_error, final_error  error  the harness itself failed
"""
import json
import threading
import time


class History:
    """Thread-safe appender. `t` is taken under the lock, so lines are in time order."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "w", encoding="utf-8")
        # Re-entrant: librdkafka runs delivery callbacks (which record) from inside the call
        # that serves them, which may be a Producer's teardown when the garbage collector frees
        # one while this thread is recording. A planted-loss run once hung with two threads
        # waiting here and no Python thread holding the lock.
        self._lock = threading.RLock()
        self._t0 = time.monotonic()

    def now(self):
        return time.monotonic() - self._t0

    def record(self, type_, **fields):
        with self._lock:
            event = {"t": round(self.now(), 6), "type": type_}
            event.update(fields)
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
            return event["t"]

    def flush(self):
        with self._lock:
            self._file.flush()

    def close(self):
        with self._lock:
            if not self._file.closed:
                self._file.close()


def load(path):
    """Reads a history; a torn last line (the harness itself was killed mid-write) is skipped,
    a bad line anywhere else is an error."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    events = []
    for n, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON event ({e})") from None
    return events
