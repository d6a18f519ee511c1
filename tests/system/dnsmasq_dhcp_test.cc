// System tests of ProcessRunner and DnsmasqDhcp: real dnsmasq in a namespace joined to a bridge,
// real DHCP clients (busybox udhcpc) in namespaces of their own. Runs as root inside the private
// network and mount namespaces set up by netns_main.cc.
#include "nm/network/dnsmasq_dhcp.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nm/core/fs.h"
#include "nm/network/process_runner.h"

namespace nm::network {
namespace {

using std::chrono::milliseconds;

int sh(const std::string& command) {
  const int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

struct CommandOutput {
  int rc = -1;
  std::string out;
};

CommandOutput capture(const std::string& command) {
  CommandOutput result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 512> buf{};
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) result.out.append(buf.data(), n);
  const int rc = ::pclose(pipe);
  result.rc = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  return result;
}

bool alive(pid_t pid) {
  return ::kill(pid, 0) == 0;
}

SpawnOptions command(std::vector<std::string> argv, std::string netns_path = "") {
  SpawnOptions options;
  options.argv = std::move(argv);
  options.netns_path = std::move(netns_path);
  return options;
}

// Everything `child` writes to stdout/stderr until it exits.
std::string output_of(SpawnOptions options) {
  std::array<int, 2> fds{};
  if (::pipe2(fds.data(), O_CLOEXEC) != 0) return "pipe failed";
  UniqueFd read_end(fds[0]);
  UniqueFd write_end(fds[1]);
  options.output_fd = write_end.get();
  auto child = spawn_process(options);
  write_end = UniqueFd();
  if (!child.is_ok()) return child.status().to_string();
  std::string out;
  std::array<char, 512> buf{};
  ssize_t n = 0;
  while ((n = ::read(read_end.get(), buf.data(), buf.size())) > 0) {
    out.append(buf.data(), static_cast<size_t>(n));
  }
  (void)child->wait();
  return out;
}

// --- ProcessRunner ---------------------------------------------------------------------------

TEST(ProcessRunner, ReportsExitStatusAndSignal) {
  auto exits = spawn_process(command({"/bin/sh", "-c", "exit 3"}));
  ASSERT_TRUE(exits.is_ok()) << exits.status().to_string();
  auto status = exits->wait();
  ASSERT_TRUE(status.is_ok());
  EXPECT_EQ(*status, (ExitStatus{false, 3}));
  EXPECT_EQ(status->str(), "exited with status 3");

  auto killed = spawn_process(command({"/bin/sh", "-c", "kill -9 $$"}));
  ASSERT_TRUE(killed.is_ok());
  status = killed->wait();
  ASSERT_TRUE(status.is_ok());
  EXPECT_EQ(*status, (ExitStatus{true, SIGKILL}));
}

TEST(ProcessRunner, ExecFailureIsReportedWithErrno) {
  auto missing = spawn_process(command({"/nonexistent/prog", "--x"}));
  ASSERT_FALSE(missing.is_ok());
  EXPECT_EQ(missing.status().code(), Code::kUnavailable);
  EXPECT_EQ(missing.status().message(),
            "executing '/nonexistent/prog': " + std::string(std::strerror(ENOENT)));

  auto not_executable = spawn_process(command({"/etc/passwd"}));
  ASSERT_FALSE(not_executable.is_ok());
  EXPECT_EQ(not_executable.status().message(),
            "executing '/etc/passwd': " + std::string(std::strerror(EACCES)));

  auto relative = spawn_process(command({"sh", "-c", "true"}));
  EXPECT_EQ(relative.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(spawn_process(SpawnOptions{}).status().code(), Code::kInvalidArgument);
}

TEST(ProcessRunner, EntersTheGivenNetworkNamespace) {
  ASSERT_EQ(
      sh("ip netns add nmprobe && ip -n nmprobe link add nmprobe0 type veth peer name nmprobe1"),
      0);
  const std::string inside =
      output_of(command({"/bin/cat", "/proc/self/net/dev"}, "/run/netns/nmprobe"));
  const std::string outside = output_of(command({"/bin/cat", "/proc/self/net/dev"}));
  EXPECT_NE(inside.find("nmprobe0:"), std::string::npos) << inside;
  EXPECT_EQ(outside.find("nmprobe0:"), std::string::npos) << outside;

  auto bad = spawn_process(command({"/bin/true"}, "/run/netns/nosuch"));
  EXPECT_EQ(bad.status().code(), Code::kUnavailable);
  EXPECT_NE(bad.status().message().find("opening network namespace '/run/netns/nosuch'"),
            std::string::npos);
  (void)sh("ip netns del nmprobe");
}

TEST(ProcessRunner, ChildGetsOnlyItsEnvironmentStdioAndANewSession) {
  ASSERT_EQ(::setenv("NM_TEST_SECRET", "leak", 1), 0);
  const std::string marker =
      (std::filesystem::path(::testing::TempDir()) / "process_runner_inherited_fd")
          .lexically_normal()
          .string();
  UniqueFd inheritable(::open(marker.c_str(), O_RDWR | O_CREAT, 0600));  // no O_CLOEXEC on purpose
  ASSERT_TRUE(inheritable.valid());
  const std::string script =
      "env; readlink /proc/$$/fd/*; echo sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$";
  SpawnOptions options = command({"/bin/sh", "-c", script});
  options.env = {"PATH=/usr/bin:/bin", "ONLY=1"};
  const std::string out = output_of(options);
  EXPECT_NE(out.find("ONLY=1"), std::string::npos) << out;
  EXPECT_EQ(out.find("NM_TEST_SECRET"), std::string::npos) << out;
  EXPECT_NE(out.find("/dev/null"), std::string::npos) << out;  // stdin
  EXPECT_EQ(out.find(marker), std::string::npos) << out;
  const auto sid = out.find("sid=");
  ASSERT_NE(sid, std::string::npos) << out;
  std::string sid_value = out.substr(sid + 4, out.find(' ', sid) - sid - 4);
  EXPECT_NE(out.find("pid=" + sid_value), std::string::npos) << "not a session leader: " << out;
  ::unsetenv("NM_TEST_SECRET");
  ::unlink(marker.c_str());
}

TEST(ProcessRunner, TerminateEscalatesToSigkill) {
  std::array<int, 2> fds{};
  ASSERT_EQ(::pipe2(fds.data(), O_CLOEXEC), 0);
  UniqueFd ready(fds[0]);
  UniqueFd ready_write(fds[1]);
  SpawnOptions options =
      command({"/bin/sh", "-c", "trap '' TERM; echo ready; while :; do :; done"});
  options.output_fd = ready_write.get();
  auto stubborn = spawn_process(options);
  ASSERT_TRUE(stubborn.is_ok());
  ready_write = UniqueFd();
  std::array<char, 6> line{};
  ASSERT_EQ(::read(ready.get(), line.data(), line.size()), 6);  // SIGTERM is ignored from now on
  auto polite = spawn_process(command({"/bin/sleep", "30"}));
  ASSERT_TRUE(polite.is_ok());
  auto stubborn_end = stubborn->terminate(milliseconds(300));
  ASSERT_TRUE(stubborn_end.is_ok());
  EXPECT_EQ(*stubborn_end, (ExitStatus{true, SIGKILL}));
  auto polite_end = polite->terminate(milliseconds(5000));
  ASSERT_TRUE(polite_end.is_ok());
  EXPECT_EQ(*polite_end, (ExitStatus{true, SIGTERM}));
  EXPECT_FALSE(alive(stubborn->pid()));
}

// PR_SET_PDEATHSIG follows the spawning thread; the child also starts with an empty signal mask
// although that thread blocked SIGTERM.
TEST(ProcessRunner, ChildGetsSigtermWhenTheSpawningThreadExits) {
  std::optional<Child> child;
  std::thread spawner([&child] {
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &term, nullptr);
    auto spawned = spawn_process(command({"/bin/sleep", "10"}));
    if (spawned.is_ok()) child = std::move(spawned).value();
  });
  spawner.join();
  ASSERT_TRUE(child.has_value());
  auto end = child->wait();
  ASSERT_TRUE(end.is_ok());
  EXPECT_EQ(*end, (ExitStatus{true, SIGTERM}));
}

TEST(ProcessRunner, DestroyingAChildHandleKillsAndReapsIt) {
  pid_t pid = 0;
  {
    auto child = spawn_process(command({"/bin/sleep", "30"}));
    ASSERT_TRUE(child.is_ok());
    pid = child->pid();
    ASSERT_TRUE(alive(pid));
  }
  EXPECT_FALSE(alive(pid));  // neither running nor a zombie
}

// --- DnsmasqDhcp -----------------------------------------------------------------------------

constexpr const char* kKnownMac = "02:00:00:00:00:11";
constexpr const char* kSecondMac = "02:00:00:00:00:12";
constexpr const char* kUnknownMac = "02:00:00:00:00:99";

DhcpHost host(const char* mac, const char* ip, const char* name) {
  return {*MacAddress::parse(mac, "mac"), *Ipv4Address::parse(ip, "ip"), name};
}

// A bridge, a namespace "dhcpns" whose dhcp0 (10.9.0.2/24) is a veth into the bridge (what
// NetlinkLinks::ensure_dhcp_namespace makes), and client namespaces with veths on the bridge.
class DnsmasqDhcpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = std::filesystem::path(::testing::TempDir()) /
            ("dnsmasq_dhcp_test_" + std::to_string(::getpid()));
    std::filesystem::remove_all(base_);
    std::filesystem::create_directories(base_);
    ::chmod(base_.c_str(), 0755);
    options_.run_dir = (base_ / "run").string();
    script_ = (base_ / "udhcpc.sh").string();
    std::ofstream(script_) << "#!/bin/sh\n"
                              "[ \"$1\" = bound ] && echo \"ip=$ip mtu=$mtu router=$router.\"\n"
                              "exit 0\n";
    ::chmod(script_.c_str(), 0755);
    ASSERT_EQ(sh("ip link add nmbrtest type bridge && ip link set nmbrtest up"
                 " && ip netns add dhcpns && ip -n dhcpns link set lo up"
                 " && ip link add nmdhtest type veth peer name dhcp0 netns dhcpns"
                 " && ip link set nmdhtest master nmbrtest up"
                 " && ip -n dhcpns addr add 10.9.0.2/24 dev dhcp0"
                 " && ip -n dhcpns link set dhcp0 up"),
              0);
  }

  void TearDown() override {
    dhcp_.reset();
    // The veths go first, synchronously: a namespace is dismantled asynchronously, and a host
    // end left for a moment would make the next test's "ip link add" fail with "File exists".
    for (const auto& ns : clients_) {
      std::string command = "ip link del nmc" + ns;
      command += "; ip netns del " + ns;
      (void)sh(command);
    }
    (void)sh("ip link del nmdhtest; ip netns del dhcpns; ip link del nmbrtest");
    std::filesystem::remove_all(base_);
  }

  void add_client(const std::string& ns, const std::string& mac) {
    const std::string veth = "nmc" + ns;
    ASSERT_EQ(sh("ip netns add " + ns + " && ip link add " + veth +
                 " type veth peer name eth netns " + ns + " && ip link set " + veth +
                 " master nmbrtest up && ip -n " + ns + " link set eth address " + mac + " up"),
              0);
    clients_.push_back(ns);
  }

  // What udhcpc in `ns` was offered and acked ("ip=10.9.0.10 mtu=1450 router=."), or "" with no
  // lease.
  std::string lease(const std::string& ns) const {
    const auto r = capture("ip netns exec " + ns + " busybox udhcpc -f -n -q -t 3 -T 1 -i eth -s " +
                           script_ + " 2>/dev/null");
    if (r.rc != 0) return "";
    return r.out.substr(0, r.out.find('\n'));
  }

  static DhcpServerConfig config(std::vector<DhcpHost> hosts, uint32_t mtu = 1450) {
    DhcpServerConfig c;
    c.key = "net1";
    c.netns = "dhcpns";
    c.ifname = "dhcp0";
    c.subnet = *Ipv4Cidr::parse("10.9.0.0/24", "subnet");
    c.server = *Ipv4Address::parse("10.9.0.2", "server");
    c.mtu = mtu;
    c.hosts = std::move(hosts);
    return c;
  }

  void create() {
    auto created = DnsmasqDhcp::create(options_);
    ASSERT_TRUE(created.is_ok()) << created.status().to_string();
    dhcp_ = std::move(created).value();
  }

  std::string server_dir() const { return options_.run_dir + "/net1"; }

  // The names in the server's hosts directory, sorted.
  std::vector<std::string> host_files() const {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(server_dir() + "/hosts.d", ec)) {
      out.push_back(e.path().filename().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  pid_t server_pid() const {
    auto text = read_file(server_dir() + "/pid");
    return text.is_ok() ? std::atoi(text->c_str()) : -1;
  }

  std::filesystem::path base_;
  std::string script_;
  DnsmasqDhcp::Options options_;
  std::unique_ptr<DnsmasqDhcp> dhcp_;
  std::vector<std::string> clients_;
};

TEST_F(DnsmasqDhcpTest, KnownMacGetsExactlyItsFixedLeaseAndUnknownMacNothing) {
  add_client("cl1", kKnownMac);
  add_client("cl2", kUnknownMac);
  create();
  const Status ensured = dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")}));
  ASSERT_TRUE(ensured.is_ok()) << ensured.to_string();
  EXPECT_EQ(dhcp_->running(), std::vector<std::string>{"net1"});
  EXPECT_EQ(host_files(), std::vector<std::string>{"02-00-00-00-00-11"});
  EXPECT_EQ(*read_file(server_dir() + "/hosts.d/02-00-00-00-00-11"),
            "02:00:00:00:00:11,10.9.0.10,vm1\n");

  EXPECT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1450 router=.");
  EXPECT_EQ(lease("cl2"), "");

  // It serves as the unprivileged user, not as root.
  const auto status = read_file("/proc/" + std::to_string(server_pid()) + "/status");
  ASSERT_TRUE(status.is_ok());
  const auto uid = status->find("\nUid:\t");
  ASSERT_NE(uid, std::string::npos);
  EXPECT_NE(status->substr(uid + 6, 2), "0\t") << status->substr(uid, 30);
}

TEST_F(DnsmasqDhcpTest, EnsureIsIdempotentAndNewHostsAreReadWithoutRestart) {
  add_client("cl1", kKnownMac);
  add_client("cl2", kSecondMac);
  create();
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  const pid_t first = server_pid();
  ASSERT_GT(first, 0);
  EXPECT_EQ(lease("cl2"), "");

  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  EXPECT_EQ(server_pid(), first);
  const Status added = dhcp_->ensure(
      config({host(kSecondMac, "10.9.0.11", "vm2"), host(kKnownMac, "10.9.0.10", "vm1")}));
  ASSERT_TRUE(added.is_ok()) << added.to_string();
  EXPECT_EQ(server_pid(), first);
  EXPECT_TRUE(alive(first));
  EXPECT_EQ(lease("cl2"), "ip=10.9.0.11 mtu=1450 router=.");
  EXPECT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1450 router=.");
}

// add_host(): one lease for a running server, no restart; clashes and unknown servers refused.
TEST_F(DnsmasqDhcpTest, AddHostServesTheNewLeaseAtOnceWithoutRestart) {
  add_client("cl1", kKnownMac);
  add_client("cl2", kSecondMac);
  create();
  EXPECT_EQ(dhcp_->add_host("net1", host(kSecondMac, "10.9.0.11", "vm2")).code(), Code::kNotFound);
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  const pid_t first = server_pid();
  const Status added = dhcp_->add_host("net1", host(kSecondMac, "10.9.0.11", "vm2"));
  ASSERT_TRUE(added.is_ok()) << added.to_string();
  EXPECT_EQ(server_pid(), first);
  EXPECT_EQ(lease("cl2"), "ip=10.9.0.11 mtu=1450 router=.");
  // Again: a no-op. Another MAC on a taken address, or a taken MAC: refused.
  EXPECT_TRUE(dhcp_->add_host("net1", host(kSecondMac, "10.9.0.11", "vm2")).is_ok());
  EXPECT_EQ(dhcp_->add_host("net1", host("02:00:00:00:00:99", "10.9.0.11", "vm3")).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(dhcp_->add_host("net1", host(kKnownMac, "10.9.0.12", "vm1")).code(),
            Code::kInvalidArgument);
  // ensure() with the full list afterwards changes nothing.
  ASSERT_TRUE(dhcp_
                  ->ensure(config(
                      {host(kKnownMac, "10.9.0.10", "vm1"), host(kSecondMac, "10.9.0.11", "vm2")}))
                  .is_ok());
  EXPECT_EQ(server_pid(), first);
  EXPECT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1450 router=.");
}

// Removed and changed hosts take a SIGHUP (dnsmasq only adds hosts on its own).
TEST_F(DnsmasqDhcpTest, RemovedAndChangedHostsAreForgottenWithoutRestart) {
  add_client("cl1", kKnownMac);
  add_client("cl2", kSecondMac);
  create();
  ASSERT_TRUE(dhcp_
                  ->ensure(config(
                      {host(kKnownMac, "10.9.0.10", "vm1"), host(kSecondMac, "10.9.0.11", "vm2")}))
                  .is_ok());
  const pid_t first = server_pid();
  ASSERT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1450 router=.");

  const Status changed = dhcp_->ensure(config({host(kSecondMac, "10.9.0.12", "vm2")}));
  ASSERT_TRUE(changed.is_ok()) << changed.to_string();
  EXPECT_EQ(server_pid(), first);
  EXPECT_EQ(host_files(), std::vector<std::string>{"02-00-00-00-00-12"});
  EXPECT_EQ(lease("cl1"), "");
  EXPECT_EQ(lease("cl2"), "ip=10.9.0.12 mtu=1450 router=.");
}

// ensure() returns once dnsmasq has read a new host, so the very first DHCP request is answered:
// with dnsmasq stopped it waits; after reread_timeout it reports Unavailable, and the next
// ensure() of the same hosts makes dnsmasq reread them.
TEST_F(DnsmasqDhcpTest, EnsureWaitsUntilDnsmasqHasReadTheHosts) {
  add_client("cl1", kKnownMac);
  add_client("cl2", kSecondMac);
  options_.reread_timeout = milliseconds(3000);
  create();
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  const pid_t pid = server_pid();
  const auto both =
      config({host(kKnownMac, "10.9.0.10", "vm1"), host(kSecondMac, "10.9.0.11", "vm2")});

  ASSERT_EQ(::kill(pid, SIGSTOP), 0);
  std::promise<Status> done;
  auto result = done.get_future();
  std::thread caller([&] { done.set_value(dhcp_->ensure(both)); });
  EXPECT_EQ(result.wait_for(milliseconds(500)), std::future_status::timeout)
      << "ensure() returned while dnsmasq could not have read the new host";
  ASSERT_EQ(::kill(pid, SIGCONT), 0);
  ASSERT_EQ(result.wait_for(milliseconds(2000)), std::future_status::ready);
  caller.join();
  const Status added = result.get();
  EXPECT_TRUE(added.is_ok()) << added.to_string();
  // One try with no retry: answered only if dnsmasq already had the host.
  const auto once = capture("ip netns exec cl2 busybox udhcpc -f -n -q -t 1 -T 1 -i eth -s " +
                            script_ + " 2>/dev/null");
  EXPECT_EQ(once.out.substr(0, once.out.find('\n')), "ip=10.9.0.11 mtu=1450 router=.");

  const auto third =
      config({host(kKnownMac, "10.9.0.10", "vm1"), host(kSecondMac, "10.9.0.11", "vm2"),
              host("02:00:00:00:00:13", "10.9.0.13", "vm3")});
  ASSERT_EQ(::kill(pid, SIGSTOP), 0);
  const Status timed_out = dhcp_->ensure(third);
  ASSERT_EQ(::kill(pid, SIGCONT), 0);
  EXPECT_EQ(timed_out.code(), Code::kUnavailable);
  EXPECT_NE(timed_out.message().find("did not read its hosts within 3000ms"), std::string::npos)
      << timed_out.to_string();
  const Status retried = dhcp_->ensure(third);
  EXPECT_TRUE(retried.is_ok()) << retried.to_string();
  EXPECT_EQ(server_pid(), pid);
  EXPECT_EQ(host_files(), (std::vector<std::string>{"02-00-00-00-00-11", "02-00-00-00-00-12",
                                                    "02-00-00-00-00-13"}));
  EXPECT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1450 router=.");
}

TEST_F(DnsmasqDhcpTest, ChangingTheMtuRestartsTheServer) {
  add_client("cl1", kKnownMac);
  create();
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  const pid_t first = server_pid();
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")}, 1400)).is_ok());
  const pid_t second = server_pid();
  EXPECT_GT(second, 0);
  EXPECT_NE(second, first);
  EXPECT_FALSE(alive(first));
  EXPECT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1400 router=.");
}

TEST_F(DnsmasqDhcpTest, AKilledServerIsRestartedAndTheObserverTold) {
  add_client("cl1", kKnownMac);
  create();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<std::string, Status>> calls;
  dhcp_->set_observer([&](const std::string& key, const Status& what) {
    std::lock_guard lock(mu);
    calls.emplace_back(key, what);
    cv.notify_all();
  });
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  const pid_t first = server_pid();
  ASSERT_GT(first, 0);
  ASSERT_EQ(::kill(first, SIGKILL), 0);

  std::unique_lock lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(5), [&] { return !calls.empty(); }));
  EXPECT_EQ(calls[0].first, "net1");
  EXPECT_EQ(calls[0].second.code(), Code::kUnavailable);
  const std::string& message = calls[0].second.message();
  EXPECT_NE(message.find("killed by signal 9"), std::string::npos) << message;
  EXPECT_NE(message.find("restarted (pid"), std::string::npos) << message;
  lock.unlock();

  const pid_t second = server_pid();
  EXPECT_GT(second, 0);
  EXPECT_NE(second, first);
  EXPECT_TRUE(alive(second));
  EXPECT_EQ(dhcp_->running(), std::vector<std::string>{"net1"});
  EXPECT_EQ(lease("cl1"), "ip=10.9.0.10 mtu=1450 router=.");
}

TEST_F(DnsmasqDhcpTest, StopLeavesNoProcessAndNoFiles) {
  create();
  ASSERT_TRUE(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm1")})).is_ok());
  const pid_t pid = server_pid();
  ASSERT_TRUE(alive(pid));
  ASSERT_TRUE(dhcp_->stop("net1").is_ok());
  EXPECT_FALSE(alive(pid));
  EXPECT_FALSE(std::filesystem::exists(server_dir()));
  EXPECT_TRUE(dhcp_->running().empty());
  EXPECT_TRUE(dhcp_->stop("net1").is_ok());
}

TEST_F(DnsmasqDhcpTest, DestructionStopsTheServers) {
  create();
  ASSERT_TRUE(dhcp_->ensure(config({})).is_ok());
  const pid_t pid = server_pid();
  ASSERT_TRUE(alive(pid));
  dhcp_.reset();
  EXPECT_FALSE(alive(pid));
}

TEST_F(DnsmasqDhcpTest, AMissingBinaryIsAClearError) {
  options_.dnsmasq = "/nonexistent/dnsmasq";
  create();
  const Status s = dhcp_->ensure(config({}));
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_EQ(s.message(), "starting dnsmasq for 'net1': executing '/nonexistent/dnsmasq': " +
                             std::string(std::strerror(ENOENT)));
  EXPECT_TRUE(dhcp_->running().empty());
  EXPECT_FALSE(std::filesystem::exists(server_dir()));
}

TEST_F(DnsmasqDhcpTest, AServerThatCannotComeUpIsAnErrorAndNotKept) {
  create();
  DhcpServerConfig no_ns = config({});
  no_ns.netns = "nosuch";
  const Status missing_ns = dhcp_->ensure(no_ns);
  EXPECT_EQ(missing_ns.code(), Code::kUnavailable);
  EXPECT_NE(missing_ns.message().find("opening network namespace '/run/netns/nosuch'"),
            std::string::npos)
      << missing_ns.to_string();

  DhcpServerConfig no_if = config({});
  no_if.ifname = "nosuch0";
  const Status missing_if = dhcp_->ensure(no_if);
  EXPECT_EQ(missing_if.code(), Code::kUnavailable);
  EXPECT_NE(missing_if.message().find("during start-up"), std::string::npos)
      << missing_if.to_string();
  EXPECT_TRUE(dhcp_->running().empty());
}

TEST_F(DnsmasqDhcpTest, InvalidConfigsAreRefused) {
  create();
  DhcpServerConfig bad_key = config({});
  bad_key.key = "../etc";
  EXPECT_EQ(dhcp_->ensure(bad_key).code(), Code::kInvalidArgument);
  EXPECT_EQ(dhcp_->ensure(config({host(kKnownMac, "10.8.0.10", "vm1")})).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "vm,1")})).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(
      dhcp_->ensure(config({host(kKnownMac, "10.9.0.10", "a"), host(kKnownMac, "10.9.0.11", "b")}))
          .code(),
      Code::kInvalidArgument);
  EXPECT_EQ(dhcp_->ensure(config({host(kKnownMac, "10.9.0.2", "vm1")})).code(),
            Code::kInvalidArgument);
  EXPECT_TRUE(dhcp_->running().empty());
}

// A dnsmasq left by an earlier daemon (same run_dir; its --dhcp-hostsdir, or the single
// --dhcp-hostsfile of earlier versions) is replaced; a process that merely has its pid in a pid
// file there is not touched.
TEST_F(DnsmasqDhcpTest, ServersOfAnEarlierInstanceAreReplacedOthersLeftAlone) {
  const std::string old_dir = server_dir();
  const std::string legacy_dir = options_.run_dir + "/net3";
  const std::string other_dir = options_.run_dir + "/net2";
  std::filesystem::create_directories(old_dir + "/hosts.d");
  std::filesystem::create_directories(legacy_dir);
  std::filesystem::create_directories(other_dir);
  std::ofstream(legacy_dir + "/hosts") << "";
  auto old_server = spawn_process(
      command({"/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
               "--dhcp-hostsdir=" + old_dir + "/hosts.d", "--pid-file=" + old_dir + "/pid"},
              "/run/netns/dhcpns"));
  ASSERT_TRUE(old_server.is_ok()) << old_server.status().to_string();
  auto legacy_server = spawn_process(
      command({"/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
               "--dhcp-hostsfile=" + legacy_dir + "/hosts", "--pid-file=" + legacy_dir + "/pid"},
              "/run/netns/dhcpns"));
  ASSERT_TRUE(legacy_server.is_ok()) << legacy_server.status().to_string();
  auto bystander = spawn_process(command({"/bin/sleep", "30"}));
  ASSERT_TRUE(bystander.is_ok());
  ASSERT_TRUE(write_file_atomic(other_dir + "/pid", std::to_string(bystander->pid())).is_ok());
  ASSERT_TRUE(write_file_atomic(old_dir + "/pid", std::to_string(old_server->pid())).is_ok());
  ASSERT_TRUE(write_file_atomic(legacy_dir + "/pid", std::to_string(legacy_server->pid())).is_ok());
  for (Child* c : {&*old_server, &*legacy_server}) {
    auto running = c->try_wait();
    ASSERT_TRUE(running.is_ok() && !running->has_value()) << "an old dnsmasq did not stay up";
  }

  create();
  for (Child* c : {&*old_server, &*legacy_server}) {
    auto ended = c->try_wait();
    ASSERT_TRUE(ended.is_ok());
    EXPECT_TRUE(ended->has_value()) << "the earlier instance's dnsmasq still runs";
  }
  auto still = bystander->try_wait();
  ASSERT_TRUE(still.is_ok());
  EXPECT_FALSE(still->has_value()) << "an unrelated process was stopped";
  EXPECT_FALSE(std::filesystem::exists(old_dir));
  EXPECT_FALSE(std::filesystem::exists(legacy_dir));

  ASSERT_TRUE(dhcp_->ensure(config({})).is_ok());
  EXPECT_NE(server_pid(), old_server->pid());
}

}  // namespace
}  // namespace nm::network
