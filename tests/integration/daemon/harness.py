"""Process-level test harness: a private dbus-daemon, a real nodemanagerd on libvirt's
test:///default, and nodectl subprocess calls.

Every Node gets its own temporary directory (bus socket, state dir, logs). Processes are started
with subprocess.Popen and stopped by pid; nothing is looked up by name. Set NM_IT_KEEP=1 to keep
the temporary directory of a failed test.

Binaries come from NM_BUILD_DIR (set by ctest): <build>/nodemanager/daemon/nodemanagerd and
<build>/nodemanager/cli/nodectl.
"""

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
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

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
        self.daemon_bin = os.path.join(self.build, "nodemanager", "daemon", "nodemanagerd")
        self.nodectl_bin = os.path.join(self.build, "nodemanager", "cli", "nodectl")
        for b in (self.daemon_bin, self.nodectl_bin):
            if not os.access(b, os.X_OK):
                raise RuntimeError("missing binary '%s' (build it first)" % b)
        self.tmp = tempfile.mkdtemp(prefix="nm-daemon-it-")
        self.socket = os.path.join(self.tmp, "bus")
        self.address = "unix:path=" + self.socket
        self.state_dir = os.path.join(self.tmp, "state")
        self.bus_proc = None
        self.daemon = None
        self.daemon_args = []
        self.starts = 0
        self.logs = []
        self.stdout_text = ""

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

    def start_daemon(self, extra_args=(), ready_timeout=20.0):
        """Starts nodemanagerd and waits until `nodectl vm list` answers (or fails the deadline)."""
        assert self.daemon is None or self.daemon.poll() is not None, "daemon already running"
        self.starts += 1
        log_path = os.path.join(self.tmp, "nodemanagerd.%d.log" % self.starts)
        self.logs.append(log_path)
        self.daemon_args = [
            self.daemon_bin, "--bus", self.address, "--libvirt-uri", "test:///default",
            "--state-dir", self.state_dir, "--log-level", "debug"] + list(extra_args)
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

    def close(self, keep=False):
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(timeout=10)
            self._close_daemon()
        if self.bus_proc is not None and self.bus_proc.poll() is None:
            self.bus_proc.send_signal(signal.SIGTERM)
            try:
                self.bus_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.bus_proc.send_signal(signal.SIGKILL)
                self.bus_proc.wait(timeout=5)
        if self.bus_proc is not None and self.bus_proc.stdout:
            self.bus_proc.stdout.close()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
