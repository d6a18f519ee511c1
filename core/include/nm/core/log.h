// Logging: one named spdlog logger per component ("service", "libvirt", "dbus", ...).
//
// Library code returns errors; the caller that decides what happens next logs once, with
// context. User-controlled strings are quoted with single quotes.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>
#include <string_view>

#include "nm/core/status.h"

namespace nm {

// Configures every logger: stderr sink (or the journal when `journal` is true and the journal
// socket exists), at `level` ("trace", "debug", "info", "warn", "error", "critical", "off").
Status setup_logging(std::string_view level, bool journal);

// The logger for `component`, created on first use with the configured sinks. Thread-safe.
std::shared_ptr<spdlog::logger> logger(const std::string& component);

}  // namespace nm
