"""The namespace toolkit on the real kernel: traffic crosses the bridge, a cut drops it (both
ways, one way, link down), a tbf limit loses what overflows it, healing restores it, and
teardown leaves no namespace behind. Skipped (with the reason) where namespaces are unavailable.

Run from tests/ as root:  python3 -m unittest chaos.test_netns
"""
import os
import subprocess
import sys
import unittest

from . import netns

PORT = 7777
DATAGRAMS = 50
# How long a receiver waits for datagrams that a cut should stop: long enough that a working
# link delivers them all (they are sent at once), short enough to keep the test quick.
RECEIVE_TIMEOUT_S = 1.5

OK, WHY = netns.available()


@unittest.skipUnless(OK, f"network namespaces unavailable: {WHY}")
class NetnsTest(unittest.TestCase):
    def delivered(self, net, src, dst, count=DATAGRAMS, size=64):
        """Datagrams from node src that node dst receives."""
        recv = net.popen(dst, [sys.executable, "-m", "chaos.netns", "udp-count", str(PORT),
                               str(count), str(RECEIVE_TIMEOUT_S)],
                         stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(recv.stdout.readline().strip(), "ready")
            send = [sys.executable, "-m", "chaos.netns", "udp-send", net.addr(dst), str(PORT),
                    str(count), str(size)]
            if src is None:  # from the host's namespace, over the client link
                subprocess.run(send, check=True, timeout=30)
            else:
                net.run(src, send, check=True, timeout=30)
            out, _ = recv.communicate(timeout=30)
            return int(out.strip())
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()

    def test_cut_heal_slow_and_teardown(self):
        prefix = f"{netns.PREFIX_ROOT}t{os.getpid()}"
        with netns.Network(3, prefix=prefix, client_link=True) as net:
            self.assertEqual(len(netns.list_namespaces(prefix + "-")), 4)  # hub + 3 nodes
            self.delivered(net, None, 2, count=1)
            self.assertEqual(self.delivered(net, None, 2), DATAGRAMS, "host reaches node 2")
            # ARP warms up with the first datagrams: a working link then delivers them all.
            self.delivered(net, 1, 2, count=1)
            self.assertEqual(self.delivered(net, 1, 2), DATAGRAMS)
            self.assertEqual(self.delivered(net, 2, 1), DATAGRAMS)

            net.cut(1, 2, both_ways=True)
            self.assertEqual(self.delivered(net, 1, 2), 0)
            self.assertEqual(self.delivered(net, 2, 1), 0)
            self.delivered(net, 1, 3, count=1)
            self.assertEqual(self.delivered(net, 1, 3), DATAGRAMS, "only 1<->2 is cut")
            net.heal_all()
            self.assertEqual(self.delivered(net, 1, 2), DATAGRAMS)

            net.cut(1, 2, both_ways=False)
            self.assertEqual(self.delivered(net, 1, 2), 0)
            self.assertEqual(self.delivered(net, 2, 1), DATAGRAMS, "the other way still works")
            net.heal_all()

            net.isolate(3)
            self.assertEqual(self.delivered(net, 1, 3), 0)
            self.assertEqual(self.delivered(net, 3, 2), 0)
            net.heal_all()
            self.delivered(net, 3, 1, count=1)
            self.assertEqual(self.delivered(net, 3, 1), DATAGRAMS)

            # 200 x 1400 B at once through 64 kbit/s with 4 KiB burst: most are dropped.
            net.slow(1, 64)
            got = self.delivered(net, 1, 2, count=200, size=1400)
            self.assertLess(got, DATAGRAMS)
            self.assertGreater(got, 0)
            net.heal_all()
            # Back to full speed (a volume the receiver's socket buffer holds at once).
            self.assertEqual(self.delivered(net, 1, 2, size=1400), DATAGRAMS)
        self.assertEqual(netns.list_namespaces(prefix + "-"), [], "teardown leaves nothing")
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
        self.assertNotIn(prefix, links.stdout, "no link left in the host's namespace")

    def test_networks_made_at_once_never_share_a_client_subnet(self):
        """Two processes make a client-linked network each at the same moment, both made to
        start their search from the same subnet (as two pids 250 apart would): they get
        different subnets, and the host reaches each one's nodes. On one subnet the host would
        route both runs' clients to one of them (a split-leader test once judged another run's
        cluster that way)."""
        env = dict(os.environ, **{netns.SUBNET_START_ENV: "7"})
        hold = [subprocess.Popen([sys.executable, "-m", "chaos.test_netns", "hold", tag],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
                for tag in ("a", "b")]
        try:
            made = [p.stdout.readline().split() for p in hold]
            self.assertTrue(all(len(m) == 2 for m in made), f"a network was not made: {made}")
            (subnet_a, _), (subnet_b, _) = made
            self.assertNotEqual(subnet_a, subnet_b)
            for subnet, link in made:
                out = subprocess.run(["ip", "-o", "-4", "route", "get", f"{subnet}2"],
                                     capture_output=True, text=True, check=True).stdout
                self.assertIn(f"dev {link} ", out, f"the host routes {subnet}0/24 to {link}")
        finally:
            for p in hold:
                p.stdin.close()
                p.wait(timeout=60)

    def test_cleanup_removes_leftovers_by_prefix(self):
        prefix = f"{netns.PREFIX_ROOT}c{os.getpid()}"
        net = netns.Network(2, prefix=prefix)
        net.create()
        net.created = False  # as if the harness died: its own teardown will not run
        self.assertEqual(len(netns.list_namespaces(prefix + "-")), 3)
        removed = netns.cleanup(prefix + "-")
        self.assertEqual(len(removed), 3)
        self.assertEqual(netns.list_namespaces(prefix + "-"), [])


def _hold(tag):
    """Makes a client-linked network, prints its subnet and the host's end of its client link,
    and keeps it until stdin closes."""
    prefix = f"{netns.PREFIX_ROOT}{tag}{os.getpid() % 100000}"
    with netns.Network(2, prefix=prefix, client_link=True) as net:
        print(net.subnet, net.client_link_name, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1:2] == ["hold"]:
        _hold(sys.argv[2])
    else:
        unittest.main()
