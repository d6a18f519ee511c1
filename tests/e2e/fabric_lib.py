"""The fabric simulator's machinery: simulated hosts running nodemanagerd, signal watchers and a
small controller that places VMs and reschedules them (a test program, not part of the product).

SimNode is one host: a harness.Node (tests/integration/daemon/harness.py: its own network and
mount namespace, a private dbus-daemon, the daemon entered into both namespaces by pid) plus

- an underlay interface `uplink0` in the node's namespace: one end of a veth whose peer
  (`Node.peer`) sits in the fabric's "switch" namespace, so setting the PEER down is carrier loss
  on the node ("the cable was pulled"), setting `uplink0` itself down is a link down;
- a state directory on a small tmpfs (the image cache is in it), so "the image disk fills up" is
  a file written into it, with the daemon's disk thresholds sized to that tmpfs. A test-driver
  node's tmpfs lives in its private mount namespace (it goes with the holder); the real-QEMU
  node's is mounted in the host's mount namespace before the holder starts, since libvirtd must
  see the overlays in it (unmounted by close());
- its libvirt connection: test:///default (each daemon has its own in-process fake host), or
  qemu:///system with its own storage pool name.

Fabric is the controller. It subscribes to every node with `nodectl node watch --json` (a reader
thread per node stamps each line with time.monotonic()), keeps a view of each node (state,
maintenance, last heartbeat), and reacts:

- a node that reports state "failed", or misses MISSED_HEARTBEATS heartbeat intervals, is down:
  each of its VMs is created (same request id, `place-<vm>`) and started on a node whose state is
  "ok" and that is not in maintenance; its old copies are deleted once the node is back;
- a VM whose check goes "failed" (crash budget spent) is moved alone, and its old copy deleted.

A VM never goes back to a node it has been on: request ids are remembered by each daemon for
good, so `place-<vm>` there would replay the old reply (an id that no longer exists).

Everything started is stopped by pid; close() is safe after any failure.
"""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "integration", "daemon"))
import harness  # noqa: E402  (tests/integration/daemon, by path)

QEMU_URI = "qemu:///system"
TEST_URI = "test:///default"
UPLINK = "uplink0"
MISSED_HEARTBEATS = 3
IMAGE_REF = "fabric-disk:1"
POOL_PREFIX = "nm-fab-"


def log(msg):
    print(f"fabric: {msg}", flush=True)


class FabricError(Exception):
    pass


def run(argv, check=True, timeout=60):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise FabricError(f"'{' '.join(argv)}' exited {p.returncode}: {p.stderr.strip()}")
    return p


def virsh(*args, check=True):
    return run(["virsh", "-q", "-c", QEMU_URI, *args], check=check)


def libvirtd_answers():
    try:
        return run(["virsh", "-q", "-c", QEMU_URI, "version"], check=False,
                   timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def libvirtd_pid():
    try:
        with open("/run/libvirtd.pid") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and os.path.exists(f"/proc/{pid}") else None


def qemu_pid(domain_name):
    """The QEMU pid libvirt wrote for `domain_name`, or None."""
    try:
        with open(f"/run/libvirt/qemu/{domain_name}.pid") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def percentile(values, p):
    """Nearest-rank percentile of `values` (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def wait_for(what, predicate, timeout, step=0.05):
    """Re-evaluates predicate() until it is truthy; FabricError after `timeout` seconds. Only for
    outcomes no signal announces (a pid file rewritten, a process gone)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FabricError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(step)


# ---------------------------------------------------------------------------------------------
# Simulated hosts


class SimNode:
    """One simulated host (see the module doc). `name` is the fabric's name for it."""

    def __init__(self, name, index, switch_ns, qemu=False, heartbeat_ms=250, health_ms=200,
                 tmpfs_mib=64, disk_degraded_mib=24, disk_failed_mib=12, extra_args=()):
        self.name = name
        self.qemu = qemu
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.tmpfs_mib = tmpfs_mib
        self.disk_failed_mib = disk_failed_mib
        self.switch_ns = switch_ns
        self.peer = f"{name}-port"[:15]
        self.daemon = None
        self.node = None
        self.host_mount = None
        self.pool = POOL_PREFIX + os.urandom(4).hex() if qemu else None
        self.filler = None
        self.created = set()  # VM ids created here (close() removes their domains on q)
        self.daemon_log_paths = []
        try:
            if qemu:
                # libvirtd (host mount namespace) must see the overlays: mount before the holder
                # copies the host's mounts.
                self.host_base = tempfile.mkdtemp(prefix=f"nm-fabric-{name}-")
                self.state_dir = os.path.join(self.host_base, "state")
                os.makedirs(self.state_dir)
                run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mib}m,mode=0755",
                     "nm-fabric", self.state_dir])
                self.host_mount = self.state_dir
            self.node = harness.Node()
            if not qemu:
                self.host_base = None
                self.state_dir = os.path.join(self.node.tmp, "state")
                self.node.mount_tmpfs(self.state_dir, tmpfs_mib * 1024 * 1024)
            self._make_uplink(index)
            self.node.start_bus()
        except BaseException:
            self.close()
            raise
        self.args = [
            "--config", "/dev/null", "--bus", self.node.address,
            "--libvirt-uri", QEMU_URI if qemu else TEST_URI,
            "--state-dir", self.state_dir, "--runtime-dir", self.node.run_dir,
            "--log-level", "debug",
            "--underlay-interface", UPLINK,
            "--heartbeat-interval-ms", str(heartbeat_ms),
            "--health-interval-ms", str(health_ms),
            "--health-disk-degraded-mib", str(disk_degraded_mib),
            "--health-disk-failed-mib", str(disk_failed_mib),
            "--disk-reserve-mib", "4", "--image-reserve-mib", "4",
            "--disk-allocation-ratio", "200",
            "--host-vcpus", "16", "--host-memory-mib", "16384",
        ] + (["--domain-type", "qemu", "--storage-pool", self.pool] if qemu else []) + \
            list(extra_args)

    def _make_uplink(self, index):
        ns = self.node.netns
        run(["ip", "link", "add", UPLINK, "netns", ns, "type", "veth", "peer", "name", self.peer,
             "netns", self.switch_ns])
        run(["ip", "-n", ns, "addr", "add", f"10.250.0.{index}/24", "dev", UPLINK])
        run(["ip", "-n", ns, "link", "set", UPLINK, "up"])
        run(["ip", "-n", self.switch_ns, "link", "set", self.peer, "up"])

    # ---- faults and repairs ----

    def set_peer(self, up):
        """The switch port: down = carrier loss on the node's uplink."""
        run(["ip", "-n", self.switch_ns, "link", "set", self.peer, "up" if up else "down"])

    def set_uplink(self, up):
        """The node's own uplink interface, administratively."""
        run(["ip", "-n", self.node.netns, "link", "set", UPLINK, "up" if up else "down"])

    def free_mib(self):
        out = self.node.run("df", "-B1M", "--output=avail", self.state_dir, check=True).stdout
        return int(out.split()[-1])

    def fill_disk(self, leave_mib):
        """Writes a file into the state dir's tmpfs leaving about `leave_mib` MiB free."""
        self.filler = os.path.join(self.state_dir, "fabric-filler")
        size = max(0, self.free_mib() - leave_mib)
        self.node.run("fallocate", "-l", f"{size}MiB", self.filler, check=True)

    def free_disk(self):
        if self.filler:
            self.node.run("rm", "-f", self.filler, check=True)
            self.filler = None

    # ---- the daemon ----

    def start_daemon(self, ready_timeout=60.0):
        assert self.daemon is None or self.daemon.poll() is not None, "daemon already running"
        notify = os.path.join(self.node.tmp, "notify")
        if os.path.exists(notify):
            os.unlink(notify)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        sock.settimeout(0.2)
        path = os.path.join(self.node.tmp, f"nodemanagerd.{len(self.daemon_log_paths) + 1}.log")
        self.daemon_log_paths.append(path)
        env = dict(os.environ, NOTIFY_SOCKET=notify)
        try:
            with open(path, "w") as out:
                self.daemon = subprocess.Popen([self.node.daemon_bin] + self.args, env=env,
                                               stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT)
            deadline = time.monotonic() + ready_timeout
            while True:
                if self.daemon.poll() is not None:
                    raise FabricError(f"nodemanagerd of '{self.name}' exited "
                                      f"{self.daemon.returncode} at start-up:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise FabricError(f"nodemanagerd of '{self.name}' sent no READY=1 within "
                                      f"{ready_timeout:.0f}s:\n{self.log_tail()}")
                try:
                    msg = sock.recv(4096).decode(errors="replace")
                except socket.timeout:
                    continue
                if "READY=1" in msg.split("\n"):
                    return
        finally:
            sock.close()

    def kill_daemon(self):
        """SIGKILL by pid; returns time.monotonic() just before the signal."""
        t = time.monotonic()
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=10)
        return t

    def stop_daemon(self):
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(timeout=10)

    def log_tail(self, chars=6000):
        out = []
        for p in self.daemon_log_paths[-2:]:
            try:
                with open(p, errors="replace") as f:
                    out.append(f"---- {os.path.basename(p)} ----\n" + f.read()[-chars:])
            except OSError:
                pass
        return "\n".join(out)

    # ---- nodectl ----

    def ctl(self, *args, timeout=60):
        """nodectl --json ARGS on this node; returns harness.NodectlResult (.rc, .json...)."""
        return self.node.nodectl(*args, timeout=timeout)

    def ctl_ok(self, *args, timeout=60):
        r = self.ctl(*args, timeout=timeout)
        if r.rc != 0:
            raise FabricError(f"on '{self.name}': {r!r}")
        return r.json

    def domain_name(self, vm_id):
        """The libvirt domain name of `vm_id` (QEMU node)."""
        return virsh("domname", vm_id).stdout.strip()

    # ---- teardown ----

    def _remove_domains(self):
        """Real QEMU: whatever a failed scenario left behind goes, through the daemon when it
        answers, else straight through libvirt (only the domains this node created)."""
        if self.daemon is not None and self.daemon.poll() is None:
            listed = self.ctl("vm", "list", timeout=30)
            for vm in listed.json if isinstance(listed.json, list) else []:
                self.ctl("vm", "delete", vm.get("id", ""), "--wait", timeout=60)
        if self.created and libvirtd_answers():
            defined = set(virsh("list", "--all", "--uuid").stdout.split())
            for vm_id in self.created & defined:
                virsh("destroy", vm_id, check=False)
                virsh("undefine", vm_id, check=False)

    def close(self, keep=False):
        """Stops everything by pid; with keep, leaves the node's temp dir (logs) in place."""
        if self.qemu:
            try:
                self._remove_domains()
            except Exception as e:  # keep cleaning up
                log(f"removing the domains of '{self.name}': {e}")
        try:
            self.stop_daemon()
        except Exception as e:  # keep cleaning up
            log(f"stopping the daemon of '{self.name}': {e}")
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        if self.node is not None:
            if keep:
                log(f"kept the logs of '{self.name}' in '{self.node.tmp}'")
            self.node.close(keep=keep)
            self.node = None
        if self.pool is not None and libvirtd_answers():
            if virsh("pool-info", self.pool, check=False).returncode == 0:
                virsh("pool-destroy", self.pool, check=False)
                virsh("pool-undefine", self.pool, check=False)
        if self.host_mount is not None:
            run(["umount", "-l", self.host_mount], check=False)
            self.host_mount = None
        if self.host_base is not None:
            shutil.rmtree(self.host_base, ignore_errors=True)
            self.host_base = None


# ---------------------------------------------------------------------------------------------
# Signal watchers


class Watcher:
    """`nodectl node watch --json` on one node; every line goes to sink(node, t, obj) from the
    reader thread, t = time.monotonic() when the line was read. on_eof(node) when it ends."""

    def __init__(self, sim, sink, on_eof):
        self.sim = sim
        self.stopping = False
        self.watching = threading.Event()
        self.err_path = os.path.join(sim.node.tmp, "watch.stderr")
        self.err = open(self.err_path, "a")
        self.proc = subprocess.Popen(
            [sim.node.nodectl_bin, "--bus", sim.node.address, "--json", "node", "watch"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err, text=True,
            bufsize=1)
        self.thread = threading.Thread(target=self._read, args=(sink, on_eof), daemon=True,
                                       name=f"watch-{sim.name}")
        self.thread.start()

    def _read(self, sink, on_eof):
        for line in self.proc.stdout:
            t = time.monotonic()
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("signal") == "Watching":
                self.watching.set()
            sink(self.sim.name, t, obj)
        if not self.stopping:
            on_eof(self.sim.name)

    def wait_watching(self, timeout=10.0):
        if not self.watching.wait(timeout):
            raise FabricError(f"nodectl node watch on '{self.sim.name}' never said Watching")

    def stop(self):
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(timeout=5)
        self.proc.stdout.close()
        self.err.close()


# ---------------------------------------------------------------------------------------------
# The controller


class NodeView:
    """What the fabric believes about a node, from its signals only."""

    def __init__(self, name, heartbeat_s):
        self.name = name
        self.heartbeat_s = heartbeat_s
        self.state = "unknown"
        self.maintenance = False
        self.last_heartbeat = None  # monotonic time of the last Heartbeat line
        self.summary = {}
        self.down = False
        self.down_reason = ""
        self.down_at = None  # monotonic time the fabric decided the node is down

    def healthy(self):
        return not self.down and self.state == "ok" and not self.maintenance


class Placement:
    """One VM as the fabric knows it: where it runs now, and where copies of it were left."""

    def __init__(self, vm, spec):
        self.vm = vm
        self.spec = spec
        self.request_id = f"place-{vm}"
        self.node = None
        self.vm_id = None
        self.state = "pending"
        self.history = []  # nodes it was created on, in order
        self.stale = {}  # node -> vm id of a copy left behind
        self.moves = []  # {"from","to","reason","decided","running"} (monotonic times)
        self.moving = False


class Fabric:
    """The controller (see the module doc). Start it with start(), stop it with close()."""

    def __init__(self, nodes):
        self.nodes = {n.name: n for n in nodes}
        self.views = {n.name: NodeView(n.name, n.heartbeat_s) for n in nodes}
        self.placements = {}
        self.events = []  # (t, node, obj), every line every watcher read
        self.watchers = {}
        self.cond = threading.Condition()
        self.actions = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="move")
        self.closing = False
        self.errors = []  # what went wrong in the controller (tests assert it stays empty)
        self.threads = [threading.Thread(target=self._control, daemon=True, name="control"),
                        threading.Thread(target=self._monitor, daemon=True, name="monitor")]

    # ---- life ----

    def start(self):
        for name in self.nodes:
            self._watch(name)
        for t in self.threads:
            t.start()
        for name in self.nodes:
            self.wait_heartbeat(name, timeout=10)

    def close(self):
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.actions.put(None)
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=30)
        self.pool.shutdown(wait=True)
        for w in list(self.watchers.values()):
            w.stop()
        self.watchers.clear()

    def _watch(self, name):
        old = self.watchers.pop(name, None)
        if old is not None:
            old.stop()
        w = Watcher(self.nodes[name], self._on_line, self._on_eof)
        self.watchers[name] = w
        w.wait_watching()

    # ---- signals in (watcher threads) ----

    def _on_line(self, node, t, obj):
        sig = obj.get("signal")
        with self.cond:
            self.events.append((t, node, obj))
            v = self.views[node]
            if sig == "Heartbeat":
                v.last_heartbeat = t
                v.state = obj.get("state", v.state)
                v.maintenance = bool(obj.get("maintenance", v.maintenance))
                v.summary = obj.get("summary", {})
            elif sig == "HealthChanged":
                v.state = obj.get("state", v.state)
                v.maintenance = bool(obj.get("maintenance", v.maintenance))
                for c in obj.get("changed", []):
                    if c.get("name", "").startswith("vm:") and c.get("state") == "failed":
                        self.actions.put(("vm-failed", node, c.get("vm_id") or c["name"][3:], t))
            elif sig == "VmStateChanged" and obj.get("state") == "failed":
                self.actions.put(("vm-failed", node, obj.get("vm_id"), t))
            if sig in ("Heartbeat", "HealthChanged"):
                if not v.down and v.state == "failed":
                    self._mark_down(v, t, "reported failed")
                elif v.down and v.state != "failed" and sig == "Heartbeat":
                    v.down = False
                    v.down_reason = ""
                    self.actions.put(("recovered", node, None, t))
                if v.healthy() and any(p.state == "pending" and p.moves and not p.moving
                                       for p in self.placements.values()):
                    self.actions.put(("retry", node, None, t))
            self.cond.notify_all()

    def _on_eof(self, node):
        with self.cond:
            self.events.append((time.monotonic(), node, {"signal": "_eof"}))
            self.cond.notify_all()

    def _mark_down(self, v, t, reason):
        v.down = True
        v.down_reason = reason
        v.down_at = t
        self.events.append((t, v.name, {"signal": "_down", "reason": reason}))
        self.actions.put(("evacuate", v.name, None, t))

    def _monitor(self):
        """Marks down a node whose heartbeats stopped for MISSED_HEARTBEATS intervals (waits on
        the exact deadline, so the verdict is not late by a polling step)."""
        with self.cond:
            while not self.closing:
                now = time.monotonic()
                next_deadline = None
                for v in self.views.values():
                    if v.down or v.last_heartbeat is None:
                        continue
                    deadline = v.last_heartbeat + MISSED_HEARTBEATS * v.heartbeat_s
                    if now >= deadline:
                        self._mark_down(v, now, f"missed {MISSED_HEARTBEATS} heartbeats")
                        self.cond.notify_all()
                    elif next_deadline is None or deadline < next_deadline:
                        next_deadline = deadline
                self.cond.wait(None if next_deadline is None else next_deadline - now)

    # ---- decisions (control thread) ----

    def _control(self):
        while True:
            item = self.actions.get()
            if item is None:
                return
            kind, node, arg, t = item
            try:
                if kind == "evacuate":
                    self._evacuate(node, t)
                elif kind == "vm-failed":
                    self._vm_failed(node, arg, t)
                elif kind == "recovered":
                    self._recovered(node)
                elif kind == "retry":
                    self._retry_pending(t)
            except Exception as e:  # recorded; tests check fabric.errors
                with self.cond:
                    self.errors.append(f"{kind} {node}: {e!r}")
                    self.cond.notify_all()

    def _evacuate(self, node, t):
        with self.cond:
            victims = [p for p in self.placements.values()
                       if p.node == node and not p.moving]
            for p in victims:
                p.moving = True
            reason = self.views[node].down_reason
        futures = [self.pool.submit(self._move, p, f"node '{node}' {reason}", t, False)
                   for p in victims]
        for f in futures:
            f.result()

    def _vm_failed(self, node, vm_id, t):
        with self.cond:
            p = next((p for p in self.placements.values()
                      if p.node == node and p.vm_id == vm_id), None)
            if p is None or p.moving:
                return
            p.moving = True
        self._move(p, f"vm '{p.vm}' failed on '{node}'", t, True)

    def _move(self, p, reason, t, delete_old):
        src, old_id = p.node, p.vm_id
        with self.cond:
            p.stale[src] = old_id
            p.state = "pending"
            rec = {"from": src, "to": None, "reason": reason, "decided": t, "running": None}
            p.moves.append(rec)
        try:
            target = self._place(p, rec)
        finally:
            with self.cond:
                p.moving = False
                self.cond.notify_all()
        if target and delete_old and old_id and self._delete_copy(src, old_id):
            with self.cond:
                p.stale.pop(src, None)

    def _recovered(self, node):
        with self.cond:
            stale = [(p, p.stale[node]) for p in self.placements.values() if node in p.stale]
        for p, vm_id in stale:
            if self._delete_copy(node, vm_id):
                with self.cond:
                    p.stale.pop(node, None)
                    self.cond.notify_all()

    def _retry_pending(self, t):
        with self.cond:
            waiting = [p for p in self.placements.values()
                       if p.state == "pending" and not p.moving and p.moves]
            for p in waiting:
                p.moving = True
        for p in waiting:
            try:
                self._place(p, p.moves[-1])
            finally:
                with self.cond:
                    p.moving = False
                    self.cond.notify_all()

    def _delete_copy(self, node, vm_id):
        sim = self.nodes[node]
        r = sim.ctl("vm", "delete", vm_id, "--wait")
        return r.rc in (0, 3)  # deleted, or not there (any more)

    def _candidates(self, p):
        with self.cond:
            load = {n: 0 for n in self.nodes}
            for q in self.placements.values():
                if q.node in load and q.state == "running":
                    load[q.node] += 1
            ok = [v.name for v in self.views.values()
                  if v.healthy() and v.name not in p.history]
            return sorted(ok, key=lambda n: (load[n], n))

    def _place(self, p, rec=None, only=None):
        """Creates and starts p on the first candidate that accepts it; leaves p "pending" when
        none does (retried when a node becomes healthy). Returns the node or None."""
        candidates = [only] if only else self._candidates(p)
        for node in candidates:
            sim = self.nodes[node]
            path = os.path.join(sim.node.tmp, f"{p.vm}.json")
            with open(path, "w") as f:
                json.dump(p.spec, f)
            with self.cond:
                p.history.append(node)
            r = sim.ctl("vm", "create", "-f", path, "--wait", "--request-id", p.request_id)
            vm_id = (r.json or {}).get("vm_id")
            if vm_id:
                sim.created.add(vm_id)
            if r.rc != 0 or not vm_id:
                self._note(f"placing '{p.vm}' on '{node}' failed: {r!r}")
                if vm_id:  # a failed create job may leave its record: delete it with the rest
                    with self.cond:
                        p.stale[node] = vm_id
                continue
            s = sim.ctl("vm", "start", vm_id, "--wait", "--request-id", f"start-{p.vm}")
            if s.rc != 0:
                self._note(f"starting '{p.vm}' on '{node}' failed: {s!r}")
                with self.cond:
                    p.stale[node] = vm_id
                continue
            t = time.monotonic()
            with self.cond:
                p.node, p.vm_id, p.state = node, vm_id, "running"
                if rec is not None:
                    rec["to"], rec["running"] = node, t
                self.cond.notify_all()
            return node
        with self.cond:
            p.state = "pending"
            self.cond.notify_all()
        return None

    def _note(self, msg):
        with self.cond:
            self.events.append((time.monotonic(), "", {"signal": "_note", "message": msg}))

    # ---- the test's side ----

    def place(self, vm, node=None, vcpus=1, memory_mib=128):
        """Places VM `vm` (on `node` if given, else where the scheduler picks); returns its
        Placement once running. FabricError when nowhere accepted it."""
        spec = {"name": vm, "tenant": "fabric", "vcpus": vcpus, "memory_mib": memory_mib,
                "image": IMAGE_REF, "disk_gib": 1, "autostart": True}
        p = Placement(vm, spec)
        with self.cond:
            if vm in self.placements:
                raise FabricError(f"VM '{vm}' is placed already")
            self.placements[vm] = p
            p.moving = True
        try:
            where = self._place(p, None, only=node)
        finally:
            with self.cond:
                p.moving = False
        if where is None:
            raise FabricError(f"no node accepted VM '{vm}': {self.notes()[-3:]}")
        return p

    def forget(self, vms):
        """Deletes every copy of `vms` wherever a node answers, and drops them."""
        for vm in vms:
            with self.cond:
                p = self.placements.get(vm)
                if p is None:
                    continue
                p.moving = True
                copies = dict(p.stale)
                if p.node:
                    copies[p.node] = p.vm_id
            for node, vm_id in copies.items():
                if vm_id:
                    self._delete_copy(node, vm_id)
            with self.cond:
                self.placements.pop(vm, None)

    def notes(self):
        with self.cond:
            return [o["message"] for _, _, o in self.events if o.get("signal") == "_note"]

    def wait(self, what, predicate, timeout):
        """Waits (on the fabric's condition: every signal line and decision wakes it) until
        predicate() is truthy, called with the lock held; returns its value."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FabricError(f"timed out after {timeout:.1f}s waiting for {what}; "
                                      f"views: {self.describe()}")
                self.cond.wait(left)

    def describe(self):
        return {n: (v.state, "down" if v.down else "up", "drained" if v.maintenance else "")
                for n, v in self.views.items()}

    def first_event(self, node, since, match):
        """(t, obj) of the first line from `node` read at or after `since` for which
        match(obj) holds, or None. Call with the lock held (inside wait())."""
        for t, n, obj in self.events:
            if n == node and t >= since and match(obj):
                return t, obj
        return None

    def wait_event(self, node, since, match, timeout, what):
        return self.wait(what, lambda: self.first_event(node, since, match), timeout)

    def wait_heartbeat(self, node, timeout=10.0, since=None):
        since = time.monotonic() if since is None else since
        return self.wait_event(node, since, lambda o: o.get("signal") == "Heartbeat", timeout,
                               f"a Heartbeat from '{node}'")

    def wait_state(self, node, state, timeout, since=None):
        """Waits for a Heartbeat from `node` (read after `since`) with state `state`."""
        since = time.monotonic() if since is None else since
        return self.wait_event(
            node, since, lambda o: o.get("signal") == "Heartbeat" and o.get("state") == state,
            timeout, f"'{node}' to report {state} in a Heartbeat")

    def wait_moved(self, vms, away_from, timeout):
        """Waits until every VM in `vms` runs on a node other than `away_from`; returns the
        latest move's "running" time."""
        def done():
            latest = 0.0
            for vm in vms:
                p = self.placements[vm]
                if p.state != "running" or p.node == away_from or not p.moves:
                    return None
                latest = max(latest, p.moves[-1]["running"])
            return latest
        return self.wait(f"{vms} to run away from '{away_from}'", done, timeout)

    def wait_gone(self, vms, node, timeout):
        """Waits until the fabric deleted its copies of `vms` left on `node`."""
        return self.wait(f"the copies of {vms} on '{node}' to be deleted",
                         lambda: all(node not in self.placements[vm].stale for vm in vms),
                         timeout)

    def rewatch(self, node):
        """Restarts the watcher of `node` when its nodectl ended (the daemon was restarted)."""
        w = self.watchers.get(node)
        if w is None or w.proc.poll() is not None:
            self._watch(node)


# ---------------------------------------------------------------------------------------------
# libvirtd (real QEMU tier)


class Services:
    """libvirtd & co. through tests/lib/start-services.sh, stopped at the end only when this
    run started them (tests/lib/stop-services.sh reads the pids it recorded)."""

    def __init__(self, state_file):
        self.state_file = state_file
        self.started_by_us = False
        self.lib = os.path.join(REPO, "tests", "lib")

    def ensure(self):
        if libvirtd_answers():
            return
        self.started_by_us = True
        self._start(self.state_file)

    def _start(self, state_file):
        env = dict(os.environ, NM_SERVICES_STATE=state_file)
        p = subprocess.run(["bash", os.path.join(self.lib, "start-services.sh")], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=120)
        if p.returncode != 0:
            raise FabricError(f"start-services.sh failed: {p.stderr.strip()}")

    def kill_libvirtd(self):
        """SIGKILLs libvirtd by the pid in its pid file; returns the monotonic time just before."""
        pid = libvirtd_pid()
        if pid is None:
            raise FabricError("libvirtd has no live pid in /run/libvirtd.pid")
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "libvirtd":
                raise FabricError(f"pid {pid} from /run/libvirtd.pid is not libvirtd")
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(f"libvirtd (pid {pid}) to die", lambda: not harness.Node._alive(pid), 10)
        return t

    def restart_libvirtd(self):
        """Starts libvirtd again the way start-services.sh does (it is that script); returns
        the monotonic time libvirtd first answered `virsh version` (polled every 50 ms by a
        thread, since the script itself only checks every 200 ms)."""
        answered = []
        done = threading.Event()

        def poll():
            while not done.is_set():
                if libvirtd_answers():
                    answered.append(time.monotonic())
                    return
                time.sleep(0.05)
        # A killed libvirtd stays a zombie until PID 1 reaps it, and start-services.sh (kill -0)
        # would take the zombie for a libvirtd that runs but does not answer.
        try:
            with open("/run/libvirtd.pid") as f:
                stale = int(f.read().strip() or 0)
            if stale > 0 and not harness.Node._alive(stale):
                os.unlink("/run/libvirtd.pid")
        except (OSError, ValueError):
            pass
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        # A libvirtd this run did not start must outlive it: record its successor elsewhere.
        state = self.state_file if self.started_by_us else self.state_file + ".restarted"
        try:
            self._start(state)
            th.join(timeout=5)
        finally:
            done.set()
            th.join()
        if not answered:
            raise FabricError("libvirtd does not answer after start-services.sh")
        return answered[0]

    def make_sure_running(self):
        if not libvirtd_answers():
            log("libvirtd does not answer: starting it again")
            self.restart_libvirtd()

    def stop(self):
        if self.started_by_us and os.path.exists(self.state_file):
            env = dict(os.environ, NM_SERVICES_STATE=self.state_file)
            subprocess.run(["bash", os.path.join(self.lib, "stop-services.sh")], env=env,
                           stdin=subprocess.DEVNULL, timeout=120)
