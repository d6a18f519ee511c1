"""Process-level test harness: a private dbus-daemon, a real nodemanagerd on libvirt's
test:///default, and nodectl subprocess calls.

Every Node gets its own temporary directory (bus socket, state dir, runtime dir, logs). Processes
are started with subprocess.Popen and stopped by pid; nothing is looked up by name. Set
NM_IT_KEEP=1 to keep the temporary directory of a failed test.

A daemon reconciles the host's network state at start-up (it removes nmbr*/nmvx*/nmdh*/nmt* links
its database does not explain and owns the nft table `bridge nodemanager`), so it never runs in
the host's network namespace here. Each Node is a simulated host:

- a network namespace of its own, `ip netns add`ed under the host's /run/netns (name in
  `Node.netns`), where the daemon's bridges, veths and nft table live; observe it with
  `ip netns exec <netns> ...` or `Node.run(...)`;
- a "host" process (`Node.holder`) that sits in that network namespace and in a private mount
  namespace with a tmpfs on /run/netns, so the DHCP namespaces the daemon binds there
  (nm-dhcp-<vni>) are the Node's own and never show up in, or collide with, the real host's.

Every daemon start enters both namespaces of the holder (`nsenter --target <holder> --mount
--net`, which execs, so the daemon keeps the pid Popen returned and signals reach it). The holder
outlives daemon restarts, so a restarted daemon finds the kernel state (links, nft table, DHCP
namespaces, a dnsmasq left by a killed daemon) exactly as a real host would keep it. Note that
`unshare --net=FILE` would not do: it creates a NEW namespace and mounts it over FILE.

`Node.daemon_bin` is a small wrapper script doing that nsenter (and adding `--runtime-dir` when
the caller gave none), so a test that starts the daemon itself with Popen(daemon_bin, ...) gets
the same isolation; `Node.daemon_real` is the binary.

Cleanup (`Node.close`) stops, by pid: the daemon, every dnsmasq whose --dhcp-hostsdir lies
under the Node's runtime dir (a killed daemon leaves its dnsmasq running, as on a real host),
the bus and the holder; then deletes the network namespace.

Binaries come from NM_BUILD_DIR (set by ctest): <build>/nodemanager/daemon/nodemanagerd and
<build>/nodemanager/cli/nodectl.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

WRAPPER = """#!/bin/sh
# nodemanagerd inside the network and mount namespaces of test node {netns} (see harness.py).
# --root/--wd: entering a mount namespace resets the root to the namespace's; keep the holder's
# (which is a chroot's root when the tests run in one).
for a in "$@"; do
  case "$a" in --runtime-dir|--runtime-dir=*) exec nsenter --target {holder} --mount --net --root --wd -- \
    {daemon} "$@";; esac
done
exec nsenter --target {holder} --mount --net --root --wd -- {daemon} "$@" \
  --runtime-dir {run_dir}
"""

_node_counter = itertools.count(1)

SERVICE = "org.nodemanager.NodeManager1"
MANAGER_PATH = "/org/nodemanager/NodeManager1"


def build_dir():
    d = os.environ.get("NM_BUILD_DIR")
    if not d:
        raise RuntimeError("NM_BUILD_DIR is not set (ctest sets it; or export it by hand)")
    return d


class NodectlResult:
    """What one nodectl call produced. `json` is the parsed stdout (None if it does not parse)."""

    def __init__(self, args, proc):
        self.args = args
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        try:
            self.json = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return "nodectl %s -> rc=%d stdout=%r stderr=%r" % (
            " ".join(self.args), self.rc, self.stdout[-2000:], self.stderr[-2000:])


class Node:
    """A private bus plus one nodemanagerd (restartable) in a temporary directory."""

    def __init__(self):
        self.build = build_dir()
        self.daemon_real = os.path.join(self.build, "nodemanager", "daemon", "nodemanagerd")
        self.nodectl_bin = os.path.join(self.build, "nodemanager", "cli", "nodectl")
        for b in (self.daemon_real, self.nodectl_bin):
            if not os.access(b, os.X_OK):
                raise RuntimeError("missing binary '%s' (build it first)" % b)
        self.tmp = tempfile.mkdtemp(prefix="nm-daemon-it-")
        # dnsmasq drops root: it must be able to traverse down to <tmp>/run/dhcp/<network>.
        os.chmod(self.tmp, 0o711)
        self.socket = os.path.join(self.tmp, "bus")
        self.address = "unix:path=" + self.socket
        self.state_dir = os.path.join(self.tmp, "state")
        self.run_dir = os.path.join(self.tmp, "run")
        self.netns = "nm-it-%d-%d" % (os.getpid(), next(_node_counter))
        self.netns_added = False
        self.holder = None
        self.bus_proc = None
        self.daemon = None
        self.daemon_args = []
        self.starts = 0
        self.logs = []
        self.stdout_text = ""
        try:
            self._start_host()
        except BaseException:
            self.close()
            raise

    # ---- the simulated host: network namespace + private /run/netns ----

    def _start_host(self):
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self.netns_added = True
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        # Holds the namespaces until close(): it waits for EOF on stdin, so it also goes away
        # if this test process dies.
        self.holder = subprocess.Popen(
            ["nsenter", "--net=/run/netns/" + self.netns, "--",
             "unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", "mount -t tmpfs nm-netns /run/netns && echo ready && read _"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError("namespace holder for '%s' did not start: %r %r" %
                               (self.netns, line, self.holder.stderr.read()))
        self.daemon_bin = os.path.join(self.tmp, "nodemanagerd")
        with open(self.daemon_bin, "w") as f:
            f.write(WRAPPER.format(netns=self.netns, holder=self.holder.pid,
                                   daemon=self.daemon_real, run_dir=self.run_dir))
        os.chmod(self.daemon_bin, 0o755)

    def run(self, *argv, check=False, timeout=30, input=None):
        """Runs argv on this node (its network namespace and its /run/netns); returns the
        CompletedProcess (text). With check, a non-zero exit raises."""
        p = subprocess.run(["nsenter", "--target", str(self.holder.pid), "--mount", "--net",
                            "--root", "--wd", "--"] + list(argv), capture_output=True, text=True, timeout=timeout,
                           input=input)
        if check and p.returncode != 0:
            raise RuntimeError("%s on node '%s' exited %d: %s" %
                               (" ".join(argv), self.netns, p.returncode, p.stderr))
        return p

    def mount_tmpfs(self, path, size):
        """Mounts a tmpfs of `size` bytes on `path` (created if missing) in the node's mount
        namespace only: the daemon (started after) sees it, this process sees the empty
        directory under it (look inside with run("find", ...)). It goes with the holder."""
        os.makedirs(path, exist_ok=True)
        self.run("mount", "-t", "tmpfs", "-o", "size=%d,mode=0755" % size, "nm-it-tmpfs", path,
                 check=True)

    def links(self):
        """The node's links as {ifname: `ip -j addr` entry} (with "addr_info", "operstate"...)."""
        out = self.run("ip", "-j", "addr", "show", check=True).stdout
        return {link["ifname"]: link for link in json.loads(out)}

    def netns_list(self):
        """Names under the node's private /run/netns (the daemon's DHCP namespaces)."""
        out = self.run("ip", "-j", "netns", "list", check=True).stdout
        return sorted(n["name"] for n in json.loads(out)) if out.strip() else []

    def netns_inode(self, name):
        """Inode of the namespace bound at the node's /run/netns/<name> (compare with
        os.stat("/proc/<pid>/ns/net").st_ino to see where a process runs); None if absent."""
        p = self.run("stat", "-L", "-c", "%i", "/run/netns/" + name)
        return int(p.stdout) if p.returncode == 0 else None

    def nft_table(self):
        """`nft list table bridge nodemanager` on the node; None when the table does not exist."""
        p = self.run("nft", "list", "table", "bridge", "nodemanager")
        return p.stdout if p.returncode == 0 else None

    def dnsmasq_pids(self):
        """{network name: pid} of the dnsmasq processes serving this node (see
        dnsmasq_processes(); with two for one network, one of them)."""
        return dict(self.dnsmasq_processes())

    def dnsmasq_processes(self):
        """Sorted [(network name, pid)] of the live dnsmasq processes serving this node, found by
        their --dhcp-hostsdir under the node's runtime dir, wherever their parent is."""
        prefix = "--dhcp-hostsdir=" + self.run_dir + "/dhcp/"
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
                with open("/proc/%s/stat" % entry) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                continue
            for a in args:
                if a.startswith(prefix):
                    out.append((a[len(prefix):].split("/", 1)[0], int(entry)))
        return sorted(out)

    def dhcp_hosts(self, network):
        """The leases dnsmasq hands out on `network`: its hosts directory (one file per host,
        "mac,ip,hostname"), concatenated in name order ("" when empty, None if absent)."""
        d = os.path.join(self.run_dir, "dhcp", network, "hosts.d")
        try:
            names = sorted(n for n in os.listdir(d) if not n.startswith("."))
            text = ""
            for n in names:
                with open(os.path.join(d, n)) as f:
                    text += f.read()
            return text
        except OSError:
            return None

    # ---- bus ----

    def start_bus(self):
        conf = os.path.join(self.tmp, "bus.conf")
        with open(conf, "w") as f:
            f.write(BUS_CONFIG.format(socket=self.socket))
        self.bus_proc = subprocess.Popen(
            ["dbus-daemon", "--config-file=" + conf, "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # dbus-daemon prints its address once it listens: no polling needed.
        line = self.bus_proc.stdout.readline()
        if not line.startswith("unix:"):
            raise RuntimeError("dbus-daemon did not start (printed %r)" % line)

    # ---- daemon ----

    def start_daemon(self, extra_args=(), ready_timeout=20.0, libvirt_uri="test:///default"):
        """Starts nodemanagerd and waits until `nodectl vm list` answers (or fails the deadline)."""
        assert self.daemon is None or self.daemon.poll() is not None, "daemon already running"
        self.starts += 1
        log_path = os.path.join(self.tmp, "nodemanagerd.%d.log" % self.starts)
        self.logs.append(log_path)
        self.daemon_args = [
            self.daemon_bin, "--bus", self.address, "--libvirt-uri", libvirt_uri,
            "--state-dir", self.state_dir, "--runtime-dir", self.run_dir,
            "--log-level", "debug"] + list(extra_args)
        self.log_file = open(log_path, "w")
        self.daemon = subprocess.Popen(self.daemon_args, stdout=subprocess.PIPE,
                                       stderr=self.log_file, text=True)
        deadline = time.monotonic() + ready_timeout
        last = None
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError("nodemanagerd exited with %d during start-up:\n%s" %
                                   (self.daemon.returncode, self.daemon_log()))
            last = self.nodectl("vm", "list", timeout=2)
            if last.rc == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("nodemanagerd not ready after %.0fs (last: %r)\n%s" %
                           (ready_timeout, last, self.daemon_log()))

    def stop_daemon(self, timeout=15.0):
        """SIGTERM, then waits for the exit; returns the exit code."""
        self.daemon.send_signal(signal.SIGTERM)
        rc = self.daemon.wait(timeout=timeout)
        self._close_daemon()
        return rc

    def kill_daemon(self):
        """SIGKILL: the crash the daemon must survive."""
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=10)
        self._close_daemon()

    def _close_daemon(self):
        if self.daemon.stdout:
            self.stdout_text = self.daemon.stdout.read()
            self.daemon.stdout.close()
        self.log_file.close()

    def daemon_stdout(self):
        """What the last daemon (after it exited) wrote on stdout: it should write nothing."""
        return self.stdout_text

    def daemon_log(self, max_chars=20000):
        out = []
        for p in self.logs:
            try:
                with open(p) as f:
                    text = f.read()
            except OSError:
                continue
            out.append("---- %s ----\n%s" % (os.path.basename(p), text[-max_chars:]))
        return "\n".join(out)

    # ---- nodectl ----

    def nodectl(self, *args, json_output=True, input=None, timeout=60, env=None):
        argv = [self.nodectl_bin, "--bus", self.address]
        if json_output:
            argv.append("--json")
        argv += list(args)
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env)
        return NodectlResult(list(args), proc)

    def nodectl_as(self, uid, gid, groups, *args, timeout=60):
        """nodectl run as another user (setpriv: uid, gid and exactly `groups`), from a copy of
        the binary in the node's temp dir so that any user can execute it."""
        copy = os.path.join(self.tmp, "nodectl-any")
        if not os.path.exists(copy):
            shutil.copy(self.nodectl_bin, copy)
            os.chmod(copy, 0o755)
        group_args = ["--groups", ",".join(str(g) for g in groups)] if groups else \
            ["--clear-groups"]
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(gid)] + group_args + \
            [copy, "--bus", self.address, "--json"] + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        return NodectlResult(list(args), proc)

    def spawn_nodectl(self, *args):
        """A long-running nodectl (events --follow); the caller stops it by pid."""
        argv = [self.nodectl_bin, "--bus", self.address, "--json"] + list(args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def write(self, name, data):
        path = os.path.join(self.tmp, name)
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(path, mode) as f:
            f.write(data)
        return path

    # ---- teardown ----

    def _stop_dnsmasq(self):
        """SIGTERM, then SIGKILL, to the node's dnsmasq processes, by pid. They are not our
        children (the daemon started them), so their end is seen in /proc."""
        pids = [pid for _, pid in self.dnsmasq_processes()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pids = [p for p in pids if self._alive(p)]
                if not pids:
                    return
                time.sleep(0.05)

    @staticmethod
    def _alive(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def close(self, keep=False):
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(timeout=10)
            self._close_daemon()
        self._stop_dnsmasq()
        if self.bus_proc is not None and self.bus_proc.poll() is None:
            self.bus_proc.send_signal(signal.SIGTERM)
            try:
                self.bus_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.bus_proc.send_signal(signal.SIGKILL)
                self.bus_proc.wait(timeout=5)
        if self.bus_proc is not None and self.bus_proc.stdout:
            self.bus_proc.stdout.close()
        if self.holder is not None:
            if self.holder.poll() is None:
                try:
                    self.holder.stdin.close()
                    self.holder.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    self.holder.send_signal(signal.SIGKILL)
                    self.holder.wait(timeout=5)
            for f in (self.holder.stdin, self.holder.stdout, self.holder.stderr):
                if f and not f.closed:
                    f.close()
            self.holder = None
        if self.netns_added:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            self.netns_added = False
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
