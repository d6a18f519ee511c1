"""Shared pieces of the e2e tests (real libvirtd + QEMU): running commands, virsh, the services
and the tiny guest, a private bus, nodectl. Each test script subclasses BaseHarness, which expects
these attributes from the subclass's __init__: args (with .nodectl), bus_path, bus_addr, bus_proc,
services_state and daemon_log."""

import json
import os
import re
import subprocess
import time

URI = "qemu:///system"
POOL_PREFIX = "nm-e2e-"  # each run defines its own overlay pool: nm-e2e-<random>


class Failure(Exception):
    pass


def log(msg):
    print(f"e2e: {msg}", flush=True)


def run(argv, check=True, timeout=120, capture=True):
    """Runs argv; returns CompletedProcess. Raises Failure with the output when check fails."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=capture, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise Failure(f"'{' '.join(argv)}' timed out after {timeout}s") from e
    if check and p.returncode != 0:
        raise Failure(f"'{' '.join(argv)}' exited {p.returncode}\n"
                      f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def virsh(*args, check=True):
    return run(["virsh", "-q", "-c", URI, *args], check=check, timeout=60)


def pool_target(pool):
    p = virsh("pool-dumpxml", pool, check=False)
    if p.returncode != 0:
        return None
    m = re.search(r"<target>\s*<path>([^<]+)</path>", p.stdout)
    return m.group(1) if m else None


class BaseHarness:
    """Services, guest, bus and nodectl; the scenario and the daemon are the subclass's."""

    def ensure_services(self):
        if virsh("version", check=False).returncode == 0:
            log("libvirtd answers on qemu:///system")
            return
        log("libvirtd not running: starting services")
        env = dict(os.environ, NM_SERVICES_STATE=self.services_state)
        p = subprocess.run(["bash", self.args.start_services], env=env,
                           stdin=subprocess.DEVNULL, timeout=120)
        if p.returncode != 0:
            raise Failure("tests/lib/start-services.sh failed")

    def build_guest(self):
        cmd = ["bash", self.args.build_guest]
        if self.args.guest_cache:
            cmd.append(self.args.guest_cache)
        out = run(cmd, timeout=300).stdout
        guest = {}
        for line in out.splitlines():
            kind, path, sha = line.split()
            guest[kind] = (path, sha)
        for kind in ("kernel", "initrd", "disk"):
            if kind not in guest or not os.path.isfile(guest[kind][0]):
                raise Failure(f"build-guest.sh gave no {kind}: {out!r}")
        return guest

    def remove_stale_pools(self):
        """Pools of earlier runs that crashed before cleaning up point into deleted temp dirs."""
        for pool in virsh("pool-list", "--all", "--name").stdout.split():
            target = pool_target(pool) if pool.startswith(POOL_PREFIX) else None
            if target is not None and not os.path.isdir(target):
                log(f"removing stale pool '{pool}' (target '{target}' is gone)")
                virsh("pool-destroy", pool, check=False)
                virsh("pool-undefine", pool, check=False)

    def start_bus(self):
        self.bus_proc = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--address", self.bus_addr],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.bus_path):
            if self.bus_proc.poll() is not None or time.monotonic() > deadline:
                raise Failure("private dbus-daemon did not come up")
            time.sleep(0.05)

    def nodectl(self, *args, check=True, timeout=180):
        p = run([self.args.nodectl, "--bus", self.bus_addr, "--json", *args], check=check,
                timeout=timeout)
        if not check:
            return p
        try:
            return json.loads(p.stdout) if p.stdout.strip() else None
        except json.JSONDecodeError as e:
            raise Failure(f"nodectl {' '.join(args)}: not JSON: {p.stdout!r}") from e

    def expect_done(self, reply, what):
        if not isinstance(reply, dict) or reply.get("result") != "done":
            raise Failure(f"{what}: job did not end 'done': {reply}")

    def dump_daemon_log(self):
        try:
            with open(self.daemon_log, errors="replace") as f:
                tail = f.read()[-6000:]
        except FileNotFoundError:
            return
        print("---- nodemanagerd log (tail) ----\n" + tail + "\n---- end ----", flush=True)
