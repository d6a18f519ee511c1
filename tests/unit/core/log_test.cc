#include "nm/core/log.h"

#include <gtest/gtest.h>
#include <spdlog/details/log_msg.h>
#include <syslog.h>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <string>
#include <thread>
#include <vector>

namespace nm {
namespace {

static_assert(is_valid_log_field_name("VM_ID"));
static_assert(is_valid_log_field_name("A1_B2"));
static_assert(!is_valid_log_field_name(""));
static_assert(!is_valid_log_field_name("vm_id"));
static_assert(!is_valid_log_field_name("_VM"));
static_assert(!is_valid_log_field_name("1VM"));
static_assert(!is_valid_log_field_name("VM-ID"));
static_assert(!is_valid_log_field_name("NM_VM_ID"));
static_assert(is_valid_log_field_name(
    std::string_view("ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHI")));
static_assert(!is_valid_log_field_name(
    std::string_view("ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ")));

spdlog::details::log_msg message(spdlog::level::level_enum level = spdlog::level::warn) {
  return {"service", level, "creating domain"};
}

// The NM_* fields of a journal record, in order.
std::vector<std::string> nm_fields(const std::vector<std::string>& record) {
  std::vector<std::string> out;
  for (const auto& f : record) {
    if (f.starts_with("NM_") && !f.starts_with("NM_COMPONENT=")) out.push_back(f);
  }
  return out;
}

std::vector<std::string> current_nm_fields() {
  return nm_fields(journal_fields(message(), LogFields::current()));
}

using Fields = std::vector<std::string>;
using std::string_literals::operator""s;

TEST(JournalFields, CarryMessagePriorityIdentifierAndComponent) {
  const auto record = journal_fields(message(), LogFields::current());
  EXPECT_EQ(record, (Fields{"MESSAGE=service: creating domain", "PRIORITY=4",
                            "SYSLOG_IDENTIFIER=nodemanagerd", "NM_COMPONENT=service"}));
}

TEST(JournalFields, IncludeTheSourceLocationOnlyWhenTheRecordHasOne) {
  const spdlog::details::log_msg located(spdlog::source_loc{"vm.cc", 42, "create_vm"}, "service",
                                         spdlog::level::info, "x");
  const auto record = journal_fields(located, LogFields{});
  const Fields tail(record.end() - 3, record.end());
  EXPECT_EQ(tail, (Fields{"CODE_FILE=vm.cc", "CODE_LINE=42", "CODE_FUNC=create_vm"}));

  for (const auto& f : journal_fields(message(), LogFields{})) {
    EXPECT_FALSE(f.starts_with("CODE_")) << f;
  }
}

TEST(JournalFields, MapLevelsToSyslogPriorities) {
  EXPECT_EQ(journal_priority(spdlog::level::trace), LOG_DEBUG);
  EXPECT_EQ(journal_priority(spdlog::level::debug), LOG_DEBUG);
  EXPECT_EQ(journal_priority(spdlog::level::info), LOG_INFO);
  EXPECT_EQ(journal_priority(spdlog::level::warn), LOG_WARNING);
  EXPECT_EQ(journal_priority(spdlog::level::err), LOG_ERR);
  EXPECT_EQ(journal_priority(spdlog::level::critical), LOG_CRIT);
  EXPECT_EQ(journal_fields(message(spdlog::level::err), LogFields{})[1], "PRIORITY=3");
  EXPECT_EQ(journal_fields(message(spdlog::level::debug), LogFields{})[1], "PRIORITY=7");
}

TEST(ScopedLogFields, AddJournalFieldsForTheirLifetime) {
  EXPECT_TRUE(LogFields::current().empty());
  {
    const ScopedLogFields f({{log_field::kVmId, "3f1c"}, {"TENANT", "acme"}, {"REQUEST_ID", "r7"}});
    EXPECT_EQ(current_nm_fields(), (Fields{"NM_VM_ID=3f1c", "NM_TENANT=acme", "NM_REQUEST_ID=r7"}));
  }
  EXPECT_TRUE(LogFields::current().empty());
  EXPECT_EQ(current_nm_fields(), Fields{});
}

TEST(ScopedLogFields, NestOverrideAndRestore) {
  const ScopedLogFields outer({{log_field::kVmId, "vm-a"}, {log_field::kTenant, "acme"}});
  {
    const ScopedLogFields inner({{log_field::kVmId, "vm-b"}, {log_field::kJobId, "j1"}});
    EXPECT_EQ(current_nm_fields(), (Fields{"NM_VM_ID=vm-b", "NM_TENANT=acme", "NM_JOB_ID=j1"}));
    EXPECT_EQ(LogFields::current().get("VM_ID"), "vm-b");
  }
  EXPECT_EQ(current_nm_fields(), (Fields{"NM_VM_ID=vm-a", "NM_TENANT=acme"}));
  EXPECT_EQ(LogFields::current().get("JOB_ID"), "");
}

TEST(ScopedLogFields, SkipEmptyValuesWithoutClearingOuterOnes) {
  const ScopedLogFields outer({{log_field::kVmId, "vm-a"}, {log_field::kRequestId, ""}});
  EXPECT_EQ(current_nm_fields(), (Fields{"NM_VM_ID=vm-a"}));
  {
    const ScopedLogFields inner({{log_field::kVmId, ""}, {log_field::kImage, ""}});
    EXPECT_EQ(current_nm_fields(), (Fields{"NM_VM_ID=vm-a"}));
  }
  const ScopedLogFields none({{log_field::kNetwork, ""}});
  EXPECT_EQ(LogFields::current().entries().size(), 1U);
}

TEST(ScopedLogFields, AreInvisibleToOtherThreads) {
  const ScopedLogFields f({{log_field::kVmId, "vm-a"}});
  Fields seen_by_other{"not run"};
  std::thread t([&] {
    seen_by_other = current_nm_fields();
    const ScopedLogFields own({{log_field::kTenant, "other"}});
  });
  t.join();
  EXPECT_EQ(seen_by_other, Fields{});
  EXPECT_EQ(current_nm_fields(), (Fields{"NM_VM_ID=vm-a"}));
}

TEST(ScopedLogFields, CarryASnapshotToAnotherThread) {
  LogFields snapshot;
  {
    const ScopedLogFields f({{log_field::kJobId, "j9"}, {log_field::kVmId, "vm-a"}});
    snapshot = LogFields::current();
  }
  Fields seen_by_worker;
  std::thread t([&] {
    const ScopedLogFields f(snapshot);
    const ScopedLogFields more({{log_field::kImage, "sha256:ab"}});
    seen_by_worker = current_nm_fields();
  });
  t.join();
  EXPECT_EQ(seen_by_worker, (Fields{"NM_JOB_ID=j9", "NM_VM_ID=vm-a", "NM_IMAGE=sha256:ab"}));
  EXPECT_TRUE(LogFields::current().empty());
}

TEST(JournalFields, PassValuesWithNewlinesAndOtherBytesUnchanged) {
  const std::string odd = "a\nb=c\x01\0 \xff"s;
  ASSERT_EQ(odd.size(), 9U);
  const ScopedLogFields f({{log_field::kTenant, odd}});
  EXPECT_EQ(current_nm_fields(), Fields{"NM_TENANT=" + odd});
}

TEST(StderrSuffix, UsesShortKeysOnlyWhenFieldsAreSet) {
  EXPECT_EQ(stderr_fields_suffix(LogFields::current()), "");
  const ScopedLogFields f(
      {{log_field::kVmId, "3f1c"}, {log_field::kTenant, "acme"}, {log_field::kRequestId, "r7"}});
  EXPECT_EQ(stderr_fields_suffix(LogFields::current()), " [vm=3f1c tenant=acme request=r7]");
  EXPECT_EQ(log_field_short_key("JOB_ID"), "job");
  EXPECT_EQ(log_field_short_key("NETWORK"), "network");
  EXPECT_EQ(log_field_short_key("IMAGE"), "image");
  EXPECT_EQ(log_field_short_key("ID"), "id");
}

TEST(StderrSuffix, KeepsTheRecordOnOneLine) {
  const ScopedLogFields f({{log_field::kTenant, "a\nb\\c\td\x1b"}});
  EXPECT_EQ(stderr_fields_suffix(LogFields::current()), " [tenant=a\\nb\\\\c\\td\\x1b]");
}

std::string format_stderr(const spdlog::details::log_msg& msg) {
  spdlog::memory_buf_t buf;
  make_stderr_formatter()->format(msg, buf);
  return {buf.data(), buf.size()};
}

TEST(StderrFormatter, AppendsTheThreadsFieldsToTheUnchangedLine) {
  const std::regex line(
      R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} warning service: creating domain)");
  // One record formatted twice (with and without fields): the same timestamp both times.
  const spdlog::details::log_msg msg = message();
  const std::string plain = format_stderr(msg);
  ASSERT_TRUE(plain.ends_with("\n")) << plain;
  EXPECT_TRUE(std::regex_match(plain.substr(0, plain.size() - 1), line)) << plain;

  const ScopedLogFields f({{log_field::kVmId, "3f1c"}, {log_field::kRequestId, "r7"}});
  const std::string with_fields = format_stderr(msg);
  EXPECT_EQ(with_fields, plain.substr(0, plain.size() - 1) + " [vm=3f1c request=r7]\n");
}

TEST(Logger, WritesFieldsToStderrWhenNotUnderTheJournal) {
  if (std::filesystem::exists("/run/systemd/journal/socket")) {
    GTEST_SKIP() << "a journal is running: setup_logging(journal=true) would use it";
  }
  // journal=true without a journal socket falls back to stderr.
  ASSERT_TRUE(setup_logging("info", /*journal=*/true).is_ok());
  auto log = logger("logtest");
  testing::internal::CaptureStderr();
  {
    const ScopedLogFields f({{log_field::kVmId, "3f1c"}});
    log->info("started");
  }
  log->info("idle");
  log->debug("hidden");
  const std::string out = testing::internal::GetCapturedStderr();
  EXPECT_NE(out.find(" info logtest: started [vm=3f1c]\n"), std::string::npos) << out;
  EXPECT_NE(out.find(" info logtest: idle\n"), std::string::npos) << out;
  EXPECT_EQ(out.find("hidden"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 2) << out;
}

TEST(Logger, RejectsUnknownLevels) {
  const Status s = setup_logging("verbose", false);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("'verbose'"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace nm
