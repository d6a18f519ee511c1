// DnsmasqDhcp: the Dhcp port over dnsmasq, one dnsmasq process per tenant network, started in the
// network's DHCP namespace through ProcessRunner.
//
// Files, per server, under <run_dir>/<key>/:
//   hosts   "mac,ip,hostname" lines, one per DhcpHost: the only leases dnsmasq gives (the range
//           is `static`, so an unknown MAC gets no answer); replaced atomically (temp + rename)
//   leases  dnsmasq's lease database (kept open by dnsmasq)
//   pid     dnsmasq's pid, written by dnsmasq once it is serving (our readiness signal)
//
// How dnsmasq runs (the argv is built here, never read from /etc/dnsmasq.conf):
//   --keep-in-foreground --conf-file=/dev/null --port=0 (no DNS) --no-resolv --no-hosts
//   --bind-interfaces --interface=<ifname> --except-interface=lo
//   --dhcp-range=<network>,static,<netmask>,1h --dhcp-authoritative
//   --dhcp-hostsfile --dhcp-leasefile --pid-file (the files above)
//   --dhcp-option=option:router (empty: guests get no default route; there is no router)
//   --dhcp-option-force=option:mtu,<mtu> (sent even to clients that do not ask, as busybox
//     udhcpc does not)
//   --log-facility=- --user=<user> --group=<user's primary group>
// dnsmasq binds port 67 and sets up its sockets as root, then switches to `user`, keeping only
// CAP_NET_ADMIN and CAP_NET_RAW (enough for DHCP in its namespace: it never needs root again).
// It parses packets from tenant guests, so it must not keep root. It rereads the hosts file on
// SIGHUP as that user: the server's directory and hosts file are root-owned, group `user`'s
// primary group, modes 0750 and 0640; run_dir itself is made 0711. Dropping root clears the
// PR_SET_PDEATHSIG that ProcessRunner set, so a dnsmasq outlives a daemon killed with SIGKILL
// (and keeps serving its fixed leases meanwhile).
//
// Earlier instances: create() terminates every dnsmasq an earlier daemon left under run_dir (its
// pid file names a live process whose command line holds that server's --dhcp-hostsfile=...
// path; any other process is left alone) and removes those files; ensure() and stop() do the
// same for their key. The reconciler's ensure() calls then start fresh servers: after a daemon
// restart DHCP is down for a few seconds; leases are fixed, so a guest renewing in that gap just
// retries and keeps its address.
//
// Threads: one supervisor thread per adapter spawns, signals, reaps and restarts every dnsmasq
// (so PR_SET_PDEATHSIG refers to a thread that lives as long as the servers). ensure() and stop()
// hand their work to it and wait for the result; running() reads shared state under a mutex. All
// calls are thread-safe, but none may be made from the observer (it runs on the supervisor
// thread: deadlock).
//
// Supervision: a server that exits while we did not ask it to is restarted after 1 s, then 2, 4,
// ... at most 30 s while it keeps dying (the delay starts again at 1 s once a server has run for
// 30 s); each attempt calls the observer.
//
// Destruction stops every server (SIGTERM, then SIGKILL after 2 s) and removes their files. The
// daemon is destroyed only when it exits (SIGTERM); guests keep running and DHCP resumes when the
// daemon comes back.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "nm/core/status.h"
#include "nm/network/dhcp.h"

namespace nm::network {

class DnsmasqDhcp final : public Dhcp {
 public:
  struct Options {
    // Per-server files live in <run_dir>/<key>/ (see above). Created when missing. It and its
    // ancestors must be searchable by `user` (dnsmasq rereads the hosts file as that user):
    // /run/nodemanager/dhcp in the daemon, a temp dir in tests.
    std::string run_dir;
    // The dnsmasq binary (absolute path).
    std::string dnsmasq = "/usr/sbin/dnsmasq";
    // Where DhcpServerConfig::netns names are bound (iproute2's /run/netns).
    std::string netns_dir = "/run/netns";
    // The unprivileged user dnsmasq switches to after binding; Debian's dnsmasq-base creates
    // "dnsmasq". "root" keeps it root (then PR_SET_PDEATHSIG stays in force): not for production.
    std::string user = "dnsmasq";
    // true: dnsmasq's log (start-up errors, one line per DHCP transaction) goes to the daemon's
    // stderr (the journal under systemd); false: to /dev/null.
    bool log_to_stderr = true;
    // How long ensure() waits for a started dnsmasq to write its pid file before it gives up
    // and kills it.
    std::chrono::milliseconds start_timeout{10000};
  };

  // Validates `options` (InvalidArgument: empty run_dir, relative paths; NotFound: unknown
  // user), creates run_dir, replaces the servers an earlier instance left there (see above) and
  // starts the supervisor thread. Does not check that the dnsmasq binary exists: ensure() reports
  // that ("executing '/usr/sbin/dnsmasq': No such file or directory").
  static Result<std::unique_ptr<DnsmasqDhcp>> create(Options options);

  DnsmasqDhcp(const DnsmasqDhcp&) = delete;
  DnsmasqDhcp& operator=(const DnsmasqDhcp&) = delete;
  ~DnsmasqDhcp() override;

  // The Dhcp contract. InvalidArgument for a config that cannot be served: a key or netns that
  // is not a plain file name, an empty or too long ifname, a prefix longer than /30, a server or
  // host address outside the subnet (or its network/broadcast address), duplicate MACs or IPs
  // (the server's included), an mtu outside 576..65535, a hostname that is not 1-64 characters of
  // [A-Za-z0-9._-] (it goes into a comma-separated file). A server that does not come up (its
  // namespace or interface is missing, dnsmasq exits or does not write its pid file in time) gives
  // Unavailable naming the key and how dnsmasq ended, and is not kept: ensure() again later.
  // Host-only changes are written to the hosts file and signalled with SIGHUP (same pid); any
  // other change restarts the server (and drops its lease database).
  Status ensure(const DhcpServerConfig& config) override;
  Status stop(const std::string& key) override;
  // Servers we supervise, including one waiting to be restarted.
  std::vector<std::string> running() const override;
  // Called after each restart attempt of a server that died: `what` is never OK; its message
  // says how dnsmasq ended and either "restarted (pid N)" or why the restart failed and when the
  // next attempt comes.
  void set_observer(std::function<void(const std::string& key, const Status& what)> fn) override;

 private:
  struct Impl;
  explicit DnsmasqDhcp(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nm::network
