// Firewall port: applies nft scripts to the kernel and reads the table back.
//
// Adapter: NftFirewall (libnftables, network/src/nft_firewall.cc). Fake: tests/fakes/.
// Thread-safe; methods may block briefly (one netlink transaction).
#pragma once

#include <optional>
#include <string>

#include "nm/core/status.h"

namespace nm::network {

class Firewall {
 public:
  virtual ~Firewall() = default;
  // Runs `script` (nft syntax) as one atomic transaction: all of it applies or none. Unavailable
  // with nft's own error text when the kernel refuses it.
  virtual Status apply(const std::string& script) = 0;
  // The current listing of `table bridge nodemanager` in nft's stateless text form (no counters,
  // no handles), or nullopt when the table does not exist. Stable for an unchanged table, so two
  // listings compare equal exactly when nobody changed the table in between.
  virtual Result<std::optional<std::string>> list_table() = 0;
};

}  // namespace nm::network
