// NftFirewall: the Firewall port over libnftables.
//
// One adapter owns one nft context. Its output and error streams are buffered in memory, so a
// listing comes back as text and a refused script comes back as nft's own error text, never
// printed to stdout/stderr. A context is not thread-safe: every call takes the adapter's mutex,
// which makes the adapter as a whole safe to call from any thread.
//
// Transactions: apply() hands the whole script to nft_run_cmd_from_buffer(), which sends it to
// the kernel as one netlink batch. A script that nft cannot parse or evaluate changes nothing; a
// batch the kernel refuses part-way (a missing object, an element that already exists) is rolled
// back by the kernel as a whole.
//
// Errors: nft's error buffer is translated once, in one helper: Unavailable, with the message
// "<what>: <nft's text, trimmed>", e.g. "applying nft script: Error: No such file or directory;
// ..." followed by the quoted command and carets under the offending tokens. Caveat of
// libnftables 1.0.6 with buffer input: it always quotes the script's first line, with the carets
// at the columns of the failing line, so for a multi-line script the error's first line is the
// reliable part.
//
// Needs CAP_NET_ADMIN in the network namespace it runs in; without it every call fails with
// Unavailable ("Operation not permitted").
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "nm/core/status.h"
#include "nm/network/firewall.h"

struct nft_ctx;  // libnftables' context, opaque here (no libnftables header in this header)

namespace nm::network {

class NftFirewall final : public Firewall {
 public:
  // A new nft context with output and error buffered in memory and stateless output (no
  // counters) without handles. Internal when libnftables cannot allocate its context or
  // buffers. Touches no kernel state.
  static Result<std::unique_ptr<NftFirewall>> create();

  NftFirewall(const NftFirewall&) = delete;
  NftFirewall& operator=(const NftFirewall&) = delete;
  ~NftFirewall() override;

  // One transaction (see above). Unavailable with nft's text when parsing, evaluation or the
  // kernel refuses any part of `script`; then nothing of it was applied.
  Status apply(const std::string& script) override;
  // `list table bridge nodemanager`, stateless and without handles; nullopt when that table does
  // not exist (a table of the same name in another family does not count). Unavailable with
  // nft's text for any other failure.
  Result<std::optional<std::string>> list_table() override;

 private:
  struct CtxFree {
    void operator()(nft_ctx* ctx) const noexcept;
  };
  using CtxPtr = std::unique_ptr<nft_ctx, CtxFree>;

  explicit NftFirewall(CtxPtr ctx);

  // Runs `command` (the caller holds mu_); nft's buffered output, or the translated error.
  Result<std::string> run_locked(const std::string& command, std::string_view what);

  std::mutex mu_;
  CtxPtr ctx_;  // guarded by mu_
};

}  // namespace nm::network
