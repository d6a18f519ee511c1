#include "migrations.h"

#include <array>

namespace nm::state {
namespace {

constexpr std::array kMigrations = {
    Migration{1, R"sql(
CREATE TABLE vms (
  id                  TEXT PRIMARY KEY NOT NULL,
  name                TEXT NOT NULL UNIQUE,
  tenant              TEXT NOT NULL,
  spec_json           TEXT NOT NULL,
  power               TEXT NOT NULL CHECK (power IN ('stopped', 'running')),
  deleting            INTEGER NOT NULL CHECK (deleting IN (0, 1)),
  generation          INTEGER NOT NULL,
  observed_generation INTEGER NOT NULL,
  state               TEXT NOT NULL,
  state_reason        TEXT NOT NULL,
  image_digest        TEXT NOT NULL,
  kernel_digest       TEXT,
  initrd_digest       TEXT,
  created_us          INTEGER NOT NULL,
  updated_us          INTEGER NOT NULL
) STRICT;
CREATE INDEX vms_by_tenant ON vms (tenant);

CREATE TABLE requests (
  id          TEXT PRIMARY KEY NOT NULL,
  method      TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  reply_json  TEXT NOT NULL,
  created_us  INTEGER NOT NULL
) STRICT;
CREATE INDEX requests_by_age ON requests (created_us);

CREATE TABLE events (
  seq          INTEGER PRIMARY KEY,
  ts_us        INTEGER NOT NULL,
  kind         TEXT NOT NULL,
  object_id    TEXT NOT NULL,
  payload_json TEXT NOT NULL
) STRICT;

CREATE TABLE meta (
  key   TEXT PRIMARY KEY NOT NULL,
  value INTEGER NOT NULL
) STRICT;
INSERT INTO meta (key, value) VALUES ('last_event_seq', 0), ('last_job_id', 0);
)sql"},
    // Jobs a client was told about and that have not ended yet: after a restart the reconciler
    // finishes their work under the same id, so a client waiting for JobRemoved still gets it.
    Migration{2, R"sql(
CREATE TABLE jobs (
  id         INTEGER PRIMARY KEY,
  kind       TEXT NOT NULL,
  object_id  TEXT NOT NULL,
  created_us INTEGER NOT NULL
) STRICT;
)sql"},
    // Tenant networks and the VM ports on them (issue 4). A port lives and dies with its VM
    // (ON DELETE CASCADE); a network cannot be deleted while a port references it.
    Migration{3, R"sql(
CREATE TABLE networks (
  name         TEXT PRIMARY KEY NOT NULL,
  tenant       TEXT NOT NULL,
  vni          INTEGER NOT NULL UNIQUE,
  spec_json    TEXT NOT NULL,
  deleting     INTEGER NOT NULL CHECK (deleting IN (0, 1)),
  state        TEXT NOT NULL,
  state_reason TEXT NOT NULL,
  created_us   INTEGER NOT NULL,
  updated_us   INTEGER NOT NULL
) STRICT;

CREATE TABLE ports (
  vm_id    TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
  network  TEXT NOT NULL REFERENCES networks (name),
  ifname   TEXT NOT NULL UNIQUE,
  mac      TEXT NOT NULL UNIQUE,
  ip       TEXT NOT NULL,
  hostname TEXT NOT NULL,
  PRIMARY KEY (vm_id, network),
  UNIQUE (network, ip)
) STRICT;
CREATE INDEX ports_by_network ON ports (network);
)sql"},
    // Node-wide settings a client changed (maintenance) and the health probe's heartbeat row.
    Migration{4, R"sql(
CREATE TABLE settings (
  key   TEXT PRIMARY KEY NOT NULL,
  value TEXT NOT NULL
) STRICT;
)sql"},
};

}  // namespace

std::span<const Migration> migrations() {
  return kMigrations;
}

int latest_schema_version() {
  return kMigrations.back().version;
}

}  // namespace nm::state
