"""Integration tests: real nodemanagerd and nodectl processes on a private dbus-daemon and
libvirt's test:///default.

About test:///default: it is an in-process fake hypervisor, one per libvirt connection. Each
daemon start therefore gets a fresh, empty hypervisor; domains do NOT survive a daemon restart
here. "Adopted after a restart" on this driver means: the daemon reads its database (desired
state), re-defines every VM's domain and restores its desired power state, so that every VM shows
up with the same id and the state it was asked to have. On real libvirt (e2e tier) the domains
survive and are adopted as they are.

Run: NM_BUILD_DIR=<build> python3 -m unittest -v test_daemon   (from this directory)
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import unittest
import xml.etree.ElementTree as ET

import harness

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
CONTRACT_XML = os.path.join(REPO, "nodemanager", "dbus", "org.nodemanager.NodeManager1.xml")


def spec(name, tenant, image="base:1", **extra):
    s = {"name": name, "tenant": tenant, "vcpus": 1, "memory_mib": 128, "image": image,
         "disk_gib": 1}
    s.update(extra)
    return json.dumps(s)


class NodeTestCase(unittest.TestCase):
    """One private bus + one daemon per test, torn down by pid."""

    daemon_args = ()

    def setUp(self):
        self.node = harness.Node()
        # A cleanup, not tearDown(): it also runs when setUp (here or in a subclass) fails, so a
        # daemon that cannot start leaves no bus, holder or namespace behind.
        self.addCleanup(self._close_node)
        self.node.start_bus()
        self.node.start_daemon(self.daemon_args)

    def _close_node(self):
        failed = self._failed()
        if failed:
            sys.stderr.write("\n==== nodemanagerd stderr (%s) ====\n%s\n" %
                             (self.id(), self.node.daemon_log()))
        keep = failed and os.environ.get("NM_IT_KEEP") == "1"
        if keep:
            sys.stderr.write("kept %s\n" % self.node.tmp)
        self.node.close(keep=keep)

    def _failed(self):
        outcome = getattr(self, "_outcome", None)
        result = getattr(outcome, "result", None)
        if result is None:
            return False
        return any(t is self for t, _ in list(result.errors) + list(result.failures))

    # ---- helpers ----

    def ctl(self, *args, expect=0, **kw):
        r = self.node.nodectl(*args, **kw)
        if expect is not None:
            self.assertEqual(r.rc, expect, r)
        return r

    def import_image(self, ref="base:1", size=256 * 1024, kind="disk"):
        data = os.urandom(size)
        path = self.node.write(ref.replace(":", "_") + ".img", data)
        digest = hashlib.sha256(data).hexdigest()
        r = self.ctl("image", "import", ref, path, "--sha256", digest, "--kind", kind, "--wait")
        self.assertEqual(r.json["result"], "done", r)
        return "sha256:" + digest

    def create(self, name, tenant, wait=True, request_id=None, expect=0, **extra):
        path = self.node.write(name + ".json", spec(name, tenant, **extra))
        args = ["vm", "create", "-f", path]
        if wait:
            args.append("--wait")
        if request_id:
            args += ["--request-id", request_id]
        return self.ctl(*args, expect=expect)

    def vms(self, *args):
        r = self.ctl("vm", "list", *args)
        self.assertIsInstance(r.json, list, r)
        return {v["name"]: v for v in r.json}

    def show(self, vm, expect=0):
        return self.ctl("vm", "show", vm, expect=expect).json

    def events(self, since=0):
        r = self.ctl("events", "--since", str(since))
        self.assertIsInstance(r.json, list, r)
        return r.json

    def wait_until(self, what, predicate, timeout=15.0):
        """Re-evaluates predicate() until true; fails with `what` after the deadline."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        self.fail("timed out after %.0fs waiting for %s (last: %r)" % (timeout, what, value))


class Lifecycle(NodeTestCase):

    def test_full_lifecycle_of_two_tenants(self):
        digest = self.import_image("base:1")
        images = self.ctl("image", "list").json
        self.assertEqual([(i["image"], i["digest"], i["kind"]) for i in images],
                         [("base:1", digest, "disk")])

        a = self.create("web-1", "contoso").json
        b = self.create("db-1", "fabrikam").json
        for r in (a, b):
            self.assertEqual(r["result"], "done", r)
            self.assertRegex(r["vm_id"], r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                                         r"[0-9a-f]{12}$")
        self.assertNotEqual(a["vm_id"], b["vm_id"])

        self.assertEqual(self.ctl("vm", "start", "web-1", "--wait").json["result"], "done")
        self.assertEqual(self.ctl("vm", "start", b["vm_id"], "--wait").json["result"], "done")

        listed = self.vms()
        self.assertEqual(set(listed), {"web-1", "db-1"})
        self.assertEqual(listed["web-1"]["id"], a["vm_id"])
        self.assertEqual(listed["web-1"]["tenant"], "contoso")
        self.assertEqual(listed["db-1"]["tenant"], "fabrikam")
        self.assertEqual({v["state"] for v in listed.values()}, {"running"})
        self.assertEqual(set(self.vms("--tenant", "contoso")), {"web-1"})
        self.assertEqual(set(self.vms("--tenant", "fabrikam")), {"db-1"})
        self.assertEqual(self.vms("--tenant", "nobody"), {})

        shown = self.show("web-1")
        self.assertEqual(shown["id"], a["vm_id"])
        self.assertEqual(shown["state"], "running")
        self.assertEqual(shown["desired_power"], "running")
        self.assertEqual(shown["spec"]["tenant"], "contoso")
        self.assertEqual(shown["image_digest"], digest)
        self.assertEqual(self.show(a["vm_id"])["spec"]["name"], "web-1")

        # Human output: an aligned table with the documented columns.
        table = self.ctl("vm", "list", json_output=False).stdout.splitlines()
        self.assertEqual(table[0].split(), ["ID", "NAME", "TENANT", "STATE", "GEN"])
        self.assertEqual(len(table), 3)

        self.assertEqual(self.ctl("vm", "stop", "web-1", "--force", "--wait").json["result"],
                         "done")
        self.assertEqual(self.show("web-1")["state"], "stopped")
        self.assertEqual(self.show("web-1")["desired_power"], "stopped")

        self.assertEqual(self.ctl("vm", "delete", "web-1", "--wait").json["result"], "done")
        self.assertEqual(set(self.vms()), {"db-1"})
        gone = self.ctl("vm", "show", "web-1", expect=3).json
        self.assertEqual(gone["error"], "NotFound")
        self.assertEqual(self.vms()["db-1"]["state"], "running")

    def test_reboot_of_a_running_vm_completes(self):
        self.import_image()
        self.create("web-1", "contoso")
        self.ctl("vm", "start", "web-1", "--wait")
        self.assertEqual(self.ctl("vm", "reboot", "web-1", "--wait").json["result"], "done")
        self.assertEqual(self.show("web-1")["state"], "running")

    def test_graceful_stop_without_force_completes(self):
        self.import_image()
        self.create("web-1", "contoso")
        self.ctl("vm", "start", "web-1", "--wait")
        self.assertEqual(self.ctl("vm", "stop", "web-1", "--wait").json["result"], "done")
        self.assertEqual(self.show("web-1")["state"], "stopped")

    def test_without_wait_prints_the_job_and_the_job_finishes(self):
        self.import_image()
        r = self.create("web-1", "contoso", wait=False).json
        self.assertRegex(r["job"], r"^/org/nodemanager/NodeManager1/job/[0-9]+$")
        self.assertNotIn("result", r)
        self.wait_until("the create job to finish",
                        lambda: self.show("web-1")["state"] == "stopped")

    def test_spec_from_stdin(self):
        self.import_image()
        r = self.ctl("vm", "create", "-f", "-", "--wait", input=spec("web-1", "contoso"))
        self.assertEqual(r.json["result"], "done")
        self.assertIn("web-1", self.vms())

    def test_image_remove_refused_while_in_use_then_allowed(self):
        digest = self.import_image()
        self.create("web-1", "contoso")
        r = self.ctl("image", "rm", "base:1", expect=4)
        self.assertEqual(r.json["error"], "Conflict")
        self.ctl("vm", "delete", "web-1", "--wait")
        self.assertEqual(self.ctl("image", "rm", digest).json["removed"], digest)
        self.assertEqual(self.ctl("image", "list").json, [])

    def test_help_at_every_level(self):
        for args in (["--help"], ["vm", "--help"], ["vm", "create", "--help"],
                     ["image", "import", "--help"], ["events", "--help"]):
            r = self.ctl(*args, json_output=False)
            self.assertTrue(r.stdout.startswith("usage: nodectl"), r)
            self.assertIn("Exit codes:", r.stdout)
        self.assertIn("--sha256", self.ctl("image", "import", "--help").stdout)

    def test_nodectl_bus_environment_variable_selects_the_bus(self):
        env = dict(os.environ, NODECTL_BUS=self.node.address)
        p = subprocess.run([self.node.nodectl_bin, "--json", "vm", "list"], env=env,
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout), [])
        env["NODECTL_BUS"] = "unix:path=" + os.path.join(self.node.tmp, "no-such-bus")
        p = subprocess.run([self.node.nodectl_bin, "--json", "vm", "list"], env=env,
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 5, p.stderr)
        self.assertEqual(json.loads(p.stdout)["error"], "Unavailable")

    def test_daemon_prints_nothing_on_stdout_and_exits_0_on_sigterm(self):
        self.assertEqual(self.node.stop_daemon(), 0, self.node.daemon_log())
        self.assertEqual(self.node.daemon_stdout(), "")


class BadInput(NodeTestCase):

    def assert_nothing_created(self):
        self.assertEqual(self.vms(), {})
        kinds = [e["kind"] for e in self.events()]
        self.assertNotIn("VmStateChanged", kinds)

    def test_unknown_field_is_invalid_argument_naming_the_field(self):
        self.import_image()
        r = self.create("web-1", "contoso", expect=2, colour="blue").json
        self.assertEqual(r["error"], "InvalidArgument")
        self.assertIn("colour", r["message"])
        self.assert_nothing_created()

    def test_bad_name_is_invalid_argument(self):
        self.import_image()
        for bad in ("Web_1", "-web", "a" * 64, "web<1>"):
            r = self.create(bad, "contoso", expect=2).json
            self.assertEqual(r["error"], "InvalidArgument", bad)
            self.assertIn("name", r["message"])
        self.assert_nothing_created()

    def test_zero_vcpus_is_invalid_argument(self):
        self.import_image()
        r = self.create("web-1", "contoso", expect=2, vcpus=0).json
        self.assertIn("vcpus", r["message"])
        self.assert_nothing_created()

    def test_unknown_image_is_not_found(self):
        self.import_image()
        r = self.create("web-1", "contoso", expect=3, image="nope:1").json
        self.assertEqual(r["error"], "NotFound")
        self.assertIn("nope:1", r["message"])
        self.assert_nothing_created()

    def test_spec_that_is_not_json_is_invalid_argument(self):
        path = self.node.write("bad.json", "{not json")
        self.ctl("vm", "create", "-f", path, expect=2)
        self.assert_nothing_created()

    def test_unknown_vm_is_not_found_for_every_verb(self):
        for verb in ("show", "start", "stop", "reboot", "delete"):
            r = self.ctl("vm", verb, "ghost", expect=3)
            self.assertEqual(r.json["error"], "NotFound", verb)

    def test_import_with_wrong_digest_fails_and_keeps_nothing(self):
        path = self.node.write("x.img", os.urandom(4096))
        r = self.ctl("image", "import", "x:1", path, "--sha256", "0" * 64, "--wait", expect=None)
        self.assertNotEqual(r.rc, 0, r)
        self.assertEqual(self.ctl("image", "list").json, [])

    def test_malformed_sha256_is_a_usage_error_before_any_call(self):
        path = self.node.write("x.img", b"x")
        r = self.ctl("image", "import", "x:1", path, "--sha256", "xyz", expect=2)
        self.assertEqual(r.json["error"], "InvalidArgument")

    def test_usage_errors_exit_2(self):
        self.ctl("vm", "frobnicate", expect=2)
        self.ctl("nonsense", expect=2)
        self.ctl("vm", "show", expect=2)
        self.ctl("vm", "show", "a", "b", expect=2)
        self.ctl("vm", "list", "--bogus", expect=2)

    def test_duplicate_name_is_already_exists(self):
        self.import_image()
        self.create("web-1", "contoso")
        r = self.create("web-1", "fabrikam", expect=4).json
        self.assertEqual(r["error"], "AlreadyExists")
        self.assertEqual(len(self.vms()), 1)


class Idempotency(NodeTestCase):

    def test_retried_create_returns_the_first_answer(self):
        self.import_image()
        first = self.create("web-1", "contoso", wait=False, request_id="req-1").json
        second = self.create("web-1", "contoso", wait=False, request_id="req-1").json
        self.assertEqual(first["vm_id"], second["vm_id"])
        self.assertEqual(first["job"], second["job"])
        third = self.create("web-1", "contoso", wait=True, request_id="req-1").json
        self.assertEqual(third["vm_id"], first["vm_id"])
        self.assertEqual(len(self.vms()), 1)

    def test_same_request_id_with_other_arguments_is_a_conflict(self):
        self.import_image()
        self.create("web-1", "contoso", request_id="req-1")
        r = self.create("web-2", "contoso", request_id="req-1", expect=4).json
        self.assertEqual(r["error"], "Conflict")
        self.assertEqual(set(self.vms()), {"web-1"})

    def test_retried_start_returns_the_same_job(self):
        self.import_image()
        self.create("web-1", "contoso")
        a = self.ctl("vm", "start", "web-1", "--request-id", "s-1", "--wait").json
        b = self.ctl("vm", "start", "web-1", "--request-id", "s-1", "--wait").json
        self.assertEqual(a["job"], b["job"])
        self.assertEqual(b["result"], "done")  # looked up in the event ring


class Events(NodeTestCase):

    def test_replay_has_each_transition_in_increasing_seq(self):
        self.import_image()
        vm_id = self.create("web-1", "contoso").json["vm_id"]
        self.ctl("vm", "start", "web-1", "--wait")
        self.ctl("vm", "stop", "web-1", "--force", "--wait")
        evs = self.events()
        seqs = [e["seq"] for e in evs]
        self.assertEqual(seqs, sorted(set(seqs)), "seq strictly increasing")
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))), "no gaps: %r" % seqs)
        states = [e["payload"]["state"] for e in evs
                  if e["kind"] == "VmStateChanged" and e["object_id"] == vm_id]
        # create -> stopped, start -> running, stop -> stopped (intermediate states allowed).
        self.assertGreaterEqual(len(states), 3, states)
        self.assertIn("running", states)
        self.assertEqual(states[-1], "stopped", states)
        self.assertLess(states.index("stopped"), states.index("running"), states)
        jobs = [e["payload"]["kind"] for e in evs if e["kind"] == "JobRemoved"]
        self.assertEqual(jobs, ["import", "create", "start", "stop"])

        later = self.events(since=seqs[-3])
        self.assertEqual([e["seq"] for e in later], seqs[-2:])

    def test_follow_streams_new_events_without_gaps_or_duplicates(self):
        self.import_image()
        follower = self.node.spawn_nodectl("events", "--follow")
        try:
            self.create("web-1", "contoso")
            self.ctl("vm", "start", "web-1", "--wait")
            last = self.events()[-1]["seq"]
            lines = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                line = follower.stdout.readline()
                if not line:
                    break
                lines.append(json.loads(line))
                if lines[-1]["seq"] >= last:
                    break
        finally:
            follower.send_signal(signal.SIGTERM)
            follower.wait(timeout=5)
            follower.stdout.close()
            follower.stderr.close()
        seqs = [e["seq"] for e in lines]
        self.assertEqual(seqs, list(range(1, last + 1)), "replay + live, no gaps or dups")
        self.assertEqual(lines[-1]["kind"], "JobRemoved")


class Restart(NodeTestCase):

    def test_every_vm_keeps_its_id_and_desired_state_across_a_restart(self):
        self.import_image()
        running = self.create("web-1", "contoso").json["vm_id"]
        stopped = self.create("db-1", "fabrikam").json["vm_id"]
        self.ctl("vm", "start", "web-1", "--wait")
        before_seq = self.events()[-1]["seq"]

        self.assertEqual(self.node.stop_daemon(), 0, self.node.daemon_log())
        self.assertEqual(self.node.nodectl("vm", "list").rc, 5, "daemon gone: Unavailable")
        self.node.start_daemon()

        listed = self.vms()
        self.assertEqual({n: v["id"] for n, v in listed.items()},
                         {"web-1": running, "db-1": stopped})
        # test:///default starts empty: the daemon re-defines both domains from its database and
        # restarts the one that should run.
        self.wait_until("web-1 running again", lambda: self.vms()["web-1"]["state"] == "running")
        self.assertEqual(self.show("web-1")["desired_power"], "running")
        self.assertEqual(self.vms()["db-1"]["state"], "stopped")
        self.assertEqual(self.show("db-1")["desired_power"], "stopped")
        # Event numbering continues; it is never reused.
        self.assertGreater(self.events()[-1]["seq"], before_seq - 1)
        self.assertEqual(self.ctl("vm", "stop", "web-1", "--force", "--wait").json["result"],
                         "done")
        self.assertEqual(self.ctl("vm", "delete", "db-1", "--wait").json["result"], "done")

    def test_request_ids_survive_a_restart(self):
        self.import_image()
        first = self.create("web-1", "contoso", request_id="req-r").json
        self.assertEqual(self.node.stop_daemon(), 0)
        self.node.start_daemon()
        again = self.create("web-1", "contoso", wait=False, request_id="req-r").json
        self.assertEqual(again["vm_id"], first["vm_id"])
        self.assertEqual(again["job"], first["job"])


class Crash(NodeTestCase):
    """kill -9 in the middle of a job, restart, and find the VM whole or gone."""

    def restart_after_kill(self, slow=False):
        self.node.kill_daemon()
        self.node.start_daemon(["--debug-job-delay-ms", "300"] if slow else [])

    def settle(self, name):
        """Waits until the VM is gone or in a settled state; returns its show JSON or None."""
        last = []

        def done():
            r = self.node.nodectl("vm", "show", name)
            last[:] = [r]
            if r.rc == 3:
                return {"gone": True}
            if r.rc == 0 and r.json["state"] in ("stopped", "running"):
                return r.json
            return None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            v = done()
            if v:
                return None if v.get("gone") else v
            time.sleep(0.05)
        self.fail("'%s' neither gone nor settled after 15s; last: %r" % (name, last[0]))

    def test_kill_during_create_leaves_the_vm_whole_or_gone(self):
        self.import_image()
        self.node.stop_daemon()
        self.node.start_daemon(["--debug-job-delay-ms", "1000"])
        first = self.create("web-1", "contoso", wait=False, request_id="crash-c").json
        self.restart_after_kill()
        vm = self.settle("web-1")
        retry = self.create("web-1", "contoso", wait=False, request_id="crash-c").json
        self.assertEqual(retry["vm_id"], first["vm_id"], "same answer as the first call")
        self.assertEqual(retry["job"], first["job"])
        vm = self.settle("web-1")
        # The create was acknowledged, so the VM must exist, defined and whole.
        self.assertIsNotNone(vm, "an acknowledged create must not vanish")
        self.assertEqual(vm["id"], first["vm_id"])
        self.assertEqual(vm["state"], "stopped")
        self.assertEqual(self.ctl("vm", "start", "web-1", "--wait").json["result"], "done")
        self.assertEqual(self.ctl("vm", "delete", "web-1", "--wait").json["result"], "done")

    def test_kill_right_after_the_create_reply(self):
        self.import_image()
        first = self.create("web-1", "contoso", wait=False, request_id="crash-c2").json
        self.restart_after_kill()
        vm = self.settle("web-1")
        self.assertIsNotNone(vm)
        self.assertEqual(vm["id"], first["vm_id"])
        retry = self.create("web-1", "contoso", wait=False, request_id="crash-c2").json
        self.assertEqual(retry["vm_id"], first["vm_id"])
        self.assertEqual(len(self.vms()), 1)

    def test_kill_during_delete_leaves_the_vm_whole_or_gone(self):
        self.import_image()
        vm_id = self.create("web-1", "contoso").json["vm_id"]
        self.ctl("vm", "start", "web-1", "--wait")
        self.node.stop_daemon()
        self.node.start_daemon(["--debug-job-delay-ms", "1000"])
        self.wait_until("web-1 running", lambda: self.vms()["web-1"]["state"] == "running")
        first = self.ctl("vm", "delete", "web-1", "--request-id", "crash-d").json
        self.restart_after_kill()
        # Acknowledged delete: the desired state is "gone"; the restarted daemon finishes it.
        self.settle("web-1")
        retry = self.ctl("vm", "delete", "web-1", "--request-id", "crash-d", expect=None)
        self.assertEqual(retry.rc, 0, retry)
        self.assertEqual(retry.json["job"], first["job"], "same answer as the first call")
        self.wait_until("web-1 gone", lambda: self.node.nodectl("vm", "show", vm_id).rc == 3)
        self.assertEqual(self.vms(), {})


class SlowJobs(NodeTestCase):
    """--wait against jobs slowed by --debug-job-delay-ms: deadlines and a vanishing daemon."""

    daemon_args = ("--debug-job-delay-ms", "1500")

    def test_wait_past_timeout_is_unavailable(self):
        self.import_image(size=4096)
        path = self.node.write("web-1.json", spec("web-1", "contoso"))
        r = self.ctl("--timeout", "0.3", "vm", "create", "-f", path, "--wait", expect=5)
        self.assertEqual(r.json["error"], "Unavailable")
        self.assertIn("timed out", r.json["message"])

    def test_wait_ends_with_unavailable_when_the_daemon_dies(self):
        self.import_image(size=4096)
        path = self.node.write("web-1.json", spec("web-1", "contoso"))
        waiter = subprocess.Popen(
            [self.node.nodectl_bin, "--bus", self.node.address, "vm", "create", "-f", path,
             "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # The VM exists as soon as the create is acknowledged; then the job sleeps.
            self.wait_until("the create to be acknowledged",
                            lambda: self.node.nodectl("vm", "show", "web-1").rc == 0)
            self.node.kill_daemon()
            out, err = waiter.communicate(timeout=10)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.communicate()
        self.assertEqual(waiter.returncode, 5, err)
        self.assertIn("left the bus", err)


class Introspection(NodeTestCase):
    """The running daemon's introspection matches the contract XML member by member."""

    daemon_args = ("--debug-job-delay-ms", "2000")  # keeps a Job object alive to introspect

    @staticmethod
    def members(iface):
        out = {}
        for m in iface:
            if m.tag == "method":
                out[("method", m.get("name"))] = [
                    (a.get("name"), a.get("type"), a.get("direction", "in"))
                    for a in m.findall("arg")]
            elif m.tag == "signal":
                out[("signal", m.get("name"))] = [
                    (a.get("name"), a.get("type")) for a in m.findall("arg")]
            elif m.tag == "property":
                out[("property", m.get("name"))] = (m.get("type"), m.get("access"))
        return out

    def contract(self):
        root = ET.parse(CONTRACT_XML).getroot()
        return {i.get("name"): self.members(i) for i in root.findall("interface")}

    def live(self, path):
        p = subprocess.run(["busctl", "--address=" + self.node.address, "introspect",
                            "--xml-interface", harness.SERVICE, path],
                           capture_output=True, text=True, timeout=10)
        self.assertEqual(p.returncode, 0, p.stderr)
        root = ET.fromstring(p.stdout)
        return {i.get("name"): self.members(i) for i in root.findall("interface")}

    def test_manager_vm_and_job_objects_match_the_contract(self):
        contract = self.contract()
        self.assertEqual(set(contract), {"org.nodemanager.NodeManager1.Manager",
                                         "org.nodemanager.NodeManager1.Vm",
                                         "org.nodemanager.NodeManager1.Job"})
        manager = self.live(harness.MANAGER_PATH)
        self.assertEqual(manager.get("org.nodemanager.NodeManager1.Manager"),
                         contract["org.nodemanager.NodeManager1.Manager"])
        self.assertIn("org.freedesktop.DBus.ObjectManager", manager)

        self.import_image(size=4096)
        r = self.create("web-1", "contoso", wait=False).json
        job = self.live(r["job"])
        self.assertEqual(job.get("org.nodemanager.NodeManager1.Job"),
                         contract["org.nodemanager.NodeManager1.Job"])
        vm = self.live(r["vm"])
        self.assertEqual(vm.get("org.nodemanager.NodeManager1.Vm"),
                         contract["org.nodemanager.NodeManager1.Vm"])


if __name__ == "__main__":
    unittest.main(verbosity=2)


class Systemd(unittest.TestCase):
    """sd_notify as systemd would see it: READY=1 only once the bus name is owned."""

    def setUp(self):
        self.node = harness.Node()
        self.proc = None
        self.addCleanup(self._close)
        self.node.start_bus()

    def _close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.node.close()

    def test_ready_comes_after_the_bus_name_and_sigterm_exits_cleanly(self):
        import socket
        path = os.path.join(self.node.tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(20)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        log = open(os.path.join(self.node.tmp, "notify-daemon.log"), "w")
        self.proc = subprocess.Popen(
            [self.node.daemon_bin, "--bus", self.node.address, "--libvirt-uri", "test:///default",
             "--state-dir", self.node.state_dir, "--config", "/dev/null"],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        # At READY the name is owned: the very first call succeeds, without retrying.
        listed = self.node.nodectl("vm", "list")
        self.assertEqual(listed.rc, 0, listed)
        statuses = [line for m in messages for line in m.splitlines() if line.startswith("STATUS=")]
        self.assertIn("STATUS=reconciling", statuses)
        self.assertTrue(any(s.startswith("STATUS=serving") for s in statuses), statuses)
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(timeout=15), 0)
        after = []
        sock.settimeout(2)
        try:
            while True:
                after.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
        self.assertTrue(any("STOPPING=1" in m for m in after), after)
        sock.close()
        log.close()

    def test_without_libvirt_ready_says_the_reconcile_waits_and_status_follows_it(self):
        import socket
        path = os.path.join(self.node.tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        self.addCleanup(sock.close)
        sock.settimeout(20)
        host = os.path.join(self.node.tmp, "libvirt-host.xml")  # the test driver's host: not yet
        log = open(os.path.join(self.node.tmp, "notify-daemon.log"), "w")
        self.addCleanup(log.close)
        self.proc = subprocess.Popen(
            [self.node.daemon_bin, "--bus", self.node.address, "--libvirt-uri", "test://" + host,
             "--state-dir", self.node.state_dir, "--config", "/dev/null"],
            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, NOTIFY_SOCKET=path))
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        self.assertIn("STATUS=serving 0 VMs; start-up reconcile waits for libvirt", messages[-1])
        with open(host, "w") as f:
            f.write("<node/>\n")
        while not any(line == "STATUS=serving 0 VMs" for line in messages[-1].splitlines()):
            messages.append(sock.recv(4096).decode())
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(timeout=15), 0)
