#!/usr/bin/python3
"""package_install: the Debian package installs, runs the way its unit says, and purges cleanly.

Run as root (ctest label `system`, RUN_SERIAL): it changes this machine's dpkg database, groups
and /etc while it runs, and puts everything back at the end, also when it fails halfway.

  1. builds the `package` target (or takes NM_PACKAGE_DEB) and checks the control data;
  2. `dpkg -i`: files, modes, groups, conffile, manual pages, `systemd-analyze verify`, the
     example config against `nodemanagerd --help`;
  3. starts /usr/sbin/nodemanagerd with the unit's ExecStart, under what the unit's sandbox means
     (own mount namespace with the file system read-only but the unit's writable paths, private
     /tmp, hidden /home, the unit's CapabilityBoundingSet and NoNewPrivileges via setpriv), on a
     private dbus-daemon that runs Debian's *system* bus configuration (so the installed policy
     file decides who may own and call), libvirt test:///default, in a network namespace of its
     own, with NOTIFY_SOCKET served here and WATCHDOG_USEC set; asserts READY=1, the watchdog
     cadence, that tenant networks (bridges, namespaces, nftables, dnsmasq) and VM ports work
     with those capabilities, who the bus lets in, and a clean SIGTERM;
  4. `dpkg --purge` and asserts that nothing of the package is left.

Usage: package_install_test.py BUILD_DIR SOURCE_DIR
"""

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback

SKIP = 77
PACKAGE = "nodemanager"
UNIT = "nodemanagerd.service"
BUS_NAME = "org.nodemanager.NodeManager1"
GROUPS = ("nodemanager", "nodemanager-operators")
CONFFILE = "/etc/nodemanager/nodemanagerd.conf"
OWNED_DIRS = ("/var/lib/nodemanager", "/etc/nodemanager", "/run/nodemanager")
# Image-store options (issue 3): may be documented before the daemon has them; their defaults are
# checked as soon as `nodemanagerd --help` lists them.
PENDING_OPTIONS = {"image-source", "image-reserve-mib", "image-gc-min-age",
                   "image-gc-interval", "disk-reserve-mib"}
WATCHDOG_USEC = 2_000_000  # the unit says 30 s; 2 s keeps the test short


class Failure(Exception):
    pass


def log(msg):
    print(f"package_install: {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def run(argv, check_rc=True, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    p = subprocess.run(argv, check=False, **kw)
    if check_rc and p.returncode != 0:
        raise Failure(f"{shlex.join(argv)} exited {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def known_to_dpkg():
    """Installed, or removed with its conffiles kept: either way something to purge."""
    p = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], check_rc=False)
    return p.returncode == 0 and not p.stdout.endswith("not-installed")


def purge():
    run(["dpkg", "--purge", PACKAGE], check_rc=False)


# --- 1. the package ------------------------------------------------------------------------------

def find_deb(build_dir):
    deb = os.environ.get("NM_PACKAGE_DEB")
    if deb:
        check(os.path.isfile(deb), f"NM_PACKAGE_DEB '{deb}' does not exist")
        return deb
    log("building the package target")
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    p = run(["cmake", "--build", build_dir, "--target", "package"], check_rc=False, env=env)
    check(p.returncode == 0, f"cmake --build --target package failed:\n{p.stdout[-4000:]}"
          f"{p.stderr[-4000:]}")
    debs = sorted((os.path.join(build_dir, f) for f in os.listdir(build_dir)
                   if f.startswith(PACKAGE + "_") and f.endswith(".deb")), key=os.path.getmtime)
    check(debs, f"no {PACKAGE}_*.deb in '{build_dir}' after building the package target")
    return debs[-1]


def check_control(deb, source_dir):
    fields = {}
    for name in ("Package", "Version", "Depends", "Maintainer", "Description"):
        fields[name] = run(["dpkg-deb", "-f", deb, name]).stdout.strip()
    check(fields["Package"] == PACKAGE, f"Package is '{fields['Package']}'")
    with open(os.path.join(source_dir, "CMakeLists.txt"), encoding="utf-8") as f:
        version = re.search(r"project\(nodemanager VERSION ([0-9.]+)", f.read()).group(1)
    check(fields["Version"] == version, f"Version '{fields['Version']}', project says {version}")
    depends = fields["Depends"]
    for want in ("libvirt-daemon-system | libvirt-daemon", "dnsmasq-base", "dbus", "qemu-utils"):
        check(want in depends, f"Depends lacks '{want}': {depends}")
    # dpkg-shlibdeps ran: the libraries the binaries link are there too.
    for lib in ("libvirt0", "libsystemd0", "libsqlite3-0", "libboost-program-options"):
        check(lib in depends, f"Depends lacks the shared library package '{lib}': {depends}")
    check(fields["Maintainer"] and fields["Description"], "Maintainer or Description is empty")
    ctrl = tempfile.mkdtemp(prefix="nm-deb-control.")
    try:
        run(["dpkg-deb", "--control", deb, ctrl])
        with open(os.path.join(ctrl, "conffiles"), encoding="utf-8") as f:
            check(f.read().split() == [CONFFILE], "conffiles does not list exactly " + CONFFILE)
        for script in ("postinst", "prerm", "postrm"):
            mode = os.stat(os.path.join(ctrl, script)).st_mode
            check(mode & 0o777 == 0o755, f"{script} has mode {oct(mode & 0o777)}")
    finally:
        shutil.rmtree(ctrl)


# --- 2. installed files --------------------------------------------------------------------------

def package_files():
    out = run(["dpkg", "-L", PACKAGE]).stdout.split("\n")
    return [p for p in out if p and p != "/."]


def find_installed(files, suffix):
    hits = [f for f in files if f.endswith(suffix)]
    check(len(hits) == 1, f"the package should hold exactly one '*{suffix}', has {hits}")
    return hits[0]


def check_mode(path, mode, owner="root", group="root"):
    st = os.stat(path)
    check(stat.S_ISDIR(st.st_mode), f"'{path}' is not a directory")
    got = (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
           grp.getgrgid(st.st_gid).gr_name)
    check(got == (mode, owner, group),
          f"'{path}' is {oct(got[0])} {got[1]}:{got[2]}, want {oct(mode)} {owner}:{group}")


def check_installed(files):
    for path in ("/usr/sbin/nodemanagerd", "/usr/bin/nodectl",
                 "/usr/share/dbus-1/system.d/org.nodemanager.NodeManager1.conf",
                 "/usr/share/dbus-1/system-services/org.nodemanager.NodeManager1.service",
                 "/usr/lib/sysusers.d/nodemanager.conf", "/usr/lib/tmpfiles.d/nodemanager.conf",
                 CONFFILE, "/usr/share/bash-completion/completions/nodectl",
                 "/usr/share/man/man8/nodemanagerd.8.gz", "/usr/share/man/man1/nodectl.1.gz",
                 "/usr/share/man/man5/nodemanagerd.conf.5.gz"):
        check(path in files, f"the package does not install '{path}'")
        check(os.path.isfile(path), f"'{path}' is listed but missing")
    unit = find_installed(files, "/system/" + UNIT)
    for d in ("/var/lib/nodemanager", "/var/lib/nodemanager/images",
              "/var/lib/nodemanager/instances", "/run/nodemanager"):
        check_mode(d, 0o711)
    for g in GROUPS:
        try:
            grp.getgrnam(g)
        except KeyError:
            raise Failure(f"postinst did not create group '{g}'") from None
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    check(CONFFILE in conffiles, f"dpkg does not treat '{CONFFILE}' as a conffile: {conffiles}")
    for page in ("man8/nodemanagerd.8.gz", "man1/nodectl.1.gz", "man5/nodemanagerd.conf.5.gz"):
        path = "/usr/share/man/" + page
        with open(path, "rb") as f:
            check(f.read(2) == b"\x1f\x8b", f"'{path}' is not gzip")
        roff = run(["zcat", path]).stdout
        p = run(["groff", "-man", "-ww", "-z"], input=roff, check_rc=False)
        check(p.returncode == 0 and not p.stderr, f"groff warns on '{path}': {p.stderr}")
    p = run(["systemd-analyze", "verify", unit], check_rc=False)
    check(p.returncode == 0 and not p.stderr.strip(),
          f"systemd-analyze verify '{unit}' failed ({p.returncode}): {p.stderr}")
    return unit


def help_options():
    """Maps every option of `nodemanagerd --help` to its default ("" when it has none)."""
    text = run(["/usr/sbin/nodemanagerd", "--help"]).stdout
    opts = {}
    for m in re.finditer(r"^\s+(?:-\w \[ )?--([a-z0-9-]+)(?: \])?( arg)?(?: \(=([^)]*)\))?",
                         text, re.M):
        if m.group(2):
            opts[m.group(1)] = m.group(3) or ""
    return opts


def check_example_config():
    """Every option of the daemon is documented, commented out, with its real default."""
    with open(CONFFILE, encoding="utf-8") as f:
        text = f.read()
    documented = dict(re.findall(r"^#([a-z0-9-]+) =[ ]?(.*)$", text, re.M))
    active = re.findall(r"^[a-z0-9-]+\s*=", text, re.M)
    check(not active, f"the example config sets options: {active}")
    opts = help_options()
    check(len(opts) > 10, f"could not read the options from nodemanagerd --help: {opts}")
    for name, default in opts.items():
        if name == "config":
            continue
        check(name in documented, f"'{CONFFILE}' does not document option '{name}'")
        check(documented[name] == default,
              f"'{CONFFILE}' gives '{name}' the default '{documented[name]}', "
              f"nodemanagerd --help says '{default}'")
    for name in documented:
        if name not in opts:
            check(name in PENDING_OPTIONS, f"'{CONFFILE}' documents '{name}', "
                  "which nodemanagerd does not know")
            log(f"note: option '{name}' is documented but not in nodemanagerd yet")


def unit_settings(unit):
    settings = {}
    section = None
    with open(unit, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            settings.setdefault((section, key), []).append(value)
    return settings


# --- 3. the daemon as the unit runs it -----------------------------------------------------------

class Scene:
    """Every process and file the test makes; closed in reverse order, also after a failure."""

    def __init__(self):
        # Not below /tmp: the daemon gets a private /tmp (PrivateTmp=) like under systemd.
        self.dir = tempfile.mkdtemp(prefix="nm-package-test.", dir="/run")
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.notify = None
        self.mount_ns = None  # the daemon's: dnsmasq runs there too, and outlives a killed daemon

    def sandboxed_pids(self):
        """Processes in the daemon's mount namespace (the daemon and its dnsmasq servers)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self.mount_ns:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def close(self):
        if self.mount_ns:
            # What systemd's KillMode=control-group does: dnsmasq drops root, which clears the
            # parent-death signal it was given, so it outlives a daemon that was killed.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.sandboxed_pids():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
                while self.sandboxed_pids() and time.monotonic() < deadline:
                    time.sleep(0.1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        if self.notify:
            self.notify.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_bus(scene):
    """A dbus-daemon with Debian's system bus configuration: it includes the installed policy."""
    address = f"unix:path={scene.dir}/bus"
    bus = scene.spawn(["dbus-daemon", "--config-file=/usr/share/dbus-1/system.conf",
                       "--address=" + address, "--nofork", "--nopidfile", "--print-address=1"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = bus.stdout.readline()
    check(line.startswith("unix:"), f"dbus-daemon did not start (printed '{line}')")
    names = run(["busctl", "--address=" + address, "call", "org.freedesktop.DBus",
                 "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListActivatableNames"]).stdout
    check(f'"{BUS_NAME}"' in names, f"the bus does not list {BUS_NAME} as activatable: {names}")
    return address


def sandbox_script(rw_paths):
    """Shell run in the new mount namespace: ProtectSystem=strict, PrivateTmp, ProtectHome."""
    rw = " ".join(shlex.quote(p) for p in rw_paths)
    return f"""set -eu
mkdir -p /run/netns
mount -t tmpfs -o mode=0755 nm-test-netns /run/netns
for p in {rw}; do mount --bind "$p" "$p"; done
awk '{{print $2}}' /proc/self/mounts | sort -u | while read -r m; do
  case "$m" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) continue ;; esac
  for p in {rw}; do [ "$m" = "$p" ] && continue 2; done
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=1777 nm-private-tmp /tmp
mount -t tmpfs -o mode=1777 nm-private-tmp /var/tmp
for h in /home /root /run/user; do
  [ -d "$h" ] && mount -t tmpfs -o ro,mode=0755 nm-protect-home "$h"
done
touch /usr/.nm-probe 2>/dev/null && {{ echo "sandbox: /usr is writable" >&2; exit 70; }}
export WATCHDOG_PID=$$
exec "$@"
"""


def caps_arg(settings):
    caps = settings[("Service", "CapabilityBoundingSet")][-1].split()
    # To find out whether a capability is needed: NM_TEST_CAPS="CAP_A CAP_B ..." replaces the set.
    caps = os.environ.get("NM_TEST_CAPS", "").split() or caps
    check(caps and all(c.startswith("CAP_") for c in caps), f"CapabilityBoundingSet: {caps}")
    return caps, "-all," + ",".join("+" + c[4:].lower() for c in caps)


def recv_notify(sock, deadline):
    sock.settimeout(max(0.0, deadline - time.monotonic()))
    try:
        return sock.recv(4096).decode()
    except socket.timeout:
        return None


def start_daemon(scene, settings, bus_address):
    exec_start = settings[("Service", "ExecStart")][-1]
    argv = shlex.split(exec_start)
    check(argv[0] == "/usr/sbin/nodemanagerd", f"ExecStart runs '{argv[0]}'")
    check("--bus" in argv and argv[argv.index("--bus") + 1] == "system",
          f"ExecStart does not serve the system bus: {exec_start}")
    argv += ["--libvirt-uri", "test:///default"]  # no libvirtd runs here

    scene.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = f"{scene.dir}/notify"
    scene.notify.bind(notify_path)
    os.chmod(notify_path, 0o777)

    caps, bounding = caps_arg(settings)
    rw_paths = ["/var/lib/nodemanager", "/run/nodemanager"]
    rw_paths += [p.lstrip("-") for v in settings.get(("Service", "ReadWritePaths"), [])
                 for p in v.split()]
    check("/run/netns" in rw_paths, "the unit does not make /run/netns writable")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "NOTIFY_SOCKET": notify_path,
           "WATCHDOG_USEC": str(WATCHDOG_USEC), "DBUS_SYSTEM_BUS_ADDRESS": bus_address}
    launcher = ["unshare", "--net", "--mount", "--propagation", "slave",
                "sh", "-c", sandbox_script(rw_paths), "nm-sandbox",
                "setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--no-new-privs"]
    log_file = open(f"{scene.dir}/nodemanagerd.log", "w", encoding="utf-8")  # noqa: SIM115
    log(f"starting {shlex.join(argv)} with {' '.join(caps)}")
    daemon = scene.spawn(launcher + argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                         stderr=subprocess.STDOUT, cwd="/")
    log_file.close()
    return daemon


def daemon_log(scene):
    with open(f"{scene.dir}/nodemanagerd.log", encoding="utf-8") as f:
        return f.read()[-6000:]


def wait_ready(scene, daemon):
    deadline = time.monotonic() + 90
    messages = []
    while time.monotonic() < deadline:
        msg = recv_notify(scene.notify, min(deadline, time.monotonic() + 1))
        if msg is not None:
            messages.append(msg)
            if "READY=1" in msg.split("\n"):
                scene.mount_ns = os.readlink(f"/proc/{daemon.pid}/ns/mnt")
                check(scene.mount_ns != os.readlink("/proc/self/ns/mnt"),
                      "nodemanagerd runs in the test's own mount namespace")
                return messages
        if daemon.poll() is not None:
            raise Failure(f"nodemanagerd exited {daemon.returncode} before READY=1; notify: "
                          f"{messages}\n{daemon_log(scene)}")
    raise Failure(f"no READY=1 within 90 s; notify: {messages}\n{daemon_log(scene)}")


def check_watchdog(scene, daemon):
    """WATCHDOG=1 arrives about every WATCHDOG_USEC/2: never a gap near the timeout, no flood."""
    window = 6.0
    start = time.monotonic()
    pings = []
    while time.monotonic() - start < window:
        msg = recv_notify(scene.notify, start + window)
        if msg is None:
            break
        if "WATCHDOG=1" in msg.split("\n"):
            pings.append(time.monotonic())
    check(daemon.poll() is None, f"nodemanagerd died while watched:\n{daemon_log(scene)}")
    period = WATCHDOG_USEC / 1e6
    check(len(pings) >= int(window / period),
          f"{len(pings)} WATCHDOG=1 in {window} s with WATCHDOG_USEC={WATCHDOG_USEC}; "
          f"want one at least every {period / 2} s")
    gaps = [b - a for a, b in zip([start] + pings, pings)]
    check(max(gaps) < period, f"a watchdog gap of {max(gaps):.2f} s >= {period} s: {gaps}")
    check(len(pings) <= 4 * window / period, f"{len(pings)} pings in {window} s: a flood")
    log(f"watchdog: {len(pings)} pings in {window} s, gaps {min(gaps):.2f}..{max(gaps):.2f} s")


def nodectl(args, bus, user=None, groups=None, input_text=None, check_rc=True):
    argv = ["/usr/bin/nodectl", "--bus", bus] + args
    if user is not None:
        ids = pwd.getpwnam(user)
        gids = ",".join(str(grp.getgrnam(g).gr_gid) for g in groups) if groups else None
        argv = (["setpriv", f"--reuid={ids.pw_uid}", f"--regid={ids.pw_gid}"] +
                ([f"--groups={gids}"] if gids else ["--clear-groups"]) + argv)
    return run(argv, check_rc=check_rc, input=input_text, cwd="/")


def in_daemon_netns(daemon, argv):
    return run(["nsenter", "-t", str(daemon.pid), "-n"] + argv)


def dnsmasq_procs(scene):
    """(pid, user) of the dnsmasq servers the daemon started."""
    procs = []
    for pid in scene.sandboxed_pids():
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                if f.read().strip() != "dnsmasq":
                    continue
            procs.append((pid, pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name))
        except OSError:
            pass
    return procs


def exercise(scene, daemon, bus):
    # Who the bus lets in (the installed policy on the system bus configuration).
    p = nodectl(["vm", "list"], bus, user="nobody", check_rc=False)
    check(p.returncode == 6, f"a user outside the groups got exit {p.returncode}, want 6 "
          f"(AccessDenied): {p.stdout}{p.stderr}")
    for g in GROUPS:
        p = nodectl(["vm", "list"], bus, user="nobody", groups=[g], check_rc=False)
        check(p.returncode == 0, f"a member of '{g}' got exit {p.returncode}: {p.stdout}{p.stderr}")
    p = run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=" +
             str(grp.getgrnam("nodemanager").gr_gid), "busctl", "--address=" + bus, "call",
             "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
             "RequestName", "su", BUS_NAME, "4"], check_rc=False)
    check(p.returncode != 0 and "denied" in p.stderr.lower(),
          f"a non-root member of 'nodemanager' may own {BUS_NAME}: {p.stdout}{p.stderr}")

    # A tenant network: bridge + veth + namespace bound under /run/netns + nftables + dnsmasq
    # started as user dnsmasq, all with the unit's capabilities and file system view.
    spec = '{"name": "blue", "tenant": "contoso", "vni": 4097, "subnet": "10.10.0.0/24"}'
    nodectl(["network", "create", "-f", "-", "--wait"], bus, input_text=spec)
    links = in_daemon_netns(daemon, ["ip", "-br", "link"]).stdout
    check("nmbr4097" in links, f"no bridge nmbr4097 in the daemon's namespace:\n{links}")
    in_daemon_netns(daemon, ["nft", "list", "table", "bridge", "nodemanager"])
    servers = dnsmasq_procs(scene)
    check(len(servers) == 1 and servers[0][1] == "dnsmasq",
          f"want one dnsmasq running as user dnsmasq, got (pid, user) {servers}")

    # A VM on it: its port's DHCP host file is root:<dnsmasq's group> 0640 (chown) and its
    # address is in the port's nftables set.
    disk = f"{scene.dir}/disk.raw"
    with open(disk, "wb") as f:
        f.write(b"NMDISK package test\n".ljust(1 << 20, b"\0"))
    os.chmod(disk, 0o644)
    digest = run(["sha256sum", disk]).stdout.split()[0]
    nodectl(["image", "import", "pkg-disk:1", disk, "--sha256", digest, "--wait"], bus)
    vm = ('{"name": "web-1", "tenant": "contoso", "vcpus": 1, "memory_mib": 128, '
          '"image": "pkg-disk:1", "networks": [{"network": "blue"}]}')
    nodectl(["vm", "create", "-f", "-", "--wait"], bus, input_text=vm)
    nodectl(["vm", "start", "web-1", "--wait"], bus)
    hosts = [os.path.join(d, f) for d, _, fs in os.walk("/run/nodemanager") for f in fs
             if d.endswith("/hosts.d") and re.fullmatch(r"[0-9a-f]{2}(-[0-9a-f]{2}){5}", f)]
    check(hosts, "no DHCP host file below /run/nodemanager for the VM's port")
    dnsmasq_gid = pwd.getpwnam("dnsmasq").pw_gid
    for h in hosts:
        st = os.stat(h)
        check((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, dnsmasq_gid, 0o640),
              f"'{h}' is {st.st_uid}:{st.st_gid} {oct(stat.S_IMODE(st.st_mode))}, "
              f"want 0:{dnsmasq_gid} 0o640")
    ips = in_daemon_netns(daemon, ["nft", "list", "table", "bridge", "nodemanager"]).stdout
    check("10.10.0." in ips, f"the VM's address is not in table bridge nodemanager:\n{ips}")
    check_completion(bus)
    nodectl(["vm", "delete", "web-1", "--wait"], bus)
    nodectl(["network", "delete", "blue", "--wait"], bus)
    check(not dnsmasq_procs(scene), "dnsmasq still runs after the network is gone: "
          f"{dnsmasq_procs(scene)}")


COMPLETION_HARNESS = r"""
source /usr/share/bash-completion/bash_completion
source /usr/share/bash-completion/completions/nodectl
COMP_LINE=$1
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<<"$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
_nodectl nodectl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def complete(line, bus):
    """What bash completes for `line` with the installed completion (the daemon on `bus`)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": bus}
    p = run(["bash", "-c", COMPLETION_HARNESS, "complete", line], env=env, check_rc=False)
    check(p.returncode == 0 and not p.stderr, f"completing '{line}' failed: {p.stderr}")
    return sorted(w for w in p.stdout.split("\n") if w)


def check_completion(bus):
    if not os.path.isfile("/usr/share/bash-completion/bash_completion"):
        log("note: bash-completion is not installed; completion not checked")
        return
    cases = {
        "nodectl ": ["--bus", "--help", "--json", "--timeout", "events", "image", "network",
                     "node", "vm"],
        "nodectl node ": ["--help", "capacity", "drain", "health", "undrain", "watch"],
        "nodectl node drain --r": ["--reason", "--request-id"],
        "nodectl vm ": ["--help", "create", "delete", "list", "reboot", "show", "start", "stop"],
        "nodectl --json vm stop web-1 --f": ["--force"],
        "nodectl image import a:1 f --kind ": ["disk", "initrd", "kernel"],
        "nodectl image g": ["gc"],
        "nodectl events --": ["--bus", "--follow", "--help", "--json", "--since", "--timeout"],
        "nodectl network delete ": ["blue"],
    }
    for line, want in cases.items():
        got = complete(line, bus)
        check(got == want, f"completing '{line}': got {got}, want {want}")
    got = complete("nodectl vm show w", bus)
    check(got == ["web-1"], f"completing a VM name from the daemon: got {got}")
    got = complete("nodectl vm show ", "unix:path=/nonexistent/bus")
    check(got == [], f"no daemon: completing a VM name gave {got}")


def stop_daemon(scene, daemon):
    daemon.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    stopping = False
    while daemon.poll() is None and time.monotonic() < deadline:
        msg = recv_notify(scene.notify, min(deadline, time.monotonic() + 0.5))
        if msg and "STOPPING=1" in msg.split("\n"):
            stopping = True
    check(daemon.poll() is not None, "nodemanagerd did not exit within 60 s of SIGTERM")
    check(daemon.returncode == 0, f"nodemanagerd exited {daemon.returncode} on SIGTERM:\n"
          f"{daemon_log(scene)}")
    check(stopping, "nodemanagerd sent no STOPPING=1")


# --- 4. purge ------------------------------------------------------------------------------------

def check_purged(files):
    check(not known_to_dpkg(), "dpkg still knows the package after --purge")
    left = [f for f in files if os.path.lexists(f) and not os.path.isdir(f)]
    check(not left, f"files left after purge: {left}")
    left = [d for d in OWNED_DIRS if os.path.lexists(d)]
    check(not left, f"directories left after purge: {left}")
    for g in GROUPS:
        check(g not in {e.gr_name for e in grp.getgrall()}, f"group '{g}' left after purge")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    build_dir, source_dir = sys.argv[1:]
    if os.geteuid() != 0:
        print("package_install: SKIPPED: needs root (dpkg -i into this machine, namespaces, "
              "capabilities); run ctest as root", flush=True)
        return SKIP
    for tool in ("dpkg", "dpkg-deb", "systemd-analyze", "dbus-daemon", "busctl", "setpriv",
                 "unshare", "nsenter", "groff", "ip", "nft"):
        if shutil.which(tool) is None:
            print(f"package_install: SKIPPED: '{tool}' is not installed", flush=True)
            return SKIP

    # ctest's timeout and Ctrl-C end the run through the `finally` below, which cleans up.
    def interrupted(signum, _frame):
        raise Failure(f"interrupted by signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    had_netns_dir = os.path.isdir("/run/netns")
    if known_to_dpkg():
        log("a nodemanager package is installed (an earlier run?): purging it first")
        purge()
    deb = find_deb(build_dir)
    log(f"package {deb}")
    check_control(deb, source_dir)

    scene = None
    files = []
    try:
        run(["dpkg", "-i", deb])
        files = package_files()
        unit = check_installed(files)
        check_example_config()
        settings = unit_settings(unit)
        check(settings.get(("Service", "Type")) == ["notify"], "Type= is not notify")
        check(settings.get(("Service", "BusName")) == [BUS_NAME], "BusName= is wrong")
        check(("Service", "WatchdogSec") in settings, "no WatchdogSec=")
        log("installed: files, modes, groups, conffile, manuals and unit check out")

        scene = Scene()
        bus = start_bus(scene)
        daemon = start_daemon(scene, settings, bus)
        messages = wait_ready(scene, daemon)
        log(f"READY=1 after {messages}")
        check_watchdog(scene, daemon)
        exercise(scene, daemon, bus)
        log("bus policy, tenant network, DHCP and a VM port work with the unit's capabilities")
        stop_daemon(scene, daemon)
        log("SIGTERM: STOPPING=1 and exit 0")
    finally:
        if scene:
            scene.close()
        purge()
        if not had_netns_dir:
            try:
                os.rmdir("/run/netns")
            except OSError:
                pass
    check_purged(files)
    log("purged: no files, directories or groups left")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"package_install: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception:  # noqa: BLE001 - any other error fails the test with its trace
        traceback.print_exc()
        sys.exit(1)
