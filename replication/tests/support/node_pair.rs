//! Two in-process nodes wired back to back: shared by the rules tests and the benchmarks.

use spate_replication::{Config, Membership, Node, Persisted, Replica};

/// Moves every message between the two nodes until none is left (bounded).
pub fn pump(a: &mut Node, b: &mut Node) {
    for _ in 0..100 {
        let (oa, ob) = (a.take_output(), b.take_output());
        if oa.messages.is_empty() && ob.messages.is_empty() {
            return;
        }
        for m in oa.messages {
            b.receive(m);
        }
        for m in ob.messages {
            a.receive(m);
        }
    }
    panic!("messages did not quiesce");
}

/// Two nodes hosting `groups` groups, each with an elected leader and nothing in flight.
pub fn idle_node_pair(groups: u64) -> (Node, Node) {
    let members = Membership::voters(&[1, 2]);
    let mut a = Node::new(1);
    let mut b = Node::new(2);
    for g in 0..groups {
        let p = Persisted::new_group(members.clone());
        a.add_group(g, Replica::new(1, Config::default(), g, p.clone()));
        b.add_group(g, Replica::new(2, Config::default(), g, p));
    }
    for _ in 0..200 {
        a.tick();
        b.tick();
        pump(&mut a, &mut b);
        let led = a.groups().filter(|(_, r)| r.is_leader()).count()
            + b.groups().filter(|(_, r)| r.is_leader()).count();
        if led as u64 == groups {
            return (a, b);
        }
    }
    panic!("not every group elected a leader");
}
