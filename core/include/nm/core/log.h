// Logging: one named spdlog logger per component ("service", "libvirt", "dbus", ...).
//
// Library code returns errors; the caller that decides what happens next logs once, with
// context. User-controlled strings are quoted with single quotes.
//
// Structured context: a thread may attach fields (VM id, tenant, request id, ...) to every record
// it logs while a ScopedLogFields is alive:
//
//   ScopedLogFields f({{log_field::kVmId, vm.str()}, {log_field::kRequestId, rid}});
//   logger("service")->info("creating domain");
//
// Under systemd each field goes to the journal as its own field (NM_VM_ID=..., so that
// `journalctl NM_VM_ID=...` finds every record about that VM); on stderr the fields are appended
// to the line as ` [vm=... request=...]`. Sinks read the fields of the thread that logs, so
// loggers must stay synchronous (no spdlog async loggers).
#pragma once

#include <spdlog/formatter.h>
#include <spdlog/spdlog.h>

#include <cstddef>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/status.h"

namespace nm {

// Configures every logger: stderr sink (or the journal when `journal` is true and the journal
// socket exists), at `level` ("trace", "debug", "info", "warn", "error", "critical", "off").
Status setup_logging(std::string_view level, bool journal);

// The logger for `component`, created on first use with the configured sinks. Thread-safe.
std::shared_ptr<spdlog::logger> logger(const std::string& component);

// ---------------------------------------------------------------------------------------------
// Structured log fields.

// True when `name` can follow "NM_" in a journal field name: 1..61 characters of [A-Z0-9_],
// starting with a letter (journal field names are [A-Z0-9_], at most 64 characters, and may not
// start with '_'), and not itself starting with "NM_".
constexpr bool is_valid_log_field_name(std::string_view name) {
  if (name.empty() || name.size() > 61) return false;
  if (name[0] < 'A' || name[0] > 'Z') return false;
  if (name.starts_with("NM_")) return false;
  for (const char c : name) {
    if ((c < 'A' || c > 'Z') && (c < '0' || c > '9') && c != '_') return false;
  }
  return true;
}

namespace log_internal {
// Deliberately not constexpr: reaching it from the consteval constructor below turns an invalid
// field name into a compile error. Never defined.
void invalid_log_field_name();
}  // namespace log_internal

// The name of a structured log field without its "NM_" prefix, e.g. "VM_ID" (journal field
// NM_VM_ID). Checked at compile time: only string literals (or other constants) that pass
// is_valid_log_field_name() compile. Trivially copyable; refers to static storage.
class LogFieldName {
 public:
  // Implicit so that {"VM_ID", value} reads well.
  consteval LogFieldName(const char* name) : name_(name) {
    if (!is_valid_log_field_name(name)) log_internal::invalid_log_field_name();
  }

  constexpr std::string_view str() const { return name_; }

 private:
  const char* name_;
};

// The fields the daemon uses. Call sites may define others with LogFieldName{"..."}.
namespace log_field {
inline constexpr LogFieldName kVmId{"VM_ID"};            // journal NM_VM_ID, stderr "vm"
inline constexpr LogFieldName kTenant{"TENANT"};         // NM_TENANT, "tenant"
inline constexpr LogFieldName kRequestId{"REQUEST_ID"};  // NM_REQUEST_ID, "request"
inline constexpr LogFieldName kJobId{"JOB_ID"};          // NM_JOB_ID, "job"
inline constexpr LogFieldName kNetwork{"NETWORK"};       // NM_NETWORK, "network"
inline constexpr LogFieldName kImage{"IMAGE"};           // NM_IMAGE, "image"
}  // namespace log_field

// One field to set: the value is copied when the scope is entered.
struct LogField {
  LogFieldName name;
  std::string_view value;
};

// A snapshot of structured fields: each name at most once, in the order it was first set on the
// thread. A value type; use current() to capture the calling thread's fields (e.g. before handing
// work to another thread, which then re-establishes them with ScopedLogFields(snapshot)).
class LogFields {
 public:
  struct Entry {
    std::string_view name;  // without "NM_"; static storage (from a LogFieldName)
    std::string value;      // never empty
  };

  LogFields() = default;

  // The effective fields of the calling thread: for a name set by several nested scopes, the
  // innermost value. Empty (and allocation-free) when no scope is active.
  static LogFields current();

  bool empty() const { return entries_.empty(); }
  const std::vector<Entry>& entries() const { return entries_; }

  // The value of `name` (without "NM_"), or "" when it is not set.
  std::string_view get(std::string_view name) const;

 private:
  friend class ScopedLogFields;
  std::vector<Entry> entries_;
};

// Adds fields to the calling thread's log context for its lifetime. Scopes nest: an inner scope
// adds fields and overrides outer values of the same name; its destructor restores exactly the
// previous context. Fields with an empty value are skipped (they neither set nor clear a name).
// Must be destroyed on the thread that created it, in reverse order of creation (as a local
// variable is). Costs one copy of each value; nothing when no scope is active.
class ScopedLogFields {
 public:
  explicit ScopedLogFields(std::initializer_list<LogField> fields);
  // Re-establishes a snapshot taken with LogFields::current(), typically on another thread.
  explicit ScopedLogFields(const LogFields& fields);
  ~ScopedLogFields();

  ScopedLogFields(const ScopedLogFields&) = delete;
  ScopedLogFields& operator=(const ScopedLogFields&) = delete;
  ScopedLogFields(ScopedLogFields&&) = delete;
  ScopedLogFields& operator=(ScopedLogFields&&) = delete;

 private:
  std::size_t saved_size_;
};

// ---------------------------------------------------------------------------------------------
// Record rendering, pure functions used by the sinks (exposed for tests).

// The syslog priority for a spdlog level: trace and debug -> 7 (LOG_DEBUG), info -> 6,
// warn -> 4, err -> 3, critical -> 2; anything else -> 6 (LOG_INFO).
int journal_priority(spdlog::level::level_enum level);

// The "FIELD=value" strings the journal sink sends for `msg` (one iovec each, so values may
// contain newlines and any other bytes): MESSAGE=<logger>: <payload>, PRIORITY,
// SYSLOG_IDENTIFIER=nodemanagerd, NM_COMPONENT=<logger>, then CODE_FILE, CODE_LINE and CODE_FUNC
// when the record carries a source location, then NM_<name>=<value> for each of `fields`.
std::vector<std::string> journal_fields(const spdlog::details::log_msg& msg,
                                        const LogFields& fields);

// The short stderr key for a field name: lowercase, with a trailing "_ID" dropped
// ("VM_ID" -> "vm", "REQUEST_ID" -> "request", "TENANT" -> "tenant").
std::string log_field_short_key(std::string_view name);

// The suffix the stderr sink appends to a line: "" when `fields` is empty, otherwise
// " [vm=<v> tenant=<v> ...]" in the order of `fields`. Control characters in values (a newline
// would break the line) are written as \n, \t or \xNN, and a backslash as "\\".
std::string stderr_fields_suffix(const LogFields& fields);

// The formatter of the stderr sink: "<time> <level> <logger>: <message>" followed by
// stderr_fields_suffix() of the logging thread's fields and a newline.
std::unique_ptr<spdlog::formatter> make_stderr_formatter();

}  // namespace nm
