// The state database's schema, as an ordered list of migrations.
//
// Step i (1-based) takes a database from schema version i-1 to i; `PRAGMA user_version` records
// the version reached. Each step runs in its own transaction together with the user_version
// update, so a crash leaves the database at one version or the next, never between. Steps are
// append-only: a released step is never edited, a change is a new step.
#pragma once

#include <span>

namespace nm::state {

struct Migration {
  int version;      // the user_version after this step
  const char* sql;  // one or more statements, run with sqlite3_exec
};

std::span<const Migration> migrations();

// The newest schema version this build knows.
int latest_schema_version();

}  // namespace nm::state
