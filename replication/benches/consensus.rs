//! Consensus core micro-benchmarks.
//! - `tick/10000_groups`: one tick of two nodes hosting 10,000 idle groups each (every group
//!   elected, half led by each node), with the heartbeats and their responses delivered: the
//!   steady cost of keeping that many groups alive.
//! - `replicate/one_batch`: one batch through propose -> leader append -> follower append ->
//!   acks -> durable on all three -> committed, on three in-process replicas.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use spate_replication::{Action, Config, Membership, Message, NodeId, Persisted, Replica};

#[path = "../tests/support/node_pair.rs"]
mod node_pair;
use node_pair::{idle_node_pair as elected_pair, pump};

const GROUPS: u64 = 10_000;

fn tick_many_groups(c: &mut Criterion) {
    let (mut a, mut b) = elected_pair(GROUPS);
    c.bench_function("tick/10000_groups", |bench| {
        bench.iter(|| {
            a.tick();
            b.tick();
            pump(&mut a, &mut b);
        })
    });
    let leaders = a.groups().filter(|(_, r)| r.is_leader()).count()
        + b.groups().filter(|(_, r)| r.is_leader()).count();
    assert_eq!(
        leaders as u64, GROUPS,
        "groups stayed led through the benchmark"
    );
}

struct Three {
    reps: Vec<Replica>,
    out: Vec<Action>,
    inbox: Vec<(NodeId, NodeId, Message)>,
    last: Vec<spate_replication::Batch>,
}

impl Three {
    fn perform(&mut self, id: NodeId) {
        let mut appended = None;
        for a in self.out.drain(..) {
            match a {
                Action::Send { to, msg } => self.inbox.push((id, to, msg)),
                Action::Append { batches } => {
                    appended = batches.last().map(|b| b.end());
                    self.last = batches;
                }
                _ => {}
            }
        }
        if let Some(end) = appended {
            let r = &mut self.reps[(id - 1) as usize];
            r.on_appended(end, &mut self.out);
            r.on_durable(end, &mut self.out);
            self.perform(id);
        }
    }
    fn deliver(&mut self) {
        while let Some((from, to, msg)) = self.inbox.pop() {
            let msg = match msg {
                Message::Append(mut req) if req.fill_end > req.prev_offset => {
                    req.batches = self.last.clone();
                    Message::Append(req)
                }
                m => m,
            };
            self.reps[(to - 1) as usize].step(from, msg, &mut self.out);
            self.perform(to);
        }
    }
}

fn replicate_one_batch(c: &mut Criterion) {
    let members = Membership::voters(&[1, 2, 3]);
    let mut t = Three {
        reps: (1..=3)
            .map(|id| {
                Replica::new(
                    id,
                    Config::default(),
                    id,
                    Persisted::new_group(members.clone()),
                )
            })
            .collect(),
        out: Vec::new(),
        inbox: Vec::new(),
        last: Vec::new(),
    };
    for _ in 0..100 {
        t.reps[0].tick(&mut t.out);
        t.perform(1);
        t.deliver();
        if t.reps[0].is_leader() {
            break;
        }
    }
    assert!(t.reps[0].is_leader());
    let payload = Bytes::from(vec![7u8; 16 * 1024]);
    c.bench_function("replicate/one_batch", |bench| {
        bench.iter(|| {
            let before = t.reps[0].high_watermark();
            let batch = [(100u32, payload.clone())];
            t.reps[0].propose(&batch, &mut t.out).unwrap();
            t.perform(1);
            t.deliver();
            assert!(t.reps[0].high_watermark() > before);
            black_box(t.reps[0].high_watermark());
        })
    });
}

criterion_group!(benches, tick_many_groups, replicate_one_batch);
criterion_main!(benches);
