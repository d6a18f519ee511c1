// DnsmasqDhcp: the Dhcp port over dnsmasq, one dnsmasq process per tenant network, started in the
// network's DHCP namespace through ProcessRunner.
//
// Files, per server, under <run_dir>/<key>/:
//   hosts.d/<mac>  one per DhcpHost, named by its MAC with '-' ("02-ab-cd-ef-01-23"), holding
//           its "mac,ip[,hostname]" line: the only leases dnsmasq gives (the range is `static`,
//           so an unknown MAC gets no answer). Published atomically: written as
//           ".<mac>.tmp" (dnsmasq skips dotfiles), closed, then renamed.
//   leases  dnsmasq's lease database (kept open by dnsmasq)
//   pid     dnsmasq's pid, written by dnsmasq once it is serving (our readiness signal)
//
// How dnsmasq runs (the argv is built here, never read from /etc/dnsmasq.conf):
//   --keep-in-foreground --conf-file=/dev/null --port=0 (no DNS) --no-resolv --no-hosts
//   --bind-interfaces --interface=<ifname> --except-interface=lo
//   --dhcp-range=<network>,static,<netmask>,1h --dhcp-authoritative
//   --dhcp-hostsdir --dhcp-leasefile --pid-file (the files above)
//   --dhcp-option=option:router (empty: guests get no default route; there is no router)
//   --dhcp-option-force=option:mtu,<mtu> (sent even to clients that do not ask, as busybox
//     udhcpc does not)
//   --log-facility=- --user=<user> --group=<user's primary group>
// dnsmasq binds port 67 and sets up its sockets as root, then switches to `user`, keeping only
// CAP_NET_ADMIN and CAP_NET_RAW (enough for DHCP in its namespace: it never needs root again).
// It parses packets from tenant guests, so it must not keep root. It reads host files as that
// user: the server's directory, hosts.d and the host files are root-owned, group `user`'s
// primary group, modes 0750, 0750 and 0640; run_dir itself is made 0711. Dropping root clears the
// PR_SET_PDEATHSIG that ProcessRunner set, so a dnsmasq outlives a daemon killed with SIGKILL
// (and keeps serving its fixed leases meanwhile).
//
// Earlier instances: create() terminates every dnsmasq an earlier daemon left under run_dir (its
// pid file names a live process whose command line holds that server's --dhcp-hostsdir=...
// path, or the --dhcp-hostsfile=<run_dir>/<key>/hosts of earlier versions; any other process is
// left alone) and removes those files; ensure() and stop() do the
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
    // How long ensure() waits for a running dnsmasq to read changed hosts (see ensure()) before
    // it reports Unavailable.
    std::chrono::milliseconds reread_timeout{5000};
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
  // Host-only changes keep the process (same pid) and are incremental, O(1) in files and work
  // for dnsmasq per new host (the list itself is still compared in memory):
  //   - a new host: its file is published; dnsmasq reads it on its own (inotify).
  //   - a removed or changed host (same MAC, other address or name): its file is removed or
  //     replaced and dnsmasq gets SIGHUP, as it never forgets what it read otherwise; it then
  //     drops every host and rereads the whole directory (O(hosts) in dnsmasq: about 20 ms at
  //     1000 hosts).
  // Either way ensure() returns only once dnsmasq has read the new files (or the directory, after
  // SIGHUP), seen as their close after reading through inotify, so the next DHCP request is
  // answered from the new list. Unavailable when that takes longer than reread_timeout (the next
  // ensure(), even with the same config, rewrites the directory and signals again); OK when
  // dnsmasq exits meanwhile (its restart reads everything). Any other change restarts the server
  // (and drops its lease database).
  // Not done: dnsmasq keeps the lease of a removed host for up to the lease time (1h), so its
  // address cannot go to another MAC meanwhile ("not using configured address").
  Status ensure(const DhcpServerConfig& config) override;
  // One new host file, which dnsmasq reads on its own (no SIGHUP), then waits until it did.
  Status add_host(const std::string& key, const DhcpHost& host) override;
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
