// nodectl's output and error policy: pure functions from reply data to text, and from errors to
// exit codes. No bus, no I/O: everything here is unit-tested (tests in format_test.cc).
//
// Human output is aligned tables; --json output is one JSON document per command on one line
// (lists are arrays of objects), except `events --follow`, which prints one object per line.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
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

struct ImageRow {        // ListImages: a(ssssttstbas)
  std::string ref = {};  // name:tag; empty for a cached blob that no tag names
  std::string digest = {};
  std::string kind = {};
  std::string format = {};
  uint64_t size = 0;
  uint64_t virtual_size = 0;
  std::string tenant = {};    // empty: public
  uint64_t last_used_us = 0;  // wall clock; 0: never used
  bool pinned = false;
  std::vector<std::string> users = {};  // names of the VMs using it
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
std::string image_removed_json(std::string_view image);  // {"removed": image}

// ---- image verbs ----

// Sizes for people, in binary units: "512 B", "1.0 KiB", "1.5 GiB" (largest unit >= 1).
std::string human_bytes(uint64_t bytes);
// "sha256:" and the first 12 hex digits of a digest; anything else is returned as is.
std::string short_digest(std::string_view digest);
// How long ago `then_us` (wall clock, microseconds) was at `now_us`: "never" for 0, "just now"
// under a minute, then "5m ago", "3h ago", "4d ago"; a date ("2025-01-07", UTC) from 30 days
// on, and for a time in the future.
std::string relative_time(uint64_t then_us, uint64_t now_us);
// The USERS cell: "-" for none, the names joined by "," when that fits in 24 characters, else
// "N VMs".
std::string users_cell(const std::vector<std::string>& users);

// IMAGE DIGEST KIND FORMAT SIZE USERS LAST-USED PINNED; IMAGE "-" for an untagged blob, DIGEST
// short, SIZE human, LAST-USED relative to `now_us`, PINNED "yes"/"no".
std::string image_list_table(const std::vector<ImageRow>& images, uint64_t now_us);
// [{"image","digest","kind","format","size","virtual_size","tenant","last_used_us","pinned",
// "users":[...]}]
std::string image_list_json(const std::vector<ImageRow>& images);

// The image list of `image pull --from-file`: one reference per line (several on a line
// separated by blanks are accepted too); blank lines and everything from '#' to the end of a
// line are ignored.
std::vector<std::string> parse_image_list(std::string_view text);
// The request id of one image of a pull: `id` itself when the command pulls one image,
// "ID:NAME:TAG" when it pulls several (so that each is idempotent on its own); "" stays "".
std::string per_image_request_id(std::string_view id, std::string_view image, bool several);

// How one image of `image pull` ended.
struct PullOutcome {
  std::string image = {};               // as given on the command line
  std::optional<uint32_t> job_id = {};  // unset: PullImage itself was refused (see `error`)
  std::string result = {};  // "done", "failed", "cancelled", "unknown", "queued" (--no-wait)
  Status error = {};        // why it failed (OK otherwise)
  std::string digest = {};  // after success: the digest the tag now names ("" if not listed)
  uint64_t size = 0;        // its size in bytes, with `digest`
};
// For people, one line: "pulled debian:12 sha256:0123456789ab (1.0 GiB)", "pull debian:12: job 7
// queued", or "pull 'debian:12' failed: <message>" (the caller prints failures on stderr).
std::string pull_result_line(const PullOutcome& o);
// [{"image","job_id" (null when refused),"result","error"?,"message"?,"digest"?,"size"?}]
std::string pull_results_json(const std::vector<PullOutcome>& outcomes);
// 0 when every image succeeded ("done", "unknown" or "queued"); when every one failed with the
// same error code, that code's exit code (3 when none exists in the store, 5 when no store is
// configured...); otherwise 1.
int pull_exit_code(const std::vector<PullOutcome>& outcomes);

// `image pin|unpin --json`: {"image","pinned"}.
std::string image_pinned_json(std::string_view image, bool pinned);

struct GcRow {  // CollectImages: a(sast)
  std::string digest = {};
  std::vector<std::string> tags = {};
  uint64_t size = 0;
};
struct GcReply {
  std::vector<GcRow> removed = {};
  uint64_t bytes = 0;
};
// A DIGEST TAGS SIZE table of what was (or with `dry_run` would be) removed, then "removed N
// images, 1.5 GiB" / "would remove N images, 1.5 GiB (dry run)"; "nothing to collect" when empty.
std::string image_gc_text(const GcReply& gc, bool dry_run);
// {"removed":[{"digest","tags","size"}],"bytes","dry_run"}
std::string image_gc_json(const GcReply& gc, bool dry_run);

struct CorruptImage {
  std::string digest = {};
  std::vector<std::string> tags = {};
  std::string problem = {};
};
struct VerifyReport {
  uint64_t checked = 0;
  std::vector<CorruptImage> corrupt = {};
};
// Reads the result of verify job `job_id` from the event ring (events in seq order, from before
// the job started): its ImageVerified event ({"job_id","checked","corrupt"}) and the
// ImageCorrupt events ({"digest","problem"}) recorded after the previous ImageVerified and
// before it. nullopt when `events` has no ImageVerified of that job.
std::optional<VerifyReport> verify_report_from_events(const std::vector<EventRow>& events,
                                                      uint32_t job_id);
// Fills each corrupt image's tags from ListImages' rows.
void add_tags(const std::vector<ImageRow>& images, VerifyReport* report);
// "checked 3 images: all intact", or one "corrupt: DIGEST (TAGS): PROBLEM" line per bad blob and
// then "checked 3 images: 1 corrupt".
std::string verify_report_text(const VerifyReport& r);
// {"checked":N,"corrupt":[{"digest","tags","problem"}]}
std::string verify_report_json(const VerifyReport& r);

// ---- progress of byte-moving jobs ----

// One line of a terminal progress display: the label padded to `label_width` (labels longer
// than 40 are cut), a 20-cell bar, done/total and the percentage:
// "debian:12  [##########----------]  512.0/1024.0 MiB   50%". Without a total (0): an empty
// bar and the bytes done so far ("waiting" before any).
std::string progress_bar(std::string_view label, size_t label_width, uint64_t done, uint64_t total);
// A plain progress line for logs: "pull debian:12: 512/1024 MiB" ("pull debian:12: 512 MiB"
// without a total).
std::string progress_plain(std::string_view what, uint64_t done, uint64_t total);
// Terminal control text that replaces the `drawn` lines printed last (cursor at the start of the
// line below them) with `lines`, each cleared to its end; lines beyond `lines` are blanked, so the
// block is then max(drawn, lines.size()) lines high.
std::string redraw_lines(const std::vector<std::string>& lines, size_t drawn);
// Erases the `drawn` lines printed last, leaving the cursor where the first of them began.
std::string erase_lines(size_t drawn);

// When a plain progress line is due: the first one once bytes have moved, then whenever 10% more
// is done or 5 seconds have passed since the last one, never twice for the same byte count.
class PlainProgressGate {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  bool due(uint64_t done, uint64_t total, TimePoint now);

 private:
  std::optional<TimePoint> last_time_;
  uint64_t last_done_ = 0;
};

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

// ---- node health, capacity, watch ----

struct HealthCheckRow {  // a(ssssx)
  std::string name = {};
  std::string state = {};
  std::string reason = {};
  std::string vm_id = {};
  int64_t changed_us = 0;
};
struct HealthReply {  // GetHealth: (sbsta(ssssx))
  std::string state = {};
  bool maintenance = false;
  std::string maintenance_reason = {};
  uint64_t heartbeat_seq = 0;
  std::vector<HealthCheckRow> checks = {};
};
// `node health`: exit 0 ok, 8 degraded, 9 failed (a monitoring system's OK/WARNING/CRITICAL).
inline constexpr int kExitDegraded = 8;
inline constexpr int kExitFailed = 9;
int health_exit_code(std::string_view state);
std::string health_text(const HealthReply& h, uint64_t now_us);
std::string health_json(const HealthReply& h);

struct CapacityRow {  // GetCapacity: a(sttdtt)
  std::string resource = {};
  uint64_t total = 0;
  uint64_t reserved = 0;
  double ratio = 1.0;
  uint64_t capacity = 0;
  uint64_t allocated = 0;
};
std::string capacity_table(const std::vector<CapacityRow>& rows);
std::string capacity_json(const std::vector<CapacityRow>& rows);

// `node drain|undrain` result.
std::string maintenance_json(bool enabled, std::string_view reason);

// Signals `node watch` prints.
struct HeartbeatSignal {
  uint64_t seq = 0;
  int64_t timestamp_us = 0;
  std::string state = {};
  bool maintenance = false;
  std::map<std::string, uint64_t> summary = {};
};
struct HealthChangedSignal {
  uint64_t seq = 0;
  std::string state = {};
  std::string previous_state = {};
  bool maintenance = false;
  std::vector<HealthCheckRow> changed = {};
  std::vector<std::string> vms_affected = {};
};
struct VmStateSignal {
  uint64_t seq = 0;
  std::string vm_id = {};
  std::string name = {};
  std::string state = {};
  std::string reason = {};
};
using NodeSignal = std::variant<HeartbeatSignal, HealthChangedSignal, VmStateSignal>;
// One line per signal: {"signal": "Heartbeat"|"HealthChanged"|"VmStateChanged", ...fields}.
std::string node_signal_json(const NodeSignal& s);
std::string node_signal_text(const NodeSignal& s);

}  // namespace nm::cli
