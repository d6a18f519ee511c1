"""Caller authorization (issue 6): the daemon decides from the caller's credentials as the bus
reports them. nodectl runs as other users through setpriv (uid, gid and supplementary groups
chosen per case) against a real nodemanagerd on a private dbus-daemon that lets every user
connect, so only the daemon's own checks stand between a caller and the API.

Identities: nobody (65534) with no groups is a stranger; nobody in gid 30002 an operator;
nobody in gid 30001 a member of the fabric group; the user `daemon` (uid 1) the fabric user.

Run: NM_BUILD_DIR=<build> python3 -m unittest -v test_authz   (from this directory, as root)
"""

import json
import os
import pwd
import subprocess
import unittest

import harness
from test_daemon import NodeTestCase

NOBODY = 65534
NOGROUP = 65534
FABRIC_GID = 30001
OPERATORS_GID = 30002
EXIT_ACCESS_DENIED = 6


def fabric_uid():
    return pwd.getpwnam("daemon").pw_uid


class AuthzTestCase(NodeTestCase):

    daemon_args = ("--fabric-group", str(FABRIC_GID), "--operators-group", str(OPERATORS_GID),
                   "--fabric-user", "daemon")

    def as_stranger(self, *args):
        return self.node.nodectl_as(NOBODY, NOGROUP, [], *args)

    def as_operator(self, *args):
        return self.node.nodectl_as(NOBODY, NOGROUP, [OPERATORS_GID], *args)

    def as_fabric_member(self, *args):
        return self.node.nodectl_as(NOBODY, NOGROUP, [FABRIC_GID], *args)

    def as_fabric_user(self, *args):
        uid = fabric_uid()
        return self.node.nodectl_as(uid, pwd.getpwuid(uid).pw_gid, [], *args)

    def spec_file(self, name):
        return self.node.write(name + ".json", json.dumps(
            {"name": name, "tenant": "contoso", "vcpus": 1, "memory_mib": 128,
             "image": "base:1"}))

    def assertDenied(self, r, method):
        self.assertEqual(r.rc, EXIT_ACCESS_DENIED, r)
        self.assertIn("AccessDenied", r.stdout, r)
        self.assertIn(method, r.stdout, r)

    def test_a_stranger_may_neither_read_nor_change_anything(self):
        self.import_image()
        self.assertDenied(self.as_stranger("vm", "list"), "ListVms")
        self.assertDenied(self.as_stranger("image", "list"), "ListImages")
        self.assertDenied(self.as_stranger("events"), "GetEvents")
        path = self.spec_file("web-1")
        os.chmod(path, 0o644)
        self.assertDenied(self.as_stranger("vm", "create", "-f", path), "CreateVm")
        self.assertDenied(self.as_stranger("image", "rm", "base:1"), "RemoveImage")
        # Nothing changed, and every refusal is in the daemon's log with the caller's uid.
        self.assertEqual(self.ctl("vm", "list").json, [])
        self.assertEqual(len(self.ctl("image", "list").json), 1)
        log = self.node.daemon_log()
        self.assertIn("denied CreateVm (mutate) to uid %d" % NOBODY, log)
        self.assertIn("denied ListVms (read) to uid %d" % NOBODY, log)

    def test_a_stranger_cannot_read_properties_either(self):
        self.import_image()
        self.create("web-1", "contoso")
        vm = self.ctl("vm", "show", "web-1").json
        path = "/org/nodemanager/NodeManager1/vm/" + vm["id"].replace("-", "_2d")
        base = ["busctl", "--address=" + self.node.address, "get-property",
                "org.nodemanager.NodeManager1", path, "org.nodemanager.NodeManager1.Vm", "State"]
        denied = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP),
                                 "--clear-groups"] + base, capture_output=True, text=True,
                                cwd="/")
        self.assertNotEqual(denied.returncode, 0, denied)
        self.assertIn("uid %d may not call Get" % NOBODY, denied.stderr)
        allowed = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP),
                                  "--groups", str(OPERATORS_GID)] + base, capture_output=True,
                                 text=True, cwd="/")
        self.assertEqual(allowed.returncode, 0, allowed)
        self.assertIn("stopped", allowed.stdout)
        # GetManagedObjects is a read too: every VM with its properties for an operator, nothing
        # for a stranger.
        managed = ["busctl", "--address=" + self.node.address, "--json=short", "call",
                   "org.nodemanager.NodeManager1", "/org/nodemanager/NodeManager1",
                   "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"]
        ok = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP),
                             "--groups", str(OPERATORS_GID)] + managed, capture_output=True,
                            text=True, cwd="/")
        self.assertEqual(ok.returncode, 0, ok)
        self.assertIn(vm["id"], ok.stdout)
        refused = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOGROUP),
                                  "--clear-groups"] + managed, capture_output=True, text=True,
                                 cwd="/")
        self.assertNotEqual(refused.returncode, 0, refused)
        self.assertNotIn(vm["id"], refused.stdout)

    def test_operators_read_but_cannot_change_anything(self):
        self.import_image()
        self.create("web-1", "contoso")
        r = self.as_operator("vm", "list")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual([v["name"] for v in r.json], ["web-1"])
        self.assertEqual(self.as_operator("vm", "show", "web-1").rc, 0)
        self.assertEqual(self.as_operator("image", "list").rc, 0)
        self.assertEqual(self.as_operator("network", "list").rc, 0)
        self.assertEqual(self.as_operator("events").rc, 0)
        self.assertDenied(self.as_operator("vm", "start", "web-1"), "StartVm")
        self.assertDenied(self.as_operator("vm", "delete", "web-1"), "DeleteVm")
        self.assertDenied(self.as_operator("image", "gc"), "CollectImages")
        self.assertEqual(self.ctl("vm", "show", "web-1").json["desired_power"], "stopped")
        self.assertIn("allowed ListVms to uid %d as operator" % NOBODY, self.node.daemon_log())

    def test_the_fabric_group_and_the_fabric_user_may_change_state(self):
        self.import_image()
        path = self.spec_file("web-1")
        os.chmod(path, 0o644)
        r = self.as_fabric_member("vm", "create", "-f", path, "--wait")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(self.as_fabric_member("vm", "start", "web-1", "--wait").rc, 0)
        self.assertEqual(self.ctl("vm", "show", "web-1").json["state"], "running")
        r = self.as_fabric_user("vm", "delete", "web-1", "--wait")
        self.assertEqual(r.rc, 0, r)
        self.assertEqual(self.ctl("vm", "list").json, [])
        log = self.node.daemon_log()
        self.assertIn("allowed CreateVm to uid %d as fabric" % NOBODY, log)
        self.assertIn("allowed DeleteVm to uid %d as fabric" % fabric_uid(), log)
        # Structured fields: outside systemd they close each line (the journal gets NM_* fields).
        self.assertRegex(log, r"created, job \d+ \[tenant=contoso vm=[0-9a-f-]{36}\]")


class AuthzConfigTest(unittest.TestCase):

    def setUp(self):
        self.node = harness.Node()
        self.addCleanup(self.node.close)
        self.node.start_bus()

    def test_a_configured_group_that_does_not_exist_stops_the_daemon(self):
        with self.assertRaises(RuntimeError) as ctx:
            self.node.start_daemon(["--operators-group", "no-such-group-nm"], ready_timeout=10)
        self.assertIn("operators-group: no group 'no-such-group-nm'", str(ctx.exception))

    def test_default_groups_missing_on_the_host_grant_nothing_but_do_not_stop_it(self):
        self.node.start_daemon()
        r = self.node.nodectl_as(NOBODY, NOGROUP, [], "vm", "list")
        self.assertEqual(r.rc, EXIT_ACCESS_DENIED, r)


if __name__ == "__main__":
    unittest.main()
