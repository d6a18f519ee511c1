// NetlinkLinkMonitor against the kernel, inside the test binary's private network namespace
// (netns_main.cc). iproute2 and SIOCSIFFLAGS change links behind the monitor's back; the monitor
// must hear of it through its fd alone, within 1 s. Every test starts from a namespace holding the
// loopback (up) and the veth pair "up0" (watched, stands for the uplink) / "up0p" (its peer, the
// "switch"), both up with carrier; TearDown removes every link but the loopback. The test kernel
// has no dummy driver: veth pairs stand in wherever a plain link is needed.
#include "nm/network/link_monitor.h"

#include <gtest/gtest.h>
#include <net/if.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "shell.h"

namespace nm::network {
namespace {

using Clock = std::chrono::steady_clock;
using system_test::CommandResult;
using system_test::contains;
using system_test::must;
using system_test::sh;

constexpr auto kDeadline = std::chrono::milliseconds(1000);

// Waits (bounded) until `ip link show` says the link's operational state is UP: the kernel's link
// watch sets it asynchronously after "ip link set up", and tests start from a settled state.
void settle_up(const std::string& name) {
  for (int i = 0; i < 100; ++i) {
    if (contains(sh("ip link show " + name).output, "state UP")) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ADD_FAILURE() << name << " never reached state UP: " << sh("ip link show " + name).output;
}

// Sets or clears IFF_UP with one ioctl: no process start between the fault and the clock.
void set_admin_up(const std::string& name, bool up) {
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  ifreq req{};
  std::strncpy(req.ifr_name, name.c_str(), IFNAMSIZ - 1);
  const bool got = ::ioctl(fd, SIOCGIFFLAGS, &req) == 0;
  if (got) {
    req.ifr_flags = static_cast<short>(up ? (req.ifr_flags | IFF_UP) : (req.ifr_flags & ~IFF_UP));
  }
  const bool set = got && ::ioctl(fd, SIOCSIFFLAGS, &req) == 0;
  const int err = errno;
  ::close(fd);
  ASSERT_TRUE(set) << name << ": " << std::strerror(err);
}

// What the monitor says of a name no link holds.
LinkStatus absent(const std::string& name) {
  LinkStatus out;
  out.name = name;
  return out;
}

struct Arrival {
  LinkStatus status;
  Clock::time_point at;  // when read_changes() returned it
};

long micros_between(Clock::time_point from, Clock::time_point to) {
  return static_cast<long>(
      std::chrono::duration_cast<std::chrono::microseconds>(to - from).count());
}

class LinkMonitorTest : public testing::Test {
 protected:
  void SetUp() override {
    must("ip link set lo up");
    must("ip link add up0 type veth peer name up0p && ip link set up0p up && ip link set up0 up");
    settle_up("up0");
    create({"up0", "lo"});
  }

  void TearDown() override {
    monitor_.reset();
    const std::string links = sh("ip -o link show | cut -d: -f2 | cut -d@ -f1").output;
    std::istringstream in(links);
    for (std::string name; in >> name;) {
      if (name != "lo") sh("ip link del " + name);  // a veth's peer goes with it: errors ignored
    }
  }

  void create(const std::vector<std::string>& names) {
    auto monitor = NetlinkLinkMonitor::create(names);
    ASSERT_TRUE(monitor.is_ok()) << monitor.status().to_string();
    monitor_ = std::move(monitor).value();
  }

  // Everything read_changes() returns for `deadline` or until `done` holds for a returned status,
  // waiting on the fd only (never calling read_changes() before poll() says it is readable).
  std::vector<Arrival> collect(const std::function<bool(const LinkStatus&)>& done,
                               std::chrono::milliseconds deadline = kDeadline) {
    std::vector<Arrival> out;
    const Clock::time_point start = Clock::now();
    const Clock::time_point end = start + deadline;
    for (Clock::time_point now = start; now < end; now = Clock::now()) {
      pollfd p{.fd = monitor_->fd(), .events = POLLIN, .revents = 0};
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - now);
      const int ready = ::poll(&p, 1, static_cast<int>(left.count()) + 1);
      if (ready <= 0) break;
      auto changes = monitor_->read_changes();
      const Clock::time_point at = Clock::now();
      EXPECT_TRUE(changes.is_ok()) << changes.status().to_string();
      if (!changes.is_ok()) break;
      bool finished = false;
      for (const LinkStatus& s : *changes) {
        out.push_back({s, at});
        finished = finished || done(s);
      }
      if (finished) break;
    }
    return out;
  }

  // The first status of `name` satisfying `want` within the deadline.
  std::optional<Arrival> wait_for(const std::string& name,
                                  const std::function<bool(const LinkStatus&)>& want) {
    const auto match = [&](const LinkStatus& s) { return s.name == name && want(s); };
    for (const Arrival& a : collect(match)) {
      if (match(a.status)) return a;
    }
    return std::nullopt;
  }

  // Every status read_changes() returns within `quiet`.
  std::vector<Arrival> changes_within(std::chrono::milliseconds quiet) {
    return collect([](const LinkStatus&) { return false; }, quiet);
  }

  LinkStatus query(const std::string& name) {
    auto status = monitor_->query(name);
    EXPECT_TRUE(status.is_ok()) << status.status().to_string();
    return status.is_ok() ? *status : LinkStatus{};
  }

  static bool no_carrier(const LinkStatus& s) { return s.exists && !s.carrier; }
  static bool has_carrier(const LinkStatus& s) { return s.exists && s.carrier; }

  std::unique_ptr<NetlinkLinkMonitor> monitor_;
};

TEST_F(LinkMonitorTest, QueryReportsTheCurrentStateAndNothingIsPendingAtStart) {
  const LinkStatus up0 = query("up0");
  EXPECT_TRUE(up0.exists);
  EXPECT_EQ(up0.name, "up0");
  EXPECT_EQ(up0.ifindex, static_cast<int>(if_nametoindex("up0")));
  EXPECT_TRUE(up0.admin_up);
  EXPECT_TRUE(up0.carrier);
  EXPECT_EQ(up0.oper_state, "up");

  // The loopback's operational state is "unknown"; being up with a lower layer, it has carrier.
  const LinkStatus lo = query("lo");
  EXPECT_TRUE(lo.exists);
  EXPECT_EQ(lo.oper_state, "unknown");
  EXPECT_TRUE(lo.admin_up);
  EXPECT_TRUE(lo.carrier);

  EXPECT_TRUE(changes_within(std::chrono::milliseconds(100)).empty());
}

TEST_F(LinkMonitorTest, QueryOfAMissingOrBadNameSaysSo) {
  const LinkStatus missing = query("nope0");
  EXPECT_EQ(missing.name, "nope0");
  EXPECT_FALSE(missing.exists);
  EXPECT_EQ(missing.ifindex, 0);
  EXPECT_FALSE(missing.carrier);
  EXPECT_EQ(missing.oper_state, "");

  EXPECT_EQ(monitor_->query("").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(monitor_->query("much-too-long-name0").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(monitor_->query("a/b").status().code(), Code::kInvalidArgument);
  const auto bad = NetlinkLinkMonitor::create({"up0", "bad name"});
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
  EXPECT_TRUE(contains(bad.status().message(), "'bad name'")) << bad.status().message();
}

TEST_F(LinkMonitorTest, CarrierLossAndReturnArriveWithinOneSecond) {
  constexpr int kRounds = 20;
  std::vector<long> down_us;
  std::vector<long> up_us;
  for (int round = 0; round < kRounds; ++round) {
    const Clock::time_point fault = Clock::now();
    set_admin_up("up0p", false);
    const std::optional<Arrival> lost = wait_for("up0", no_carrier);
    ASSERT_TRUE(lost.has_value()) << "round " << round << ": no carrier loss within 1 s";
    EXPECT_TRUE(lost->status.admin_up);
    EXPECT_EQ(lost->status.oper_state, "lowerlayerdown");
    down_us.push_back(micros_between(fault, lost->at));
    EXPECT_LT(down_us.back(), 1'000'000);

    const Clock::time_point repair = Clock::now();
    set_admin_up("up0p", true);
    const std::optional<Arrival> back = wait_for("up0", has_carrier);
    ASSERT_TRUE(back.has_value()) << "round " << round << ": no carrier within 1 s";
    EXPECT_EQ(back->status.oper_state, "up");
    up_us.push_back(micros_between(repair, back->at));
    EXPECT_LT(up_us.back(), 1'000'000);
  }
  std::sort(down_us.begin(), down_us.end());
  std::sort(up_us.begin(), up_us.end());
  std::printf(
      "fault (SIOCSIFFLAGS on the peer) to read_changes(), %d rounds: carrier loss median "
      "%ld us, max %ld us; carrier return median %ld us, max %ld us\n",
      kRounds, down_us[kRounds / 2], down_us.back(), up_us[kRounds / 2], up_us.back());
  RecordProperty("carrier_loss_max_us", std::to_string(down_us.back()));
  RecordProperty("carrier_return_max_us", std::to_string(up_us.back()));
}

TEST_F(LinkMonitorTest, AdminDownAndUpAreReported) {
  const Clock::time_point start = Clock::now();
  must("ip link set up0 down");
  const std::optional<Arrival> down =
      wait_for("up0", [](const LinkStatus& s) { return !s.admin_up; });
  ASSERT_TRUE(down.has_value());
  EXPECT_TRUE(down->status.exists);
  EXPECT_FALSE(down->status.carrier);
  EXPECT_EQ(down->status.oper_state, "down");
  std::printf("'ip link set up0 down' (process start included) to read_changes(): %ld us\n",
              micros_between(start, down->at));

  must("ip link set up0 up");
  const std::optional<Arrival> up = wait_for("up0", has_carrier);
  ASSERT_TRUE(up.has_value());
  EXPECT_TRUE(up->status.admin_up);
  EXPECT_EQ(up->status.oper_state, "up");
}

TEST_F(LinkMonitorTest, LoopbackDownLosesCarrier) {
  must("ip link set lo down");
  const std::optional<Arrival> down =
      wait_for("lo", [](const LinkStatus& s) { return !s.admin_up; });
  ASSERT_TRUE(down.has_value());
  EXPECT_FALSE(down->status.carrier);
  must("ip link set lo up");
  const std::optional<Arrival> up = wait_for("lo", has_carrier);
  ASSERT_TRUE(up.has_value());
  EXPECT_EQ(up->status.oper_state, "unknown");
}

TEST_F(LinkMonitorTest, DeletedThenRecreatedLinkIsReportedAbsentThenPresent) {
  const int old_index = query("up0").ifindex;
  must("ip link del up0");
  const std::optional<Arrival> gone =
      wait_for("up0", [](const LinkStatus& s) { return !s.exists; });
  ASSERT_TRUE(gone.has_value());
  EXPECT_EQ(gone->status, absent("up0"));

  must("ip link add up0 type veth peer name up0p && ip link set up0p up && ip link set up0 up");
  const std::optional<Arrival> back = wait_for("up0", has_carrier);
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(back->status.admin_up);
  EXPECT_NE(back->status.ifindex, old_index);
  EXPECT_EQ(back->status.ifindex, static_cast<int>(if_nametoindex("up0")));

  // The old link's index means nothing any more: the new link going down is still reported.
  must("ip link set up0p down");
  EXPECT_TRUE(wait_for("up0", no_carrier).has_value());
}

TEST_F(LinkMonitorTest, RenamedLinkLeavesItsNameAndTakesTheNewOne) {
  create({"up0", "ren1"});
  EXPECT_FALSE(query("ren1").exists);
  const int index = query("up0").ifindex;

  // Renaming needs the link down; only the watched names are reported.
  must("ip link set up0 down && ip link set up0 name tmp0");
  const std::vector<Arrival> renamed = collect([](const LinkStatus& s) { return !s.exists; });
  ASSERT_FALSE(renamed.empty());
  EXPECT_EQ(renamed.back().status, absent("up0"));
  for (const Arrival& a : renamed) EXPECT_EQ(a.status.name, "up0");

  must("ip link set tmp0 name ren1 && ip link set ren1 up");
  const std::optional<Arrival> taken = wait_for("ren1", has_carrier);
  ASSERT_TRUE(taken.has_value());
  EXPECT_EQ(taken->status.ifindex, index);
  EXPECT_TRUE(taken->status.admin_up);

  must("ip link set ren1 down && ip link set ren1 name up0 && ip link set up0 up");
  std::optional<Arrival> ren1_gone;
  std::optional<Arrival> up0_back;
  for (const Arrival& a : collect([&](const LinkStatus& s) { return s.name == "up0" && s.carrier; },
                                  std::chrono::milliseconds(2000))) {
    if (a.status.name == "ren1" && !a.status.exists) ren1_gone = a;
    if (a.status.name == "up0" && a.status.carrier) up0_back = a;
  }
  ASSERT_TRUE(ren1_gone.has_value());
  ASSERT_TRUE(up0_back.has_value());
  EXPECT_EQ(up0_back->status.ifindex, index);
}

TEST_F(LinkMonitorTest, ChangesOfOtherLinksAndNeutralChangesProduceNothing) {
  must("ip link add oth0 type veth peer name oth0p && ip link set oth0p up && ip link set oth0 up");
  must("ip link set oth0 mtu 1400 && ip link set oth0p down && ip link set oth0 down");
  must("ip link del oth0");
  // Changes of the watched link that leave its status as it was: MTU, a bridge joined and left
  // (the bridge's own "port deleted" message is not the link's deletion).
  must("ip link set up0 mtu 1400 && ip link add br0 type bridge");
  must("ip link set up0 master br0 && ip link set up0 nomaster");
  EXPECT_TRUE(changes_within(std::chrono::milliseconds(300)).empty());

  // The fd still works: a real change comes through, and alone.
  must("ip link set up0 down");
  const std::vector<Arrival> after = collect([](const LinkStatus& s) { return !s.admin_up; });
  ASSERT_EQ(after.size(), 1U);
  EXPECT_EQ(after[0].status.name, "up0");
  EXPECT_TRUE(after[0].status.exists);
}

TEST_F(LinkMonitorTest, RepeatedChangesBetweenReadsYieldOneLatestStatus) {
  must("ip link set up0 down && ip link set up0 up && ip link set up0 down");
  const std::vector<Arrival> changes =
      collect([](const LinkStatus&) { return false; }, std::chrono::milliseconds(300));
  ASSERT_FALSE(changes.empty());
  EXPECT_FALSE(changes.back().status.admin_up);
  EXPECT_EQ(changes.size(), 1U);  // three changes, one read, one (the latest) status
  const LinkStatus now = query("up0");
  EXPECT_EQ(changes.back().status, now);
}

TEST_F(LinkMonitorTest, OverrunRequeriesAndReportsEveryWatchedLink) {
  // The smallest receive buffer the kernel allows holds a message or two: a burst overflows it.
  const int tiny = 1;
  ASSERT_EQ(::setsockopt(monitor_->fd(), SOL_SOCKET, SO_RCVBUF, &tiny, sizeof(tiny)), 0);
  must("ip link add oth0 type veth peer name oth0p");
  must("for m in $(seq 1300 1400); do ip link set oth0 mtu $m; done");
  must("ip link set up0 down");

  auto changes = monitor_->read_changes();
  ASSERT_TRUE(changes.is_ok()) << changes.status().to_string();
  // The loopback did not change: it is there only because every watched link was queried again.
  ASSERT_EQ(changes->size(), 2U);
  EXPECT_EQ((*changes)[0].name, "up0");
  EXPECT_TRUE((*changes)[0].exists);
  EXPECT_FALSE((*changes)[0].admin_up);
  EXPECT_EQ((*changes)[1], query("lo"));

  // Back to normal: the next change is reported alone.
  must("ip link set up0 up");
  const std::optional<Arrival> up = wait_for("up0", has_carrier);
  ASSERT_TRUE(up.has_value());
}

}  // namespace
}  // namespace nm::network
