// nodectl's output and error policy: pure functions from reply data to text, and from errors to
// exit codes. No bus, no I/O: everything here is unit-tested (tests in format_test.cc).
//
// Human output is aligned tables; --json output is one JSON document per command on one line
// (lists are arrays of objects), except `events --follow`, which prints one object per line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/status.h"

namespace nm::cli {

// Process exit codes. Documented in docs/cli.md and `nodectl --help`; scripts depend on them.
enum class Exit : int {
  kOk = 0,
  kFailure = 1,       // generic failure, Internal, or a job that ended "failed"/"cancelled"
  kUsage = 2,         // bad command line, or InvalidArgument from the daemon
  kNotFound = 3,      // NotFound
  kConflict = 4,      // AlreadyExists, Conflict
  kUnavailable = 5,   // Unavailable: daemon not running, bus unreachable, timed out
  kAccessDenied = 6,  // AccessDenied
  kCapacity = 7,      // QuotaExceeded, InsufficientCapacity
};

int exit_code(Code code);

// Maps a D-Bus error name to a Code: "org.nodemanager.NodeManager1.Error.<Name>" by name, the
// bus's own errors by meaning (ServiceUnknown, NoReply, Timeout... are Unavailable), anything
// else Internal.
Code code_from_dbus_error(std::string_view name);

// "org.nodemanager.NodeManager1.Error.NotFound" -> "NotFound"; other names are returned as is.
std::string short_error_name(std::string_view name);

// The JSON printed on stdout for a failure under --json: {"error": <code name>, "message": ...}.
std::string error_json(const Status& status);

// Accepts "HEX" or "sha256:HEX" (64 hex digits, any case) and returns "sha256:<lowercase hex>";
// InvalidArgument otherwise.
Result<std::string> normalize_sha256(std::string_view text);

// The trailing number of a job object path ("/org/nodemanager/NodeManager1/job/17" -> 17).
std::optional<uint32_t> job_id_from_path(std::string_view path);

// ---- Reply rows (what the daemon returns, in plain types) ----

struct VmRow {  // ListVms: a(sssstt)
  std::string id = {};
  std::string name = {};
  std::string tenant = {};
  std::string state = {};
  uint64_t generation = 0;
  uint64_t observed_generation = 0;
};

struct ImageRow {  // ListImages: a(sssstts)
  std::string ref = {};
  std::string digest = {};
  std::string kind = {};
  std::string format = {};
  uint64_t size = 0;
  uint64_t virtual_size = 0;
  std::string tenant = {};
};

struct NetworkRow {  // ListNetworks: a(sssuus)
  std::string name = {};
  std::string tenant = {};
  std::string subnet = {};
  uint32_t vni = 0;
  uint32_t ports = 0;
  std::string state = {};
};

struct EventRow {  // GetEvents: a(ttsss), or a signal turned into the same shape
  uint64_t seq = 0;
  uint64_t ts_us = 0;
  std::string kind = {};
  std::string object_id = {};
  std::string payload_json = {};
};

// How a job ended, from JobRemoved (signal or the event ring).
struct JobOutcome {
  std::string job = {};  // object path
  uint32_t job_id = 0;
  std::string kind = {};
  std::string object_id = {};
  std::string result = {};  // "done", "failed", "cancelled"; "unknown" if it ended out of sight
  std::string error_name = {};
  std::string error_message = {};
};

// Columns padded to their widest cell, separated by two spaces, no trailing blanks.
std::string render_table(const std::vector<std::string>& header,
                         const std::vector<std::vector<std::string>>& rows);

std::string vm_list_table(const std::vector<VmRow>& vms);  // ID NAME TENANT STATE GEN
std::string vm_list_json(const std::vector<VmRow>& vms);
// `vm show` for people: "key: value" lines from GetVm's JSON (spec fields flattened as spec.x).
// Falls back to the raw text if it is not a JSON object.
std::string vm_show_text(std::string_view vm_json);
// `vm show --json`: GetVm's JSON re-serialized on one line (the raw text if it does not parse).
std::string vm_show_json(std::string_view vm_json);

std::string network_list_table(const std::vector<NetworkRow>& networks);
std::string network_list_json(const std::vector<NetworkRow>& networks);
// GetNetwork's document as "key: value" lines, one line per port ("port <hostname>: ...").
std::string network_show_text(std::string_view network_json);
std::string image_list_table(const std::vector<ImageRow>& images);
std::string image_list_json(const std::vector<ImageRow>& images);
std::string image_removed_json(std::string_view image);  // {"removed": image}

// One line for people: "SEQ TIME KIND OBJECT PAYLOAD" (time in UTC, ISO 8601, ms).
std::string event_line(const EventRow& e);
// One JSON object: {"seq", "ts_us", "kind", "object_id", "payload"} where payload is the parsed
// payload JSON (or the raw string when it does not parse).
std::string event_json(const EventRow& e);
std::string events_json(const std::vector<EventRow>& events);

// Reads a JobRemoved event from the ring: true and fills `out` if `e` is the JobRemoved of
// `job_id` (object_id is the job id; payload "job" is the id or the path, "job_id" the id).
// Payload fields read: kind, object_id, result, error (or error_name), message (or
// error_message).
bool job_outcome_from_event(const EventRow& e, uint32_t job_id, const std::string& job_path,
                            JobOutcome* out);

// For a job that ended: Ok for "done" and "unknown"; otherwise a Status carrying the job's error
// (Internal when the daemon gave none). The exit code for a failed job is always kFailure.
Status job_status(const JobOutcome& outcome);

// Output of a job-starting verb. Without --wait: the job (and for create the VM); with --wait:
// the outcome too. `vm_id`/`vm_path` are empty for verbs that do not create.
struct JobReply {
  std::string verb = {};  // "create", "start", ...
  std::string vm_id = {};
  std::string vm_path = {};
  std::string job = {};
  std::optional<JobOutcome> outcome = {};
};
std::string job_reply_text(const JobReply& r);
std::string job_reply_json(const JobReply& r);

}  // namespace nm::cli
