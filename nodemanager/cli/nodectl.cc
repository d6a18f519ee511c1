// nodectl: the operator's command line for nodemanagerd. See docs/cli.md.
#include <fcntl.h>

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
    "  7  quota or capacity exhausted (QuotaExceeded, InsufficientCapacity)\n";

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

Result<std::string> read_spec(const std::string& path) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    if (std::cin.bad()) return invalid_argument("-f: cannot read the spec from stdin");
    return text;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return invalid_argument("-f: cannot open '" + path + "'");
  text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (in.bad()) return invalid_argument("-f: cannot read '" + path + "'");
  return text;
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

int image_list(Context& ctx, const Vars&) {
  auto client = ctx.client();
  if (!client) return ctx.fail(client.status());
  auto images = (*client)->list_images();
  if (!images) return ctx.fail(images.status());
  std::cout << (ctx.json() ? image_list_json(*images) + "\n" : image_list_table(*images))
            << std::flush;
  return 0;
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
             .summary = "List images (IMAGE DIGEST KIND FORMAT SIZE VSIZE TENANT).",
             .positional = {},
             .options = nullptr,
             .run = image_list};
  Verb rm{.name = "rm",
          .usage = "image rm NAME:TAG|DIGEST [--request-id ID]",
          .summary = "Remove an image; refused (exit 4) while a VM uses it.",
          .positional = {"image"},
          .options =
              [](po::options_description& d) {
                d.add_options()("request-id", po::value<std::string>()->value_name("ID"),
                                "idempotency key");
              },
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
  return {
      Noun{"vm",
           "create, list, show, start, stop, reboot and delete VMs",
           {create, list, show, start, stop, reboot, del}},
      Noun{"network",
           "create, list, show and delete tenant networks",
           {ncreate, nlist, nshow, ndelete}},
      Noun{"image", "import, list and remove images", {import, ilist, rm}},
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
