// nodectl: the operator's command line for nodemanagerd. See docs/cli.md.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bus_client.h"
#include "format.h"
#include "nm/core/fs.h"
#include "nm/core/status.h"

namespace po = boost::program_options;

namespace nm::cli {
namespace {

constexpr const char* kExitCodes =
    "Exit codes:\n"
    "  0  ok\n"
    "  1  failure (also: a --wait job that ended failed or cancelled)\n"
    "  2  usage error, or the daemon refused the input (InvalidArgument)\n"
    "  3  not found (NotFound)\n"
    "  4  already exists or conflicting state (AlreadyExists, Conflict)\n"
    "  5  unavailable: daemon not running, bus unreachable, timed out (Unavailable)\n"
    "  6  access denied (AccessDenied)\n"
    "  7  quota or capacity exhausted (QuotaExceeded, InsufficientCapacity)\n"
    "  8  node health: degraded   9  node health: failed   (nodectl node health only)\n";

struct Globals {
  std::string bus;  // empty: $NODECTL_BUS, then "system"
  bool json = false;
  double timeout_s = -1;  // < 0: not given
};

po::options_description global_options(Globals* g) {
  po::options_description d("Global options");
  d.add_options()("bus", po::value<std::string>(&g->bus)->value_name("system|session|ADDRESS"),
                  "bus to reach nodemanagerd on (default: $NODECTL_BUS, else system)")(
      "json", po::bool_switch(&g->json), "machine-readable JSON output on stdout")(
      "help,h", "show help (at every level: nodectl NOUN --help, nodectl NOUN VERB --help)")(
      "timeout", po::value<double>(&g->timeout_s)->value_name("SECONDS"),
      "method-call timeout (default 30); also bounds --wait and --follow (default: no limit)");
  return d;
}

class Context {
 public:
  explicit Context(Globals g) : g_(std::move(g)) {}

  bool json() const { return g_.json; }

  // Connects on first use, so that --help and usage errors never need a bus.
  Result<BusClient*> client() {
    if (client_) return client_.get();
    std::string bus = g_.bus;
    if (bus.empty()) {
      const char* env = std::getenv("NODECTL_BUS");
      bus = env != nullptr && *env != '\0' ? env : "system";
    }
    const auto timeout = g_.timeout_s >= 0
                             ? std::chrono::microseconds(static_cast<int64_t>(g_.timeout_s * 1e6))
                             : std::chrono::microseconds(30'000'000);
    NM_ASSIGN_OR_RETURN(client_, BusClient::connect(bus, timeout));
    return client_.get();
  }

  // --wait and --follow wait forever unless --timeout was given.
  Deadline wait_deadline() const {
    if (g_.timeout_s < 0) return std::nullopt;
    return std::chrono::steady_clock::now() +
           std::chrono::microseconds(static_cast<int64_t>(g_.timeout_s * 1e6));
  }

  // Prints `s` ({"error",...} on stdout under --json, "nodectl: ..." on stderr otherwise) and
  // returns its exit code.
  int fail(const Status& s) const {
    if (g_.json) {
      std::cout << error_json(s) << std::endl;
    } else {
      std::cerr << "nodectl: " << s.message() << std::endl;
    }
    return exit_code(s.code());
  }

 private:
  Globals g_;
  std::unique_ptr<BusClient> client_;
};

using Args = std::vector<std::string>;
using Vars = po::variables_map;

struct Verb {
  std::string name;     // empty for a noun that is itself the command ("events")
  std::string usage;    // "vm create -f SPEC|- [--request-id ID] [--wait]"
  std::string summary;  // one line
  std::vector<std::string> positional;
  std::function<void(po::options_description&)> options;
  std::function<int(Context&, const Vars&)> run;
  std::string rest = {};  // a positional taking every remaining argument (optional), if any
};

struct Noun {
  std::string name;
  std::string summary;
  std::vector<Verb> verbs;
};

struct UsageError {
  std::string message;
};

std::string opt(const Vars& vm, const char* name) {
  return vm.count(name) ? vm[name].as<std::string>() : std::string();
}
bool flag(const Vars& vm, const char* name) {
  return vm.count(name) && vm[name].as<bool>();
}

// --request-id alone (verbs that start no job).
void request_id_option(po::options_description& d) {
  d.add_options()("request-id", po::value<std::string>()->value_name("ID"), "idempotency key");
}

void job_options(po::options_description& d) {
  d.add_options()("request-id", po::value<std::string>()->value_name("ID"),
                  "idempotency key: a retry with the same key returns the first answer")(
      "wait", po::bool_switch(), "wait until the job ends; exit 1 if it failed");
}

// Parses a verb's arguments (its options plus the global ones, which may appear anywhere).
// Returns nullopt after printing help; throws UsageError.
std::optional<Vars> parse_verb(const Verb& verb, const Args& args, Globals* g) {
  po::options_description own("Options");
  if (verb.options) verb.options(own);
  Globals late;  // global options given after the verb; merged into *g after parsing
  po::options_description hidden;
  po::positional_options_description pos;
  for (const auto& name : verb.positional) {
    hidden.add_options()(name.c_str(), po::value<std::string>());
    pos.add(name.c_str(), 1);
  }
  if (!verb.rest.empty()) {
    hidden.add_options()(verb.rest.c_str(), po::value<std::vector<std::string>>());
    pos.add(verb.rest.c_str(), -1);
  }
  po::options_description all;
  all.add(own).add(global_options(&late)).add(hidden);
  Vars vm;
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
    if (vm.count("help")) {
      std::cout << "usage: nodectl " << verb.usage << "\n\n" << verb.summary << "\n\n";
      if (!own.options().empty()) std::cout << own << "\n";
      std::cout << global_options(g) << "\n" << kExitCodes;
      return std::nullopt;
    }
    if (vm["json"].as<bool>()) g->json = true;
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError{std::string(e.what()) + "; usage: nodectl " + verb.usage};
  }
  if (!late.bus.empty()) g->bus = late.bus;
  if (late.timeout_s >= 0) g->timeout_s = late.timeout_s;
  for (const auto& name : verb.positional) {
    if (!vm.count(name)) throw UsageError{"missing " + name + "; usage: nodectl " + verb.usage};
  }
  return vm;
}

// Reads all of `path` ('-': stdin); errors name `option`.
Result<std::string> read_input(const std::string& path, const std::string& option) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    if (std::cin.bad()) return invalid_argument(option + ": cannot read stdin");
    return text;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return invalid_argument(option + ": cannot open '" + path + "'");
  text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (in.bad()) return invalid_argument(option + ": cannot read '" + path + "'");
  return text;
}

Result<std::string> read_spec(const std::string& path) {
  return read_input(path, "-f");
}

std::vector<std::string> opts(const Vars& vm, const char* name) {
  return vm.count(name) ? vm[name].as<std::vector<std::string>>() : std::vector<std::string>();
}

// Prints the answer of a job-starting verb, after waiting for the job when asked.
int finish_job(Context& ctx, BusClient& client, JobReply reply, bool wait) {
  if (wait) {
    auto outcome = client.wait_job(reply.job, ctx.wait_deadline());
    if (!outcome) return ctx.fail(outcome.status());
    reply.outcome = *outcome;
  }
  const Status job = reply.outcome ? job_status(*reply.outcome) : Status::ok();
  if (ctx.json()) {
    std::cout << job_reply_json(reply) << std::endl;
  } else {
    if (job.is_ok()) std::cout << job_reply_text(reply) << std::flush;
    if (!job.is_ok()) std::cerr << "nodectl: " << job.message() << std::endl;
    if (reply.outcome && reply.outcome->result == "unknown") {
      std::cerr << "nodectl: job " << reply.job
                << " ended before nodectl could watch it; its result is no longer recorded"
                << std::endl;
    }
  }
  return job.is_ok() ? static_cast<int>(Exit::kOk) : static_cast<int>(Exit::kFailure);
}

// Runs a job-starting method: subscribes first when waiting, then calls `start`.
int run_job(Context& ctx, const Vars& vm, const std::string& verb,
            const std::function<Result<std::string>(BusClient&)>& start) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  const bool wait = flag(vm, "wait");
  if (wait) {
    if (Status s = (*client)->watch_jobs(); !s) return ctx.fail(s);
  }
  auto job = start(**client);
  if (!job) return ctx.fail(job.status());
  return finish_job(ctx, **client, JobReply{.verb = verb, .job = *job}, wait);
}

// ---- vm ----

int vm_create(Context& ctx, const Vars& vm) {
  auto text = read_spec(opt(vm, "file"));
  if (!text) return ctx.fail(text.status());
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  const bool wait = flag(vm, "wait");
  if (wait) {
    if (Status s = (*client)->watch_jobs(); !s) return ctx.fail(s);
  }
  auto reply = (*client)->create_vm(*text, opt(vm, "request-id"));
  if (!reply) return ctx.fail(reply.status());
  return finish_job(
      ctx, **client,
      JobReply{
          .verb = "create", .vm_id = reply->vm_id, .vm_path = reply->vm_path, .job = reply->job},
      wait);
}

int vm_list(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto vms = (*client)->list_vms(opt(vm, "tenant"));
  if (!vms) return ctx.fail(vms.status());
  std::cout << (ctx.json() ? vm_list_json(*vms) + "\n" : vm_list_table(*vms)) << std::flush;
  return 0;
}

int vm_show(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto doc = (*client)->get_vm(opt(vm, "vm"));
  if (!doc) return ctx.fail(doc.status());
  std::cout << (ctx.json() ? vm_show_json(*doc) + "\n" : vm_show_text(*doc)) << std::flush;
  return 0;
}

int vm_start(Context& ctx, const Vars& vm) {
  return run_job(ctx, vm, "start",
                 [&](BusClient& c) { return c.start_vm(opt(vm, "vm"), opt(vm, "request-id")); });
}

int vm_stop(Context& ctx, const Vars& vm) {
  return run_job(ctx, vm, "stop", [&](BusClient& c) {
    return c.stop_vm(opt(vm, "vm"), flag(vm, "force"), opt(vm, "request-id"));
  });
}

int vm_reboot(Context& ctx, const Vars& vm) {
  return run_job(ctx, vm, "reboot",
                 [&](BusClient& c) { return c.reboot_vm(opt(vm, "vm"), opt(vm, "request-id")); });
}

int vm_delete(Context& ctx, const Vars& vm) {
  return run_job(ctx, vm, "delete",
                 [&](BusClient& c) { return c.delete_vm(opt(vm, "vm"), opt(vm, "request-id")); });
}

// ---- network ----

int network_create(Context& ctx, const Vars& vm) {
  auto text = read_spec(opt(vm, "file"));
  if (!text) return ctx.fail(text.status());
  return run_job(ctx, vm, "network-create",
                 [&](BusClient& c) { return c.create_network(*text, opt(vm, "request-id")); });
}

int network_delete(Context& ctx, const Vars& vm) {
  return run_job(ctx, vm, "network-delete", [&](BusClient& c) {
    return c.delete_network(opt(vm, "network"), opt(vm, "request-id"));
  });
}

int network_list(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto nets = (*client)->list_networks(opt(vm, "tenant"));
  if (!nets) return ctx.fail(nets.status());
  std::cout << (ctx.json() ? network_list_json(*nets) + "\n" : network_list_table(*nets))
            << std::flush;
  return 0;
}

int network_show(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto doc = (*client)->get_network(opt(vm, "network"));
  if (!doc) return ctx.fail(doc.status());
  std::cout << (ctx.json() ? vm_show_json(*doc) + "\n" : network_show_text(*doc)) << std::flush;
  return 0;
}

// ---- events ----

constexpr uint32_t kEventPage = 1000;

// Prints every event with seq > *last (in pages) and advances *last.
Status print_events_since(Context& ctx, BusClient& client, uint64_t* last, bool lines,
                          std::vector<EventRow>* collect) {
  for (;;) {
    NM_ASSIGN_OR_RETURN(EventPage page, client.get_events(*last, kEventPage));
    for (auto& e : page.events) {
      if (e.seq <= *last) continue;
      *last = e.seq;
      if (collect != nullptr) {
        collect->push_back(std::move(e));
      } else {
        std::cout << (ctx.json() || lines ? event_json(e) : event_line(e)) << "\n";
      }
    }
    std::cout << std::flush;
    if (page.events.empty() || *last >= page.last_seq) return Status::ok();
  }
}

// ---- image ----

int image_import(Context& ctx, const Vars& vm) {
  auto sha = normalize_sha256(opt(vm, "sha256"));
  if (!sha) return ctx.fail(sha.status());
  const std::string path = opt(vm, "file");
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd.valid()) {
    const Status s = errno_status(errno, "open '" + path + "'");
    return ctx.fail(errno == ENOENT ? not_found(s.message()) : invalid_argument(s.message()));
  }
  return run_job(ctx, vm, "import", [&](BusClient& c) {
    return c.import_image(opt(vm, "image"), fd.get(), *sha, opt(vm, "kind"), opt(vm, "tenant"),
                          opt(vm, "request-id"));
  });
}

// Wall clock now, in microseconds since the epoch (for "last used 2h ago" and "SINCE").
uint64_t now_realtime_us() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

int image_list(Context& ctx, const Vars&) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto images = (*client)->list_images();
  if (!images) return ctx.fail(images.status());
  std::cout << (ctx.json() ? image_list_json(*images) + "\n"
                           : image_list_table(*images, now_realtime_us()))
            << std::flush;
  return 0;
}

// Shows the byte progress of running jobs on stderr while nodectl waits for them: a bar per job,
// redrawn in place, on a terminal; otherwise a plain line now and then (PlainProgressGate).
class ProgressDisplay {
 public:
  // `labels`: the bar's label of each job; `lines`: what its plain lines start with.
  ProgressDisplay(std::vector<std::string> labels, std::vector<std::string> lines)
      : terminal_(::isatty(STDERR_FILENO) == 1),
        labels_(std::move(labels)),
        lines_(std::move(lines)),
        state_(labels_.size()),
        gates_(labels_.size()) {
    for (const auto& l : labels_) width_ = std::max(width_, l.size());
  }
  ProgressDisplay(const ProgressDisplay&) = delete;
  ProgressDisplay& operator=(const ProgressDisplay&) = delete;
  ~ProgressDisplay() { finish(); }

  void update(size_t i, const JobProgress& p) {
    if (i >= state_.size()) return;
    state_[i] = p;
    const auto now = std::chrono::steady_clock::now();
    if (!terminal_) {
      if (gates_[i].due(p.done, p.total, now)) {
        std::cerr << progress_plain(lines_[i], p.done, p.total) << std::endl;
      }
      return;
    }
    if (drawn_ > 0 && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    std::vector<std::string> bars;
    bars.reserve(state_.size());
    for (size_t j = 0; j < state_.size(); ++j) {
      bars.push_back(progress_bar(labels_[j], width_, state_[j].done, state_[j].total));
    }
    std::cerr << redraw_lines(bars, drawn_) << std::flush;
    drawn_ = std::max(drawn_, bars.size());
  }

  // Erases the bars (the results are printed after them).
  void finish() {
    if (drawn_ == 0) return;
    std::cerr << erase_lines(drawn_) << std::flush;
    drawn_ = 0;
  }

 private:
  bool terminal_;
  std::vector<std::string> labels_;
  std::vector<std::string> lines_;
  std::vector<JobProgress> state_;
  std::vector<PlainProgressGate> gates_;
  size_t width_ = 0;
  size_t drawn_ = 0;
  std::chrono::steady_clock::time_point last_draw_;
};

// A failed job's error as the daemon gave it (its message without the "job N ... failed" frame).
Status job_error(const JobOutcome& o) {
  Status s = job_status(o);
  if (s.is_ok() || o.error_message.empty()) return s;
  return {s.code(), o.error_message};
}

int image_pull(Context& ctx, const Vars& vm) {
  std::vector<std::string> given = opts(vm, "image");
  if (vm.count("from-file")) {
    auto text = read_input(opt(vm, "from-file"), "--from-file");
    if (!text) return ctx.fail(text.status());
    for (auto& i : parse_image_list(*text)) given.push_back(std::move(i));
  }
  std::vector<std::string> images;
  for (auto& i : given) {
    if (std::find(images.begin(), images.end(), i) == images.end()) images.push_back(std::move(i));
  }
  if (images.empty()) {
    return ctx.fail(invalid_argument(
        "no image to pull: name them, or give --from-file; usage: nodectl image pull NAME:TAG "
        "[NAME:TAG ...] [--from-file FILE|-] [--request-id ID] [--no-wait]"));
  }
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  BusClient& c = **client;
  const bool wait = !flag(vm, "no-wait");
  if (wait) {
    if (Status s = c.watch_jobs(); !s) return ctx.fail(s);
    if (Status s = c.watch_job_progress(); !s) return ctx.fail(s);
  }
  // Every pull is started before waiting for any: they run in parallel.
  std::vector<PullOutcome> outcomes;
  std::vector<std::string> jobs;
  std::vector<size_t> job_of;  // index in `outcomes` of each job
  for (const auto& image : images) {
    auto job =
        c.pull_image(image, per_image_request_id(opt(vm, "request-id"), image, images.size() > 1));
    if (!job) {
      outcomes.push_back({.image = image, .result = "failed", .error = job.status()});
      continue;
    }
    outcomes.push_back({.image = image, .job_id = job_id_from_path(*job), .result = "queued"});
    jobs.push_back(*job);
    job_of.push_back(outcomes.size() - 1);
  }
  if (wait && !jobs.empty()) {
    std::vector<std::string> labels;
    std::vector<std::string> lines;
    for (size_t i : job_of) {
      labels.push_back(outcomes[i].image);
      lines.push_back("pull " + outcomes[i].image);
    }
    ProgressDisplay display(labels, lines);
    auto ended = c.wait_jobs(jobs, ctx.wait_deadline(),
                             [&](size_t i, const JobProgress& p) { display.update(i, p); });
    display.finish();
    if (!ended) return ctx.fail(ended.status());
    bool any_done = false;
    for (size_t k = 0; k < jobs.size(); ++k) {
      PullOutcome& o = outcomes[job_of[k]];
      o.result = (*ended)[k].result;
      o.error = job_error((*ended)[k]);
      any_done = any_done || o.error.is_ok();
    }
    if (any_done) {
      auto rows = c.list_images();
      if (!rows) return ctx.fail(rows.status());
      for (size_t k = 0; k < jobs.size(); ++k) {
        PullOutcome& o = outcomes[job_of[k]];
        if (!o.error.is_ok()) continue;
        for (const auto& r : *rows) {
          if (!r.ref.empty() && (r.ref == (*ended)[k].object_id || r.ref == o.image)) {
            o.digest = r.digest;
            o.size = r.size;
          }
        }
      }
    }
  }
  if (ctx.json()) {
    std::cout << pull_results_json(outcomes) << std::endl;
  } else {
    for (const auto& o : outcomes) {
      if (o.error.is_ok()) {
        std::cout << pull_result_line(o) << "\n";
      } else {
        std::cerr << "nodectl: " << pull_result_line(o) << "\n";
      }
    }
    std::cout << std::flush;
    std::cerr << std::flush;
  }
  return pull_exit_code(outcomes);
}

int image_pin(Context& ctx, const Vars& vm, bool pinned) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  const std::string image = opt(vm, "image");
  if (Status s = (*client)->pin_image(image, pinned, opt(vm, "request-id")); !s) {
    return ctx.fail(s);
  }
  if (ctx.json()) {
    std::cout << image_pinned_json(image, pinned) << std::endl;
  } else {
    std::cout << (pinned ? "pinned '" : "unpinned '") << image << "'" << std::endl;
  }
  return 0;
}

int image_gc(Context& ctx, const Vars& vm) {
  int64_t min_age = -1;
  if (vm.count("min-age")) {
    min_age = vm["min-age"].as<int64_t>();
    if (min_age < 0) {
      return ctx.fail(
          invalid_argument("--min-age: must not be negative, got " + std::to_string(min_age)));
    }
  }
  const bool dry_run = flag(vm, "dry-run");
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto gc = (*client)->collect_images(min_age, dry_run);
  if (!gc) return ctx.fail(gc.status());
  std::cout << (ctx.json() ? image_gc_json(*gc, dry_run) + "\n" : image_gc_text(*gc, dry_run))
            << std::flush;
  return 0;
}

int image_verify(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  BusClient& c = **client;
  if (Status s = c.watch_jobs(); !s) return ctx.fail(s);
  if (Status s = c.watch_job_progress(); !s) return ctx.fail(s);
  auto start = c.last_event_seq();
  if (!start) return ctx.fail(start.status());
  auto job = c.verify_images(opts(vm, "image"), opt(vm, "request-id"));
  if (!job) return ctx.fail(job.status());
  std::vector<JobOutcome> ended;
  {
    ProgressDisplay display({"verify"}, {"verify"});
    auto r = c.wait_jobs({*job}, ctx.wait_deadline(),
                         [&](size_t i, const JobProgress& p) { display.update(i, p); });
    display.finish();
    if (!r) return ctx.fail(r.status());
    ended = std::move(*r);
  }
  const JobOutcome& outcome = ended.front();
  // This run's ImageCorrupt and ImageVerified events come after `start`; a retried request id
  // may answer with an older job, whose events come before it.
  std::optional<VerifyReport> report;
  for (uint64_t since : {*start, uint64_t{0}}) {
    std::vector<EventRow> events;
    if (Status s = print_events_since(ctx, c, &since, false, &events); !s) return ctx.fail(s);
    report = verify_report_from_events(events, outcome.job_id);
    if (report || *start == 0) break;
  }
  if (!report || (report->corrupt.empty() && !job_status(outcome).is_ok())) {
    Status s = job_status(outcome);
    if (s.is_ok()) {
      s = internal_error("verify job " + std::to_string(outcome.job_id) +
                         " ended, but its ImageVerified event is no longer in the event log");
    }
    ctx.fail(s);
    return static_cast<int>(Exit::kFailure);
  }
  if (!report->corrupt.empty()) {
    if (auto rows = c.list_images()) add_tags(*rows, &*report);
  }
  std::cout << (ctx.json() ? verify_report_json(*report) + "\n" : verify_report_text(*report))
            << std::flush;
  return report->corrupt.empty() ? static_cast<int>(Exit::kOk) : static_cast<int>(Exit::kFailure);
}

int image_rm(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  const std::string image = opt(vm, "image");
  if (Status s = (*client)->remove_image(image, opt(vm, "request-id")); !s) return ctx.fail(s);
  if (ctx.json()) {
    std::cout << image_removed_json(image) << std::endl;
  } else {
    std::cout << "removed '" << image << "'" << std::endl;
  }
  return 0;
}

int events(Context& ctx, const Vars& vm) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  uint64_t last = vm.count("since") ? vm["since"].as<uint64_t>() : 0;
  const bool follow = flag(vm, "follow");
  if (!follow) {
    std::vector<EventRow> all;
    if (Status s = print_events_since(ctx, **client, &last, false, ctx.json() ? &all : nullptr);
        !s) {
      return ctx.fail(s);
    }
    if (ctx.json()) std::cout << events_json(all) << std::endl;
    return 0;
  }
  // Subscribe first, then replay: an event committed between the two is seen twice at most, and
  // the seq filter drops the second copy.
  if (Status s = (*client)->watch_events(); !s) return ctx.fail(s);
  if (Status s = print_events_since(ctx, **client, &last, ctx.json(), nullptr); !s) {
    return ctx.fail(s);
  }
  const Deadline deadline = ctx.wait_deadline();
  for (;;) {
    auto seq = (*client)->wait_event_signal(deadline);
    if (!seq) return ctx.fail(seq.status());
    if (*seq == 0) return 0;  // --timeout reached
    if (*seq <= last) continue;
    if (Status s = print_events_since(ctx, **client, &last, ctx.json(), nullptr); !s) {
      return ctx.fail(s);
    }
  }
}

// ---- node ----

int node_health(Context& ctx, const Vars&) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto h = (*client)->get_health();
  if (!h) return ctx.fail(h.status());
  std::cout << (ctx.json() ? health_json(*h) + "\n" : health_text(*h, now_realtime_us()))
            << std::flush;
  return health_exit_code(h->state);
}

int node_capacity(Context& ctx, const Vars&) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto rows = (*client)->get_capacity();
  if (!rows) return ctx.fail(rows.status());
  std::cout << (ctx.json() ? capacity_json(*rows) + "\n" : capacity_table(*rows)) << std::flush;
  return 0;
}

int node_maintenance(Context& ctx, const Vars& vm, bool enabled) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  const std::string reason = enabled ? opt(vm, "reason") : std::string();
  if (Status s = (*client)->set_maintenance(enabled, reason, opt(vm, "request-id")); !s) {
    return ctx.fail(s);
  }
  if (ctx.json()) {
    std::cout << maintenance_json(enabled, reason) << std::endl;
  } else {
    std::cout << (enabled ? "drained: new VMs are refused, running VMs keep running"
                          : "undrained: new VMs are accepted again")
              << std::endl;
  }
  return 0;
}

int node_watch(Context& ctx, const Vars&) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  if (Status s = (*client)->watch_node(); !s) return ctx.fail(s);
  // Once this line is out, no later signal can be missed: a follower may start its clock.
  std::cout << (ctx.json() ? R"({"signal":"Watching"})" : "watching; Ctrl-C to stop") << std::endl;
  const Deadline deadline = ctx.wait_deadline();
  for (;;) {
    auto signals = (*client)->wait_node_signals(deadline);
    if (!signals) return ctx.fail(signals.status());
    if (signals->empty()) return 0;  // --timeout reached
    for (const auto& sig : *signals) {
      std::cout << (ctx.json() ? node_signal_json(sig) : node_signal_text(sig)) << "\n";
    }
    std::cout << std::flush;
  }
}

// ---- command table ----

std::vector<Noun> commands() {
  auto vm_arg = [](const char* usage, const char* summary, auto run) {
    return Verb{.name = "",
                .usage = usage,
                .summary = summary,
                .positional = {"vm"},
                .options = job_options,
                .run = run};
  };
  Verb create{.name = "create",
              .usage = "vm create -f SPEC|- [--request-id ID] [--wait]",
              .summary =
                  "Create a VM from a JSON spec (version 1, see docs/cli.md); '-f -' reads "
                  "stdin. Prints the VM id and its create job.",
              .positional = {},
              .options =
                  [](po::options_description& d) {
                    d.add_options()("file,f",
                                    po::value<std::string>()->required()->value_name("SPEC|-"),
                                    "the VM spec file (JSON), '-' for stdin");
                    job_options(d);
                  },
              .run = vm_create};
  Verb list{.name = "list",
            .usage = "vm list [--tenant T]",
            .summary = "List VMs (ID NAME TENANT STATE GEN), sorted by tenant then name.",
            .positional = {},
            .options =
                [](po::options_description& d) {
                  d.add_options()("tenant", po::value<std::string>()->value_name("T"),
                                  "only the VMs of tenant T");
                },
            .run = vm_list};
  Verb show{.name = "show",
            .usage = "vm show ID|NAME",
            .summary = "Show one VM: spec, observed state, generations.",
            .positional = {"vm"},
            .options = nullptr,
            .run = vm_show};
  Verb start = vm_arg("vm start ID|NAME [--request-id ID] [--wait]", "Start a VM.", vm_start);
  start.name = "start";
  Verb stop = vm_arg("vm stop ID|NAME [--force] [--request-id ID] [--wait]",
                     "Stop a VM: ACPI shutdown, forced after the daemon's stop timeout; --force "
                     "powers off at once.",
                     vm_stop);
  stop.name = "stop";
  stop.options = [](po::options_description& d) {
    d.add_options()("force", po::bool_switch(), "power off at once, no ACPI shutdown");
    job_options(d);
  };
  Verb reboot = vm_arg("vm reboot ID|NAME [--request-id ID] [--wait]", "Reboot a VM.", vm_reboot);
  reboot.name = "reboot";
  Verb del = vm_arg("vm delete ID|NAME [--request-id ID] [--wait]",
                    "Delete a VM: its domain, its disk overlay, all of it.", vm_delete);
  del.name = "delete";

  Verb import{
      .name = "import",
      .usage =
          "image import NAME:TAG FILE --sha256 HEX [--kind disk|kernel|initrd] [--tenant T] "
          "[--request-id ID] [--wait]",
      .summary =
          "Import a local file as an image. nodectl opens FILE and passes the open file to "
          "the daemon; the content must hash to --sha256.",
      .positional = {"image", "file"},
      .options =
          [](po::options_description& d) {
            d.add_options()("sha256", po::value<std::string>()->required()->value_name("HEX"),
                            "expected SHA-256 of FILE (64 hex digits, 'sha256:' prefix optional)")(
                "kind", po::value<std::string>()->default_value("disk")->value_name("K"),
                "disk, kernel or initrd")("tenant", po::value<std::string>()->value_name("T"),
                                          "owning tenant (default: shared by all tenants)");
            job_options(d);
          },
      .run = image_import};
  Verb ilist{.name = "list",
             .usage = "image list",
             .summary =
                 "List images (IMAGE DIGEST KIND FORMAT SIZE USERS LAST-USED PINNED): one row "
                 "per tag, then one per cached blob no tag names (IMAGE '-').",
             .positional = {},
             .options = nullptr,
             .run = image_list};
  Verb pull{.name = "pull",
            .usage =
                "image pull NAME:TAG [NAME:TAG ...] [--from-file FILE|-] [--request-id ID] "
                "[--no-wait]",
            .summary =
                "Pull images from the node's shared image store into its cache, all in "
                "parallel, and wait for them, showing their progress on stderr. Exit 0 when all "
                "succeeded; when all failed with the same error, that error's exit code; else 1.",
            .positional = {},
            .options =
                [](po::options_description& d) {
                  d.add_options()("from-file", po::value<std::string>()->value_name("FILE|-"),
                                  "also pull the images listed in FILE ('-': stdin), one per "
                                  "line, '#' starts a comment")(
                      "request-id", po::value<std::string>()->value_name("ID"),
                      "idempotency key; with several images each gets ID:NAME:TAG")(
                      "no-wait", po::bool_switch(), "print the jobs and return at once");
                },
            .run = image_pull,
            .rest = "image"};
  auto pin_verb = [](bool pinned) {
    return Verb{
        .name = pinned ? "pin" : "unpin",
        .usage = pinned ? "image pin NAME:TAG|DIGEST [--request-id ID]"
                        : "image unpin NAME:TAG|DIGEST [--request-id ID]",
        .summary = pinned ? "Pin a cached image: garbage collection never removes it."
                          : "Unpin a cached image: garbage collection may remove it again.",
        .positional = {"image"},
        .options = request_id_option,
        .run = [pinned](Context& ctx, const Vars& vm) { return image_pin(ctx, vm, pinned); }};
  };
  Verb gc{.name = "gc",
          .usage = "image gc [--min-age SECONDS] [--dry-run]",
          .summary =
              "Remove the cached images that no VM uses, that are not pinned and were not used "
              "for --min-age; prints what was removed and the bytes freed.",
          .positional = {},
          .options =
              [](po::options_description& d) {
                d.add_options()("min-age", po::value<int64_t>()->value_name("SECONDS"),
                                "least time since last use (default: the daemon's "
                                "image-gc-min-age)")("dry-run", po::bool_switch(),
                                                     "only list what would be removed");
              },
          .run = image_gc};
  Verb verify{.name = "verify",
              .usage = "image verify [NAME:TAG|DIGEST ...] [--request-id ID]",
              .summary =
                  "Re-hash cached images (all when none is named), showing progress on stderr, "
                  "and report the corrupt ones; exit 1 when any is corrupt.",
              .positional = {},
              .options = request_id_option,
              .run = image_verify,
              .rest = "image"};
  Verb rm{.name = "rm",
          .usage = "image rm NAME:TAG|DIGEST [--request-id ID]",
          .summary = "Remove an image; refused (exit 4, naming the VMs) while a VM uses it.",
          .positional = {"image"},
          .options = request_id_option,
          .run = image_rm};
  Verb ncreate{.name = "create",
               .usage = "network create -f SPEC|- [--request-id ID] [--wait]",
               .summary =
                   "Create a tenant network from a JSON spec (version 1, see "
                   "docs/network-spec.md): its bridge, VXLAN device, DHCP server and "
                   "anti-spoofing rules. '-f -' reads stdin.",
               .positional = {},
               .options =
                   [](po::options_description& d) {
                     d.add_options()("file,f",
                                     po::value<std::string>()->required()->value_name("SPEC|-"),
                                     "the network spec file (JSON), '-' for stdin");
                     job_options(d);
                   },
               .run = network_create};
  Verb nlist{.name = "list",
             .usage = "network list [--tenant T]",
             .summary = "List tenant networks (NAME TENANT VNI SUBNET PORTS STATE).",
             .positional = {},
             .options =
                 [](po::options_description& d) {
                   d.add_options()("tenant", po::value<std::string>()->value_name("T"),
                                   "only the networks of tenant T");
                 },
             .run = network_list};
  Verb nshow{.name = "show",
             .usage = "network show NAME",
             .summary = "Show one network: spec, state, and each VM port (address, MAC, tap).",
             .positional = {"network"},
             .options = nullptr,
             .run = network_show};
  Verb ndelete{.name = "delete",
               .usage = "network delete NAME [--request-id ID] [--wait]",
               .summary =
                   "Delete a network and everything on the host made for it; refused "
                   "(exit 4) while VMs use it.",
               .positional = {"network"},
               .options = job_options,
               .run = network_delete};
  Verb ev{.name = "",
          .usage = "events [--since N] [--follow]",
          .summary =
              "Print the event log after sequence number N (default 0: all that is kept). "
              "With --follow, keep printing new events as they happen, in sequence order, "
              "without gaps or duplicates (JSON: one object per line).",
          .positional = {},
          .options =
              [](po::options_description& d) {
                d.add_options()("since", po::value<uint64_t>()->value_name("N"),
                                "only events with seq > N")("follow", po::bool_switch(),
                                                            "keep streaming new events");
              },
          .run = events};
  Verb nhealth{.name = "health",
               .usage = "node health",
               .summary =
                   "Show the node's health: its state (the worst host check) and every check "
                   "with its reason. Exit 0 ok, 8 degraded, 9 failed: usable as a monitoring "
                   "probe.",
               .positional = {},
               .options = nullptr,
               .run = node_health};
  Verb ncapacity{.name = "capacity",
                 .usage = "node capacity",
                 .summary =
                     "Show vCPUs, memory and disk: total, reserved for the host, overcommit "
                     "ratio, capacity, allocated to VMs, free.",
                 .positional = {},
                 .options = nullptr,
                 .run = node_capacity};
  Verb ndrain{.name = "drain",
              .usage = "node drain [--reason TEXT] [--request-id ID]",
              .summary =
                  "Put the node in maintenance: new VMs are refused (Unavailable), running VMs "
                  "keep running. Survives daemon restarts; shown in health and heartbeats.",
              .positional = {},
              .options =
                  [](po::options_description& d) {
                    d.add_options()("reason", po::value<std::string>()->value_name("TEXT"),
                                    "why, for the fabric and other operators");
                    request_id_option(d);
                  },
              .run = [](Context& ctx, const Vars& vm) { return node_maintenance(ctx, vm, true); }};
  Verb nundrain{
      .name = "undrain",
      .usage = "node undrain [--request-id ID]",
      .summary = "End maintenance: new VMs are accepted again.",
      .positional = {},
      .options = request_id_option,
      .run = [](Context& ctx, const Vars& vm) { return node_maintenance(ctx, vm, false); }};
  Verb nwatch{.name = "watch",
              .usage = "node watch [--timeout SECONDS]",
              .summary =
                  "Print Heartbeat, HealthChanged and VmStateChanged signals as they arrive "
                  "(JSON: one object per line, the first {\"signal\":\"Watching\"} once "
                  "subscribed). Runs until interrupted or --timeout.",
              .positional = {},
              .options = nullptr,
              .run = node_watch};
  return {
      Noun{"vm",
           "create, list, show, start, stop, reboot and delete VMs",
           {create, list, show, start, stop, reboot, del}},
      Noun{"network",
           "create, list, show and delete tenant networks",
           {ncreate, nlist, nshow, ndelete}},
      Noun{"image",
           "import, pull, list, pin, verify, collect and remove cached images",
           {import, pull, ilist, pin_verb(true), pin_verb(false), verify, gc, rm}},
      Noun{"node",
           "health, capacity, drain/undrain and the live signal stream of this node",
           {nhealth, ncapacity, ndrain, nundrain, nwatch}},
      Noun{"events", "print (and follow) the node's event log", {ev}},
  };
}

void print_top_help(std::ostream& os, Globals* g) {
  os << "usage: nodectl [--bus system|session|ADDRESS] [--json] [--timeout SECONDS] NOUN VERB "
        "...\n\nCommands:\n";
  for (const auto& noun : commands()) {
    for (const auto& v : noun.verbs) os << "  nodectl " << v.usage << "\n";
  }
  os << "\n'nodectl NOUN --help' and 'nodectl NOUN VERB --help' describe each command.\n\n"
     << global_options(g) << "\n"
     << kExitCodes;
}

void print_noun_help(std::ostream& os, const Noun& noun) {
  os << "usage: nodectl " << noun.name << " VERB ...\n\n" << noun.summary << "\n\nVerbs:\n";
  for (const auto& v : noun.verbs) os << "  nodectl " << v.usage << "\n      " << v.summary << "\n";
  os << "\n" << kExitCodes;
}

int run(int argc, char** argv) {
  const Args argvec(argv + 1, argv + argc);
  Globals g;
  size_t i = 0;
  Args leading;
  for (; i < argvec.size() && !argvec[i].empty() && argvec[i][0] == '-'; ++i) {
    leading.push_back(argvec[i]);
    if ((argvec[i] == "--bus" || argvec[i] == "--timeout") && i + 1 < argvec.size()) {
      leading.push_back(argvec[++i]);
    }
  }
  bool help = false;
  try {
    auto d = global_options(&g);
    Vars vm;
    po::store(po::command_line_parser(leading).options(d).run(), vm);
    po::notify(vm);
    help = vm.count("help") > 0;
  } catch (const po::error& e) {
    return Context(g).fail(invalid_argument(std::string(e.what()) + "; see 'nodectl --help'"));
  }
  if (help) {
    print_top_help(std::cout, &g);
    return 0;
  }
  if (i >= argvec.size()) {
    print_top_help(std::cerr, &g);
    return static_cast<int>(Exit::kUsage);
  }
  const auto nouns = commands();
  const std::string& noun_name = argvec[i++];
  const auto noun =
      std::find_if(nouns.begin(), nouns.end(), [&](const Noun& n) { return n.name == noun_name; });
  if (noun == nouns.end()) {
    return Context(g).fail(
        invalid_argument("unknown command '" + noun_name + "'; see 'nodectl --help'"));
  }
  const Verb* verb = nullptr;
  if (noun->verbs.size() == 1 && noun->verbs[0].name.empty()) {
    verb = &noun->verbs[0];
  } else {
    if (i >= argvec.size()) {
      print_noun_help(std::cerr, *noun);
      return static_cast<int>(Exit::kUsage);
    }
    const std::string& verb_name = argvec[i++];
    if (verb_name == "--help" || verb_name == "-h") {
      print_noun_help(std::cout, *noun);
      return 0;
    }
    for (const auto& v : noun->verbs) {
      if (v.name == verb_name) verb = &v;
    }
    if (verb == nullptr) {
      return Context(g).fail(invalid_argument("unknown verb '" + verb_name + "' for '" +
                                              noun->name + "'; see 'nodectl " + noun->name +
                                              " --help'"));
    }
  }
  std::optional<Vars> vm;
  try {
    vm = parse_verb(*verb, Args(argvec.begin() + static_cast<std::ptrdiff_t>(i), argvec.end()), &g);
  } catch (const UsageError& e) {
    return Context(g).fail(invalid_argument(e.message));
  }
  if (!vm) return 0;
  Context ctx(g);
  return verb->run(ctx, *vm);
}

}  // namespace
}  // namespace nm::cli

int main(int argc, char** argv) {
  try {
    return nm::cli::run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "nodectl: " << e.what() << std::endl;
    return static_cast<int>(nm::cli::Exit::kFailure);
  }
}
