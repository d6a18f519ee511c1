"""Node health, capacity and maintenance (issue 5) through a real nodemanagerd and nodectl on a
private bus and libvirt's test:///default: the checks a real host feeds (the uplink's carrier
through netlink events on a veth in the node's namespace, the image disk on a small tmpfs), the
HealthChanged and Heartbeat signals as `nodectl node watch` prints them, drain/undrain across a
restart, capacity and quota refusals, and bad configuration.

Run: NM_BUILD_DIR=<build> python3 -m unittest -v test_health   (from this directory, as root)
"""

import json
import os
import queue
import subprocess
import threading
import time
import unittest

import harness
from test_daemon import NodeTestCase

EXIT_UNAVAILABLE = 5
EXIT_CAPACITY = 7
EXIT_DEGRADED = 8
EXIT_FAILED = 9


class Watch:
    """`nodectl node watch --json` in the background; lines stamped on arrival."""

    def __init__(self, node):
        self.proc = node.spawn_nodectl("node", "watch")
        self.lines = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        first = self.next(lambda s: True, timeout=10)
        assert first["signal"] == "Watching", first

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.put((time.monotonic(), json.loads(line)))
            except ValueError:
                self.lines.put((time.monotonic(), {"signal": "unparsable", "line": line}))

    def next(self, match, timeout=5.0):
        """The next signal for which match(signal) holds; its arrival time is in ["_at"]."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching signal within %.1fs" % timeout)
            try:
                at, sig = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if match(sig):
                sig["_at"] = at
                return sig

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def health_changed(check, state):
    def match(s):
        return s["signal"] == "HealthChanged" and any(
            c["name"] == check and c["state"] == state for c in s["changed"])
    return match


class HealthTestCase(NodeTestCase):

    daemon_args = ("--heartbeat-interval-ms", "100", "--health-interval-ms", "100")

    def health(self, expect=0):
        return self.ctl("node", "health", expect=expect).json

    def checks(self, h):
        return {c["name"]: c for c in h["checks"]}

    def watch(self):
        w = Watch(self.node)
        self.addCleanup(w.close)
        return w

    def test_a_healthy_node_reports_every_host_check_ok(self):
        h = self.health()
        self.assertEqual(h["state"], "ok", h)
        self.assertFalse(h["maintenance"])
        checks = self.checks(h)
        for name in ("libvirt", "state-db", "image-disk", "memory-pressure"):
            self.assertIn(name, checks, h)
            self.assertEqual(checks[name]["state"], "ok", h)
        self.assertNotIn("uplink", checks, "no underlay configured: nothing to watch")
        self.wait_until("a heartbeat", lambda: self.health()["heartbeat_seq"] > 0, timeout=5)
        text = self.ctl("node", "health", json_output=False).stdout
        self.assertIn("node: ok", text)
        self.assertIn("CHECK", text)

    def test_without_libvirt_at_start_up_the_node_serves_reports_it_and_catches_up(self):
        """libvirt not reachable when the daemon starts (libvirtd comes later at boot): the bus
        name is owned, the libvirt check is failed with the reason, the database's VMs are listed
        and VM changes are refused as unavailable; once libvirt answers, the start-up reconcile
        runs (the VM's missing domain is defined again) and VMs can be created."""
        self.import_image()
        self.create("web-1", "contoso")
        self.assertEqual(self.node.stop_daemon(), 0)
        # The test driver's host from a file: no file, no connection, as without libvirtd.
        host = os.path.join(self.node.tmp, "libvirt-host.xml")
        self.node.start_daemon(self.daemon_args, libvirt_uri="test://" + host)

        h = self.health(expect=EXIT_FAILED)
        self.assertEqual(h["state"], "failed", h)
        libvirt = self.checks(h)["libvirt"]
        self.assertEqual(libvirt["state"], "failed", h)
        self.assertIn(host, libvirt["reason"])
        self.assertEqual(set(self.vms()), {"web-1"})
        refused = self.create("web-2", "contoso", wait=False, expect=EXIT_UNAVAILABLE)
        self.assertIn("waiting for libvirt", refused.json["message"])
        self.assertIn(host, refused.json["message"])
        self.ctl("vm", "start", "web-1", expect=EXIT_UNAVAILABLE)
        self.assertEqual(set(self.vms()), {"web-1"}, "a refused create leaves nothing")

        with open(host, "w") as f:
            f.write("<node/>\n")  # "libvirtd has started"
        self.wait_until("the libvirt check to turn ok",
                        lambda: self.checks(self.health(expect=None))["libvirt"]["state"] == "ok",
                        timeout=10)
        self.wait_until("the start-up reconcile to define web-1 again",
                        lambda: "re-defining" in self.node.daemon_log(), timeout=10)
        self.ctl("vm", "start", "web-1", "--wait")
        self.assertEqual(self.show("web-1")["state"], "running")
        self.create("web-2", "contoso")
        self.assertEqual(self.health()["state"], "ok")

    def test_a_late_libvirt_that_cannot_be_used_keeps_the_node_failed_with_the_reason(self):
        """libvirt comes but the start-up reconcile still cannot read it (our overlay pool's
        name is taken by a pool with another target): the node stays failed with that reason
        instead of turning ok while refusing every VM change."""
        self.assertEqual(self.node.stop_daemon(), 0)
        host = os.path.join(self.node.tmp, "libvirt-host.xml")
        self.node.start_daemon(self.daemon_args, libvirt_uri="test://" + host)
        with open(host, "w") as f:
            f.write("<node><pool type='dir'><name>nodemanager</name><target>"
                    "<path>/somewhere/else</path></target></pool></node>\n")

        def pool_reason():
            libvirt = self.checks(self.health(expect=None))["libvirt"]
            return libvirt["state"] == "failed" and "start-up reconcile" in libvirt["reason"] \
                and libvirt["reason"]
        reason = self.wait_until("the libvirt check to name the pool", pool_reason, timeout=10)
        self.assertIn("/somewhere/else", reason)
        self.assertEqual(self.health(expect=EXIT_FAILED)["state"], "failed")
        refused = self.create("web-2", "contoso", wait=False, expect=EXIT_UNAVAILABLE)
        self.assertIn("/somewhere/else", refused.json["message"])

    def test_heartbeats_come_every_interval_with_a_capacity_summary(self):
        w = self.watch()
        beats = [w.next(lambda s: s["signal"] == "Heartbeat") for _ in range(6)]
        seqs = [b["seq"] for b in beats]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 6)), seqs)
        gaps = [b2["_at"] - b1["_at"] for b1, b2 in zip(beats, beats[1:])]
        self.assertLess(max(gaps), 0.6, gaps)  # 100 ms interval; generous for a loaded CI host
        summary = beats[-1]["summary"]
        for key in ("vms", "vms_running", "vcpus_capacity", "vcpus_allocated",
                    "memory_mib_capacity", "memory_mib_allocated", "disk_gib_capacity",
                    "disk_gib_allocated"):
            self.assertIn(key, summary, summary)
        self.assertEqual(summary["vcpus_capacity"], 16 * 4, "test driver: 16 CPUs, ratio 4")
        self.assertEqual(beats[-1]["state"], "ok")

    def test_capacity_lists_each_resource(self):
        rows = {r["resource"]: r for r in self.ctl("node", "capacity").json}
        self.assertEqual(set(rows), {"vcpus", "memory_mib", "disk_gib"})
        self.assertEqual(rows["vcpus"]["total"], 16)
        self.assertEqual(rows["memory_mib"]["total"], 3072)  # the test driver's host
        self.assertEqual(rows["memory_mib"]["reserved"], 512)
        self.assertEqual(rows["memory_mib"]["capacity"], 2560)
        self.assertGreater(rows["disk_gib"]["total"], 0)
        text = self.ctl("node", "capacity", json_output=False).stdout
        self.assertIn("ALLOCATED", text)

    def test_drain_refuses_new_vms_keeps_running_ones_and_survives_a_restart(self):
        self.import_image()
        self.create("a", "contoso")
        self.ctl("vm", "start", "a", "--wait")
        w = self.watch()
        r = self.ctl("node", "drain", "--reason", "kernel upgrade")
        self.assertEqual(r.json, {"maintenance": True, "reason": "kernel upgrade"})
        sig = w.next(lambda s: s["signal"] == "HealthChanged" and s["maintenance"])
        self.assertEqual(sig["state"], "ok")
        w.next(lambda s: s["signal"] == "Heartbeat" and s["maintenance"])
        refused = self.create("b", "contoso", expect=EXIT_UNAVAILABLE)
        self.assertIn("maintenance", refused.json["message"])
        self.assertIn("kernel upgrade", refused.json["message"])
        self.assertEqual(self.vms()["a"]["state"], "running")
        self.assertNotIn("b", self.vms())
        h = self.health()
        self.assertTrue(h["maintenance"])
        self.assertEqual(h["maintenance_reason"], "kernel upgrade")

        self.node.stop_daemon()
        self.node.start_daemon(self.daemon_args)
        self.assertTrue(self.health()["maintenance"], "drain is persisted")
        self.create("b", "contoso", expect=EXIT_UNAVAILABLE)
        self.ctl("node", "undrain")
        self.assertFalse(self.health()["maintenance"])
        self.create("b", "contoso")
        kinds = [e["kind"] for e in self.events()]
        self.assertIn("HealthChanged", kinds, "GetEvents replays HealthChanged")


class FollowHealthTest(NodeTestCase):

    def test_events_follow_prints_a_health_change_at_once(self):
        follow = self.node.spawn_nodectl("events", "--follow")
        self.addCleanup(lambda: (follow.kill(), follow.wait(timeout=10), follow.stdout.close(),
                                 follow.stderr.close()))
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(json.loads(l)) for l in follow.stdout],
                         daemon=True).start()
        time.sleep(0.5)  # let it subscribe and replay
        self.ctl("node", "drain", "--reason", "follow test")
        deadline = time.monotonic() + 3
        while True:
            left = deadline - time.monotonic()
            self.assertGreater(left, 0, "HealthChanged not printed within 3 s")
            try:
                e = lines.get(timeout=left)
            except queue.Empty:
                continue
            if e["kind"] == "HealthChanged" and e["payload"]["maintenance"]:
                break


class UplinkHealthTest(NodeTestCase):
    """The underlay is a veth in the node's namespace; its peer going down is carrier loss."""

    daemon_args = ("--underlay-interface", "ul0", "--heartbeat-interval-ms", "100")

    def setUp(self):
        # The veth must exist before the daemon starts: create the node, then restart its daemon.
        super().setUp()
        self.node.run("ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul0p",
                      check=True)
        self.node.run("ip", "link", "set", "ul0", "up", check=True)
        self.node.run("ip", "link", "set", "ul0p", "up", check=True)
        self.node.stop_daemon()
        self.node.start_daemon(self.daemon_args)

    def uplink(self, expect=None):
        r = self.ctl("node", "health", expect=expect)
        return {c["name"]: c for c in r.json["checks"]}["uplink"], r

    def test_carrier_loss_and_link_down_are_failed_within_a_second(self):
        check, _ = self.uplink(expect=0)
        self.assertEqual(check["state"], "ok", check)
        w = Watch(self.node)
        self.addCleanup(w.close)
        t0 = time.monotonic()
        self.node.run("ip", "link", "set", "ul0p", "down", check=True)
        sig = w.next(health_changed("uplink", "failed"))
        self.assertLess(sig["_at"] - t0, 1.0, "carrier loss -> HealthChanged")
        self.assertEqual(sig["state"], "failed")
        self.assertEqual(sig["previous_state"], "ok")
        check, r = self.uplink(expect=EXIT_FAILED)
        self.assertIn("no carrier", check["reason"])
        self.node.run("ip", "link", "set", "ul0p", "up", check=True)
        sig = w.next(health_changed("uplink", "ok"))
        self.assertEqual(sig["state"], "ok")
        self.node.run("ip", "link", "set", "ul0", "down", check=True)
        w.next(health_changed("uplink", "failed"))
        check, _ = self.uplink(expect=EXIT_FAILED)
        self.assertIn("administratively down", check["reason"])
        self.node.run("ip", "link", "del", "ul0", check=True)
        w.next(lambda s: s["signal"] == "Heartbeat" and s["state"] == "failed")
        check, _ = self.uplink(expect=EXIT_FAILED)
        self.assertIn("does not exist", check["reason"])


class DiskHealthTest(NodeTestCase):
    """The state directory (image cache) on a 64 MiB tmpfs; filling it fails the node."""

    daemon_args = ("--health-interval-ms", "100", "--health-disk-degraded-mib", "40",
                   "--health-disk-failed-mib", "20", "--image-reserve-mib", "1",
                   "--disk-reserve-mib", "1")

    def setUp(self):
        super().setUp()
        self.node.stop_daemon()
        # A fresh state dir on the tmpfs (the first daemon's was on the real disk).
        self.node.run("rm", "-rf", self.node.state_dir, check=True)
        self.node.mount_tmpfs(self.node.state_dir, 64 << 20)
        self.node.start_daemon(self.daemon_args)

    def test_a_filling_disk_degrades_then_fails_the_node_and_recovers(self):
        h = self.ctl("node", "health", expect=0).json
        self.assertEqual({c["name"]: c for c in h["checks"]}["image-disk"]["state"], "ok", h)
        w = Watch(self.node)
        self.addCleanup(w.close)
        fill = os.path.join(self.node.state_dir, "images", "fill")
        self.node.run("dd", "if=/dev/zero", "of=" + fill, "bs=1M", "count=30", check=True)
        w.next(health_changed("image-disk", "degraded"))
        self.ctl("node", "health", expect=EXIT_DEGRADED)
        self.node.run("dd", "if=/dev/zero", "of=" + fill, "bs=1M", "count=50", check=True)
        sig = w.next(health_changed("image-disk", "failed"))
        self.assertEqual(sig["state"], "failed")
        h = self.ctl("node", "health", expect=EXIT_FAILED).json
        self.assertIn("below 20 MiB", {c["name"]: c for c in h["checks"]}["image-disk"]["reason"])
        self.node.run("rm", fill, check=True)
        w.next(health_changed("image-disk", "ok"))
        self.ctl("node", "health", expect=0)


class CapacityTest(NodeTestCase):

    daemon_args = ("--host-memory-mib", "1024", "--reserved-memory-mib", "512",
                   "--tenant-quota", "fabrikam:vms=1")

    def test_creates_beyond_capacity_or_quota_are_refused_and_change_nothing(self):
        self.import_image()
        self.create("a", "contoso", memory_mib=256)
        self.create("b", "contoso", memory_mib=256)
        r = self.create("c", "contoso", memory_mib=32, expect=EXIT_CAPACITY)
        self.assertEqual(r.json["error"], "InsufficientCapacity", r)
        self.assertIn("memory_mib: 32 requested, 0 of 512 free", r.json["message"])
        self.create("f1", "fabrikam", memory_mib=32, expect=EXIT_CAPACITY)  # capacity first
        self.ctl("vm", "delete", "b", "--wait")
        self.create("f1", "fabrikam", memory_mib=32)
        q = self.create("f2", "fabrikam", memory_mib=32, expect=EXIT_CAPACITY)
        self.assertEqual(q.json["error"], "QuotaExceeded", q)
        self.assertIn("tenant 'fabrikam'", q.json["message"])
        self.assertEqual(set(self.vms()), {"a", "f1"})
        rows = {r["resource"]: r for r in self.ctl("node", "capacity").json}
        self.assertEqual(rows["memory_mib"]["allocated"], 256 + 32)


class BadHealthConfigTest(unittest.TestCase):

    def test_bad_values_name_the_option_and_the_rule(self):
        daemon = os.path.join(harness.build_dir(), "nodemanager", "daemon", "nodemanagerd")
        cases = [
            (["--tenant-quota", "acme:cpus=1"], "tenant-quota"),
            (["--tenant-quota", "acme"], "tenant-quota"),
            (["--heartbeat-interval-ms", "10"], "heartbeat-interval-ms"),
            (["--health-disk-failed-mib", "9000"], "health-disk-failed-mib"),
            (["--cpu-allocation-ratio", "0"], "cpu-allocation-ratio"),
            (["--health-psi-failed", "150"], "health-psi-failed"),
            (["--crash-restart-window-s", "0"], "crash-restart-window-s"),
        ]
        for args, field in cases:
            p = subprocess.run([daemon, "--config", "/dev/null"] + args, capture_output=True,
                               text=True, timeout=10)
            self.assertEqual(p.returncode, 2, (args, p.stderr))
            self.assertIn(field, p.stderr, args)


if __name__ == "__main__":
    unittest.main()
