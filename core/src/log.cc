#include "nm/core/log.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <sys/uio.h>
#include <syslog.h>

// Without this, sd_journal_sendv() is a macro that adds CODE_FILE/CODE_LINE/CODE_FUNC of this
// file; the record's own location (if any) is added by journal_fields() instead.
#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#include <algorithm>
#include <cassert>
#include <filesystem>
#include <mutex>
#include <system_error>
#include <utility>
#include <vector>

namespace nm {
namespace {

constexpr std::string_view kStderrPattern = "%Y-%m-%dT%H:%M:%S.%e %^%l%$ %n: %v%*";
constexpr char kJournalSocket[] = "/run/systemd/journal/socket";

// The calling thread's log context: every entry of every active ScopedLogFields, outermost first.
thread_local std::vector<LogFields::Entry> t_fields;

class JournalSink final : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    auto fields = journal_fields(msg, LogFields::current());
    std::vector<iovec> iov;
    iov.reserve(fields.size());
    for (auto& f : fields) iov.push_back(iovec{f.data(), f.size()});
    // A record the journal refuses has nowhere else to go.
    sd_journal_sendv(iov.data(), static_cast<int>(iov.size()));
  }
  void flush_() override {}
};

// The %* flag of the stderr pattern: the thread's fields, or nothing.
class FieldsFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& /*msg*/, const std::tm& /*tm*/,
              spdlog::memory_buf_t& dest) override {
    if (t_fields.empty()) return;
    const std::string suffix = stderr_fields_suffix(LogFields::current());
    dest.append(suffix.data(), suffix.data() + suffix.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<FieldsFlag>();
  }
};

spdlog::sink_ptr make_stderr_sink() {
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  sink->set_formatter(make_stderr_formatter());
  return sink;
}

std::mutex g_mu;
std::vector<spdlog::sink_ptr> g_sinks;
spdlog::level::level_enum g_level = spdlog::level::info;

std::vector<spdlog::sink_ptr>& sinks_locked() {
  if (g_sinks.empty()) g_sinks.push_back(make_stderr_sink());
  return g_sinks;
}

void append_escaped(std::string& out, std::string_view value) {
  constexpr char kHex[] = "0123456789abcdef";
  for (const char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7f) {
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 0xf];
    } else {
      out += c;
    }
  }
}

}  // namespace

Status setup_logging(std::string_view level, bool journal) {
  const auto lvl = spdlog::level::from_str(std::string(level));
  if (lvl == spdlog::level::off && level != "off") {
    return invalid_argument("log-level: '" + std::string(level) +
                            "' is not one of trace, debug, info, warn, error, critical, off");
  }
  std::error_code ec;
  const bool journal_socket = std::filesystem::exists(kJournalSocket, ec);
  std::lock_guard lock(g_mu);
  g_level = lvl;
  g_sinks.clear();
  if (journal && journal_socket) {
    g_sinks.push_back(std::make_shared<JournalSink>());
  } else {
    g_sinks.push_back(make_stderr_sink());
  }
  spdlog::apply_all([&](const std::shared_ptr<spdlog::logger>& l) {
    l->sinks() = g_sinks;
    l->set_level(g_level);
  });
  return Status::ok();
}

std::shared_ptr<spdlog::logger> logger(const std::string& component) {
  std::lock_guard lock(g_mu);
  if (auto existing = spdlog::get(component)) return existing;
  auto& s = sinks_locked();
  auto l = std::make_shared<spdlog::logger>(component, s.begin(), s.end());
  l->set_level(g_level);
  spdlog::register_logger(l);
  return l;
}

LogFields LogFields::current() {
  LogFields out;
  if (t_fields.empty()) return out;
  out.entries_.reserve(t_fields.size());
  for (const Entry& e : t_fields) {
    auto it = std::find_if(out.entries_.begin(), out.entries_.end(),
                           [&](const Entry& o) { return o.name == e.name; });
    if (it != out.entries_.end()) {
      it->value = e.value;
    } else {
      out.entries_.push_back(e);
    }
  }
  return out;
}

std::string_view LogFields::get(std::string_view name) const {
  for (const Entry& e : entries_) {
    if (e.name == name) return e.value;
  }
  return {};
}

ScopedLogFields::ScopedLogFields(std::initializer_list<LogField> fields)
    : saved_size_(t_fields.size()) {
  for (const LogField& f : fields) {
    if (!f.value.empty()) t_fields.push_back({f.name.str(), std::string(f.value)});
  }
}

ScopedLogFields::ScopedLogFields(const LogFields& fields) : saved_size_(t_fields.size()) {
  t_fields.insert(t_fields.end(), fields.entries().begin(), fields.entries().end());
}

ScopedLogFields::~ScopedLogFields() {
  assert(t_fields.size() >= saved_size_ && "ScopedLogFields destroyed out of order");
  t_fields.resize(saved_size_);
}

int journal_priority(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return LOG_DEBUG;
    case spdlog::level::info:
      return LOG_INFO;
    case spdlog::level::warn:
      return LOG_WARNING;
    case spdlog::level::err:
      return LOG_ERR;
    case spdlog::level::critical:
      return LOG_CRIT;
    default:
      return LOG_INFO;
  }
}

std::vector<std::string> journal_fields(const spdlog::details::log_msg& msg,
                                        const LogFields& fields) {
  const std::string_view component(msg.logger_name.data(), msg.logger_name.size());
  const std::string_view payload(msg.payload.data(), msg.payload.size());
  std::vector<std::string> out;
  out.reserve(7 + fields.entries().size());

  std::string message = "MESSAGE=";
  if (!component.empty()) {
    message += component;
    message += ": ";
  }
  message += payload;
  out.push_back(std::move(message));
  out.push_back("PRIORITY=" + std::to_string(journal_priority(msg.level)));
  out.emplace_back("SYSLOG_IDENTIFIER=nodemanagerd");
  if (!component.empty()) out.push_back("NM_COMPONENT=" + std::string(component));
  if (!msg.source.empty() && msg.source.filename != nullptr) {
    out.push_back("CODE_FILE=" + std::string(msg.source.filename));
    out.push_back("CODE_LINE=" + std::to_string(msg.source.line));
    if (msg.source.funcname != nullptr && *msg.source.funcname != '\0') {
      out.push_back("CODE_FUNC=" + std::string(msg.source.funcname));
    }
  }
  for (const LogFields::Entry& e : fields.entries()) {
    std::string f = "NM_";
    f += e.name;
    f += '=';
    f += e.value;
    out.push_back(std::move(f));
  }
  return out;
}

std::string log_field_short_key(std::string_view name) {
  if (name.size() > 3 && name.ends_with("_ID")) name.remove_suffix(3);
  std::string key(name);
  std::transform(key.begin(), key.end(), key.begin(), [](char c) {
    return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
  });
  return key;
}

std::string stderr_fields_suffix(const LogFields& fields) {
  if (fields.empty()) return {};
  std::string out = " [";
  bool first = true;
  for (const LogFields::Entry& e : fields.entries()) {
    if (!first) out += ' ';
    first = false;
    out += log_field_short_key(e.name);
    out += '=';
    append_escaped(out, e.value);
  }
  out += ']';
  return out;
}

std::unique_ptr<spdlog::formatter> make_stderr_formatter() {
  auto f = std::make_unique<spdlog::pattern_formatter>();
  f->add_flag<FieldsFlag>('*').set_pattern(std::string(kStderrPattern));
  return f;
}

}  // namespace nm
