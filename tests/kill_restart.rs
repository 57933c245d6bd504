//! Restart right after SIGKILL: the killed process's listening socket outlives it for a moment
//! (its io_uring is torn down after exit), and the new broker must start anyway.

mod common;

use common::Broker;

const CYCLES: usize = 10;

#[test]
fn ten_sigkills_each_followed_at_once_by_a_restart_all_start() {
    let mut broker = Broker::start();
    for cycle in 0..CYCLES {
        broker.kill();
        // No wait for the port: spawn_at_once panics if the broker exits during start.
        broker.spawn_at_once();
        assert!(broker.is_running(), "cycle {cycle}: the broker runs");
    }
    let log = broker.log();
    assert!(!log.contains("Address already in use"), "{log}");
}
