"""Integration tests of tenant networks: real nodemanagerd and nodectl processes on a private
dbus-daemon and libvirt's test:///default, each daemon in a network namespace of its own with a
private /run/netns (harness.Node), so the bridges, veths, DHCP namespaces, dnsmasq processes and
the nft table `bridge nodemanager` it makes are real and observable, and never the host's.

test:///default creates no tap devices, so a VM port here is its database record, its nft set
elements and its DHCP lease; the tap itself is covered by the e2e tier (tests/e2e).

Run: NM_BUILD_DIR=<build> python3 -m unittest -v test_networks   (from this directory, as root)
"""

import json
import os
import re
import signal
import time
import unittest

from test_daemon import NodeTestCase

MAC_RE = r"^[0-9a-f][26ae](:[0-9a-f]{2}){5}$"  # locally administered unicast


def net_spec(name="blue", tenant="contoso", vni=4097, subnet="10.10.0.0/24", **extra):
    s = {"name": name, "tenant": tenant, "vni": vni, "subnet": subnet}
    s.update(extra)
    return json.dumps(s)


class NetworkTestCase(NodeTestCase):

    def setUp(self):
        super().setUp()
        self.import_image()

    # ---- helpers ----

    def create_network(self, name="blue", tenant="contoso", vni=4097, subnet="10.10.0.0/24",
                       wait=True, request_id=None, expect=0, **extra):
        args = ["network", "create", "-f", "-"]
        if wait:
            args.append("--wait")
        if request_id:
            args += ["--request-id", request_id]
        r = self.ctl(*args, expect=expect,
                     input=net_spec(name, tenant, vni, subnet, **extra))
        if expect == 0 and wait:
            self.assertEqual(r.json["result"], "done", r)
        return r

    def networks(self, *args):
        r = self.ctl("network", "list", *args)
        self.assertIsInstance(r.json, list, r)
        return {n["name"]: n for n in r.json}

    def show_network(self, name, expect=0):
        return self.ctl("network", "show", name, expect=expect).json

    def create_vm(self, name, tenant="contoso", networks=({"network": "blue"},), **kw):
        return self.create(name, tenant, networks=list(networks), **kw)

    def ports(self, vm):
        return self.show(vm).get("ports", [])

    def bridge_addresses(self, bridge):
        link = self.node.links().get(bridge)
        self.assertIsNotNone(link, "bridge '%s' missing on the node" % bridge)
        return [(a["family"], a["local"]) for a in link.get("addr_info", [])]

    def network_events(self, since=0, kinds=("NetworkStateChanged", "NetworkRepaired")):
        return [e for e in self.events(since) if e["kind"] in kinds]

    def assert_network_built(self, vni=4097, name="blue"):
        links = self.node.links()
        bridge, veth = "nmbr%d" % vni, "nmdh%d" % vni
        self.assertIn(bridge, links)
        self.assertIn(veth, links)
        self.assertEqual(links[veth].get("master"), bridge, links[veth])
        self.assertEqual(self.bridge_addresses(bridge), [], "the host has no address on it")
        self.assertIn("nm-dhcp-%d" % vni, self.node.netns_list())
        self.assertIn(name, self.node.dnsmasq_pids())


class CreateAndAttach(NetworkTestCase):

    def test_network_with_two_vms_is_built_on_the_node(self):
        r = self.create_network()
        self.assertRegex(r.json["job"], r"^/org/nodemanager/NodeManager1/job/[0-9]+$")

        self.assertEqual(self.networks(), {"blue": {
            "name": "blue", "tenant": "contoso", "vni": 4097, "subnet": "10.10.0.0/24",
            "ports": 0, "state": "ready"}})
        self.assertEqual(self.networks("--tenant", "fabrikam"), {})
        shown = self.show_network("blue")
        self.assertEqual(shown["state"], "ready", shown)
        self.assertEqual((shown["bridge"], shown["gateway"], shown["dhcp_server"]),
                         ("nmbr4097", "10.10.0.1", "10.10.0.2"))
        self.assertEqual((shown["peers"], shown["ports"], shown["deleting"]), ([], [], False))

        # On the node: the bridge without any address, the DHCP veth on it, dnsmasq in its own
        # namespace holding the DHCP server address, and no VXLAN device (no underlay).
        self.assert_network_built()
        links = self.node.links()
        self.assertNotIn("nmvx4097", links)
        for ifname, link in links.items():
            for a in link.get("addr_info", []):
                self.assertFalse(a["local"].startswith("10.10."),
                                 "node address %s on %s" % (a["local"], ifname))
        pid = self.node.dnsmasq_pids()["blue"]
        self.assertEqual(os.stat("/proc/%d/ns/net" % pid).st_ino,
                         self.node.netns_inode("nm-dhcp-4097"),
                         "dnsmasq runs in the DHCP namespace")
        self.assertNotEqual(self.node.netns_inode("nm-dhcp-4097"),
                            os.stat("/run/netns/" + self.node.netns).st_ino)
        inside = json.loads(self.node.run("ip", "-n", "nm-dhcp-4097", "-j", "addr", "show",
                                          check=True).stdout)
        self.assertIn(("inet", "10.10.0.2", 24),
                      [(a["family"], a["local"], a["prefixlen"])
                       for link in inside for a in link.get("addr_info", [])])

        web = self.create_vm("web-1").json
        db = self.create_vm("db-1", networks=[{"network": "blue", "ip": "10.10.0.50"}]).json
        self.assertEqual((web["result"], db["result"]), ("done", "done"))

        web_ports, db_ports = self.ports("web-1"), self.ports("db-1")
        self.assertEqual(len(web_ports), 1, web_ports)
        self.assertEqual(len(db_ports), 1, db_ports)
        wp, dp = web_ports[0], db_ports[0]
        self.assertEqual((wp["network"], wp["ip"]), ("blue", "10.10.0.3"), "lowest free")
        self.assertEqual((dp["network"], dp["ip"]), ("blue", "10.10.0.50"), "fixed")
        for p in (wp, dp):
            self.assertRegex(p["mac"], MAC_RE)
            self.assertRegex(p["ifname"], r"^nmt[0-9a-f]{11}0$")
        self.assertNotEqual(wp["mac"], dp["mac"])
        self.assertTrue(wp["ifname"].startswith("nmt" + web["vm_id"].replace("-", "")[:11]), wp)
        self.assertEqual(self.show("web-1")["spec"]["networks"], [{"network": "blue"}])

        shown = self.show_network("blue")
        self.assertEqual(
            sorted((p["hostname"], p["vm_id"], p["ip"], p["mac"], p["ifname"])
                   for p in shown["ports"]),
            sorted([("web-1", web["vm_id"], wp["ip"], wp["mac"], wp["ifname"]),
                    ("db-1", db["vm_id"], dp["ip"], dp["mac"], dp["ifname"])]))
        self.assertEqual(self.networks()["blue"]["ports"], 2)

        table = self.node.nft_table()
        self.assertIsNotNone(table, "nft table 'bridge nodemanager' exists")
        for p in (wp, dp):
            self.assertIn(p["mac"], table)
            self.assertIn(p["ip"], table)
            self.assertIn(p["ifname"], table)

        hosts = self.node.dhcp_hosts("blue")
        self.assertEqual(sorted(hosts.splitlines()),
                         sorted(["%s,10.10.0.3,web-1" % wp["mac"],
                                 "%s,10.10.0.50,db-1" % dp["mac"]]))

        # Human output of the new verbs.
        table = self.ctl("network", "list", json_output=False).stdout.splitlines()
        self.assertEqual(table[0].split(), ["NAME", "TENANT", "VNI", "SUBNET", "PORTS", "STATE"])
        self.assertEqual(table[1].split(), ["blue", "contoso", "4097", "10.10.0.0/24", "2",
                                            "ready"])
        text = self.ctl("network", "show", "blue", json_output=False).stdout
        self.assertRegex(text, r"(?m)^port web-1: +10\.10\.0\.3 %s %s vm %s$" %
                         (wp["mac"], wp["ifname"], web["vm_id"]))

    def test_tenants_may_reuse_address_space_on_separate_bridges(self):
        self.create_network("blue", "contoso", 4097, "10.10.0.0/24")
        self.create_network("red", "fabrikam", 4098, "10.10.0.0/24")
        a = self.create_vm("web-1", "contoso", networks=[{"network": "blue"}]).json
        b = self.create_vm("web-2", "fabrikam", networks=[{"network": "red"}]).json
        self.assertEqual(set(self.networks()), {"blue", "red"})
        self.assertEqual(set(self.networks("--tenant", "fabrikam")), {"red"})
        self.assert_network_built(4097, "blue")
        self.assert_network_built(4098, "red")
        pids = self.node.dnsmasq_pids()
        self.assertNotEqual(pids["blue"], pids["red"])
        self.assertEqual(self.ports(a["vm_id"])[0]["ip"], "10.10.0.3")
        self.assertEqual(self.ports(b["vm_id"])[0]["ip"], "10.10.0.3")
        self.assertIn(self.ports("web-1")[0]["mac"], self.node.dhcp_hosts("blue"))
        self.assertNotIn(self.ports("web-1")[0]["mac"], self.node.dhcp_hosts("red"))


class Usage(NodeTestCase):

    def test_network_help_and_usage_errors(self):
        for args in (["network", "--help"], ["network", "create", "--help"],
                     ["network", "delete", "--help"]):
            r = self.ctl(*args, json_output=False)
            self.assertTrue(r.stdout.startswith("usage: nodectl"), r)
        self.assertIn("--request-id", self.ctl("network", "create", "--help").stdout)
        self.ctl("network", "create", expect=2)  # -f is required
        self.ctl("network", "show", expect=2)
        self.ctl("network", "show", "a", "b", expect=2)
        self.ctl("network", "list", "--bogus", expect=2)
        self.assertEqual(self.ctl("network", "show", "ghost", expect=3).json["error"], "NotFound")


class BadNetworkSpecs(NetworkTestCase):

    def assert_no_network_objects(self, allowed=()):
        self.assertEqual(set(self.networks()), {n[0] for n in allowed})
        owned = [n for n in self.node.links() if re.match(r"^nm(br|vx|dh|t)", n)]
        self.assertEqual(sorted(owned),
                         sorted(x for n in allowed for x in ("nmbr%d" % n[1], "nmdh%d" % n[1])))
        self.assertEqual(sorted(self.node.netns_list()),
                         sorted("nm-dhcp-%d" % n[1] for n in allowed))
        self.assertEqual(sorted(self.node.dnsmasq_pids()), sorted(n[0] for n in allowed))
        named = {e["object_id"] for e in self.network_events()}
        self.assertEqual(named, {n[0] for n in allowed})

    def test_invalid_specs_are_refused_naming_the_field_and_nothing_is_created(self):
        cases = [
            (dict(vni=0), "spec.vni"),
            (dict(vni=16777216), "spec.vni"),
            (dict(subnet="10.10.0.5/24"), "spec.subnet"),
            (dict(subnet="10.0.0.0/8"), "spec.subnet"),
            (dict(subnet="127.0.0.0/24"), "spec.subnet"),
            (dict(vnid=4097), "spec.vnid"),
            (dict(peers=["192.168.50.2"]), "spec.peers"),
            (dict(name="Blue"), "spec.name"),
        ]
        for extra, field in cases:
            args = dict(name="blue", tenant="contoso", vni=4097, subnet="10.10.0.0/24")
            args.update(extra)
            r = self.ctl("network", "create", "-f", "-", "--wait", expect=2,
                         input=json.dumps(args)).json
            self.assertEqual(r["error"], "InvalidArgument", (extra, r))
            self.assertTrue(r["message"].startswith(field + ":"), (extra, r))
        r = self.ctl("network", "create", "-f", "-", expect=2, input="{not json").json
        self.assertIn("malformed JSON", r["message"])
        self.assert_no_network_objects()
        self.assertIsNone(self.node.nft_table(), "no table on a node that never had a network")

    def test_specs_clashing_with_an_existing_network_are_refused(self):
        self.create_network("blue", "contoso", 4097, "10.10.0.0/24")
        r = self.create_network("red", "contoso", 4098, "10.10.0.0/16", expect=2).json
        self.assertEqual(r["error"], "InvalidArgument")
        self.assertTrue(r["message"].startswith("spec.subnet:"), r)
        self.assertIn("'blue'", r["message"])
        r = self.create_network("green", "fabrikam", 4097, "10.20.0.0/24", expect=4).json
        self.assertEqual(r["error"], "AlreadyExists")
        self.assertTrue(r["message"].startswith("spec.vni:"), r)
        self.assertIn("'blue'", r["message"])
        r = self.create_network("blue", "fabrikam", 4099, "10.30.0.0/24", expect=4).json
        self.assertEqual(r["error"], "AlreadyExists")
        self.assertTrue(r["message"].startswith("spec.name:"), r)
        self.assert_no_network_objects(allowed=[("blue", 4097)])
        self.assertEqual(self.show_network("blue")["subnet"], "10.10.0.0/24")


class BadPorts(NetworkTestCase):

    def setUp(self):
        super().setUp()
        self.create_network("blue", "contoso", 4097, "10.10.0.0/24")
        self.create_network("red", "fabrikam", 4098, "10.20.0.0/24")
        self.web = self.create_vm("web-1", networks=[{"network": "blue", "ip": "10.10.0.7"}])
        self.hosts_before = self.node.dhcp_hosts("blue")
        self.table_before = self.node.nft_table()

    def assert_nothing_created(self):
        self.assertEqual(set(self.vms()), {"web-1"})
        self.assertEqual([p["hostname"] for p in self.show_network("blue")["ports"]], ["web-1"])
        self.assertEqual(self.show_network("red")["ports"], [])
        self.assertEqual(self.node.dhcp_hosts("blue"), self.hosts_before)
        self.assertEqual(self.node.dhcp_hosts("red"), "")
        self.assertEqual(self.node.nft_table(), self.table_before)

    def test_a_vm_cannot_join_another_tenants_network(self):
        r = self.create_vm("spy-1", "contoso", networks=[{"network": "red"}], expect=3).json
        self.assertEqual(r["error"], "NotFound")
        self.assertTrue(r["message"].startswith("spec.networks[0].network:"), r)
        self.assertIn("'red'", r["message"])
        # Refused the same way as a network that does not exist at all: nothing is revealed.
        r2 = self.create_vm("spy-2", "contoso", networks=[{"network": "nope"}], expect=3).json
        self.assertTrue(r2["message"].startswith("spec.networks[0].network:"), r2)
        self.assert_nothing_created()

    def test_fixed_ip_already_taken_is_refused(self):
        r = self.create_vm("web-2", networks=[{"network": "blue", "ip": "10.10.0.7"}],
                           expect=4).json
        self.assertEqual(r["error"], "AlreadyExists")
        self.assertTrue(r["message"].startswith("spec.networks[0].ip:"), r)
        self.assertIn("'10.10.0.7'", r["message"])
        self.assert_nothing_created()

    def test_reserved_or_outside_ip_is_refused(self):
        for ip in ("10.10.0.1", "10.10.0.2", "10.10.0.255", "10.10.1.5"):
            r = self.create_vm("web-2", networks=[{"network": "blue", "ip": ip}], expect=2).json
            self.assertEqual(r["error"], "InvalidArgument", ip)
            self.assertTrue(r["message"].startswith("spec.networks[0].ip:"), r)
        self.assert_nothing_created()


class Delete(NetworkTestCase):

    def test_delete_is_refused_while_in_use_then_removes_everything(self):
        self.create_network()
        self.create_vm("web-1")
        self.create_vm("db-1")
        macs = [self.ports(v)[0]["mac"] for v in ("web-1", "db-1")]
        r = self.ctl("network", "delete", "blue", "--wait", expect=4).json
        self.assertEqual(r["error"], "Conflict")
        self.assertIn("'web-1'", r["message"])
        self.assertIn("'db-1'", r["message"])
        self.assertEqual(self.show_network("blue")["state"], "ready")
        self.assert_network_built()

        self.assertEqual(self.ctl("vm", "delete", "web-1", "--wait").json["result"], "done")
        self.assertEqual([p["hostname"] for p in self.show_network("blue")["ports"]], ["db-1"])
        self.assertNotIn(macs[0], self.node.nft_table())
        self.assertNotIn(macs[0], self.node.dhcp_hosts("blue"))
        self.ctl("network", "delete", "blue", expect=4)
        self.assertEqual(self.ctl("vm", "delete", "db-1", "--wait").json["result"], "done")

        dnsmasq = self.node.dnsmasq_pids()["blue"]
        r = self.ctl("network", "delete", "blue", "--wait").json
        self.assertEqual(r["result"], "done", r)
        self.assertEqual(self.networks(), {})
        self.assertEqual(self.show_network("blue", expect=3)["error"], "NotFound")
        links = self.node.links()
        self.assertNotIn("nmbr4097", links)
        self.assertNotIn("nmdh4097", links)
        self.assertNotIn("nm-dhcp-4097", self.node.netns_list())
        self.assertEqual(self.node.dnsmasq_pids(), {})
        self.assertFalse(self.node._alive(dnsmasq))
        self.assertIsNone(self.node.dhcp_hosts("blue"))
        table = self.node.nft_table() or ""
        for mac in macs:
            self.assertNotIn(mac, table)

        states = [e["payload"]["state"] for e in self.network_events()
                  if e["object_id"] == "blue" and e["kind"] == "NetworkStateChanged"]
        self.assertEqual(states, ["creating", "ready", "deleting", "deleted"])
        jobs = [(e["payload"]["kind"], e["payload"]["result"]) for e in self.events()
                if e["kind"] == "JobRemoved" and e["payload"]["kind"].startswith("network-")]
        self.assertEqual(jobs, [("network-create", "done"), ("network-delete", "done")])

        # The name and VNI are free again.
        self.create_network()
        self.assert_network_built()

    def test_delete_of_an_unknown_network_is_not_found(self):
        r = self.ctl("network", "delete", "ghost", expect=3).json
        self.assertEqual(r["error"], "NotFound")
        self.assertIn("'ghost'", r["message"])


class Restart(NetworkTestCase):

    def test_kill_then_state_removed_behind_its_back_is_rebuilt_at_start(self):
        self.create_network()
        self.create_vm("web-1")
        self.ctl("vm", "start", "web-1", "--wait")
        port = self.ports("web-1")
        before_seq = self.events()[-1]["seq"]
        self.node.kill_daemon()

        # A crashed daemon leaves the host as it was, dnsmasq included.
        old_dnsmasq = self.node.dnsmasq_pids()["blue"]
        self.node.run("ip", "link", "del", "nmbr4097", check=True)
        self.node.run("nft", "delete", "table", "bridge", "nodemanager", check=True)
        self.assertNotIn("nmbr4097", self.node.links())
        self.assertIsNone(self.node.nft_table())

        self.node.start_daemon()
        # Rebuilt before the daemon answered its first call.
        self.assert_network_built()
        table = self.node.nft_table()
        self.assertIsNotNone(table)
        self.assertIn(port[0]["mac"], table)
        self.assertIn(port[0]["ip"], table)
        self.assertEqual(self.ports("web-1"), port, "same MAC, IP and tap after the restart")
        self.assertEqual(self.show_network("blue")["state"], "ready")
        # One DHCP server for the network: the crashed daemon's was adopted or replaced.
        servers = self.node.dnsmasq_processes()
        self.assertEqual([n for n, _ in servers], ["blue"], servers)
        self.assertTrue(servers[0][1] == old_dnsmasq or not self.node._alive(old_dnsmasq))
        self.assertEqual(os.stat("/proc/%d/ns/net" % servers[0][1]).st_ino,
                         self.node.netns_inode("nm-dhcp-4097"))
        self.assertIn(port[0]["mac"], self.node.dhcp_hosts("blue"))
        self.wait_until("web-1 running again",
                        lambda: self.vms()["web-1"]["state"] == "running")
        # What happened is in the daemon's log (events: see the next test).
        self.assertIn("network repair: bridge 'nmbr4097' was missing; recreated",
                      self.node.daemon_log())

    def test_start_up_repairs_are_recorded_as_events(self):
        self.create_network()
        self.create_vm("web-1")
        before_seq = self.events()[-1]["seq"]
        self.node.kill_daemon()
        self.node.run("ip", "link", "del", "nmbr4097", check=True)
        self.node.run("nft", "delete", "table", "bridge", "nodemanager", check=True)
        self.node.start_daemon()
        self.assert_network_built()
        repaired = [e["payload"] for e in self.network_events(before_seq, ("NetworkRepaired",))]
        self.assertIn({"network": "blue", "object": "bridge 'nmbr4097'",
                       "what": "was missing; recreated"},
                      repaired, self.events(before_seq))
        self.assertIn("nft table 'bridge nodemanager'", [p["object"] for p in repaired])

    def test_request_id_of_network_create_is_replayed_across_a_crash(self):
        first = self.create_network(wait=False, request_id="net-req-1").json
        self.assertRegex(first["job"], r"/job/[0-9]+$")
        self.node.kill_daemon()
        self.node.start_daemon()
        again = self.create_network(wait=False, request_id="net-req-1").json
        self.assertEqual(again["job"], first["job"], "same answer as the first call")
        waited = self.create_network(wait=True, request_id="net-req-1").json
        self.assertEqual(waited["result"], "done", "looked up in the event log")
        self.assertEqual(list(self.networks()), ["blue"])
        self.wait_until("blue ready", lambda: self.networks()["blue"]["state"] == "ready")
        self.assert_network_built()
        r = self.create_network("red", vni=4098, subnet="10.20.0.0/24",
                                request_id="net-req-1", expect=4).json
        self.assertEqual(r["error"], "Conflict")
        self.assertEqual(list(self.networks()), ["blue"])
        self.node.stop_daemon()
        self.node.start_daemon()
        third = self.create_network(wait=False, request_id="net-req-1").json
        self.assertEqual(third["job"], first["job"])


class Audit(NetworkTestCase):
    """With a short audit interval, damage done behind the daemon's back is repaired quickly."""

    daemon_args = ("--audit-interval-ms", "300")

    def setUp(self):
        super().setUp()
        self.create_network()
        self.create_vm("web-1")
        self.port = self.ports("web-1")[0]
        # Let a few audits pass: the first one after a port change re-applies the table and
        # takes the listing later audits compare with (a table deleted before that is put back
        # without a NetworkRepaired event; reported to the lead).
        time.sleep(1.0)
        self.table = self.node.nft_table()
        self.since = self.events()[-1]["seq"]

    def repaired(self, obj):
        return [e for e in self.network_events(self.since, ("NetworkRepaired",))
                if e["payload"]["object"] == obj]

    def test_flushed_nft_table_is_restored(self):
        self.assertIn(self.port["mac"], self.table)
        self.assertIn("ether saddr", self.table)
        # (No check that it is flushed: a 300 ms audit may restore it before we could look.)
        self.node.run("nft", "flush", "table", "bridge", "nodemanager", check=True)
        self.wait_until("the table as it was", lambda: self.node.nft_table() == self.table,
                        timeout=5)
        self.wait_until("a NetworkRepaired event for the table",
                        lambda: self.repaired("nft table 'bridge nodemanager'"), timeout=8)

    def test_deleted_nft_table_is_recreated(self):
        # (No check that it is gone: a 300 ms audit may restore it before we could look.)
        self.node.run("nft", "delete", "table", "bridge", "nodemanager", check=True)
        self.wait_until("the table as it was", lambda: self.node.nft_table() == self.table,
                        timeout=5)
        self.wait_until("a NetworkRepaired event for the table",
                        lambda: self.repaired("nft table 'bridge nodemanager'"), timeout=8)

    def test_deleted_bridge_is_recreated_with_the_dhcp_veth_on_it(self):
        self.node.run("ip", "link", "del", "nmbr4097", check=True)
        self.wait_until("nmbr4097 back", lambda: "nmbr4097" in self.node.links(), timeout=8)
        self.wait_until("nmdh4097 enslaved again",
                        lambda: self.node.links().get("nmdh4097", {}).get("master") ==
                        "nmbr4097", timeout=8)
        self.assertEqual(self.bridge_addresses("nmbr4097"), [])
        events = self.wait_until("a NetworkRepaired event for the bridge",
                                 lambda: self.repaired("bridge 'nmbr4097'"), timeout=8)
        self.assertEqual(events[0]["payload"]["what"], "was missing; recreated")
        self.assertEqual(self.show_network("blue")["state"], "ready")

    def test_address_put_on_the_bridge_is_removed(self):
        self.node.run("ip", "addr", "add", "10.10.0.1/24", "dev", "nmbr4097", check=True)
        self.wait_until("the address gone", lambda: self.bridge_addresses("nmbr4097") == [],
                        timeout=5)
        self.wait_until("a NetworkRepaired event for the bridge",
                        lambda: self.repaired("bridge 'nmbr4097'"), timeout=8)

    def test_killed_dnsmasq_is_restarted_with_its_leases(self):
        pid = self.node.dnsmasq_pids()["blue"]
        os.kill(pid, signal.SIGKILL)
        new = self.wait_until("a new dnsmasq for blue",
                              lambda: self.node.dnsmasq_pids().get("blue", pid) != pid and
                              self.node.dnsmasq_pids().get("blue"), timeout=8)
        self.assertNotEqual(new, pid)
        self.assertIn(self.port["mac"], self.node.dhcp_hosts("blue"))
        # Still exactly one server, in the DHCP namespace.
        time.sleep(1.0)
        self.assertEqual(self.node.dnsmasq_processes(), [("blue", new)])
        self.assertEqual(os.stat("/proc/%d/ns/net" % new).st_ino,
                         self.node.netns_inode("nm-dhcp-4097"))

    # The dnsmasq supervisor restarts a killed server itself and tells the service, which
    # records a NetworkRepaired event.
    def test_killed_dnsmasq_is_recorded_as_an_event(self):
        pid = self.node.dnsmasq_pids()["blue"]
        os.kill(pid, signal.SIGKILL)
        self.wait_until("a new dnsmasq for blue",
                        lambda: self.node.dnsmasq_pids().get("blue", pid) != pid, timeout=8)
        self.wait_until("a NetworkRepaired event for the DHCP server",
                        lambda: [e for e in self.network_events(self.since, ("NetworkRepaired",))
                                 if "'blue'" in e["payload"]["object"]], timeout=3)

    def test_leftover_link_of_ours_is_removed(self):
        self.node.run("ip", "link", "add", "nmbr999", "type", "bridge", check=True)
        self.node.run("ip", "link", "add", "other0", "type", "bridge", check=True)
        self.wait_until("nmbr999 gone", lambda: "nmbr999" not in self.node.links(), timeout=8)
        self.assertIn("other0", self.node.links(), "others' devices are never touched")
        self.wait_until("a NetworkRepaired event for the leftover",
                        lambda: self.repaired("link 'nmbr999'"), timeout=8)


if __name__ == "__main__":
    unittest.main(verbosity=2)
