// ProcessRunner: the one way nodemanager starts another program (DESIGN.md allows dnsmasq only).
//
// A program is started from an argv vector with execve(): no shell, no PATH search, and an
// explicit environment (nothing of the daemon's is inherited). Between fork() and execve() the
// child only makes async-signal-safe calls, in this order:
//   1. resets every signal to its default action, then empties its signal mask (the daemon
//      blocks SIGTERM, SIGHUP... for its signalfd, and a blocked mask survives execve: dnsmasq
//      would never see the SIGTERM or SIGHUP we send it; in this order, a signal already pending
//      meets the default action, not a handler of the daemon's);
//   2. setsid(): a session and process group of its own, so signals meant for the daemon's group
//      (a Ctrl-C in a terminal) do not reach it;
//   3. PR_SET_PDEATHSIG(SIGTERM), then exits if the parent is already gone (see "Lifetime");
//   4. setns(CLONE_NEWNET) into `netns_path` when one is given;
//   5. stdin from /dev/null, stdout and stderr to `output_fd` (or /dev/null), and every other
//      descriptor marked close-on-exec (close_range(3, ~0, CLOSE_RANGE_CLOEXEC)), so the child
//      holds none of the daemon's sockets, database or pidfds;
//   6. execve().
// A failure of steps 4 or 6 is written (errno and the step) to a close-on-exec pipe the parent
// reads until EOF: spawn_process() then returns that error, e.g. Unavailable "executing
// '/usr/sbin/dnsmasq': No such file or directory", after reaping the child; never a silent exit
// 127 discovered later.
//
// Lifetime: PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process (it is
// in force when spawn_process() returns, which waits for the execve). Call
// spawn_process() only from a thread that lives as long as its children should (DnsmasqDhcp
// spawns from its own supervisor thread, never from a caller's or a worker pool's thread). The
// kernel also clears the setting when the child changes its credentials (setuid/setgid), as
// dnsmasq does when it drops root: such a child outlives a daemon killed with SIGKILL, and its
// owner must find and replace it on the next start (DnsmasqDhcp does, through its pid file).
//
// Reaping: a Child is waited for through its own pidfd (waitid(P_PIDFD)), that process only;
// never waitpid(-1), which would steal the exit status of the daemon's other children.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <compare>
#include <optional>
#include <string>
#include <vector>

#include "nm/core/fs.h"
#include "nm/core/status.h"

namespace nm::network {

struct SpawnOptions {
  // argv[0] is the program, an absolute path: it is executed as given. Must not be empty.
  std::vector<std::string> argv;
  // The child's whole environment, "NAME=value" entries. The default gives a PATH for programs
  // that run others (/bin/sh in tests) and the C locale; dnsmasq needs neither.
  std::vector<std::string> env = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"};
  // A network namespace file to enter before execve ("/run/netns/<name>", "/proc/<pid>/ns/net");
  // empty: the child stays in the caller's namespace.
  std::string netns_path;
  // Where the child's stdout and stderr go (borrowed, not closed); -1: /dev/null.
  int output_fd = -1;
};

// How a process ended.
struct ExitStatus {
  bool signaled = false;  // true: killed by signal `value`; false: exited with status `value`
  int value = 0;
  bool success() const { return !signaled && value == 0; }
  // "exited with status 2", "killed by signal 9 (Killed)".
  std::string str() const;
  auto operator<=>(const ExitStatus&) const = default;
};

// A started child process: its pid and a pidfd (which stays valid and names this process only,
// even after the pid is reused). Move-only. Not thread-safe: one thread uses a Child at a time.
class Child {
 public:
  Child(Child&& other) noexcept;
  Child& operator=(Child&& other) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  // A child not yet reaped is killed (SIGKILL) and reaped: no process and no zombie outlives its
  // handle. Call terminate() first for a graceful stop.
  ~Child();

  pid_t pid() const { return pid_; }
  // Becomes readable (POLLIN) when the process exits; for poll loops. Owned by the Child.
  int pidfd() const { return pidfd_.get(); }
  bool reaped() const { return reaped_; }

  // Sends `sig` through the pidfd. OK after the process exited but before it was reaped (the
  // signal is lost); InvalidArgument after it was reaped.
  Status signal(int sig);
  // Reaps without blocking: the exit status once the process ended, nullopt while it runs. The
  // status again on later calls. Internal only if someone else reaped it (a waitpid(-1) in the
  // process: a bug).
  Result<std::optional<ExitStatus>> try_wait();
  // Blocks until the process ends and reaps it.
  Result<ExitStatus> wait();
  // SIGTERM, up to `grace` for it to exit, then SIGKILL; reaps it and returns how it ended (the
  // status it already had when it was reaped before).
  Result<ExitStatus> terminate(std::chrono::milliseconds grace);

 private:
  friend Result<Child> spawn_process(const SpawnOptions& options);
  Child(pid_t pid, UniqueFd pidfd) : pid_(pid), pidfd_(std::move(pidfd)) {}
  Result<std::optional<ExitStatus>> reap(bool block);

  pid_t pid_ = -1;
  UniqueFd pidfd_;
  bool reaped_ = false;
  ExitStatus status_;
};

// Starts the program described by `options` as above. InvalidArgument for an empty argv or a
// relative argv[0]; Unavailable when the namespace cannot be opened or entered or execve fails
// (the message names the path and errno's text); Internal when fork, pipe or pidfd_open fail.
Result<Child> spawn_process(const SpawnOptions& options);

// Opens a pidfd for `pid`, a process that need not be our child. NotFound when it does not exist.
Result<UniqueFd> open_pidfd(pid_t pid);

// Stops any process given by its pidfd: SIGTERM, up to `grace` for it to exit, then SIGKILL and
// waits for its end (non-children cannot be reaped here; their parent does that). OK when it is
// already gone. For processes we did not start (a server left by an earlier daemon); use
// Child::terminate() for our own children.
Status terminate_pidfd(int pidfd, std::chrono::milliseconds grace);

}  // namespace nm::network
