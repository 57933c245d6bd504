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
import queue
import threading
import time

# How long flush() and close() wait for the writer thread (it only formats and writes lines).
WRITER_WAIT_S = 30.0


class History:
    """Thread-safe appender that no recording thread can block.

    record() only puts the event on a queue.SimpleQueue (safe to call from anywhere, also from
    callbacks run inside a client's teardown); one writer thread formats and writes the lines.
    An earlier version wrote under a threading.RLock, and the harness hung under load in 1 of
    6-8 planted-loss runs: gdb showed the lock held (count 1) by a producer thread that no
    longer existed. confluent-kafka can run a delivery callback with a fatal error still set
    as the pending Python exception (see workload.ProducerWorker._drain); the first checked C
    call in the callback then fails with SystemError even though it did its work, and when
    that call was the lock's acquire in `with`, the lock was taken and never released. So nothing a
    recording thread does holds anything another thread waits for.

    Lines are in queue order, which can differ from `t` order across threads by a thread
    switch; load() sorts by `t` (stable, so each thread keeps its own order)."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "w", encoding="utf-8")
        self._queue = queue.SimpleQueue()
        self._t0 = time.monotonic()
        self._closed = False
        self._writer = threading.Thread(target=self._write_lines, name="history-writer",
                                        daemon=True)
        self._writer.start()

    def now(self):
        return time.monotonic() - self._t0

    def record(self, type_, **fields):
        event = {"t": round(self.now(), 6), "type": type_}
        event.update(fields)
        # Formatted here, so a field that is not JSON fails the caller, not the writer.
        self._queue.put(json.dumps(event, separators=(",", ":")) + "\n")
        return event["t"]

    def _write_lines(self):
        while True:
            item = self._queue.get()
            if isinstance(item, str):
                self._file.write(item)
                continue
            self._file.flush()
            if item is None:
                self._file.close()
                return
            item.set()

    def flush(self):
        """Returns once every event recorded before the call is in the file (or the writer
        did not answer within WRITER_WAIT_S)."""
        if self._closed:
            return
        written = threading.Event()
        self._queue.put(written)
        written.wait(WRITER_WAIT_S)

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(WRITER_WAIT_S)


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
    events.sort(key=lambda e: e["t"])
    return events
