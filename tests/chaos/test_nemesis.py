"""Schedules are a pure function of their seed, use only the kinds asked for, and the bounded
CI run (60 s of kill and pause on one node) always holds at least 6 faults.

Run from tests/:  python3 -m unittest chaos.test_nemesis
"""
import unittest

from . import nemesis

CI_DURATION_S = 60
CI_MIN_FAULTS = 6
SEEDS_CHECKED = 2000


class NemesisTest(unittest.TestCase):
    def test_same_seed_same_schedule(self):
        kinds = nemesis.available_kinds(3, True)
        a = nemesis.schedule(42, 300, kinds, 3)
        b = nemesis.schedule(42, 300, kinds, 3)
        self.assertEqual(a, b)
        self.assertNotEqual(a, nemesis.schedule(43, 300, kinds, 3))

    def test_faults_are_sequential_and_within_the_duration(self):
        for seed in range(200):
            faults = nemesis.schedule(seed, 120, nemesis.SINGLE_NODE_KINDS, 1)
            for f, g in zip(faults, faults[1:]):
                self.assertGreaterEqual(g.at_s, f.at_s + f.duration_s + nemesis.GAP_MIN_S - 1e-6)
            self.assertLess(faults[-1].at_s, 120)

    def test_single_node_kinds_only_target_node_one(self):
        kinds = nemesis.available_kinds(1, False)
        self.assertEqual(set(kinds), set(nemesis.SINGLE_NODE_KINDS))
        for f in nemesis.schedule(7, 600, kinds, 1):
            self.assertIn(f.kind, kinds)
            self.assertEqual(set(f.targets), {1})

    def test_mixed_cluster_schedule_uses_every_kind(self):
        # Three nodes hold all three replicas: nowhere to move them.
        kinds = nemesis.available_kinds(3, True)
        self.assertEqual(set(kinds), set(nemesis.ALL_KINDS) - set(nemesis.MOVE_KINDS))
        self.assertEqual(set(nemesis.available_kinds(4, True)), set(nemesis.ALL_KINDS))
        for f in nemesis.schedule(3, 3600, nemesis.available_kinds(4, True), 4):
            if f.kind in nemesis.MOVE_KINDS:
                self.assertEqual(len(set(f.targets)), 3)
                self.assertTrue(set(f.targets) <= {1, 2, 3, 4})
        seen = {f.kind for f in nemesis.schedule(1, 3600, kinds, 3)}
        self.assertEqual(seen, set(kinds))
        for f in nemesis.schedule(2, 3600, kinds, 3):
            if f.kind == "kill_majority":
                self.assertEqual(len(set(f.targets)), 2)
            if f.kind == "partition_split":
                self.assertEqual(len(f.targets), 1)

    def test_ci_run_always_has_enough_faults(self):
        for seed in range(SEEDS_CHECKED):
            n = len(nemesis.schedule(seed, CI_DURATION_S, ("kill", "pause"), 1))
            self.assertGreaterEqual(n, CI_MIN_FAULTS, f"seed {seed}")


if __name__ == "__main__":
    unittest.main()
