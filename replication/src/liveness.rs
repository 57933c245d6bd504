//! Node-level liveness: what quiet groups rely on instead of their own heartbeats (see
//! [`crate::replica::Replica::quiesced`]). Every shard of a node pings every peer node once
//! per heartbeat interval with the node's liveness token (a fresh non-zero number per
//! process start) and its shard index; a node is live while every shard of its current token
//! has been heard within an election timeout. A shard that stalls so makes its node silent
//! (the groups it leads could not answer either), and a restarted node is told apart by its
//! new token, whatever the timing. Sans-IO: the caller feeds pings and ticks.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::types::NodeId;

/// One shard's ping: its node's liveness token and the shard's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub token: u64,
    pub shard: u32,
}

/// Shards of one peer node tracked at most; pings naming more are ignored (a node runs one
/// shard per core, far fewer). Bounds what a peer can make every shard of this node keep
/// and look at on each tick.
pub const MAX_TRACKED_SHARDS: usize = 256;

/// One peer node's shards under its current token.
#[derive(Debug, Clone)]
struct NodeHeard {
    token: u64,
    /// Per shard: ticks since its last ping (0 on the tick one came), and whether one came
    /// since the last tick.
    shards: BTreeMap<u32, (u32, bool)>,
}

/// What one shard knows of its peers' liveness.
#[derive(Debug, Clone)]
pub struct PeerLiveness {
    timeout_ticks: u32,
    nodes: BTreeMap<NodeId, NodeHeard>,
}

impl PeerLiveness {
    /// Silent for `timeout_ticks` (an election timeout) ticks: not live.
    pub fn new(timeout_ticks: u32) -> Self {
        assert!(timeout_ticks > 0);
        PeerLiveness {
            timeout_ticks,
            nodes: BTreeMap::new(),
        }
    }

    /// A ping from `node`. A new token forgets the node's shards under the old one (the
    /// process restarted; its shard count may differ).
    pub fn heard(&mut self, node: NodeId, ping: Ping) {
        if ping.token == 0 {
            return;
        }
        let n = self.nodes.entry(node).or_insert_with(|| NodeHeard {
            token: ping.token,
            shards: BTreeMap::new(),
        });
        if n.token != ping.token {
            n.token = ping.token;
            n.shards.clear();
        }
        if let Some(s) = n.shards.get_mut(&ping.shard) {
            s.1 = true;
        } else if n.shards.len() < MAX_TRACKED_SHARDS {
            n.shards.insert(ping.shard, (0, true));
        }
    }

    /// One tick: a shard pinged since the last one is heard now, the others one tick more
    /// silent.
    pub fn tick(&mut self) {
        for n in self.nodes.values_mut() {
            for (silent, pinged) in n.shards.values_mut() {
                if std::mem::take(pinged) {
                    *silent = 0;
                } else {
                    *silent = silent.saturating_add(1);
                }
            }
        }
    }

    /// `node`'s liveness token while it is live: every shard heard under its current token
    /// pinged within the timeout. `None` for a node silent that long or never heard.
    pub fn live(&self, node: NodeId) -> Option<u64> {
        self.nodes.get(&node).and_then(|n| self.live_token(n))
    }

    fn live_token(&self, n: &NodeHeard) -> Option<u64> {
        let silent = n.shards.values().any(|s| s.0 >= self.timeout_ticks);
        (!silent && !n.shards.is_empty()).then_some(n.token)
    }

    /// A compact copy of who is live now, for a pass over thousands of groups.
    pub fn snapshot(&self) -> LiveNodes {
        LiveNodes(
            self.nodes
                .iter()
                .filter_map(|(&id, n)| self.live_token(n).map(|t| (id, t)))
                .collect(),
        )
    }
}

/// Where a node's service thread leaves the pings it receives for its shards (each reads
/// them on its tick into its own [`PeerLiveness`]), and the node's own liveness token. Shared
/// across threads; a ping costs a short lock.
#[derive(Debug)]
pub struct PingBoard {
    token: u64,
    /// Per peer node: its current token, and per shard the pings received under it so far
    /// (at most [`MAX_TRACKED_SHARDS`]).
    heard: Mutex<BTreeMap<NodeId, BoardEntry>>,
}

/// A peer node's token and, per shard, the pings received under it.
type BoardEntry = (u64, BTreeMap<u32, u64>);

impl Default for PingBoard {
    fn default() -> Self {
        Self::new()
    }
}

/// What a shard has read off the [`PingBoard`] so far (see [`PingBoard::read_into`]).
pub type PingsSeen = BTreeMap<(NodeId, u64, u32), u64>;

impl PingBoard {
    /// A board with a fresh token: every process start is a new incarnation to the peers.
    pub fn new() -> Self {
        PingBoard {
            token: fastrand::u64(1..),
            heard: Mutex::default(),
        }
    }

    /// This node's liveness token (non-zero).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// A ping from `from` (a peer the transport's handshake verified).
    pub fn record(&self, from: NodeId, ping: Ping) {
        if ping.token == 0 {
            return;
        }
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let (token, shards) = heard
            .entry(from)
            .or_insert_with(|| (ping.token, BTreeMap::new()));
        if *token != ping.token {
            *token = ping.token;
            shards.clear();
        }
        if let Some(count) = shards.get_mut(&ping.shard) {
            *count += 1;
        } else if shards.len() < MAX_TRACKED_SHARDS {
            shards.insert(ping.shard, 1);
        }
    }

    /// Hands `liveness` the pings received since the last call with the same `seen` (the
    /// caller's own record of the counts it has read).
    pub fn read_into(&self, seen: &mut PingsSeen, liveness: &mut PeerLiveness) {
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        // Entries of tokens the board no longer holds go: the board holds one per node.
        seen.retain(|(node, token, _), _| heard.get(node).is_some_and(|(t, _)| t == token));
        for (&node, (token, shards)) in heard.iter() {
            for (&shard, &count) in shards {
                let last = seen.entry((node, *token, shard)).or_insert(0);
                if *last != count {
                    *last = count;
                    liveness.heard(
                        node,
                        Ping {
                            token: *token,
                            shard,
                        },
                    );
                }
            }
        }
    }
}

/// The live nodes and their tokens at one moment (see [`PeerLiveness::snapshot`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveNodes(Vec<(NodeId, u64)>);

impl LiveNodes {
    pub fn live(&self, node: NodeId) -> Option<u64> {
        // Ascending by node (made from an ordered map).
        self.0
            .binary_search_by_key(&node, |&(n, _)| n)
            .ok()
            .map(|i| self.0[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_live_until_one_of_its_shards_falls_silent() {
        let mut l = PeerLiveness::new(3);
        assert_eq!(l.live(2), None);
        l.heard(2, Ping { token: 7, shard: 0 });
        l.heard(2, Ping { token: 7, shard: 1 });
        l.tick();
        assert_eq!(l.live(2), Some(7));
        for _ in 0..3 {
            l.heard(2, Ping { token: 7, shard: 0 });
            l.tick();
        }
        assert_eq!(l.live(2), None, "shard 1 silent for the timeout");
        l.heard(2, Ping { token: 7, shard: 1 });
        l.tick();
        assert_eq!(l.live(2), Some(7));
    }

    #[test]
    fn a_new_token_replaces_the_old_shards() {
        let mut l = PeerLiveness::new(3);
        l.heard(2, Ping { token: 7, shard: 0 });
        l.heard(2, Ping { token: 7, shard: 1 });
        l.tick();
        l.heard(2, Ping { token: 9, shard: 0 });
        l.tick();
        assert_eq!(l.live(2), Some(9));
        assert_eq!(l.snapshot().live(2), Some(9));
        assert_eq!(l.snapshot().live(3), None);
    }

    #[test]
    fn the_board_hands_on_each_new_ping_once() {
        let board = PingBoard::new();
        assert_ne!(board.token(), 0);
        let (mut seen, mut l) = (PingsSeen::new(), PeerLiveness::new(2));
        board.record(2, Ping { token: 7, shard: 0 });
        board.read_into(&mut seen, &mut l);
        l.tick();
        assert_eq!(l.live(2), Some(7));
        // Nothing new: two silent ticks and the node is not live.
        for _ in 0..2 {
            board.read_into(&mut seen, &mut l);
            l.tick();
        }
        assert_eq!(l.live(2), None);
        board.record(2, Ping { token: 7, shard: 0 });
        board.read_into(&mut seen, &mut l);
        l.tick();
        assert_eq!(l.live(2), Some(7));
    }

    #[test]
    fn a_zero_token_is_ignored() {
        let mut l = PeerLiveness::new(3);
        l.heard(2, Ping { token: 0, shard: 0 });
        l.tick();
        assert_eq!(l.live(2), None);
    }
}
