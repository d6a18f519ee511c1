// image_bench: issue 3's image store benchmark (docs/benchmarks.md, "Image store (issue 3)").
//
//   image_bench --work DIR [--parts pull,overlay,concurrent] [--size-mib 1024] [--large-mib 8192]
//               [--runs 5] [--creations 30] [--libvirt-uri qemu:///system] [--pool NAME]
//               [--daemon PATH] [--daemon-uri test:///default] [--vms 20] [--daemon-runs 3]
//               [--no-drop-caches] [--strict]
//
// 1. pull: a `size-mib` image (pseudo-random bytes, so nothing is sparse or compressible) in a
//    directory store under DIR, pulled by ImageStore::pull from open_dir_image_source into a fresh
//    cache directory, next to `cp` of the blob followed by `sha256sum` of the copy, in the same
//    run, alternating which goes first. `runs` repetitions cold (sync + drop_caches before each
//    one, as root; skipped with --no-drop-caches) and `runs` warm (the blob in the page cache);
//    medians compared. Then the pull's phases alone (cold read of the blob in 1 MiB reads,
//    SHA-256 of 1 GiB in memory by OpenSSL, writing 1 GiB in 1 MiB writes + fsync) to see which
//    one dominates.
// 2. overlay: LibvirtHypervisor::create_overlay (virStorageVolCreateXML with <backingStore>) on
//    `libvirt-uri`, in a pool `pool` whose directory is under DIR, from fully allocated bases:
//    raw (fallocate) and qcow2 (qemu-img preallocation=falloc) of `size-mib` and `large-mib`;
//    `creations` overlays per base (20 GiB virtual), bases interleaved, each overlay deleted after
//    (not timed); p50/p95 per base. The pool is left defined: the caller removes it (virsh).
// 3. concurrent: `daemon` (nodemanagerd) on a private dbus-daemon with a fresh state directory,
//    --libvirt-uri `daemon-uri`, --image-source dir:<the store of part 1>, reserves 0. Two
//    scenarios on fresh daemons, alternating, `daemon-runs` times each: "single" = PullImage of
//    the image, then CreateVm of one VM from it (now cached), each until its JobRemoved; and
//    "concurrent" = `vms` CreateVm calls sent at once for the uncached image, until all their
//    JobRemoved. The number of transfers is read from the ImagePulled events (GetEvents): exactly
//    one must have "transferred": true.
//
// tests/bench/run-image-bench.sh builds and runs it (and starts libvirtd when needed).
//
// Exit status: 0 when every measurement ran (targets are reported, not enforced), 1 when a step
// failed, 2 on bad usage, 3 with --strict when a target was missed.
#include <fcntl.h>
#include <openssl/evp.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-bus.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "args.h"
#include "bench_bus.h"
#include "libvirt/libvirt_hypervisor.h"
#include "nm/core/fs.h"
#include "nm/core/ids.h"
#include "nm/imagestore/image_source.h"
#include "nm/imagestore/image_store.h"
#include "stats.h"

extern char** environ;

namespace nm::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr double kPullTargetRatio = 0.8;
constexpr double kOverlayTargetMs = 50.0;
// "Equal within noise": the p50s of the two base sizes differ by at most this fraction of the
// smaller one, or by kOverlayNoiseMs, whichever is larger.
constexpr double kOverlayNoiseFraction = 0.2;
constexpr double kOverlayNoiseMs = 2.0;
constexpr double kConcurrentTargetFactor = 1.5;
constexpr uint64_t kOverlayCapacity = uint64_t{20} << 30;
constexpr size_t kChunk = size_t{1} << 20;
constexpr int kOverlayWarmup = 2;
constexpr auto kJobTimeout = 600s;
constexpr auto kStartTimeout = 30s;

constexpr const char* kNmService = "org.nodemanager.NodeManager1";
constexpr const char* kNmPath = "/org/nodemanager/NodeManager1";
constexpr const char* kNmManager = "org.nodemanager.NodeManager1.Manager";
constexpr const char* kImageName = "bench";

struct Options {
  fs::path work;
  std::set<std::string> parts = {"pull", "overlay", "concurrent"};
  uint64_t size_mib = 1024;
  uint64_t large_mib = 8192;
  int runs = 5;
  int creations = 30;
  std::string libvirt_uri = "qemu:///system";
  std::string pool = "nm-imgbench";
  std::string daemon;
  std::string daemon_uri = "test:///default";
  int vms = 20;
  int daemon_runs = 3;
  bool drop_caches = true;
  bool strict = false;
};

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

std::string join(const std::vector<double>& v, const char* fmt = "%.0f") {
  std::string out;
  for (const double x : v) {
    std::array<char, 32> buf{};
    std::snprintf(buf.data(), buf.size(), fmt, x);
    if (!out.empty()) out += ' ';
    out += buf.data();
  }
  return out;
}

bool fail(const char* what, const Status& s) {
  std::fprintf(stderr, "image_bench: %s: %s\n", what, s.to_string().c_str());
  return false;
}

// ---- processes and files --------------------------------------------------------------------

struct FileActionsDeleter {
  void operator()(posix_spawn_file_actions_t* fa) const noexcept {
    posix_spawn_file_actions_destroy(fa);
    delete fa;  // NOLINT(cppcoreguidelines-owning-memory)
  }
};

// Starts `argv` with stdin from /dev/null and stdout+stderr appended to `log` (or /dev/null).
Result<pid_t> spawn(const std::vector<std::string>& argv, const std::string& log = "/dev/null") {
  std::unique_ptr<posix_spawn_file_actions_t, FileActionsDeleter> fa(
      new posix_spawn_file_actions_t);  // NOLINT(cppcoreguidelines-owning-memory)
  if (posix_spawn_file_actions_init(fa.get()) != 0) {
    return internal_error("posix_spawn_file_actions_init failed");
  }
  posix_spawn_file_actions_addopen(fa.get(), 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(fa.get(), 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(fa.get(), 1, 2);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int r = posix_spawnp(&pid, args[0], fa.get(), nullptr, args.data(), environ);
  if (r != 0) return errno_status(r, "starting '" + argv[0] + "'");
  return pid;
}

// Runs `argv` to completion; OK when it exits 0.
Status run(const std::vector<std::string>& argv, const std::string& log = "/dev/null") {
  NM_ASSIGN_OR_RETURN(pid_t pid, spawn(argv, log));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return errno_status(errno, "waitpid");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return internal_error("'" + argv[0] + "' failed (status " + std::to_string(status) + ")");
  }
  return Status::ok();
}

// SIGTERM, up to 10 s, then SIGKILL; reaps `pid`.
void stop_process(pid_t pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGTERM);
  const auto deadline = Clock::now() + 10s;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (Clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return;
    }
    std::this_thread::sleep_for(20ms);
  }
}

bool process_alive(pid_t pid) {
  int status = 0;
  return ::waitpid(pid, &status, WNOHANG) == 0;
}

// sync, then drop the page cache (root only); a no-op when disabled.
Status drop_caches(const Options& opts) {
  ::sync();
  if (!opts.drop_caches) return Status::ok();
  UniqueFd fd(::open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC));
  if (!fd.valid()) return errno_status(errno, "open '/proc/sys/vm/drop_caches'");
  if (::write(fd.get(), "3\n", 2) != 2) return errno_status(errno, "drop_caches");
  return Status::ok();
}

std::string hex(std::span<const unsigned char> bytes) {
  static constexpr std::string_view kDigits = "0123456789abcdef";
  std::string out;
  for (const unsigned char b : bytes) {
    out += kDigits[b >> 4];
    out += kDigits[b & 0xf];
  }
  return out;
}

struct EvpDeleter {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};
using EvpPtr = std::unique_ptr<EVP_MD_CTX, EvpDeleter>;

Result<EvpPtr> new_sha256() {
  EvpPtr ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return internal_error("sha256: cannot initialise OpenSSL digest");
  }
  return ctx;
}

std::string finish_sha256(EVP_MD_CTX* ctx) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md.data(), &len);
  return hex(std::span<const unsigned char>(md.data(), len));
}

Status write_all(int fd, std::span<const uint8_t> data, const std::string& path) {
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status(errno, "write '" + path + "'");
    }
    off += static_cast<size_t>(n);
  }
  return Status::ok();
}

// Fills `buf` with xorshift64 output (fast, incompressible enough for a filesystem).
void fill_random(std::vector<uint8_t>& buf, uint64_t& state) {
  for (size_t i = 0; i + 8 <= buf.size(); i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(buf.data() + i, &state, 8);
  }
}

// Writes `bytes` pseudo-random bytes to `path` (fsynced); their SHA-256 in hex.
Result<std::string> make_random_file(const fs::path& path, uint64_t bytes, uint64_t seed) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid()) return errno_status(errno, "create '" + path.string() + "'");
  NM_ASSIGN_OR_RETURN(EvpPtr ctx, new_sha256());
  std::vector<uint8_t> buf(kChunk);
  uint64_t state = seed | 1;
  for (uint64_t done = 0; done < bytes; done += buf.size()) {
    fill_random(buf, state);
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), bytes - done));
    EVP_DigestUpdate(ctx.get(), buf.data(), n);
    NM_RETURN_IF_ERROR(write_all(fd.get(), std::span<const uint8_t>(buf.data(), n), path));
  }
  if (::fsync(fd.get()) != 0) return errno_status(errno, "fsync '" + path.string() + "'");
  return finish_sha256(ctx.get());
}

Status fsync_path(const fs::path& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return errno_status(errno, "open '" + path.string() + "'");
  if (::fsync(fd.get()) != 0) return errno_status(errno, "fsync '" + path.string() + "'");
  return Status::ok();
}

// Reads the whole file in 1 MiB reads (into the page cache).
Status read_file(const fs::path& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return errno_status(errno, "open '" + path.string() + "'");
  std::vector<uint8_t> buf(kChunk);
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status(errno, "read '" + path.string() + "'");
    if (n == 0) return Status::ok();
  }
}

// ---- 1. pull versus cp + sha256sum ------------------------------------------------------------

// A directory store with one image, `bench:<tag>`.
struct Store {
  fs::path root;
  std::string tag;
  std::string hex;
  uint64_t bytes = 0;
  fs::path blob() const { return root / "blobs" / "sha256" / hex; }
  std::string ref() const { return std::string(kImageName) + ":" + tag; }
};

Result<Store> make_store(const fs::path& root, uint64_t mib) {
  Store store{root, std::to_string(mib) + "m", "", mib << 20};
  fs::create_directories(root / "blobs" / "sha256");
  fs::create_directories(root / kImageName);
  const fs::path tmp = root / "blobs" / "incoming";
  NM_ASSIGN_OR_RETURN(store.hex, make_random_file(tmp, store.bytes, 0x9e3779b97f4a7c15ULL + mib));
  fs::rename(tmp, store.blob());
  std::ofstream manifest(root / kImageName / (store.tag + ".json"));
  manifest << nlohmann::json{{"digest", "sha256:" + store.hex},
                             {"size", store.bytes},
                             {"format", "raw"},
                             {"kind", "disk"}}
                  .dump()
           << "\n";
  if (!manifest.good()) return internal_error("writing the manifest under '" + root.string() + "'");
  return store;
}

Result<double> time_pull(const Store& store, const fs::path& cache) {
  ImageStoreOptions opts;
  opts.reserve_bytes = 0;
  NM_ASSIGN_OR_RETURN(auto images, open_dir_image_store(cache.string(), opts));
  NM_ASSIGN_OR_RETURN(auto source, open_dir_image_source(store.root.string()));
  NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(store.ref(), "image"));
  std::array<ImageSource*, 1> sources{source.get()};
  const auto t0 = Clock::now();
  NM_ASSIGN_OR_RETURN(PullResult r, images->pull(ref, sources, nullptr, nullptr));
  const double ms = ms_since(t0);
  if (!r.transferred || r.info.digest.str() != "sha256:" + store.hex) {
    return internal_error("pull of '" + store.ref() + "' did not transfer the expected digest");
  }
  return ms;
}

struct CpSample {
  double cp_ms = 0;
  double sha_ms = 0;
  double fsync_ms = 0;    // the copy's fsync, after sha256sum (not part of the target's baseline)
  double openssl_ms = 0;  // `openssl dgst -sha256` of the copy, after that (page cache)
};

Result<CpSample> time_cp_sha(const Store& store, const fs::path& dst, const fs::path& out) {
  CpSample s;
  auto t0 = Clock::now();
  NM_RETURN_IF_ERROR(run({"cp", store.blob().string(), dst.string()}));
  s.cp_ms = ms_since(t0);
  fs::remove(out);
  t0 = Clock::now();
  NM_RETURN_IF_ERROR(run({"sha256sum", dst.string()}, out.string()));
  s.sha_ms = ms_since(t0);
  t0 = Clock::now();
  NM_RETURN_IF_ERROR(fsync_path(dst));
  s.fsync_ms = ms_since(t0);
  t0 = Clock::now();
  NM_RETURN_IF_ERROR(run({"openssl", "dgst", "-sha256", dst.string()}));
  s.openssl_ms = ms_since(t0);
  std::ifstream in(out);
  std::string digest;
  in >> digest;
  if (digest != store.hex) return internal_error("sha256sum of the copy: '" + digest + "'");
  return s;
}

struct PullTemperature {
  std::vector<double> pull_ms;
  std::vector<CpSample> cp;
};

struct Phases {
  double read_ms = 0;           // cold sequential read of the blob, 1 MiB reads
  double sha_ms = 0;            // OpenSSL SHA-256 of the same number of bytes, in memory
  double write_ms = 0;          // writing that many bytes in 1 MiB writes (page cache)
  double fsync_ms = 0;          // then fsync
  double sha256sum_hot_ms = 0;  // sha256sum of the blob while it is in the page cache
};

struct PullResults {
  PullTemperature cold, warm;
  Phases phases;
  uint64_t bytes = 0;
};

Status clean(const fs::path& cache, const fs::path& dst) {
  std::error_code ec;
  fs::remove_all(cache, ec);
  fs::remove(dst, ec);
  ::sync();
  return Status::ok();
}

Status measure_pull(const Options& opts, const Store& store, PullResults* out) {
  out->bytes = store.bytes;
  const fs::path cache = opts.work / "pull-cache";
  const fs::path dst = opts.work / "cp-copy";
  const fs::path sum = opts.work / "sha256sum.out";
  for (const bool cold : {true, false}) {
    PullTemperature& t = cold ? out->cold : out->warm;
    if (!cold) NM_RETURN_IF_ERROR(read_file(store.blob()));
    for (int r = 0; r < opts.runs; ++r) {
      for (int k = 0; k < 2; ++k) {
        const bool pull_now = (k == 0) == (r % 2 == 0);
        NM_RETURN_IF_ERROR(clean(cache, dst));
        if (cold) NM_RETURN_IF_ERROR(drop_caches(opts));
        if (pull_now) {
          NM_ASSIGN_OR_RETURN(double ms, time_pull(store, cache));
          t.pull_ms.push_back(ms);
        } else {
          NM_ASSIGN_OR_RETURN(CpSample s, time_cp_sha(store, dst, sum));
          t.cp.push_back(s);
        }
      }
      const CpSample& c = t.cp.back();
      std::fprintf(stderr,
                   "image_bench: pull %s run %d: pull %.0f ms, cp %.0f + sha256sum %.0f ms "
                   "(+ fsync %.0f)\n",
                   cold ? "cold" : "warm", r + 1, t.pull_ms.back(), c.cp_ms, c.sha_ms, c.fsync_ms);
    }
  }
  NM_RETURN_IF_ERROR(clean(cache, dst));

  // Phases of a pull, each alone.
  Phases& p = out->phases;
  NM_RETURN_IF_ERROR(drop_caches(opts));
  auto t0 = Clock::now();
  NM_RETURN_IF_ERROR(read_file(store.blob()));
  p.read_ms = ms_since(t0);
  t0 = Clock::now();
  NM_RETURN_IF_ERROR(run({"sha256sum", store.blob().string()}));
  p.sha256sum_hot_ms = ms_since(t0);
  std::vector<uint8_t> buf(kChunk);
  uint64_t state = 42;
  fill_random(buf, state);
  NM_ASSIGN_OR_RETURN(EvpPtr ctx, new_sha256());
  t0 = Clock::now();
  for (uint64_t done = 0; done < store.bytes; done += buf.size()) {
    EVP_DigestUpdate(ctx.get(), buf.data(), buf.size());
  }
  finish_sha256(ctx.get());
  p.sha_ms = ms_since(t0);
  {
    UniqueFd fd(::open(dst.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd.valid()) return errno_status(errno, "create '" + dst.string() + "'");
    t0 = Clock::now();
    for (uint64_t done = 0; done < store.bytes; done += buf.size()) {
      NM_RETURN_IF_ERROR(write_all(fd.get(), buf, dst.string()));
    }
    p.write_ms = ms_since(t0);
    t0 = Clock::now();
    if (::fsync(fd.get()) != 0) return errno_status(errno, "fsync '" + dst.string() + "'");
    p.fsync_ms = ms_since(t0);
  }
  return clean(cache, dst);
}

double mib_per_s(uint64_t bytes, double ms) {
  return ms > 0 ? static_cast<double>(bytes) / (1 << 20) / (ms / 1000) : 0;
}

// ---- 2. overlay creation ----------------------------------------------------------------------

struct Base {
  std::string label;
  fs::path path;
  std::string format;
  std::vector<double> create_ms;
  std::vector<double> delete_ms;
};

Status make_bases(const Options& opts, std::vector<Base>* bases) {
  const fs::path dir = opts.work / "bases";
  fs::create_directories(dir);
  for (const uint64_t mib : {opts.size_mib, opts.large_mib}) {
    const std::string size = std::to_string(mib) + "M";
    Base raw{"raw " + std::to_string(mib) + " MiB", dir / ("base-" + size + ".raw"), "raw", {}, {}};
    NM_RETURN_IF_ERROR(run({"fallocate", "-l", size, raw.path.string()}));
    Base qcow{"qcow2 " + std::to_string(mib) + " MiB",
              dir / ("base-" + size + ".qcow2"),
              "qcow2",
              {},
              {}};
    NM_RETURN_IF_ERROR(run({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
                            qcow.path.string(), size}));
    bases->push_back(std::move(raw));
    bases->push_back(std::move(qcow));
  }
  ::sync();
  return Status::ok();
}

Status measure_overlays(const Options& opts, std::vector<Base>* bases) {
  NM_RETURN_IF_ERROR(make_bases(opts, bases));
  LibvirtOptions lo;
  lo.uri = opts.libvirt_uri;
  lo.pool_name = opts.pool;
  lo.pool_dir = (opts.work / "pool").string();
  NM_ASSIGN_OR_RETURN(auto hv, LibvirtHypervisor::create(lo));
  const size_t n = bases->size();
  for (int i = 0; i < kOverlayWarmup + opts.creations; ++i) {
    for (size_t k = 0; k < n; ++k) {
      Base& b = (*bases)[(k + static_cast<size_t>(i)) % n];
      const VmId id = generate_vm_id();
      auto t0 = Clock::now();
      auto path = hv->create_overlay(id, b.path.string(), b.format, kOverlayCapacity);
      const double create = ms_since(t0);
      if (!path.is_ok()) return path.status().with_context("overlay on '" + b.label + "'");
      t0 = Clock::now();
      NM_RETURN_IF_ERROR(hv->delete_overlay(id));
      const double del = ms_since(t0);
      if (i >= kOverlayWarmup) {
        b.create_ms.push_back(create);
        b.delete_ms.push_back(del);
      }
    }
  }
  return Status::ok();
}

// ---- 3. concurrent creations through the daemon ---------------------------------------------

struct JobEnd {
  std::string result;
  std::string error;
};

// A private dbus-daemon and a nodemanagerd on it, with a fresh state directory; stopped (by pid)
// and removed on destruction.
class Daemon {
 public:
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;
  ~Daemon() {
    bus_.reset();
    stop_process(nm_pid_);
    stop_process(bus_pid_);
    if (uri_ != "test:///default") {
      // The daemon leaves its overlay pool defined in libvirtd; each fresh daemon needs its own.
      (void)run({"virsh", "-q", "-c", uri_, "pool-destroy", pool_});
      (void)run({"virsh", "-q", "-c", uri_, "pool-undefine", pool_});
    }
    std::error_code ec;
    fs::remove_all(dir_ / "state", ec);
  }

  static Result<std::unique_ptr<Daemon>> start(const Options& opts, const fs::path& dir,
                                               const Store& store) {
    auto d = std::unique_ptr<Daemon>(
        new Daemon(dir, opts.daemon_uri, opts.pool + "-" + dir.filename().string()));
    NM_RETURN_IF_ERROR(d->start_bus());
    NM_RETURN_IF_ERROR(d->start_daemon(opts, store));
    return d;
  }

  sd_bus* bus() { return bus_.get(); }
  const fs::path& dir() const { return dir_; }

  // Subscribes to JobRemoved; call before the first job-starting call.
  Status subscribe() {
    sd_bus_slot* slot = nullptr;
    const int r = sd_bus_add_match(bus_.get(), &slot,
                                   "type='signal',path='/org/nodemanager/NodeManager1',"
                                   "interface='org.nodemanager.NodeManager1.Manager',"
                                   "member='JobRemoved'",
                                   &Daemon::on_job_removed, this);
    if (r < 0) return bus_status(r, nullptr, "adding the JobRemoved match");
    match_.reset(slot);
    return Status::ok();
  }

  // Processes the bus until `done()` or the deadline.
  Status pump(const std::function<bool()>& done) {
    const auto deadline = Clock::now() + kJobTimeout;
    while (!done()) {
      int r = sd_bus_process(bus_.get(), nullptr);
      if (r < 0) return bus_status(r, nullptr, "processing the bus");
      if (r > 0) continue;
      if (!process_alive(nm_pid_)) return unavailable("nodemanagerd exited; see its log");
      const auto now = Clock::now();
      if (now >= deadline) return unavailable("jobs did not end within the deadline");
      r = sd_bus_wait(bus_.get(), 1'000'000);
      if (r < 0) return bus_status(r, nullptr, "waiting on the bus");
    }
    return Status::ok();
  }

  Status wait_job(const std::string& job) {
    NM_RETURN_IF_ERROR(pump([&] { return ended_.contains(job); }));
    const JobEnd& e = ended_.at(job);
    if (e.result != "done") return internal_error("job '" + job + "' ended: " + e.error);
    return Status::ok();
  }

  const std::map<std::string, JobEnd>& ended() const { return ended_; }

  // Deletes the VMs (not timed), so that a real libvirtd keeps no domain or volume of ours.
  Status delete_vms(const std::vector<std::string>& ids) {
    std::vector<std::string> jobs;
    for (const std::string& id : ids) {
      BusError error;
      sd_bus_message* raw = nullptr;
      int r = sd_bus_call_method(bus_.get(), kNmService, kNmPath, kNmManager, "DeleteVm",
                                 error.get(), &raw, "ss", id.c_str(), "");
      if (r < 0) return bus_status(r, error.get(), "DeleteVm");
      MessagePtr reply(raw);
      const char* job = nullptr;
      r = sd_bus_message_read(reply.get(), "o", &job);
      if (r < 0) return bus_status(r, nullptr, "DeleteVm reply");
      jobs.emplace_back(job);
    }
    for (const std::string& job : jobs) NM_RETURN_IF_ERROR(wait_job(job));
    return Status::ok();
  }

  // ImagePulled events so far: (all, with "transferred": true).
  Result<std::pair<int, int>> pulled_events() {
    BusError error;
    sd_bus_message* raw = nullptr;
    int r = sd_bus_call_method(bus_.get(), kNmService, kNmPath, kNmManager, "GetEvents",
                               error.get(), &raw, "tu", uint64_t{0}, uint32_t{100000});
    if (r < 0) return bus_status(r, error.get(), "GetEvents");
    MessagePtr reply(raw);
    r = sd_bus_message_enter_container(reply.get(), 'a', "(ttsss)");
    if (r < 0) return bus_status(r, nullptr, "GetEvents reply");
    int all = 0;
    int transferred = 0;
    for (;;) {
      uint64_t seq = 0;
      uint64_t ts = 0;
      const char* kind = nullptr;
      const char* object = nullptr;
      const char* payload = nullptr;
      r = sd_bus_message_read(reply.get(), "(ttsss)", &seq, &ts, &kind, &object, &payload);
      if (r < 0) return bus_status(r, nullptr, "GetEvents row");
      if (r == 0) break;
      if (std::string_view(kind) != "ImagePulled") continue;
      ++all;
      const auto doc = nlohmann::json::parse(payload, nullptr, false);
      if (doc.is_object() && doc.value("transferred", false)) ++transferred;
    }
    return std::make_pair(all, transferred);
  }

 private:
  Daemon(fs::path dir, std::string uri, std::string pool)
      : dir_(std::move(dir)), uri_(std::move(uri)), pool_(std::move(pool)) {}

  Status start_bus() {
    fs::create_directories(dir_);
    address_ = "unix:path=" + (dir_ / "bus").string();
    std::ofstream conf(dir_ / "bus.conf");
    conf << "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n"
            " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
            "<busconfig><type>session</type><listen>"
         << address_
         << "</listen><auth>EXTERNAL</auth><policy context=\"default\">"
            "<allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/>"
            "<allow own=\"*\"/><allow user=\"*\"/></policy></busconfig>\n";
    conf.close();
    NM_ASSIGN_OR_RETURN(
        bus_pid_,
        spawn({"dbus-daemon", "--config-file=" + (dir_ / "bus.conf").string(), "--nofork"},
              (dir_ / "dbus.log").string()));
    const auto deadline = Clock::now() + kStartTimeout;
    for (;;) {
      auto bus = connect_bus(address_);
      if (bus.is_ok()) {
        bus_ = std::move(bus).value();
        return Status::ok();
      }
      if (!process_alive(bus_pid_) || Clock::now() > deadline) {
        return bus.status().with_context("starting dbus-daemon (log in '" + dir_.string() + "')");
      }
      std::this_thread::sleep_for(20ms);
    }
  }

  Status start_daemon(const Options& opts, const Store& store) {
    nm_pid_ = 0;
    NM_ASSIGN_OR_RETURN(
        nm_pid_,
        spawn({opts.daemon, "--bus", address_, "--libvirt-uri", opts.daemon_uri, "--state-dir",
               (dir_ / "state").string(), "--runtime-dir", (dir_ / "run").string(), "--log-level",
               "warn", "--storage-pool", pool_, "--image-source", "dir:" + store.root.string(),
               "--image-reserve-mib", "0", "--disk-reserve-mib", "0"},
              (dir_ / "nodemanagerd.log").string()));
    const auto deadline = Clock::now() + kStartTimeout;
    for (;;) {
      BusError error;
      sd_bus_message* raw = nullptr;
      const int r = sd_bus_call_method(bus_.get(), "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                       "org.freedesktop.DBus", "NameHasOwner", error.get(), &raw,
                                       "s", kNmService);
      MessagePtr reply(raw);
      int has = 0;
      if (r >= 0 && sd_bus_message_read(reply.get(), "b", &has) >= 0 && has != 0) {
        return Status::ok();
      }
      if (!process_alive(nm_pid_)) {
        nm_pid_ = 0;
        return unavailable("nodemanagerd exited at start; log: '" +
                           (dir_ / "nodemanagerd.log").string() + "'");
      }
      if (Clock::now() > deadline) return unavailable("nodemanagerd did not own its name in 30 s");
      std::this_thread::sleep_for(20ms);
    }
  }

  static int on_job_removed(sd_bus_message* m, void* userdata, sd_bus_error* /*error*/) noexcept {
    auto* self = static_cast<Daemon*>(userdata);
    uint64_t seq = 0;
    uint32_t job_id = 0;
    const char *job, *kind, *object_id, *result, *error_name, *error_message;
    if (sd_bus_message_read(m, "tuosssss", &seq, &job_id, &job, &kind, &object_id, &result,
                            &error_name, &error_message) < 0) {
      return 0;
    }
    try {
      self->ended_[job] = JobEnd{result, std::string(error_name) + ": " + error_message};
    } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory; the wait times out
    }
    return 0;
  }

  fs::path dir_;
  std::string uri_;
  std::string pool_;
  std::string address_;
  pid_t bus_pid_ = 0;
  pid_t nm_pid_ = 0;
  BusPtr bus_;
  SlotPtr match_;
  std::map<std::string, JobEnd> ended_;
};

std::string vm_spec(int i, const Store& store) {
  return nlohmann::json{{"name", "ib-" + std::to_string(i)},
                        {"tenant", "bench"},
                        {"vcpus", 1},
                        {"memory_mib", 128},
                        {"image", store.ref()}}
      .dump();
}

struct SingleSample {
  double pull_ms = 0;
  double create_ms = 0;
};
struct ConcurrentSample {
  double total_ms = 0;
  int pulled_events = 0;
  int transfers = 0;
};
struct DaemonResults {
  std::vector<SingleSample> single;
  std::vector<ConcurrentSample> concurrent;
};

Status run_single(const Options& opts, const Store& store, const fs::path& dir, SingleSample* out) {
  NM_ASSIGN_OR_RETURN(auto d, Daemon::start(opts, dir, store));
  NM_RETURN_IF_ERROR(d->subscribe());
  NM_RETURN_IF_ERROR(drop_caches(opts));
  BusError error;
  sd_bus_message* raw = nullptr;
  auto t0 = Clock::now();
  int r = sd_bus_call_method(d->bus(), kNmService, kNmPath, kNmManager, "PullImage", error.get(),
                             &raw, "ss", store.ref().c_str(), "");
  if (r < 0) return bus_status(r, error.get(), "PullImage");
  MessagePtr reply(raw);
  const char* job = nullptr;
  r = sd_bus_message_read(reply.get(), "o", &job);
  if (r < 0) return bus_status(r, nullptr, "PullImage reply");
  NM_RETURN_IF_ERROR(d->wait_job(job));
  out->pull_ms = ms_since(t0);

  raw = nullptr;
  const std::string spec = vm_spec(0, store);
  t0 = Clock::now();
  r = sd_bus_call_method(d->bus(), kNmService, kNmPath, kNmManager, "CreateVm", error.get(), &raw,
                         "ss", spec.c_str(), "");
  if (r < 0) return bus_status(r, error.get(), "CreateVm");
  reply.reset(raw);
  const char* id = nullptr;
  const char* vm = nullptr;
  r = sd_bus_message_read(reply.get(), "soo", &id, &vm, &job);
  if (r < 0) return bus_status(r, nullptr, "CreateVm reply");
  NM_RETURN_IF_ERROR(d->wait_job(job));
  out->create_ms = ms_since(t0);
  const std::string vm_id = id;
  NM_ASSIGN_OR_RETURN(auto pulled, d->pulled_events());
  if (pulled.second != 1) {
    return internal_error("single: " + std::to_string(pulled.second) + " transfers, expected 1");
  }
  return d->delete_vms({vm_id});
}

struct PendingCreate {
  Daemon* daemon = nullptr;
  std::string id;
  std::string job;
  std::string error;
  bool replied = false;
};

int on_create_reply(sd_bus_message* m, void* userdata, sd_bus_error* /*error*/) noexcept {
  auto* p = static_cast<PendingCreate*>(userdata);
  p->replied = true;
  try {
    if (const sd_bus_error* e = sd_bus_message_get_error(m); e != nullptr) {
      p->error = std::string(e->name) + ": " + (e->message != nullptr ? e->message : "");
      return 0;
    }
    const char *id, *vm, *job;
    if (sd_bus_message_read(m, "soo", &id, &vm, &job) < 0) {
      p->error = "bad CreateVm reply";
      return 0;
    }
    p->id = id;
    p->job = job;
  } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory; `error` stays empty
  }
  return 0;
}

Status run_concurrent(const Options& opts, const Store& store, const fs::path& dir,
                      ConcurrentSample* out) {
  NM_ASSIGN_OR_RETURN(auto d, Daemon::start(opts, dir, store));
  NM_RETURN_IF_ERROR(d->subscribe());
  NM_RETURN_IF_ERROR(drop_caches(opts));
  std::vector<PendingCreate> pending(static_cast<size_t>(opts.vms));
  std::vector<SlotPtr> slots;
  std::vector<std::string> specs;
  specs.reserve(pending.size());
  for (int i = 0; i < opts.vms; ++i) specs.push_back(vm_spec(i, store));
  const auto t0 = Clock::now();
  for (int i = 0; i < opts.vms; ++i) {
    PendingCreate& p = pending[static_cast<size_t>(i)];
    p.daemon = d.get();
    sd_bus_slot* slot = nullptr;
    const int r = sd_bus_call_method_async(d->bus(), &slot, kNmService, kNmPath, kNmManager,
                                           "CreateVm", on_create_reply, &p, "ss",
                                           specs[static_cast<size_t>(i)].c_str(), "");
    if (r < 0) return bus_status(r, nullptr, "CreateVm (async)");
    slots.emplace_back(slot);
  }
  NM_RETURN_IF_ERROR(d->pump([&] {
    return std::all_of(pending.begin(), pending.end(), [&](const PendingCreate& p) {
      return p.replied && (!p.error.empty() || d->ended().contains(p.job));
    });
  }));
  out->total_ms = ms_since(t0);
  for (const PendingCreate& p : pending) {
    if (!p.error.empty()) return internal_error("CreateVm: " + p.error);
    const JobEnd& e = d->ended().at(p.job);
    if (e.result != "done") return internal_error("job '" + p.job + "' ended: " + e.error);
  }
  NM_ASSIGN_OR_RETURN(auto pulled, d->pulled_events());
  out->pulled_events = pulled.first;
  out->transfers = pulled.second;
  std::vector<std::string> ids;
  ids.reserve(pending.size());
  for (const PendingCreate& p : pending) ids.push_back(p.id);
  return d->delete_vms(ids);
}

Status measure_daemon(const Options& opts, const Store& store, DaemonResults* out) {
  for (int r = 0; r < opts.daemon_runs; ++r) {
    for (int k = 0; k < 2; ++k) {
      const bool single_now = (k == 0) == (r % 2 == 0);
      const fs::path dir = opts.work / ("daemon-" + std::to_string(r) + (single_now ? "s" : "c"));
      if (single_now) {
        SingleSample s;
        NM_RETURN_IF_ERROR(run_single(opts, store, dir, &s));
        out->single.push_back(s);
      } else {
        ConcurrentSample c;
        NM_RETURN_IF_ERROR(run_concurrent(opts, store, dir, &c));
        out->concurrent.push_back(c);
      }
      std::error_code ec;
      fs::remove_all(dir, ec);
      ::sync();
    }
    const SingleSample& s = out->single.back();
    const ConcurrentSample& c = out->concurrent.back();
    std::fprintf(stderr,
                 "image_bench: daemon run %d: single pull %.0f + create %.1f ms; %d concurrent "
                 "creates %.0f ms (%d ImagePulled, %d transferred)\n",
                 r + 1, s.pull_ms, s.create_ms, opts.vms, c.total_ms, c.pulled_events, c.transfers);
  }
  return Status::ok();
}

// ---- report -----------------------------------------------------------------------------------

bool report_pull(const Options& opts, const PullResults& p) {
  std::printf(
      "1. pull of a %llu MiB raw image from a directory store vs cp + sha256sum (%d runs "
      "each, alternating; MiB/s of the median time)\n\n",
      static_cast<unsigned long long>(p.bytes >> 20), opts.runs);
  std::printf("%-6s %-34s %10s %8s   %s\n", "cache", "measurement", "median ms", "MiB/s",
              "runs (ms)");
  bool met = true;
  for (const bool cold : {true, false}) {
    const PullTemperature& t = cold ? p.cold : p.warm;
    const char* temp = cold ? (opts.drop_caches ? "cold" : "nodrop") : "warm";
    std::vector<double> cp, sha, both, fsync_all, openssl;
    for (const CpSample& c : t.cp) {
      openssl.push_back(c.cp_ms + c.openssl_ms);
      cp.push_back(c.cp_ms);
      sha.push_back(c.sha_ms);
      both.push_back(c.cp_ms + c.sha_ms);
      fsync_all.push_back(c.cp_ms + c.sha_ms + c.fsync_ms);
    }
    const double pull = median(t.pull_ms);
    const double base = median(both);
    auto row = [&](const char* what, const std::vector<double>& v) {
      std::printf("%-6s %-34s %10.0f %8.0f   %s\n", temp, what, median(v),
                  mib_per_s(p.bytes, median(v)), join(v).c_str());
    };
    row("ImageStore::pull (incl. fsync)", t.pull_ms);
    row("cp", cp);
    row("sha256sum of the copy", sha);
    row("cp + sha256sum (the baseline)", both);
    row("cp + sha256sum + fsync of the copy", fsync_all);
    row("cp + openssl dgst -sha256 (hot)", openssl);
    const double ratio = base / pull;
    const bool ok = ratio >= kPullTargetRatio;
    met = met && ok;
    std::printf(
        "%s: %s pull throughput >= %.1f x cp + sha256sum: %.2f x (vs + fsync: %.2f x; vs cp + "
        "openssl: %.2f x)\n\n",
        ok ? "PASS" : "FAIL", temp, kPullTargetRatio, ratio, median(fsync_all) / pull,
        median(openssl) / pull);
  }
  const Phases& ph = p.phases;
  std::printf(
      "pull phases, each alone (ms, MiB/s): cold read %.0f (%.0f), OpenSSL SHA-256 in "
      "memory %.0f (%.0f), write %.0f (%.0f) + fsync %.0f, serial sum %.0f; "
      "sha256sum hot %.0f (%.0f)\n\n",
      ph.read_ms, mib_per_s(p.bytes, ph.read_ms), ph.sha_ms, mib_per_s(p.bytes, ph.sha_ms),
      ph.write_ms, mib_per_s(p.bytes, ph.write_ms), ph.fsync_ms,
      ph.read_ms + ph.sha_ms + ph.write_ms + ph.fsync_ms, ph.sha256sum_hot_ms,
      mib_per_s(p.bytes, ph.sha256sum_hot_ms));
  return met;
}

bool report_overlays(const Options& opts, const std::vector<Base>& bases) {
  std::printf(
      "2. overlay creation (LibvirtHypervisor::create_overlay, %s, 20 GiB virtual), %d per "
      "base after %d warm-up, interleaved\n\n",
      opts.libvirt_uri.c_str(), opts.creations, kOverlayWarmup);
  std::printf("%-18s %5s %8s %8s %8s %8s | %s\n", "base", "n", "p50 ms", "p95 ms", "max ms",
              "mean ms", "delete p50 ms");
  std::map<std::string, double> p50_by_format_small, p50_by_format_large;
  bool met = true;
  for (const Base& b : bases) {
    std::vector<double> sorted = b.create_ms;
    std::sort(sorted.begin(), sorted.end());
    std::vector<double> del = b.delete_ms;
    std::sort(del.begin(), del.end());
    Samples s;
    for (const double x : b.create_ms) s.add_ms(x);
    const Summary sum = s.summarize();
    const double p50 = percentile(sorted, 0.5);
    const double p95 = percentile(sorted, 0.95);
    std::printf("%-18s %5zu %8.2f %8.2f %8.2f %8.2f | %8.2f\n", b.label.c_str(), sorted.size(), p50,
                p95, sum.max_ms, sum.mean_ms, percentile(del, 0.5));
    met = met && p50 < kOverlayTargetMs;
    if (b.label.find(std::to_string(opts.size_mib) + " MiB") != std::string::npos) {
      p50_by_format_small[b.format] = p50;
    } else {
      p50_by_format_large[b.format] = p50;
    }
  }
  std::printf("%s: every base's p50 < %.0f ms\n", met ? "PASS" : "FAIL", kOverlayTargetMs);
  for (const auto& [format, small] : p50_by_format_small) {
    const double large = p50_by_format_large[format];
    const double limit = std::max(kOverlayNoiseMs, kOverlayNoiseFraction * std::min(small, large));
    const bool ok = std::abs(large - small) <= limit;
    met = met && ok;
    std::printf(
        "%s: %s %llu MiB vs %llu MiB p50 equal within noise (|diff| <= max(%.0f ms, "
        "%.0f%%)): %.2f vs %.2f ms\n",
        ok ? "PASS" : "FAIL", format.c_str(), static_cast<unsigned long long>(opts.large_mib),
        static_cast<unsigned long long>(opts.size_mib), kOverlayNoiseMs,
        kOverlayNoiseFraction * 100, large, small);
  }
  std::printf("\n");
  return met;
}

bool report_daemon(const Options& opts, const Store& store, const DaemonResults& d) {
  std::printf(
      "3. %d VMs created at once from one uncached %llu MiB image through nodemanagerd "
      "(%s), %d runs each, alternating, fresh daemon each\n\n",
      opts.vms, static_cast<unsigned long long>(store.bytes >> 20), opts.daemon_uri.c_str(),
      opts.daemon_runs);
  std::vector<double> pull, create, single, total;
  bool one_transfer = true;
  std::string transfers;
  for (const SingleSample& s : d.single) {
    pull.push_back(s.pull_ms);
    create.push_back(s.create_ms);
    single.push_back(s.pull_ms + s.create_ms);
  }
  for (const ConcurrentSample& c : d.concurrent) {
    total.push_back(c.total_ms);
    one_transfer = one_transfer && c.transfers == 1 && c.pulled_events == opts.vms;
    transfers += (transfers.empty() ? "" : " ") + std::to_string(c.transfers) + "/" +
                 std::to_string(c.pulled_events);
  }
  std::printf("%-40s %10s   %s\n", "measurement", "median ms", "runs (ms)");
  std::printf("%-40s %10.0f   %s\n", "PullImage -> JobRemoved", median(pull), join(pull).c_str());
  std::printf("%-40s %10.1f   %s\n", "CreateVm (cached) -> JobRemoved", median(create),
              join(create, "%.1f").c_str());
  std::printf("%-40s %10.0f   %s\n", "single pull + create", median(single), join(single).c_str());
  std::printf("%-40s %10.0f   %s\n",
              (std::to_string(opts.vms) + " CreateVm at once -> all done").c_str(), median(total),
              join(total).c_str());
  std::printf("ImagePulled events with transferred=true / all, per concurrent run: %s\n",
              transfers.c_str());
  const double ratio = median(total) / median(single);
  const bool ok = ratio <= kConcurrentTargetFactor;
  std::printf("%s: exactly one transfer per concurrent run (%d ImagePulled events each)\n",
              one_transfer ? "PASS" : "FAIL", opts.vms);
  std::printf("%s: concurrent total <= %.1f x (single pull + create): %.2f x\n\n",
              ok ? "PASS" : "FAIL", kConcurrentTargetFactor, ratio);
  return ok && one_transfer;
}

// ---- arguments --------------------------------------------------------------------------------

constexpr const char* kUsage =
    "usage: image_bench --work DIR [--parts pull,overlay,concurrent] [--size-mib N]\n"
    "                   [--large-mib N] [--runs N] [--creations N] [--libvirt-uri URI]\n"
    "                   [--pool NAME] [--daemon PATH] [--daemon-uri URI] [--vms N]\n"
    "                   [--daemon-runs N] [--no-drop-caches] [--strict]\n";

bool parse_args(int argc, char** argv, Options* opts) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    bool ok = true;
    if (arg == "--strict") {
      opts->strict = true;
    } else if (arg == "--no-drop-caches") {
      opts->drop_caches = false;
    } else if (arg == "--work" && has_value) {
      opts->work = argv[++i];
    } else if (arg == "--parts" && has_value) {
      opts->parts.clear();
      std::string_view list = argv[++i];
      while (ok && !list.empty()) {
        const size_t comma = list.find(',');
        const std::string part(list.substr(0, comma));
        ok = part == "pull" || part == "overlay" || part == "concurrent";
        opts->parts.insert(part);
        list = comma == std::string_view::npos ? "" : list.substr(comma + 1);
      }
      ok = ok && !opts->parts.empty();
    } else if (arg == "--size-mib" && has_value) {
      ok = bench::parse_number<uint64_t>(argv[++i], 1, &opts->size_mib);
    } else if (arg == "--large-mib" && has_value) {
      ok = bench::parse_number<uint64_t>(argv[++i], 1, &opts->large_mib);
    } else if (arg == "--runs" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->runs);
    } else if (arg == "--creations" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->creations);
    } else if (arg == "--vms" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->vms);
    } else if (arg == "--daemon-runs" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->daemon_runs);
    } else if (arg == "--libvirt-uri" && has_value) {
      opts->libvirt_uri = argv[++i];
    } else if (arg == "--pool" && has_value) {
      opts->pool = argv[++i];
    } else if (arg == "--daemon" && has_value) {
      opts->daemon = argv[++i];
    } else if (arg == "--daemon-uri" && has_value) {
      opts->daemon_uri = argv[++i];
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "image_bench: bad or incomplete argument '%s'\n%s", argv[i], kUsage);
      return false;
    }
  }
  if (opts->work.empty()) {
    std::fprintf(stderr, "image_bench: --work is required\n%s", kUsage);
    return false;
  }
  if (opts->parts.contains("concurrent") && opts->daemon.empty()) {
    std::fprintf(stderr, "image_bench: the concurrent part needs --daemon PATH\n%s", kUsage);
    return false;
  }
  return true;
}

int run_all(Options opts) {
  if (opts.drop_caches && ::geteuid() != 0) {
    std::fprintf(stderr, "image_bench: not root: page cache not dropped (cold runs are warm)\n");
    opts.drop_caches = false;
  }
  fs::create_directories(opts.work);
  std::fprintf(stderr, "image_bench: writing the %llu MiB image into the store\n",
               static_cast<unsigned long long>(opts.size_mib));
  auto store = make_store(opts.work / "store", opts.size_mib);
  if (!store.is_ok()) {
    fail("making the store", store.status());
    return 1;
  }

  bool met = true;
  std::optional<PullResults> pull;
  std::vector<Base> bases;
  std::optional<DaemonResults> daemon;
  if (opts.parts.contains("pull")) {
    pull.emplace();
    if (Status s = measure_pull(opts, *store, &*pull); !s.is_ok()) {
      fail("pull benchmark", s);
      return 1;
    }
  }
  if (opts.parts.contains("overlay")) {
    if (Status s = measure_overlays(opts, &bases); !s.is_ok()) {
      fail("overlay benchmark", s);
      return 1;
    }
    std::error_code ec;
    fs::remove_all(opts.work / "bases", ec);
  }
  if (opts.parts.contains("concurrent")) {
    daemon.emplace();
    if (Status s = measure_daemon(opts, *store, &*daemon); !s.is_ok()) {
      fail("concurrent benchmark", s);
      return 1;
    }
  }
  std::printf("\nimage_bench on %s (%u cores)\n\n", opts.work.c_str(),
              std::thread::hardware_concurrency());
  if (pull) met = report_pull(opts, *pull) && met;
  if (!bases.empty()) met = report_overlays(opts, bases) && met;
  if (daemon) met = report_daemon(opts, *store, *daemon) && met;
  std::printf("%s\n", met ? "all targets met" : "some targets missed");
  return !met && opts.strict ? 3 : 0;
}

}  // namespace
}  // namespace nm::bench

int main(int argc, char** argv) {
  nm::bench::Options opts;
  if (!nm::bench::parse_args(argc, argv, &opts)) return 2;
  return nm::bench::run_all(std::move(opts));
}
