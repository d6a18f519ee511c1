#include "nm/network/nft_firewall.h"

#include <nftables/libnftables.h>

#include <string_view>
#include <utility>

#include "nm/network/nft_ruleset.h"

namespace nm::network {

namespace {

constexpr std::string_view kNoSuchObject = "No such file or directory";

std::string_view trim(std::string_view text) {
  constexpr std::string_view kSpace = " \t\r\n";
  const size_t first = text.find_first_not_of(kSpace);
  if (first == std::string_view::npos) return {};
  return text.substr(first, text.find_last_not_of(kSpace) - first + 1);
}

std::string buffer_text(const char* buffer) {
  return buffer == nullptr ? std::string() : std::string(buffer);
}

// The one translation of nft's error buffer into a Status.
Status nft_status(std::string_view what, const std::string& error_text) {
  std::string_view text = trim(error_text);
  if (text.empty()) text = "nft failed without an error message";
  return unavailable(std::string(what) + ": " + std::string(text));
}

}  // namespace

void NftFirewall::CtxFree::operator()(nft_ctx* ctx) const noexcept {
  nft_ctx_free(ctx);
}

NftFirewall::NftFirewall(CtxPtr ctx) : ctx_(std::move(ctx)) {}

NftFirewall::~NftFirewall() = default;

Result<std::unique_ptr<NftFirewall>> NftFirewall::create() {
  CtxPtr ctx(nft_ctx_new(NFT_CTX_DEFAULT));
  if (!ctx) return internal_error("creating nft context: nft_ctx_new failed");
  if (nft_ctx_buffer_output(ctx.get()) != 0 || nft_ctx_buffer_error(ctx.get()) != 0) {
    return internal_error("creating nft context: cannot buffer nft's output");
  }
  nft_ctx_output_set_flags(ctx.get(), NFT_CTX_OUTPUT_STATELESS);
  return std::unique_ptr<NftFirewall>(new NftFirewall(std::move(ctx)));
}

Result<std::string> NftFirewall::run_locked(const std::string& command, std::string_view what) {
  const int rc = nft_run_cmd_from_buffer(ctx_.get(), command.c_str());
  // Both buffers are read after every run: reading one rewinds it for the next command.
  std::string output = buffer_text(nft_ctx_get_output_buffer(ctx_.get()));
  std::string error = buffer_text(nft_ctx_get_error_buffer(ctx_.get()));
  if (rc != 0) return nft_status(what, error);
  return output;
}

Status NftFirewall::apply(const std::string& script) {
  const std::lock_guard lock(mu_);
  auto out = run_locked(script, "applying nft script");
  return out.status();
}

Result<std::optional<std::string>> NftFirewall::list_table() {
  const std::string table = std::string(kNftFamily) + " " + std::string(kNftTable);
  const std::lock_guard lock(mu_);
  auto out = run_locked("list table " + table, "listing table '" + table + "'");
  if (out.is_ok()) return std::optional<std::string>(std::move(out).value());
  if (out.status().message().find(kNoSuchObject) != std::string::npos) {
    return std::optional<std::string>();
  }
  return out.status();
}

}  // namespace nm::network
