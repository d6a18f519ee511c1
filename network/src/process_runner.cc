#include "nm/network/process_runner.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <utility>

namespace nm::network {
namespace {

// Raw syscalls: glibc 2.36's <sys/pidfd.h> lacks extern "C" (fixed in 2.37), so its wrappers
// cannot be linked from C++.
int pidfd_open(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0U));
}
int pidfd_send_signal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0U));
}

// What the child reports through the pipe when it fails before execve took over.
enum class Step : int { kSetns = 1, kExec = 2 };
struct ChildFailure {
  Step step;
  int err;
};

// Moves `fd` above 0..2, so the child's dup2() onto stdio cannot clobber it.
UniqueFd above_stdio(UniqueFd fd) {
  if (!fd.valid() || fd.get() > 2) return fd;
  return UniqueFd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 3));
}

[[noreturn]] void child_fail(int report_fd, Step step) {
  const ChildFailure failure{step, errno};
  (void)!::write(report_fd, &failure, sizeof failure);
  ::_exit(127);
}

// Runs in the forked child: async-signal-safe calls only.
[[noreturn]] void run_child(pid_t parent, int netns_fd, int devnull_fd, int output_fd,
                            int report_fd, char* const* argv, char* const* envp) {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) ::sigaction(sig, &dfl, nullptr);
  sigset_t none;
  ::sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  ::setsid();
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() != parent) ::_exit(127);

  if (netns_fd >= 0 && ::setns(netns_fd, CLONE_NEWNET) != 0) child_fail(report_fd, Step::kSetns);

  const int out = output_fd >= 0 ? output_fd : devnull_fd;
  ::dup2(out, STDOUT_FILENO);
  ::dup2(out, STDERR_FILENO);
  ::dup2(devnull_fd, STDIN_FILENO);
  ::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);

  ::execve(argv[0], argv, envp);
  child_fail(report_fd, Step::kExec);
}

std::vector<char*> c_strings(const std::vector<std::string>& v) {
  std::vector<char*> out;
  out.reserve(v.size() + 1);
  for (const auto& s : v) out.push_back(const_cast<char*>(s.c_str()));
  out.push_back(nullptr);
  return out;
}

Status unavailable_errno(int err, const std::string& what) {
  return unavailable(what + ": " + std::strerror(err));
}

ExitStatus from_siginfo(const siginfo_t& info) {
  if (info.si_code == CLD_EXITED) return {false, info.si_status};
  return {true, info.si_status};
}

// Waits up to `timeout` for `pidfd` to become readable (the process ended). True when it did.
bool wait_readable(int pidfd, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd p{pidfd, POLLIN, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::max<int64_t>(left.count(), 0)));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) return false;
  }
}

}  // namespace

std::string ExitStatus::str() const {
  if (!signaled) return "exited with status " + std::to_string(value);
  return "killed by signal " + std::to_string(value) + " (" + ::strsignal(value) + ")";
}

Child::Child(Child&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      pidfd_(std::move(other.pidfd_)),
      reaped_(std::exchange(other.reaped_, false)),
      status_(other.status_) {}

Child& Child::operator=(Child&& other) noexcept {
  if (this != &other) {
    Child old(std::move(*this));
    pid_ = std::exchange(other.pid_, -1);
    pidfd_ = std::move(other.pidfd_);
    reaped_ = std::exchange(other.reaped_, false);
    status_ = other.status_;
  }
  return *this;
}

Child::~Child() {
  if (pid_ < 0 || reaped_) return;
  (void)signal(SIGKILL);
  (void)reap(true);
}

Status Child::signal(int sig) {
  if (reaped_) return invalid_argument("process " + std::to_string(pid_) + " was already reaped");
  if (pidfd_send_signal(pidfd_.get(), sig) != 0 && errno != ESRCH) {
    return internal_error("signalling process " + std::to_string(pid_) + ": " +
                          std::strerror(errno));
  }
  return Status::ok();
}

Result<std::optional<ExitStatus>> Child::reap(bool block) {
  if (reaped_) return std::optional<ExitStatus>(status_);
  for (;;) {
    siginfo_t info{};
    const int flags = WEXITED | (block ? 0 : WNOHANG);
    if (::waitid(P_PIDFD, static_cast<id_t>(pidfd_.get()), &info, flags) != 0) {
      if (errno == EINTR) continue;
      return internal_error("waiting for process " + std::to_string(pid_) + ": " +
                            std::strerror(errno));
    }
    if (info.si_pid == 0) return std::optional<ExitStatus>();
    reaped_ = true;
    status_ = from_siginfo(info);
    return std::optional<ExitStatus>(status_);
  }
}

Result<std::optional<ExitStatus>> Child::try_wait() {
  return reap(false);
}

Result<ExitStatus> Child::wait() {
  NM_ASSIGN_OR_RETURN(auto status, reap(true));
  return *status;
}

Result<ExitStatus> Child::terminate(std::chrono::milliseconds grace) {
  if (reaped_) return status_;
  NM_RETURN_IF_ERROR(signal(SIGTERM));
  if (!wait_readable(pidfd_.get(), grace)) NM_RETURN_IF_ERROR(signal(SIGKILL));
  return wait();
}

Result<Child> spawn_process(const SpawnOptions& options) {
  if (options.argv.empty()) return invalid_argument("spawning a process: empty argv");
  const std::string& program = options.argv[0];
  if (program.empty() || program[0] != '/') {
    return invalid_argument("spawning '" + program + "': the program must be an absolute path");
  }

  UniqueFd netns;
  if (!options.netns_path.empty()) {
    netns = UniqueFd(::open(options.netns_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!netns.valid()) {
      return unavailable_errno(errno, "opening network namespace '" + options.netns_path + "'");
    }
  }
  UniqueFd devnull = above_stdio(UniqueFd(::open("/dev/null", O_RDWR | O_CLOEXEC)));
  if (!devnull.valid()) return internal_error("opening /dev/null: " + std::string(strerror(errno)));
  std::array<int, 2> pipe_fds{};
  if (::pipe2(pipe_fds.data(), O_CLOEXEC) != 0) {
    return internal_error("creating a pipe: " + std::string(std::strerror(errno)));
  }
  UniqueFd report_read(pipe_fds[0]);
  UniqueFd report_write = above_stdio(UniqueFd(pipe_fds[1]));
  if (!report_write.valid()) {
    return internal_error("creating a pipe: " + std::string(std::strerror(errno)));
  }

  const std::vector<char*> argv = c_strings(options.argv);
  const std::vector<char*> envp = c_strings(options.env);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return internal_error("fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    run_child(parent, netns.get(), devnull.get(), options.output_fd, report_write.get(),
              argv.data(), envp.data());
  }
  report_write = UniqueFd();

  // The child is ours and unreaped, so its pid cannot be reused before pidfd_open.
  UniqueFd pidfd(pidfd_open(pid));
  if (!pidfd.valid()) {
    const int err = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return internal_error("pidfd_open for process " + std::to_string(pid) + ": " +
                          std::strerror(err));
  }
  Child child(pid, std::move(pidfd));

  ChildFailure failure{};
  ssize_t n = 0;
  do {
    n = ::read(report_read.get(), &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  if (n == 0) return child;
  (void)child.wait();
  if (n != static_cast<ssize_t>(sizeof failure)) {
    return internal_error("spawning '" + program + "': the child died before execve");
  }
  if (failure.step == Step::kSetns) {
    return unavailable_errno(failure.err,
                             "entering network namespace '" + options.netns_path + "'");
  }
  return unavailable_errno(failure.err, "executing '" + program + "'");
}

Result<UniqueFd> open_pidfd(pid_t pid) {
  UniqueFd fd(pidfd_open(pid));
  if (!fd.valid()) {
    if (errno == ESRCH) return not_found("process " + std::to_string(pid) + " does not exist");
    return internal_error("pidfd_open for process " + std::to_string(pid) + ": " +
                          std::strerror(errno));
  }
  return fd;
}

Status terminate_pidfd(int pidfd, std::chrono::milliseconds grace) {
  const auto send = [pidfd](int sig) -> Status {
    if (pidfd_send_signal(pidfd, sig) != 0 && errno != ESRCH) {
      return internal_error("signalling a process: " + std::string(std::strerror(errno)));
    }
    return Status::ok();
  };
  NM_RETURN_IF_ERROR(send(SIGTERM));
  if (wait_readable(pidfd, grace)) return Status::ok();
  NM_RETURN_IF_ERROR(send(SIGKILL));
  if (!wait_readable(pidfd, std::chrono::seconds(5))) {
    return internal_error("a process did not end 5s after SIGKILL");
  }
  return Status::ok();
}

}  // namespace nm::network
