#include "shell.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <memory>

namespace nm::system_test {
namespace {

struct PipeClose {
  void operator()(FILE* f) const noexcept { pclose(f); }
};

}  // namespace

CommandResult sh(const std::string& command) {
  CommandResult result;
  FILE* raw = popen((command + " 2>&1").c_str(), "r");
  if (raw == nullptr) return result;
  std::unique_ptr<FILE, PipeClose> pipe(raw);
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = fread(buf.data(), 1, buf.size(), pipe.get())) > 0) {
    result.output.append(buf.data(), n);
  }
  const int status = pclose(pipe.release());
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

std::string must(const std::string& command) {
  CommandResult r = sh(command);
  EXPECT_EQ(r.exit_code, 0) << command << ":\n" << r.output;
  return r.output;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace nm::system_test
