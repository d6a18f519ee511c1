#include "nm/core/log.h"

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <systemd/sd-journal.h>

#include <mutex>
#include <vector>

namespace nm {
namespace {

// Sends each record to the journal with PRIORITY and SYSLOG_IDENTIFIER=nodemanagerd and the
// component as NM_COMPONENT.
class JournalSink final : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    int prio = LOG_INFO;
    switch (msg.level) {
      case spdlog::level::trace:
      case spdlog::level::debug:
        prio = LOG_DEBUG;
        break;
      case spdlog::level::info:
        prio = LOG_INFO;
        break;
      case spdlog::level::warn:
        prio = LOG_WARNING;
        break;
      case spdlog::level::err:
        prio = LOG_ERR;
        break;
      case spdlog::level::critical:
        prio = LOG_CRIT;
        break;
      default:
        break;
    }
    const std::string text(msg.payload.data(), msg.payload.size());
    const std::string name(msg.logger_name.data(), msg.logger_name.size());
    sd_journal_send("MESSAGE=%s: %s", name.c_str(), text.c_str(), "PRIORITY=%i", prio,
                    "SYSLOG_IDENTIFIER=nodemanagerd", "NM_COMPONENT=%s", name.c_str(), nullptr);
  }
  void flush_() override {}
};

std::mutex g_mu;
std::vector<spdlog::sink_ptr> g_sinks;
spdlog::level::level_enum g_level = spdlog::level::info;

std::vector<spdlog::sink_ptr>& sinks_locked() {
  if (g_sinks.empty()) g_sinks.push_back(std::make_shared<spdlog::sinks::stderr_sink_mt>());
  return g_sinks;
}

}  // namespace

Status setup_logging(std::string_view level, bool journal) {
  const auto lvl = spdlog::level::from_str(std::string(level));
  if (lvl == spdlog::level::off && level != "off") {
    return invalid_argument("log-level: '" + std::string(level) +
                            "' is not one of trace, debug, info, warn, error, critical, off");
  }
  std::lock_guard lock(g_mu);
  g_level = lvl;
  g_sinks.clear();
  if (journal) {
    g_sinks.push_back(std::make_shared<JournalSink>());
  } else {
    g_sinks.push_back(std::make_shared<spdlog::sinks::stderr_sink_mt>());
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
  l->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %n: %v");
  spdlog::register_logger(l);
  return l;
}

}  // namespace nm
