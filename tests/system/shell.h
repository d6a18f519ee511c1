// Shell commands for system tests (setting up and observing namespaces with ip, nft, busybox).
// The product itself never spawns a shell; only tests do.
#pragma once

#include <string>

namespace nm::system_test {

struct CommandResult {
  int exit_code = -1;  // -1 when it could not run or did not exit normally
  std::string output;  // stdout and stderr
};

// Runs `command` through /bin/sh, stderr merged into stdout.
CommandResult sh(const std::string& command);

// Runs a setup command that must succeed (a gtest failure otherwise); returns its output.
std::string must(const std::string& command);

bool contains(const std::string& haystack, const std::string& needle);

}  // namespace nm::system_test
