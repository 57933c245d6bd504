"""Process control of real `spate` nodes: start (optionally inside a network namespace), SIGKILL,
SIGSTOP/SIGCONT, graceful stop, and readiness by an answered Kafka request. Each node keeps its
data dir and its log (appended across restarts) under the run's directory."""
import ctypes
import os
import signal
import socket
import struct
import subprocess
import time

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
READY_POLL_S = 0.02
# A killed node's listening socket lingers while its io_uring is torn down, and spate refuses
# a port someone listens on: a restart waits this long at most for the port to be free.
PORT_FREE_TIMEOUT_S = 30.0
# The first start of a node retries on a port taken between the probe and the bind.
MAX_START_ATTEMPTS = 5
LOG_TAIL_BYTES = 4000
TEST_SEGMENT_BYTES = 16 << 20


PR_SET_PDEATHSIG = 1


class NodeError(Exception):
    pass


def _die_with_parent():
    """In the child before exec: SIGKILL it when the harness dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def api_versions_answered(host, port, timeout_s=0.5):
    """True when a Kafka ApiVersions v0 request gets its answer (correlation id 1): a connect
    alone can reach a dying predecessor's socket."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            # length 10: api key 18, version 0, correlation id 1, empty client id.
            s.sendall(struct.pack(">ihhih", 10, 18, 0, 1, 0))
            head = b""
            while len(head) < 8:
                chunk = s.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
            return struct.unpack(">ii", head)[1] == 1
    except OSError:
        return False


def port_is_free(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return False
    except OSError:
        return True


def binary_supports(binary, flag):
    out = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True,
                         timeout=30)
    return flag in out.stdout


class Node:
    """One `spate serve` process. `netns` runs it inside that namespace (`ip netns exec`, which
    execs, so the pid is spate's own). Cluster flags (issue 15) are passed when `seeds` is set."""

    def __init__(self, binary, node_id, base_dir, host="127.0.0.1", port=None, cores=1,
                 flush="always", netns=None, rpc_port=None, seeds=None, extra_args=()):
        self.binary = binary
        self.node_id = node_id
        self.host = host
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        self.rpc_port = rpc_port
        self.seeds = seeds
        self.cores = cores
        self.flush = flush
        self.netns = netns
        self.extra_args = list(extra_args)
        self.dir = os.path.join(base_dir, f"node{node_id}")
        self.data_dir = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "spate.log")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.paused = False
        self.starts = 0

    @property
    def addr(self):
        return f"{self.host}:{self.port}"

    def command(self):
        cmd = [self.binary, "serve", "--listen", self.addr, "--data-dir", self.data_dir,
               "--cores", str(self.cores), "--flush", self.flush,
               "--segment-bytes", str(TEST_SEGMENT_BYTES), "--metrics-listen", "off",
               "--node-id", str(self.node_id)]
        if self.seeds:
            cmd += ["--rpc-listen", f"{self.host}:{self.rpc_port}", "--seeds", self.seeds]
        cmd += self.extra_args
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    def _ready_check(self):
        # In a namespace the node is reached over the network's client link (netns.Network).
        return api_versions_answered(self.host, self.port)

    def log_tail(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def start(self, first=False):
        """Starts the node and returns when it answers a Kafka request. A first start retries
        on a port taken by someone else; a restart waits for its predecessor's port."""
        assert self.proc is None, f"node {self.node_id} already running"
        attempts = MAX_START_ATTEMPTS if first and self.netns is None else 1
        for attempt in range(attempts):
            if not first:
                self._wait_port_free()
            try:
                self._spawn_and_wait()
                return
            except NodeError:
                if attempt + 1 == attempts or "in use" not in self.log_tail():
                    raise
                self.port = free_port(self.host)

    def _wait_port_free(self):
        deadline = time.monotonic() + PORT_FREE_TIMEOUT_S
        while not port_is_free(self.host, self.port):
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.node_id}: port {self.port} stays taken")
            time.sleep(READY_POLL_S)

    def _spawn_and_wait(self):
        with open(self.log_path, "ab") as log:
            log.write(f"--- harness: start #{self.starts + 1}: {' '.join(self.command())}\n"
                      .encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=_die_with_parent,
                                         env=dict(os.environ, RUST_LOG=os.environ.get(
                                             "SPATE_CHAOS_RUST_LOG", "info")))
        self.starts += 1
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready_check():
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise NodeError(f"node {self.node_id} exited during start ({code}):\n"
                                f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise NodeError(f"node {self.node_id} not ready in {START_TIMEOUT_S} s:\n"
                                f"{self.log_tail()}")
            time.sleep(READY_POLL_S)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL: no chance to flush anything."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None
        self.paused = False

    def pause(self):
        assert self.running and not self.paused
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self):
        """SIGTERM and a bounded wait for a clean exit; SIGKILL after that. Returns the exit
        code (None when it had to be killed)."""
        if self.proc is None:
            return None
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.proc = None
        return code

    def check_alive(self):
        """Raises when the node died without the harness killing it (a crash is a finding)."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            raise NodeError(f"node {self.node_id} exited on its own ({code}):\n"
                            f"{self.log_tail()}")


class Nodes:
    """The nodes of one run. One node: today's single broker. More: the issue-15 cluster flags
    (--node-id, --rpc-listen, --seeds), each node in its own namespace when given."""

    def __init__(self, binary, base_dir, count=1, flush="always", cores=1, hosts=None,
                 netns_names=None):
        if count > 1 and not binary_supports(binary, "--seeds"):
            raise NodeError(f"{binary} has no --seeds flag: cluster mode needs issue 15 "
                            "(replicated partitions); run with one node")
        self.nodes = []
        seeds = None
        if count > 1:
            hosts = hosts or ["127.0.0.1"] * count
            rpc_ports = [free_port("127.0.0.1") if h == "127.0.0.1" else 9192 for h in hosts]
            seeds = ",".join(f"{i + 1}@{h}:{p}" for i, (h, p) in enumerate(zip(hosts, rpc_ports)))
        for i in range(count):
            host = hosts[i] if hosts else "127.0.0.1"
            self.nodes.append(Node(
                binary, i + 1, base_dir, host=host,
                port=None if host == "127.0.0.1" else 9092, cores=cores, flush=flush,
                netns=netns_names[i] if netns_names else None,
                rpc_port=None if seeds is None else int(seeds.split(",")[i].rsplit(":", 1)[1]),
                seeds=seeds))

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self):
        return len(self.nodes)

    def __getitem__(self, i):
        return self.nodes[i]

    @property
    def bootstrap(self):
        return ",".join(n.addr for n in self.nodes)

    def start_all(self):
        for n in self.nodes:
            n.start(first=True)

    def ensure_running(self):
        for n in self.nodes:
            n.resume()
            if not n.running:
                n.proc = None
                n.start()

    def kill_all(self):
        for n in self.nodes:
            try:
                n.kill()
            except Exception:  # teardown must reach every node
                pass
