//! Node-level liveness: what quiet groups rely on instead of their own heartbeats (see
//! [`crate::replica::Replica::quiesced`]). Every shard of a node pings every peer node once
//! per heartbeat interval with the node's liveness token (a fresh non-zero number per
//! process start) and its shard index; a node is live while every shard of its current token
//! has been heard within an election timeout. A shard that stalls so makes its node silent
//! (the groups it leads could not answer either), and a restarted node is told apart by its
//! new token, whatever the timing. Sans-IO: the caller feeds pings and ticks.

use std::sync::Mutex;

use crate::types::NodeId;

/// One shard's ping: its node's liveness token and the shard's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub token: u64,
    pub shard: u32,
}

/// Shards of one peer node tracked at most; pings naming more are ignored (the highest
/// shard index a node runs is far below: one per core).
pub const MAX_TRACKED_SHARDS: usize = 1024;

#[derive(Debug, Clone)]
struct Heard {
    node: NodeId,
    token: u64,
    shard: u32,
    /// Ticks since the last ping (0 on the tick a ping came).
    silent: u32,
    pinged: bool,
}

/// What one shard knows of its peers' liveness.
#[derive(Debug, Clone)]
pub struct PeerLiveness {
    timeout_ticks: u32,
    heard: Vec<Heard>,
}

impl PeerLiveness {
    /// Silent for `timeout_ticks` (an election timeout) ticks: not live.
    pub fn new(timeout_ticks: u32) -> Self {
        assert!(timeout_ticks > 0);
        PeerLiveness {
            timeout_ticks,
            heard: Vec::new(),
        }
    }

    /// A ping from `node`. A new token forgets the node's shards under the old one (the
    /// process restarted; its shard count may differ).
    pub fn heard(&mut self, node: NodeId, ping: Ping) {
        if ping.token == 0 {
            return;
        }
        self.heard
            .retain(|h| h.node != node || h.token == ping.token);
        if let Some(h) = self
            .heard
            .iter_mut()
            .find(|h| h.node == node && h.shard == ping.shard)
        {
            h.pinged = true;
            return;
        }
        if self.heard.iter().filter(|h| h.node == node).count() >= MAX_TRACKED_SHARDS {
            return;
        }
        self.heard.push(Heard {
            node,
            token: ping.token,
            shard: ping.shard,
            silent: 0,
            pinged: true,
        });
    }

    /// One tick: a shard pinged since the last one is heard now, the others one tick more
    /// silent.
    pub fn tick(&mut self) {
        for h in &mut self.heard {
            if std::mem::take(&mut h.pinged) {
                h.silent = 0;
            } else {
                h.silent = h.silent.saturating_add(1);
            }
        }
    }

    /// `node`'s liveness token while it is live: every shard heard under its current token
    /// pinged within the timeout. `None` for a node silent that long or never heard.
    pub fn live(&self, node: NodeId) -> Option<u64> {
        let mut token = None;
        for h in self.heard.iter().filter(|h| h.node == node) {
            if h.silent >= self.timeout_ticks {
                return None;
            }
            token = Some(h.token);
        }
        token
    }

    /// A compact copy of who is live now, for a pass over thousands of groups.
    pub fn snapshot(&self) -> LiveNodes {
        let mut nodes: Vec<NodeId> = self.heard.iter().map(|h| h.node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        LiveNodes(
            nodes
                .into_iter()
                .filter_map(|n| self.live(n).map(|t| (n, t)))
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
    /// (node, ping, pings received from it so far), at most [`MAX_TRACKED_SHARDS`] per node.
    heard: Mutex<Vec<(NodeId, Ping, u64)>>,
}

impl Default for PingBoard {
    fn default() -> Self {
        Self::new()
    }
}

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
        heard.retain(|(n, p, _)| *n != from || p.token == ping.token);
        if let Some(h) = heard.iter_mut().find(|(n, p, _)| *n == from && *p == ping) {
            h.2 += 1;
            return;
        }
        if heard.iter().filter(|(n, ..)| *n == from).count() < MAX_TRACKED_SHARDS {
            heard.push((from, ping, 1));
        }
    }

    /// Hands `liveness` the pings received since the last call with the same `seen` (the
    /// caller's own record of the counts it has read).
    pub fn read_into(&self, seen: &mut Vec<(NodeId, Ping, u64)>, liveness: &mut PeerLiveness) {
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        for &(node, ping, count) in heard.iter() {
            match seen.iter_mut().find(|(n, p, _)| *n == node && *p == ping) {
                Some(s) if s.2 == count => {}
                Some(s) => {
                    s.2 = count;
                    liveness.heard(node, ping);
                }
                None => {
                    seen.push((node, ping, count));
                    liveness.heard(node, ping);
                }
            }
        }
        seen.retain(|(n, p, _)| heard.iter().any(|(hn, hp, _)| hn == n && hp == p));
    }
}

/// The live nodes and their tokens at one moment (see [`PeerLiveness::snapshot`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveNodes(Vec<(NodeId, u64)>);

impl LiveNodes {
    pub fn live(&self, node: NodeId) -> Option<u64> {
        self.0.iter().find(|(n, _)| *n == node).map(|(_, t)| *t)
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
        let (mut seen, mut l) = (Vec::new(), PeerLiveness::new(2));
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
