#!/usr/bin/env python3
"""e2e: one tenant VM through its whole life on real libvirtd + QEMU (TCG).

What it proves, each step an assertion that can fail:
  1. nodemanagerd comes up on a private bus against qemu:///system and says READY=1.
  2. `nodectl image import` stores the tiny guest's kernel, initrd and disk, checked by SHA-256.
  3. `nodectl vm create` + `vm start --wait` define and boot a domain that is ours
     (type 'qemu', our metadata element, a qcow2 overlay on the imported disk).
  4. The guest's serial console shows its boot marker and that it sees a disk of the base image's
     size whose first bytes are the base image's ("NMDISK"): the overlay chain works.
  5. `vm stop --force --wait` and `vm delete --wait` leave nothing in libvirt: no domain, no
     overlay volume in any pool, no overlay file.
  6. SIGTERM stops the daemon with exit status 0.

Needs root. Starts libvirtd & co. through tests/lib/start-services.sh when they are not running
(and stops what it started), builds the guest through tests/guest/build-guest.sh (cached).
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

BOOT_DEADLINE_S = 90.0


def all_volume_paths():
    """Paths of every volume in every active pool."""
    paths = []
    for pool in virsh("pool-list", "--name").stdout.split():
        virsh("pool-refresh", pool, check=False)
        out = virsh("vol-list", "--pool", pool, check=False).stdout
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2:
                paths.append(parts[1].strip())
    return paths


class Harness(BaseHarness):
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="nm-e2e.")
        self.state_dir = os.path.join(self.tmp, "state")
        self.bus_path = os.path.join(self.tmp, "bus")
        self.bus_addr = f"unix:path={self.bus_path}"
        self.services_state = os.path.join(self.tmp, "services.pids")
        self.bus_proc = None
        self.daemon = None
        self.daemon_log = os.path.join(self.tmp, "nodemanagerd.log")
        self.vm_id = None
        self.pool = POOL_PREFIX + uuid.uuid4().hex[:8]

    # ---- environment ----


    def start_daemon(self):
        notify_path = os.path.join(self.tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify_path)
        sock.settimeout(0.25)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        argv = [self.args.nodemanagerd, "--config", "/dev/null", "--bus", self.bus_addr,
                "--libvirt-uri", URI, "--domain-type", "qemu", "--state-dir", self.state_dir,
                "--storage-pool", self.pool, "--runtime-dir", os.path.join(self.tmp, "run")]
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


    # ---- the scenario ----

    def scenario(self):
        guest = self.build_guest()
        for kind, (path, sha) in guest.items():
            log(f"guest {kind}: {path} sha256 {sha}")
        self.ensure_services()
        self.remove_stale_pools()
        self.start_bus()
        self.start_daemon()

        refs = {"kernel": "e2e-kernel:1", "initrd": "e2e-initrd:1", "disk": "e2e-disk:1"}
        for kind, ref in refs.items():
            path, sha = guest[kind]
            reply = self.nodectl("image", "import", ref, path, "--sha256", sha, "--kind", kind,
                                 "--wait")
            self.expect_done(reply, f"image import {ref}")
        images = self.nodectl("image", "list")
        listed = ({i.get("image", i.get("ref")): i for i in images}
                  if isinstance(images, list) else {})
        for kind, ref in refs.items():
            if ref not in listed or guest[kind][1] not in str(listed[ref].get("digest", "")):
                raise Failure(f"image list lacks {ref} with digest {guest[kind][1]}: {images}")
        log("imported kernel, initrd and disk")

        name = "e2e-" + uuid.uuid4().hex[:8]
        spec = {"name": name, "tenant": "e2e", "vcpus": 1, "memory_mib": 256,
                "image": refs["disk"], "kernel_image": refs["kernel"],
                "initrd_image": refs["initrd"], "cmdline": "console=ttyS0", "autostart": False}
        spec_path = os.path.join(self.tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        reply = self.nodectl("vm", "create", "-f", spec_path, "--wait")
        self.expect_done(reply, "vm create")
        self.vm_id = reply.get("vm_id") or self.nodectl("vm", "show", name)["id"]
        log(f"created VM '{name}' id {self.vm_id}")

        t0 = time.monotonic()
        self.expect_done(self.nodectl("vm", "start", self.vm_id, "--wait"), "vm start")
        shown = self.nodectl("vm", "show", self.vm_id)
        if shown.get("state") != "running":
            raise Failure(f"vm show after start: state is not 'running': {shown}")

        xml = virsh("dumpxml", self.vm_id).stdout
        if not re.search(r"<domain type=['\"]qemu['\"]", xml):
            raise Failure("domain is not <domain type='qemu'>:\n" + xml)
        if "https://nodemanager.org/xmlns/vm/1" not in xml or self.vm_id not in xml:
            raise Failure("domain lacks our metadata element:\n" + xml)
        m = re.search(r"<disk[^>]*device=['\"]disk['\"].*?<source file=['\"]([^'\"]+)['\"]", xml,
                      re.S)
        if not m:
            raise Failure("domain has no file disk:\n" + xml)
        overlay = m.group(1)
        if not os.path.isfile(overlay) or overlay not in all_volume_paths():
            raise Failure(f"overlay '{overlay}' is not a file in a libvirt pool")
        info = run(["qemu-img", "info", "--output=json", "-U", overlay]).stdout
        if json.loads(info).get("format") != "qcow2":
            raise Failure(f"overlay '{overlay}' is not qcow2: {info}")
        log(f"domain is ours, type qemu, disk is the qcow2 overlay '{overlay}'")

        serial = self.serial_log_path(shown)
        lines = self.wait_for_console(serial, t0)
        disk_size_sectors = os.path.getsize(guest["disk"][0]) // 512
        disk_lines = [l for l in lines if l.startswith("NODEMANAGER-GUEST-DISK ")]
        expected = f"NODEMANAGER-GUEST-DISK vda {disk_size_sectors} NMDISK"
        if expected not in disk_lines:
            raise Failure(f"guest disk line {disk_lines} is not '{expected}'")
        if any(l.startswith("NODEMANAGER-GUEST-MODULE-FAILED") for l in lines):
            raise Failure(f"guest failed to load modules: {lines}")
        log(f"guest booted in {time.monotonic() - t0:.1f}s and saw '{expected}'")

        self.expect_done(self.nodectl("vm", "stop", self.vm_id, "--force", "--wait"), "vm stop")
        state = virsh("domstate", self.vm_id).stdout.strip()
        if state != "shut off":
            raise Failure(f"after vm stop, libvirt says the domain is '{state}'")
        shown = self.nodectl("vm", "show", self.vm_id)
        if shown.get("state") not in ("stopped", "shutoff", "shut off"):
            raise Failure(f"vm show after stop: {shown}")
        log("stopped")

        self.expect_done(self.nodectl("vm", "delete", self.vm_id, "--wait"), "vm delete")
        uuids = virsh("list", "--all", "--uuid").stdout.split()
        if self.vm_id in uuids:
            raise Failure(f"domain {self.vm_id} still defined after delete")
        if overlay in all_volume_paths():
            raise Failure(f"overlay volume '{overlay}' still in a pool after delete")
        if os.path.exists(overlay):
            raise Failure(f"overlay file '{overlay}' still exists after delete")
        p = self.nodectl("vm", "show", self.vm_id, check=False)
        if p.returncode != 3:
            raise Failure(f"vm show after delete: exit {p.returncode}, want 3 (not found)")
        self.vm_id = None
        log("deleted: no domain, no overlay volume, no overlay file")

        self.daemon.send_signal(signal.SIGTERM)
        try:
            rc = self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired as e:
            raise Failure("nodemanagerd did not exit within 30s of SIGTERM") from e
        if rc != 0:
            raise Failure(f"nodemanagerd exited {rc} on SIGTERM, want 0")
        log("nodemanagerd exited 0 on SIGTERM")

    def serial_log_path(self, shown):
        for key in ("serial_log", "serial_log_path", "console_log"):
            if isinstance(shown.get(key), str):
                return shown[key]
        return os.path.join(self.state_dir, "instances", f"{self.vm_id}.serial.log")

    def wait_for_console(self, path, t0):
        """Polls the serial log every 0.5 s (reading a guest console: no event to wait on)."""
        deadline = t0 + BOOT_DEADLINE_S
        text = ""
        while time.monotonic() < deadline:
            try:
                with open(path, "rb") as f:
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                pass
            if "NODEMANAGER-GUEST-READY" in text:
                lines = [l.strip() for l in text.splitlines()]
                if "NODEMANAGER-GUEST-BOOTED" not in text:
                    raise Failure("guest READY without BOOTED marker")
                return [l for l in lines if l.startswith("NODEMANAGER-GUEST-")]
            time.sleep(0.5)
        raise Failure(f"no NODEMANAGER-GUEST-READY in '{path}' within {BOOT_DEADLINE_S:.0f}s; "
                      f"console tail:\n{text[-2000:]}")

    # ---- cleanup: whatever happened, leave the host as found ----

    def cleanup(self):
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        if self.vm_id is not None:
            virsh("destroy", self.vm_id, check=False)
            virsh("undefine", self.vm_id, check=False)
        if pool_target(self.pool) is not None:
            virsh("pool-destroy", self.pool, check=False)
            virsh("pool-undefine", self.pool, check=False)
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
    try:
        h.scenario()
        log("PASS")
        return 0
    except Failure as e:
        log(f"FAIL: {e}")
        h.dump_daemon_log()
        return 1
    finally:
        h.cleanup()


if __name__ == "__main__":
    sys.exit(main())
