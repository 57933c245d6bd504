"""Network namespaces for fault tests: N node namespaces, each joined by a veth pair to a bridge
that lives in a hub namespace of its own. Node i has address 10.77.K.i/24 on its `eth0` (K is
per network, so networks of parallel runs do not collide: see `_claim_subnet`). With
`client_link`, one more veth pair joins the host's namespace to the bridge (10.77.K.254) so
that clients and the harness running there reach the nodes; it is the only thing added to the
host's namespace, and it goes when the hub namespace is removed.

Faults (what this kernel has: ip netns, veth, bridge, tc htb/tbf/blackhole with u32 filters;
not netem, iptables or nftables):
  cut(a, b, both_ways)  a u32 filter on a's egress steering packets for b into a blackhole
                        qdisc (and on b's egress for a when both ways)
  isolate(a)            a's link down: nothing in or out
  slow(a, rate_kbit)    a tbf qdisc limiting a's egress
  heal_all()            undoes every fault

Every namespace name starts with a prefix (default: "spch" and the pid), removed by the context
manager, by atexit, and by `python3 -m chaos.netns cleanup [--prefix P]` for leftovers of a run
that was itself killed.

Helpers for tests, run inside a namespace:  udp-count PORT EXPECTED TIMEOUT_S  and
udp-send HOST PORT COUNT BYTES.
"""
import argparse
import atexit
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time

PREFIX_ROOT = "spch"
SUBNET_FIRST_OCTETS = "10.77"
SUBNET_BITS = 24
# Third octet of a network's subnet: one of this many, the first free from the pid on.
SUBNET_CHOICES = 250
# Held while a network picks its subnet and puts its client address in the host's namespace,
# so two networks made at once cannot pick the same one.
SUBNET_LOCK_PATH = "/tmp/spate-chaos-netns.lock"
# Where the search for a free subnet starts, instead of the pid (for the test of the lock: two
# processes made to start from the same subnet).
SUBNET_START_ENV = "SPATE_NETNS_SUBNET_START"
CLIENT_HOST_ID = 254
# Most nodes in one network: addresses .1 to .MAX_NODES of the /24, filter priorities below.
MAX_NODES = 50
CMD_TIMEOUT_S = 20
# htb needs a rate; far above anything the tests send, so the default class never limits.
UNLIMITED_RATE = "10gbit"
HTB_QUANTUM_BYTES = 1514
CUT_FILTER_PRIO_BASE = 100
SLOW_BURST_BYTES = 4096
SLOW_LATENCY_MS = 400


class NetnsError(Exception):
    pass


def _run(cmd, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {out.stderr.strip() or out.returncode}")
    return out


def available():
    """(True, "") when namespaces can be made here, else (False, why)."""
    if os.geteuid() != 0:
        return False, "not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"no `{tool}` command (iproute2)"
    probe = f"{PREFIX_ROOT}probe{os.getpid()}"
    out = _run(["ip", "netns", "add", probe], check=False)
    if out.returncode != 0:
        return False, f"`ip netns add` fails: {out.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return True, ""


def list_namespaces(prefix=PREFIX_ROOT):
    out = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def cleanup(prefix=PREFIX_ROOT):
    """Removes every namespace whose name starts with prefix, killing what still runs there.
    Returns the names removed."""
    removed = []
    out = _run(["ip", "-o", "link", "show"], check=False)
    for line in out.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(prefix.rstrip("-")) and name.endswith("c"):
            _run(["ip", "link", "del", name], check=False)
    for ns in list_namespaces(prefix):
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


def _host_subnets():
    """Third octets of the 10.77.K.0/24 subnets with an address in the host's namespace."""
    # Checked: a failed listing must not read as "nothing in use".
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    pattern = r"(?<![\d.])" + re.escape(SUBNET_FIRST_OCTETS) + r"\.(\d+)\.\d+/"
    return {int(k) for k in re.findall(pattern, out)}


def _claim_subnet(client_link):
    """The subnet prefix ("10.77.K.") for a new network; the caller holds SUBNET_LOCK_PATH.

    A network with a client link puts an address of its subnet in the host's namespace, and the
    host routes the whole /24 to it: two such networks on one subnet (a pid-derived choice
    collides once in 250 pairs) would send one run's clients to the other run's nodes. So K is
    the first, from the pid on, that no address in the host's namespace uses. A network without
    a client link is private to its namespaces and may reuse any K."""
    start = int(os.environ.get(SUBNET_START_ENV, os.getpid())) % SUBNET_CHOICES
    if not client_link:
        return f"{SUBNET_FIRST_OCTETS}.{start}."
    taken = _host_subnets()
    for step in range(SUBNET_CHOICES):
        k = (start + step) % SUBNET_CHOICES
        if k not in taken:
            return f"{SUBNET_FIRST_OCTETS}.{k}."
    raise NetnsError(f"every {SUBNET_FIRST_OCTETS}.K.0/24 subnet is in use in the host's "
                     "namespace (leftovers? python3 -m chaos.netns cleanup)")


class Network:
    def __init__(self, size, prefix=None, client_link=False):
        assert 1 <= size <= MAX_NODES, size
        self.size = size
        self.client_link = client_link
        self.prefix = prefix or f"{PREFIX_ROOT}{os.getpid()}"
        # Chosen by `create`, not here: which subnets are free depends on the host's addresses
        # at that moment, under the lock.
        self.subnet = None
        # veth names are made in the node namespace but must still fit IFNAMSIZ (15).
        assert len(self.prefix) <= 11, self.prefix
        self.hub = f"{self.prefix}-hub"
        self.created = False
        self._faults = set()

    def ns(self, i):
        return f"{self.prefix}-n{i}"

    def addr(self, i):
        assert self.subnet is not None, "a network's addresses exist once it is created"
        return f"{self.subnet}{i}"

    @property
    def client_link_name(self):
        """The host's end of the client link (a veth in the host's namespace)."""
        return f"{self.prefix}c"

    @property
    def client_addr(self):
        return self.addr(CLIENT_HOST_ID)

    def ids(self):
        return range(1, self.size + 1)

    def __enter__(self):
        self.create()
        return self

    def __exit__(self, *exc):
        self.destroy()

    def create(self):
        ok, why = available()
        if not ok:
            raise NetnsError(f"network namespaces unavailable: {why}")
        atexit.register(self.destroy)
        self.created = True
        with open(SUBNET_LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _claim_subnet(self.client_link)
            self._create()

    def _create(self):
        try:
            _run(["ip", "netns", "add", self.hub])
            _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
            for i in self.ids():
                ns = self.ns(i)
                _run(["ip", "netns", "add", ns])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                tmp = f"{self.prefix}v{i}"
                _run(["ip", "link", "add", tmp, "netns", ns, "type", "veth", "peer", "name",
                      f"b{i}", "netns", self.hub])
                _run(["ip", "-n", ns, "link", "set", tmp, "name", "eth0"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/{SUBNET_BITS}",
                      "dev", "eth0"])
                _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
                _run(["ip", "-n", self.hub, "link", "set", f"b{i}", "master", "br0"])
                _run(["ip", "-n", self.hub, "link", "set", f"b{i}", "up"])
                self._egress_qdiscs(i)
            if self.client_link:
                host_end = self.client_link_name
                _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "c0",
                      "netns", self.hub])
                _run(["ip", "addr", "add", f"{self.client_addr}/{SUBNET_BITS}", "dev",
                      host_end])
                _run(["ip", "link", "set", host_end, "up"])
                _run(["ip", "-n", self.hub, "link", "set", "c0", "master", "br0"])
                _run(["ip", "-n", self.hub, "link", "set", "c0", "up"])
        except Exception:
            self.destroy()
            raise

    def _tc(self, i, *args, check=True):
        return _run(["tc", "-n", self.ns(i)] + list(args), check=check)

    def _egress_qdiscs(self, i):
        """htb at the root of eth0: class 1:1 (default, unlimited; tbf goes under it to slow
        the link) and class 1:2 whose leaf is a blackhole: filters steer cut traffic there."""
        self._tc(i, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
        for cls in ("1:1", "1:2"):
            self._tc(i, "class", "add", "dev", "eth0", "parent", "1:", "classid", cls, "htb",
                     "rate", UNLIMITED_RATE, "quantum", str(HTB_QUANTUM_BYTES))
        self._tc(i, "qdisc", "add", "dev", "eth0", "parent", "1:2", "handle", "20:", "blackhole")

    def run(self, i, cmd, **kwargs):
        """Runs cmd inside node i's namespace (blocking)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(i)] + list(cmd), **kwargs)

    def popen(self, i, cmd, **kwargs):
        return subprocess.Popen(["ip", "netns", "exec", self.ns(i)] + list(cmd), **kwargs)

    def cut(self, a, b, both_ways=True):
        """Drops a's packets to b (and b's to a when both_ways)."""
        pairs = [(a, b), (b, a)] if both_ways else [(a, b)]
        for src, dst in pairs:
            if ("cut", src, dst) in self._faults:
                continue
            self._tc(src, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip",
                     "prio", str(CUT_FILTER_PRIO_BASE + dst), "u32", "match", "ip", "dst",
                     f"{self.addr(dst)}/32", "flowid", "1:2")
            self._faults.add(("cut", src, dst))

    def isolate(self, a):
        _run(["ip", "-n", self.ns(a), "link", "set", "eth0", "down"])
        self._faults.add(("down", a, None))

    def slow(self, a, rate_kbit):
        self._tc(a, "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:", "tbf",
                 "rate", f"{rate_kbit}kbit", "burst", str(SLOW_BURST_BYTES), "latency",
                 f"{SLOW_LATENCY_MS}ms")
        self._faults.add(("slow", a, None))

    def heal_all(self):
        for kind, a, b in sorted(self._faults, key=str):
            if kind == "cut":
                self._tc(a, "filter", "del", "dev", "eth0", "parent", "1:", "prio",
                         str(CUT_FILTER_PRIO_BASE + b), check=False)
            elif kind == "down":
                _run(["ip", "-n", self.ns(a), "link", "set", "eth0", "up"], check=False)
            elif kind == "slow":
                self._tc(a, "qdisc", "del", "dev", "eth0", "parent", "1:1", "handle", "10:",
                         check=False)
        self._faults.clear()

    def destroy(self):
        """Idempotent: kills what runs in the namespaces, removes them (veths go with them)."""
        if not self.created:
            return
        self.created = False
        cleanup(self.prefix + "-")
        if self.client_link:
            # Gone with its peer in the hub namespace; removed here if the hub never got it.
            _run(["ip", "link", "del", self.client_link_name], check=False)


def _udp_count(port, expected, timeout_s):
    """Counts datagrams until `expected` arrived or timeout_s passed; prints `ready` once
    bound and the count at the end."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port))
        print("ready", flush=True)
        n = 0
        deadline = time.monotonic() + timeout_s
        while n < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                s.recv(65536)
                n += 1
            except socket.timeout:
                break
        print(n, flush=True)


def _udp_send(host, port, count, size):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        payload = b"x" * size
        for _ in range(count):
            try:
                s.sendto(payload, (host, port))
            except OSError:
                pass  # no route while the link is down: the datagram is lost, as intended


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m chaos.netns")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="remove leftover namespaces by name prefix")
    c.add_argument("--prefix", default=PREFIX_ROOT)
    sub.add_parser("check", help="say whether namespaces are available here")
    r = sub.add_parser("udp-count")
    r.add_argument("port", type=int)
    r.add_argument("expected", type=int)
    r.add_argument("timeout_s", type=float)
    s = sub.add_parser("udp-send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("count", type=int)
    s.add_argument("bytes", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "cleanup":
        removed = cleanup(args.prefix)
        print(f"removed {len(removed)} namespaces" + (": " + " ".join(removed) if removed else ""))
    elif args.cmd == "check":
        ok, why = available()
        print("network namespaces available" if ok else f"unavailable: {why}")
        return 0 if ok else 1
    elif args.cmd == "udp-count":
        _udp_count(args.port, args.expected, args.timeout_s)
    elif args.cmd == "udp-send":
        _udp_send(args.host, args.port, args.count, args.bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
