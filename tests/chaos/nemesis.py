"""Nemeses on a seeded schedule. `schedule()` is a pure function of its arguments, so a failing
run is replayed by its seed; `Nemesis` applies one fault at a time and records its start and
end in the history.

Kinds:
  kill              SIGKILL one node (a random one, or the leader in a cluster), restart after
                    a short down time
  pause             SIGSTOP one node for longer than the consumers' session timeout (and, in a
                    cluster, the election timeout), then SIGCONT
  restart           rolling restart: every node in turn stopped with SIGTERM and started again
  kill_majority     SIGKILL a majority at once (cluster only)
  partition         isolate one node (its link down): from the other nodes and the clients
  partition_split   a majority/minority split, both ways (cluster + namespaces)
  partition_oneway  one node's packets to the others are dropped, theirs still arrive
  partition_bridge  two sides that cannot see each other, and one node that sees both
  slow              one node's egress limited by tbf (namespaces)
  move              move a partition's replicas to another set of nodes (AlterPartition-
                    Reassignments) and wait for it (needs more nodes than replicas)
  move_kill         the same, and SIGKILL a node of the old or new replica set while it moves
                    (where Jepsen found Redpanda losing writes)
"""
import random
import shutil
from dataclasses import dataclass, field

SINGLE_NODE_KINDS = ("kill", "pause", "restart")
CLUSTER_KINDS = SINGLE_NODE_KINDS + ("kill_majority",)
NETWORK_KINDS = ("partition", "partition_split", "partition_oneway", "partition_bridge", "slow")
# Planted bugs, never in a `mixed` schedule: they exist to show that a run under them fails.
# kill_wipe kills a node and deletes its data dir before the restart (a lost disk on one node
# with no replica must lose acknowledged writes).
PLANTED_KINDS = ("kill_wipe",)
MOVE_KINDS = ("move", "move_kill")
ALL_KINDS = CLUSTER_KINDS + NETWORK_KINDS + MOVE_KINDS

# Time between the end of one fault and the start of the next.
GAP_MIN_S = 1.0
GAP_MAX_S = 2.5
# A killed node stays down this long before its restart (0: restart at once).
KILL_DOWN_MAX_S = 2.0
# Pauses outlast the consumers' session timeout (workload.SESSION_TIMEOUT_MS, 6 s) so the
# group rebalances around the paused broker's clients and the producers' requests time out.
PAUSE_MIN_S = 6.5
PAUSE_MAX_S = 7.5
PARTITION_MIN_S = 3.0
PARTITION_MAX_S = 8.0
SLOW_RATE_KBIT = 256
# Kinds that need more than one node, and kinds that need namespaces.
NEEDS_CLUSTER = ("kill_majority", "partition_split", "partition_oneway", "partition_bridge")
NEEDS_NETNS = NETWORK_KINDS
# Replicas of the harness's topic (the cluster default: min(3, nodes)); a move needs a node
# outside them.
TOPIC_REPLICAS_MAX = 3
# A move is waited for this long at most (it is a fault: the next one starts after it).
MOVE_WAIT_MAX_S = 30.0
# The time a move fault is planned to take (the schedule's spacing): a move of a few MB with a
# kill in it takes 1-5 s here. Planning MOVE_WAIT_MAX_S would leave a 150 s run five faults; a
# move that takes longer than planned only delays the next fault.
MOVE_PLANNED_S = 6.0
MOVE_KILL_AFTER_MIN_S = 0.2
MOVE_KILL_AFTER_MAX_S = 2.0


def replicas_for(nodes):
    return min(TOPIC_REPLICAS_MAX, nodes)


@dataclass
class Fault:
    id: int
    at_s: float  # planned start, seconds after the nemesis starts
    kind: str
    duration_s: float
    targets: list = field(default_factory=list)  # node ids; "leader" is resolved at run time
    params: dict = field(default_factory=dict)


def available_kinds(nodes, netns):
    kinds = [k for k in ALL_KINDS if (nodes > 1 or k not in NEEDS_CLUSTER)
             and (netns or k not in NEEDS_NETNS)
             and (nodes > replicas_for(nodes) or k not in MOVE_KINDS)]
    return tuple(kinds)


def schedule(seed, duration_s, kinds, nodes):
    """Faults one after another, starting before `duration_s`. Each kind is chosen uniformly
    from `kinds`, durations and targets from ranges above; all from `random.Random(seed)`."""
    assert kinds, "no fault kinds"
    rng = random.Random(seed)
    ids = list(range(1, nodes + 1))
    faults = []
    t = rng.uniform(GAP_MIN_S, GAP_MAX_S)
    while t < duration_s:
        kind = rng.choice(list(kinds))
        params = {}
        if kind in ("kill", "kill_wipe"):
            targets = [rng.choice(ids + (["leader"] if nodes > 1 else []))]
            dur = rng.uniform(0.0, KILL_DOWN_MAX_S)
        elif kind == "pause":
            targets = [rng.choice(ids + (["leader"] if nodes > 1 else []))]
            dur = rng.uniform(PAUSE_MIN_S, PAUSE_MAX_S)
        elif kind == "restart":
            targets = list(ids)
            rng.shuffle(targets)
            dur = 0.0  # as long as the restarts take
        elif kind == "kill_majority":
            targets = rng.sample(ids, nodes // 2 + 1)
            dur = rng.uniform(0.0, KILL_DOWN_MAX_S)
        elif kind == "partition":
            targets = [rng.choice(ids + (["leader"] if nodes > 1 else []))]
            dur = rng.uniform(PARTITION_MIN_S, PARTITION_MAX_S)
        elif kind == "partition_split":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            targets = shuffled[: (nodes - 1) // 2]  # the minority side
            dur = rng.uniform(PARTITION_MIN_S, PARTITION_MAX_S)
        elif kind == "partition_oneway":
            targets = [rng.choice(ids)]
            dur = rng.uniform(PARTITION_MIN_S, PARTITION_MAX_S)
        elif kind == "partition_bridge":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            targets = shuffled[:1]  # the bridge; the rest split in two halves
            rest = shuffled[1:]
            params = {"left": rest[: len(rest) // 2], "right": rest[len(rest) // 2:]}
            dur = rng.uniform(PARTITION_MIN_S, PARTITION_MAX_S)
        elif kind == "slow":
            targets = [rng.choice(ids)]
            dur = rng.uniform(PARTITION_MIN_S, PARTITION_MAX_S)
            params = {"rate_kbit": SLOW_RATE_KBIT}
        elif kind in MOVE_KINDS:
            targets = sorted(rng.sample(ids, replicas_for(nodes)))  # the new replica set
            dur = MOVE_PLANNED_S
            # Picks resolved at run time against what the cluster has then (partition count,
            # the old replica set), so the schedule stays a function of the seed alone.
            params = {"partition_pick": rng.randrange(1 << 16)}
            if kind == "move_kill":
                params.update(kill_after_s=round(rng.uniform(MOVE_KILL_AFTER_MIN_S,
                                                             MOVE_KILL_AFTER_MAX_S), 3),
                              down_s=round(rng.uniform(0.0, KILL_DOWN_MAX_S), 3),
                              victim_pick=rng.randrange(1 << 16))
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        faults.append(Fault(len(faults) + 1, round(t, 3), kind, round(dur, 3), targets, params))
        t += dur + rng.uniform(GAP_MIN_S, GAP_MAX_S)
    return faults


class Nemesis:
    """Applies faults to `nodes` (nodes.Nodes) and, for network kinds, to `net` (netns.Network).
    `leader_of` resolves the "leader" target (a callable returning a node id), for clusters."""

    def __init__(self, nodes, history, net=None, leader_of=None, mover=None, partitions=1,
                 replicas_of=None):
        self.nodes = nodes
        self.history = history
        self.net = net
        self.leader_of = leader_of
        self.mover = mover
        self.partitions = partitions
        self.replicas_of = replicas_of

    def _node(self, target):
        if target == "leader":
            target = (self.leader_of() if self.leader_of else None) or 1
        return self.nodes[int(target) - 1]

    def apply(self, fault, stop_event):
        if fault.kind in MOVE_KINDS:
            self._move(fault, stop_event)
            return
        nodes = [self._node(t) for t in fault.targets]
        targets = [n.node_id for n in nodes]
        self.history.record("fault_start", id=fault.id, kind=fault.kind, targets=targets,
                            params=fault.params, planned_s=fault.duration_s)
        try:
            if fault.kind in ("kill", "kill_majority", "kill_wipe"):
                for n in nodes:
                    n.kill()
                    if fault.kind == "kill_wipe":
                        shutil.rmtree(n.data_dir)
                stop_event.wait(fault.duration_s)
                for n in nodes:
                    n.start()
            elif fault.kind == "pause":
                for n in nodes:
                    n.pause()
                stop_event.wait(fault.duration_s)
                for n in nodes:
                    n.resume()
            elif fault.kind == "restart":
                for n in nodes:
                    n.stop()
                    n.start()
            elif fault.kind in NETWORK_KINDS:
                self._network(fault, targets)
                stop_event.wait(fault.duration_s)
            else:
                raise ValueError(f"unknown fault kind {fault.kind!r}")
        finally:
            if fault.kind in NETWORK_KINDS and self.net is not None:
                self.net.heal_all()
            self.history.record("fault_end", id=fault.id, kind=fault.kind)

    def _network(self, fault, targets):
        assert self.net is not None, f"{fault.kind} needs namespaces"
        everyone = [n.node_id for n in self.nodes]
        others = [i for i in everyone if i not in targets]
        if fault.kind == "partition":
            self.net.isolate(targets[0])
        elif fault.kind == "partition_split":
            for a in targets:
                for b in others:
                    self.net.cut(a, b, both_ways=True)
        elif fault.kind == "partition_oneway":
            for b in others:
                self.net.cut(targets[0], b, both_ways=False)
        elif fault.kind == "partition_bridge":
            for a in fault.params["left"]:
                for b in fault.params["right"]:
                    self.net.cut(a, b, both_ways=True)
        elif fault.kind == "slow":
            self.net.slow(targets[0], fault.params["rate_kbit"])

    def _move(self, fault, stop_event):
        """Moves one partition to the fault's replica set; move_kill also kills a node of the
        old or new set while it moves. Waits (bounded) for the move to finish."""
        import time
        assert self.mover is not None, f"{fault.kind} needs a mover"
        partition = fault.params["partition_pick"] % self.partitions
        old = (self.replicas_of(partition) if self.replicas_of else None) or []
        self.history.record("fault_start", id=fault.id, kind=fault.kind, targets=fault.targets,
                            params=dict(fault.params, partition=partition, old=old),
                            planned_s=fault.duration_s)
        deadline = time.monotonic() + MOVE_WAIT_MAX_S
        victim = None
        try:
            error = self.mover.move(partition, fault.targets)
            self.history.record("move", partition=partition, replicas=fault.targets,
                                error=error)
            if fault.kind == "move_kill":
                union = sorted(set(old) | set(fault.targets))
                victim = self.nodes[union[fault.params["victim_pick"] % len(union)] - 1]
                stop_event.wait(fault.params["kill_after_s"])
                victim.kill()
                stop_event.wait(fault.params["down_s"])
                victim.start()
                victim = None
            done = error is None and self.mover.wait(partition, deadline)
            self.history.record("move_end", partition=partition, done=done)
        finally:
            if victim is not None:
                victim.start()
            self.history.record("fault_end", id=fault.id, kind=fault.kind)

