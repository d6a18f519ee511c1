#!/usr/bin/env python3
"""e2e: tenant network isolation proven with real guests on libvirtd + QEMU (TCG).

Two tenant networks with the same numeric subnet, so only their bridges separate them:
  A (tenant e2e-a, VNI 16770001, 10.77.0.0/24): a1 .10, a2 .11, a3 .12
  B (tenant e2e-b, VNI 16770002, 10.77.0.0/24): b1 .20
All four guests boot together and take their address by DHCP (busybox udhcpc, tests/guest/init).

What it proves, each step an assertion that can fail:
  1. `nodectl network create --wait` makes both networks; `network list --tenant` and
     `network show` report them; a VM of tenant B asking for network A is refused.
  2. Each guest gets its fixed address from its network's DHCP server (10.77.0.2) with MTU 1450
     and no router; `vm show` reports the port (network, MAC, IP, tap) and the domain uses them.
  3. a1 and a2 ping each other; a3 pings a1 (its port works), then claims a2's address
     (gratuitous ARP) and pings a1 from it: nothing comes back. b1 reaches neither a1 nor a2.
  4. On the host: both bridges exist without any IPv4 or IPv6 address and without a route to
     the subnet, each tap is a port of its network's bridge, and `nft list table bridge
     nodemanager` names every VM's MAC.
  5. Deleting the VMs removes their taps and their MACs from the table; deleting the networks
     removes the bridges, VXLAN and DHCP veth devices, the DHCP namespaces and their dnsmasq.
  6. SIGTERM stops the daemon with exit status 0.

Needs root. Starts libvirtd & co. through tests/lib/start-services.sh when they are not running
(and stops what it started), builds the guest through tests/guest/build-guest.sh (cached).
Cleans up everything it created even on failure: domains, its pool, the devices, namespaces and
dnsmasq processes of its two VNIs, and the `bridge nodemanager` table if it did not exist before.
Exit 0 on success, 1 on failure, 77 (ctest SKIP) when not run as root.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from e2e_lib import (POOL_PREFIX, URI, BaseHarness, Failure, log, pool_target, run,
                     virsh)

BOOT_DEADLINE_S = 90.0  # boot + DHCP of four TCG guests sharing two cores
PINGWAIT_S = 60  # nm.pingwait: the guests' ping + spoof deadline
NFT_TABLE = ("bridge", "nodemanager")
SUBNET = "10.77.0.0/24"
DHCP_SERVER = "10.77.0.2"
MTU = 1450

# name -> (tenant, VNI): VNIs near the top of the range, unlikely to be used by anyone else.
NETWORKS = {"e2e-net-a": ("e2e-a", 16770001), "e2e-net-b": ("e2e-b", 16770002)}
A1, A2, A3, B1 = "10.77.0.10", "10.77.0.11", "10.77.0.12", "10.77.0.20"


# ---- host observations ----

def link(ifname):
    """`ip -j -d addr show dev IFNAME` as a dict, or None when there is no such device."""
    p = run(["ip", "-j", "-d", "addr", "show", "dev", ifname], check=False)
    if p.returncode != 0:
        return None
    links = json.loads(p.stdout or "[]")
    return links[0] if links else None


def netns_names():
    out = run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_pids(name):
    p = run(["ip", "netns", "pids", name], check=False)
    return {int(x) for x in p.stdout.split()} if p.returncode == 0 else set()


def is_dnsmasq(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "dnsmasq"
    except OSError:
        return False


def dnsmasq_pids(marker):
    """Pids of dnsmasq processes whose command line mentions `marker` (our runtime directory)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"dnsmasq" and marker.encode() in b" ".join(argv):
            pids.add(int(entry))
    return pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def nft_table():
    p = run(["nft", "list", "table", *NFT_TABLE], check=False)
    return p.stdout if p.returncode == 0 else None


def device_names(vni):
    return [f"nmbr{vni}", f"nmvx{vni}", f"nmdh{vni}"]


def tap_of(vm_id, index=0):
    """network/names.h: "nmt" + 11 hex digits of the VM id + the port's index digit."""
    return "nmt" + vm_id.replace("-", "")[:11] + str(index)


class Harness(BaseHarness):
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="nm-e2e-net.")
        self.state_dir = os.path.join(self.tmp, "state")
        # dnsmasq drops privileges: the path to its files must be searchable by its user.
        os.chmod(self.tmp, 0o711)
        self.runtime_dir = os.path.join(self.tmp, "run")
        self.bus_path = os.path.join(self.tmp, "bus")
        self.bus_addr = f"unix:path={self.bus_path}"
        self.services_state = os.path.join(self.tmp, "services.pids")
        self.bus_proc = None
        self.daemon = None
        self.daemon_log = os.path.join(self.tmp, "nodemanagerd.log")
        self.pool = POOL_PREFIX + uuid.uuid4().hex[:8]
        self.vm_ids = {}  # name -> id, for cleanup
        self.table_existed = None
        self.dnsmasq_seen = set()

    # ---- environment ----


    def remove_network_objects(self, why):
        """Removes the devices, DHCP namespaces and dnsmasq of our VNIs; they are ours by VNI."""
        for _, vni in NETWORKS.values():
            ns = f"nm-dhcp-{vni}"
            pids = netns_pids(ns) if ns in netns_names() else set()
            for pid in pids:
                log(f"{why}: killing pid {pid} in netns '{ns}'")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if ns in netns_names():
                log(f"{why}: deleting netns '{ns}'")
                run(["ip", "netns", "delete", ns], check=False)
            for dev in device_names(vni):
                if link(dev) is not None:
                    log(f"{why}: deleting device '{dev}'")
                    run(["ip", "link", "delete", dev], check=False)


    def start_daemon(self):
        notify_path = os.path.join(self.tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify_path)
        sock.settimeout(0.25)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        argv = [self.args.nodemanagerd, "--config", "/dev/null", "--bus", self.bus_addr,
                "--libvirt-uri", URI, "--domain-type", "qemu", "--state-dir", self.state_dir,
                "--storage-pool", self.pool, "--runtime-dir", self.runtime_dir,
                "--network-mtu", str(MTU)]
        log("starting " + " ".join(argv))
        with open(self.daemon_log, "wb") as out:
            self.daemon = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        try:
            while True:
                if self.daemon.poll() is not None:
                    raise Failure(f"nodemanagerd exited {self.daemon.returncode} at start-up")
                if time.monotonic() > deadline:
                    raise Failure("nodemanagerd sent no READY=1 within 60s")
                try:
                    msg = sock.recv(4096).decode(errors="replace")
                except socket.timeout:
                    continue
                if "READY=1" in msg.split("\n"):
                    log("nodemanagerd is ready (READY=1)")
                    return
        finally:
            sock.close()


    def network_list(self, *args):
        """`nodectl --json network list`: a list of objects (bare or under "networks")."""
        listed = self.nodectl("network", "list", *args)
        if isinstance(listed, dict):
            listed = listed.get("networks")
        if listed is None:
            return []
        if not isinstance(listed, list) or not all(isinstance(n, dict) for n in listed):
            raise Failure(f"network list {' '.join(args)}: not a list of objects: {listed}")
        return listed

    def write_json(self, name, doc):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    # ---- the scenario ----

    def scenario(self):
        guest = self.build_guest()
        for kind, (path, sha) in guest.items():
            log(f"guest {kind}: {path} sha256 {sha}")
        self.ensure_services()
        self.remove_stale_pools()
        self.remove_network_objects("leftover of an earlier run")
        self.table_existed = nft_table() is not None
        self.start_bus()
        self.start_daemon()

        refs = {"kernel": "e2e-kernel:1", "initrd": "e2e-initrd:1", "disk": "e2e-disk:1"}
        for kind, ref in refs.items():
            path, sha = guest[kind]
            reply = self.nodectl("image", "import", ref, path, "--sha256", sha, "--kind", kind,
                                 "--wait")
            self.expect_done(reply, f"image import {ref}")
        log("imported kernel, initrd and disk")

        self.create_networks()
        vms = self.create_vms(refs)
        t0 = time.monotonic()
        for name, vm in vms.items():
            self.expect_done(self.nodectl("vm", "start", vm["id"], "--wait"), f"vm start {name}")
        log(f"started {len(vms)} VMs in {time.monotonic() - t0:.1f}s")
        for name, vm in vms.items():
            self.check_port(name, vm)
        self.check_host(vms)

        consoles = self.wait_for_consoles(vms, t0)
        log(f"all guests reported READY {time.monotonic() - t0:.1f}s after the first start")
        self.check_consoles(vms, consoles)

        self.delete_vms(vms)
        self.delete_networks()

        self.daemon.send_signal(signal.SIGTERM)
        try:
            rc = self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired as e:
            raise Failure("nodemanagerd did not exit within 30s of SIGTERM") from e
        if rc != 0:
            raise Failure(f"nodemanagerd exited {rc} on SIGTERM, want 0")
        log("nodemanagerd exited 0 on SIGTERM")

    def create_networks(self):
        for name, (tenant, vni) in NETWORKS.items():
            spec = {"version": 1, "name": name, "tenant": tenant, "vni": vni, "subnet": SUBNET,
                    "peers": []}
            path = self.write_json(f"{name}.json", spec)
            self.expect_done(self.nodectl("network", "create", "-f", path, "--wait"),
                             f"network create {name}")
            shown = self.nodectl("network", "show", name)
            for key, want in (("name", name), ("tenant", tenant), ("vni", vni),
                              ("subnet", SUBNET)):
                if shown.get(key) != want:
                    raise Failure(f"network show {name}: {key} is {shown.get(key)!r}, "
                                  f"want {want!r}: {shown}")
            listed = self.network_list("--tenant", tenant)
            names = [n.get("name") for n in listed]
            if names != [name]:
                raise Failure(f"network list --tenant {tenant}: {listed}, want only '{name}'")
            bridge = link(f"nmbr{vni}")
            if bridge is None or bridge.get("linkinfo", {}).get("info_kind") != "bridge":
                raise Failure(f"after network create {name}: no bridge 'nmbr{vni}': {bridge}")
            ns = f"nm-dhcp-{vni}"
            if ns not in netns_names():
                raise Failure(f"after network create {name}: no netns '{ns}' "
                              f"in {sorted(netns_names())}")
            pids = {p for p in netns_pids(ns) if alive(p) and is_dnsmasq(p)}
            if not pids:
                raise Failure(f"after network create {name}: no dnsmasq of ours in netns '{ns}'")
            self.dnsmasq_seen |= pids
            log(f"network '{name}' (tenant {tenant}, VNI {vni}): bridge, netns '{ns}', "
                f"dnsmasq pid {sorted(pids)}")

    def create_vms(self, refs):
        net_a, net_b = list(NETWORKS)
        ping_opts = f"nm.net=1 nm.pingwait={PINGWAIT_S}"
        plan = {
            "e2e-a1": ("e2e-a", net_a, A1, f"nm.ping={A2}"),
            "e2e-a2": ("e2e-a", net_a, A2, f"nm.ping={A1}"),
            "e2e-a3": ("e2e-a", net_a, A3, f"nm.ping={A1} nm.spoof={A2} nm.spoofping={A1}"),
            "e2e-b1": ("e2e-b", net_b, B1, f"nm.ping={A1},{A2}"),
        }

        def spec(name, tenant, network, ip, opts):
            return {"name": name, "tenant": tenant, "vcpus": 1, "memory_mib": 192,
                    "image": refs["disk"], "kernel_image": refs["kernel"],
                    "initrd_image": refs["initrd"], "autostart": False,
                    "cmdline": f"console=ttyS0 {ping_opts} {opts}",
                    "networks": [{"network": network, "ip": ip}]}

        # Never another tenant's network: tenant e2e-b asking for network A is refused.
        path = self.write_json("intruder.json", spec("e2e-intruder", "e2e-b", net_a, "10.77.0.30",
                                                     ""))
        p = self.nodectl("vm", "create", "-f", path, "--wait", check=False)
        if p.returncode == 0:
            shown = self.nodectl("vm", "show", "e2e-intruder", check=False)
            self.vm_ids["e2e-intruder"] = (json.loads(shown.stdout).get("id")
                                           if shown.returncode == 0 else None)
            raise Failure(f"tenant e2e-b got a VM on '{net_a}' of tenant e2e-a: {p.stdout}")
        if self.nodectl("vm", "show", "e2e-intruder", check=False).returncode != 3:
            raise Failure("refused vm create of e2e-intruder left a VM behind")
        log(f"VM of tenant e2e-b on '{net_a}' refused (exit {p.returncode}): "
            f"{(p.stderr or p.stdout).strip()}")

        vms = {}
        for name, (tenant, network, ip, opts) in plan.items():
            path = self.write_json(f"{name}.json", spec(name, tenant, network, ip, opts))
            reply = self.nodectl("vm", "create", "-f", path, "--wait")
            self.expect_done(reply, f"vm create {name}")
            vm_id = reply.get("vm_id") or self.nodectl("vm", "show", name)["id"]
            self.vm_ids[name] = vm_id
            vms[name] = {"id": vm_id, "network": network, "ip": ip,
                         "vni": NETWORKS[network][1]}
        log("created " + ", ".join(f"{n} ({v['id']})" for n, v in vms.items()))
        return vms

    def check_port(self, name, vm):
        shown = self.nodectl("vm", "show", vm["id"])
        if shown.get("state") != "running":
            raise Failure(f"vm show {name} after start: state is not 'running': {shown}")
        ports = shown.get("ports")
        if not isinstance(ports, list) or len(ports) != 1:
            raise Failure(f"vm show {name}: want exactly one port: {shown}")
        port = ports[0]
        mac = str(port.get("mac", "")).lower()
        if port.get("network") != vm["network"] or port.get("ip") != vm["ip"]:
            raise Failure(f"vm show {name}: port {port}, want network '{vm['network']}' "
                          f"ip {vm['ip']}")
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) or int(mac[:2], 16) & 3 != 2:
            raise Failure(f"vm show {name}: MAC '{mac}' is not a locally administered unicast")
        if port.get("ifname") != tap_of(vm["id"]):
            raise Failure(f"vm show {name}: ifname {port.get('ifname')!r}, "
                          f"want '{tap_of(vm['id'])}'")
        xml = virsh("dumpxml", vm["id"]).stdout
        m = re.search(r"<interface type=['\"](\w+)['\"].*?</interface>", xml, re.S)
        iface = m.group(0) if m else ""
        if (f"'{mac}'" not in iface.lower() and f'"{mac}"' not in iface.lower()) or \
                port["ifname"] not in iface or "virtio" not in iface:
            raise Failure(f"domain of {name} lacks a virtio interface with MAC {mac} on tap "
                          f"'{port['ifname']}':\n{xml}")
        vm.update(mac=mac, tap=port["ifname"], serial=self.serial_log_path(shown, vm["id"]))
        tap = link(vm["tap"])
        want_master = f"nmbr{vm['vni']}"
        if tap is None or tap.get("master") != want_master:
            raise Failure(f"tap '{vm['tap']}' of {name} is not a port of '{want_master}': {tap}")

    def check_host(self, vms):
        for name, (_, vni) in NETWORKS.items():
            bridge = link(f"nmbr{vni}")
            if bridge is None:
                raise Failure(f"bridge 'nmbr{vni}' of '{name}' is gone while VMs use it")
            addrs = [f"{a.get('local')}/{a.get('prefixlen')}" for a in bridge.get("addr_info", [])
                     if a.get("family") in ("inet", "inet6")]
            if addrs:
                raise Failure(f"host has addresses on bridge 'nmbr{vni}': {addrs}")
        subnet_prefix = SUBNET.rsplit(".", 1)[0] + "."
        routes = run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines()
        leaks = [r for r in routes if subnet_prefix in r]
        if leaks:
            raise Failure(f"host has routes into the tenant subnet: {leaks}")
        table = nft_table()
        if table is None:
            raise Failure(f"no nft table '{' '.join(NFT_TABLE)}' while VMs have ports")
        missing = [f"{n} {v['mac']}" for n, v in vms.items() if v["mac"] not in table.lower()]
        if missing:
            raise Failure(f"nft table {' '.join(NFT_TABLE)} lacks the MACs of {missing}:\n"
                          f"{table}")
        log("host: bridges without addresses, no route into the subnet, taps on their bridges, "
            "every MAC in the nft table")

    def serial_log_path(self, shown, vm_id):
        for key in ("serial_log", "serial_log_path", "console_log"):
            if isinstance(shown.get(key), str):
                return shown[key]
        return os.path.join(self.state_dir, "instances", f"{vm_id}.serial.log")

    def wait_for_consoles(self, vms, t0):
        """Polls the serial logs every 0.5 s (reading a guest console: no event to wait on).
        READY comes after the guest's network steps, so it marks all their lines present."""
        deadline = t0 + BOOT_DEADLINE_S + PINGWAIT_S + 15
        texts = {name: "" for name in vms}
        while True:
            for name, vm in vms.items():
                try:
                    with open(vm["serial"], "rb") as f:
                        texts[name] = f.read().decode(errors="replace")
                except FileNotFoundError:
                    pass
            waiting = [n for n, t in texts.items() if "NODEMANAGER-GUEST-READY" not in t]
            if not waiting:
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{texts[n][-1500:]}" for n in waiting)
                raise Failure(f"no NODEMANAGER-GUEST-READY from {waiting} within "
                              f"{deadline - t0:.0f}s; console tails:\n{tails}")
            time.sleep(0.5)
        return {n: [l.strip() for l in t.splitlines() if l.strip().startswith("NODEMANAGER-GUEST-")]
                for n, t in texts.items()}

    def check_consoles(self, vms, consoles):
        for name, lines in consoles.items():
            log(f"{name} console: " + " | ".join(l[len("NODEMANAGER-GUEST-"):] for l in lines))
        want = {
            "e2e-a1": [f"PING {A2} ok"],
            "e2e-a2": [f"PING {A1} ok"],
            "e2e-a3": [f"PING {A1} ok", f"SPOOF {A1} blocked"],
            "e2e-b1": [f"PING {A1} fail", f"PING {A2} fail"],
        }
        for name, vm in vms.items():
            lines = consoles[name]
            prefix = SUBNET.split("/")[1]
            expected = [f"LEASE {vm['ip']}/{prefix} mtu {MTU} router none server {DHCP_SERVER}",
                        f"NET eth0 {vm['ip']}/{prefix} mtu {MTU}"] + want[name]
            for e in expected:
                if "NODEMANAGER-GUEST-" + e not in lines:
                    raise Failure(f"{name}: console lacks 'NODEMANAGER-GUEST-{e}': {lines}")
            if any(l.startswith("NODEMANAGER-GUEST-MODULE-FAILED") for l in lines):
                raise Failure(f"{name}: guest failed to load modules: {lines}")
        log(f"a1 <-> a2 ping ok; a3 spoofing {A2} toward a1 blocked; b1 reaches neither; "
            f"every guest got its fixed lease from {DHCP_SERVER} with mtu {MTU}, no router")

    def delete_vms(self, vms):
        for name, vm in vms.items():
            self.expect_done(self.nodectl("vm", "stop", vm["id"], "--force", "--wait"),
                             f"vm stop {name}")
            self.expect_done(self.nodectl("vm", "delete", vm["id"], "--wait"), f"vm delete {name}")
            if self.nodectl("vm", "show", vm["id"], check=False).returncode != 3:
                raise Failure(f"vm show {name} after delete: not 'not found'")
            del self.vm_ids[name]
        uuids = virsh("list", "--all", "--uuid").stdout.split()
        left = [n for n, v in vms.items() if v["id"] in uuids]
        if left:
            raise Failure(f"domains of {left} still defined after delete")
        taps = [v["tap"] for v in vms.values() if link(v["tap"]) is not None]
        if taps:
            raise Failure(f"taps {taps} still exist after the VMs were deleted")
        table = nft_table()
        macs = [f"{n} {v['mac']}" for n, v in vms.items()
                if table is not None and v["mac"] in table.lower()]
        if macs:
            raise Failure(f"nft table still names the MACs of deleted VMs {macs}:\n{table}")
        for name in NETWORKS:
            ports = self.nodectl("network", "show", name).get("ports")
            if ports:
                raise Failure(f"network show {name} after the VMs were deleted: ports {ports}")
        log("VMs deleted: no domains, no taps, no MACs in the nft table, no ports")

    def delete_networks(self):
        for name in NETWORKS:
            self.expect_done(self.nodectl("network", "delete", name, "--wait"),
                             f"network delete {name}")
            p = self.nodectl("network", "show", name, check=False)
            if p.returncode != 3:
                raise Failure(f"network show {name} after delete: exit {p.returncode}, want 3")
        listed = self.network_list()
        if listed:
            raise Failure(f"network list after deleting both networks: {listed}")
        left = [d for _, vni in NETWORKS.values() for d in device_names(vni)
                if link(d) is not None]
        if left:
            raise Failure(f"devices {left} still exist after the networks were deleted")
        ns_left = {f"nm-dhcp-{vni}" for _, vni in NETWORKS.values()} & netns_names()
        if ns_left:
            raise Failure(f"DHCP namespaces {sorted(ns_left)} still exist after network delete")
        # dnsmasq is the daemon's child: once it exited, the daemon reaps it.
        deadline = time.monotonic() + 5
        while True:
            running = {p for p in self.dnsmasq_seen | dnsmasq_pids(self.runtime_dir) if alive(p)}
            if not running:
                break
            if time.monotonic() > deadline:
                raise Failure(f"dnsmasq pids {sorted(running)} still run after network delete")
            time.sleep(0.1)
        log("networks deleted: no bridges, VXLAN or DHCP devices, namespaces or dnsmasq left")

    # ---- cleanup: whatever happened, leave the host as found ----

    def cleanup(self):
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        for name, vm_id in self.vm_ids.items():
            target = vm_id or name
            virsh("destroy", target, check=False)
            virsh("undefine", target, check=False)
            if vm_id is not None and link(tap_of(vm_id)) is not None:
                run(["ip", "link", "delete", tap_of(vm_id)], check=False)
        if pool_target(self.pool) is not None:
            virsh("pool-destroy", self.pool, check=False)
            virsh("pool-undefine", self.pool, check=False)
        for pid in self.dnsmasq_seen | dnsmasq_pids(self.runtime_dir):
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.remove_network_objects("cleanup")
        if self.table_existed is False and nft_table() is not None:
            run(["nft", "delete", "table", *NFT_TABLE], check=False)
        if self.bus_proc is not None and self.bus_proc.poll() is None:
            self.bus_proc.terminate()
            self.bus_proc.wait(timeout=10)
        if os.path.exists(self.services_state):
            env = dict(os.environ, NM_SERVICES_STATE=self.services_state)
            subprocess.run(["bash", self.args.stop_services], env=env, stdin=subprocess.DEVNULL)
        if self.args.keep:
            log(f"kept '{self.tmp}'")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodemanagerd", required=True)
    ap.add_argument("--nodectl", required=True)
    ap.add_argument("--guest-cache", default=os.environ.get("NM_GUEST_CACHE"),
                    help="cache directory for tests/guest/build-guest.sh")
    ap.add_argument("--start-services", default=os.path.join(root, "tests/lib/start-services.sh"))
    ap.add_argument("--stop-services", default=os.path.join(root, "tests/lib/stop-services.sh"))
    ap.add_argument("--build-guest", default=os.path.join(root, "tests/guest/build-guest.sh"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, state)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        log("SKIP: needs root (libvirtd on qemu:///system)")
        return 77
    h = Harness(args)
    t0 = time.monotonic()
    try:
        h.scenario()
        log(f"PASS in {time.monotonic() - t0:.0f}s")
        return 0
    except Failure as e:
        log(f"FAIL: {e}")
        h.dump_daemon_log()
        return 1
    finally:
        h.cleanup()


if __name__ == "__main__":
    sys.exit(main())
