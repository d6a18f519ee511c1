#include "event_loop.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "event_loop_internal.h"
#include "nm/core/fs.h"
#include "nm/core/log.h"

namespace nm {
namespace {

struct EventDeleter {
  void operator()(sd_event* e) const { sd_event_unref(e); }
};
struct SourceDeleter {
  void operator()(sd_event_source* s) const { sd_event_source_disable_unref(s); }
};
using EventPtr = std::unique_ptr<sd_event, EventDeleter>;
using SourcePtr = std::unique_ptr<sd_event_source, SourceDeleter>;

// The one translation of sd-event's negative errno returns.
Status event_status(int r, std::string_view what) {
  return errno_status(-r, "sd-event: " + std::string(what));
}

std::shared_ptr<spdlog::logger> log() {
  static const auto kLogger = nm::logger("loop");
  return kLogger;
}

template <typename F>
void run_guarded(const char* what, F&& fn) noexcept {
  try {
    fn();
  } catch (const std::exception& e) {
    log()->error("{} threw: {}", what, e.what());
  } catch (...) {
    log()->error("{} threw a non-standard exception", what);
  }
}

struct Periodic {
  std::chrono::microseconds interval;
  std::function<void()> fn;
  SourcePtr source;
};

// Timers fire within 1 ms of their time (sd-event's default slack is 250 ms, too coarse for
// heartbeats and restart backoff).
constexpr uint64_t kAccuracyUs = 1000;

struct OneShot {
  std::function<void()> fn;
  SourcePtr source;
  void* owner;  // the SdEventLoop::Impl whose one_shots map holds it
};

struct FdWatch {
  std::function<void()> fn;
  SourcePtr source;
};

struct SignalHandler {
  std::function<void(int)> fn;
  std::vector<SourcePtr> sources;
};

}  // namespace

struct SdEventLoop::Impl {
  // Declared first, destroyed last: every source below refers to it.
  EventPtr event;
  UniqueFd wake_fd;
  SourcePtr wake_source;
  std::vector<std::unique_ptr<Periodic>> periodics;
  std::vector<std::unique_ptr<SignalHandler>> signal_handlers;
  std::vector<std::unique_ptr<FdWatch>> fd_watches;
  std::map<OneShot*, std::unique_ptr<OneShot>> one_shots;

  std::mutex mu;
  std::deque<std::function<void()>> queue;  // guarded by mu

  SourcePtr idle_source;                         // enabled (one shot) while idle_queue has work
  std::deque<std::function<void()>> idle_queue;  // loop thread only

  static int on_idle(sd_event_source*, void* userdata) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    std::deque<std::function<void()>> batch;
    batch.swap(self->idle_queue);
    for (auto& fn : batch) run_guarded("an idle function", fn);
    return 0;
  }

  static int on_one_shot(sd_event_source*, uint64_t, void* userdata) noexcept {
    auto* shot = static_cast<OneShot*>(userdata);
    auto* self = static_cast<Impl*>(shot->owner);
    std::function<void()> fn = std::move(shot->fn);
    // Freed before running: `fn` may arm new timers; the source stays valid while dispatching.
    self->one_shots.erase(shot);
    run_guarded("a delayed function", fn);
    return 0;
  }

  static int on_readable(sd_event_source*, int, uint32_t, void* userdata) noexcept {
    run_guarded("an fd watch", static_cast<FdWatch*>(userdata)->fn);
    return 0;
  }

  static int on_wake(sd_event_source*, int fd, uint32_t, void* userdata) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    uint64_t count = 0;
    if (::read(fd, &count, sizeof count) < 0 && errno != EAGAIN) {
      log()->error("read of the wake-up eventfd failed: {}", std::strerror(errno));
    }
    std::deque<std::function<void()>> batch;
    {
      std::lock_guard lock(self->mu);
      batch.swap(self->queue);
    }
    for (auto& fn : batch) run_guarded("a posted function", fn);
    return 0;
  }

  static int on_timer(sd_event_source* s, uint64_t, void* userdata) noexcept {
    auto* p = static_cast<Periodic*>(userdata);
    run_guarded("a periodic function", p->fn);
    int r = sd_event_source_set_time_relative(s, static_cast<uint64_t>(p->interval.count()));
    if (r >= 0) r = sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
    if (r < 0) log()->error("re-arming a periodic timer failed: {}", std::strerror(-r));
    return 0;
  }

  static int on_signal(sd_event_source*, const struct signalfd_siginfo* si,
                       void* userdata) noexcept {
    auto* h = static_cast<SignalHandler*>(userdata);
    const int sig = static_cast<int>(si->ssi_signo);
    run_guarded("a signal handler", [&] { h->fn(sig); });
    return 0;
  }
};

sd_event* SdEventLoopAccess::event(SdEventLoop& loop) {
  return loop.impl_->event.get();
}

SdEventLoop::SdEventLoop(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

SdEventLoop::~SdEventLoop() = default;

Result<std::unique_ptr<SdEventLoop>> SdEventLoop::create() {
  auto impl = std::make_unique<Impl>();
  sd_event* raw = nullptr;
  int r = sd_event_new(&raw);
  if (r < 0) return event_status(r, "create the loop");
  impl->event.reset(raw);

  impl->wake_fd = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->wake_fd.valid()) return errno_status(errno, "eventfd");
  sd_event_source* src = nullptr;
  r = sd_event_add_io(impl->event.get(), &src, impl->wake_fd.get(), EPOLLIN, &Impl::on_wake,
                      impl.get());
  if (r < 0) return event_status(r, "watch the wake-up eventfd");
  impl->wake_source.reset(src);

  src = nullptr;
  r = sd_event_add_defer(impl->event.get(), &src, &Impl::on_idle, impl.get());
  if (r < 0) return event_status(r, "add the idle source");
  impl->idle_source.reset(src);
  r = sd_event_source_set_priority(src, SD_EVENT_PRIORITY_IDLE);
  if (r >= 0) r = sd_event_source_set_enabled(src, SD_EVENT_OFF);
  if (r < 0) return event_status(r, "set up the idle source");
  return std::unique_ptr<SdEventLoop>(new SdEventLoop(std::move(impl)));
}

void SdEventLoop::post_idle(std::function<void()> fn) {
  impl_->idle_queue.push_back(std::move(fn));
  const int r = sd_event_source_set_enabled(impl_->idle_source.get(), SD_EVENT_ONESHOT);
  if (r < 0) log()->error("enabling the idle source failed: {}", std::strerror(-r));
}

void SdEventLoop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(impl_->mu);
    impl_->queue.push_back(std::move(fn));
  }
  const uint64_t one = 1;
  // EAGAIN only when the counter is saturated, which means a wake-up is pending anyway.
  if (::write(impl_->wake_fd.get(), &one, sizeof one) < 0 && errno != EAGAIN) {
    log()->error("waking the loop failed: {}", std::strerror(errno));
  }
}

Status SdEventLoop::add_periodic(std::chrono::microseconds interval, std::function<void()> fn) {
  if (interval.count() <= 0) return invalid_argument("periodic interval must be positive");
  auto p = std::make_unique<Periodic>(Periodic{interval, std::move(fn), nullptr});
  sd_event_source* src = nullptr;
  const int r = sd_event_add_time_relative(impl_->event.get(), &src, CLOCK_MONOTONIC,
                                           static_cast<uint64_t>(interval.count()), kAccuracyUs,
                                           &Impl::on_timer, p.get());
  if (r < 0) return event_status(r, "add a periodic timer");
  p->source.reset(src);
  impl_->periodics.push_back(std::move(p));
  return Status::ok();
}

void SdEventLoop::post_after(std::chrono::milliseconds delay, std::function<void()> fn) {
  post([impl = impl_.get(), delay, fn = std::move(fn)]() mutable {
    auto shot = std::make_unique<OneShot>(OneShot{std::move(fn), nullptr, impl});
    sd_event_source* src = nullptr;
    const auto usec = std::chrono::duration_cast<std::chrono::microseconds>(delay).count();
    const int r = sd_event_add_time_relative(impl->event.get(), &src, CLOCK_MONOTONIC,
                                             static_cast<uint64_t>(std::max<int64_t>(usec, 0)),
                                             kAccuracyUs, &Impl::on_one_shot, shot.get());
    if (r < 0) {
      log()->error("arming a one-shot timer failed: {}", std::strerror(-r));
      return;
    }
    shot->source.reset(src);
    impl->one_shots.emplace(shot.get(), std::move(shot));
  });
}

Status SdEventLoop::watch_readable(int fd, std::function<void()> fn) {
  auto w = std::make_unique<FdWatch>(FdWatch{std::move(fn), nullptr});
  sd_event_source* src = nullptr;
  const int r = sd_event_add_io(impl_->event.get(), &src, fd, EPOLLIN, &Impl::on_readable, w.get());
  if (r < 0) return event_status(r, "watch fd " + std::to_string(fd));
  w->source.reset(src);
  impl_->fd_watches.push_back(std::move(w));
  return Status::ok();
}

Status SdEventLoop::on_signals(const std::vector<int>& signals, std::function<void(int)> fn) {
  sigset_t set;
  sigemptyset(&set);
  for (const int sig : signals) {
    if (sigaddset(&set, sig) != 0)
      return invalid_argument("bad signal number " + std::to_string(sig));
  }
  const int err = pthread_sigmask(SIG_BLOCK, &set, nullptr);
  if (err != 0) return errno_status(err, "block signals");
  auto h = std::make_unique<SignalHandler>();
  h->fn = std::move(fn);
  for (const int sig : signals) {
    sd_event_source* src = nullptr;
    const int r = sd_event_add_signal(impl_->event.get(), &src, sig, &Impl::on_signal, h.get());
    if (r < 0) return event_status(r, "watch signal " + std::to_string(sig));
    h->sources.emplace_back(src);
  }
  impl_->signal_handlers.push_back(std::move(h));
  return Status::ok();
}

Status SdEventLoop::run() {
  const int r = sd_event_loop(impl_->event.get());
  if (r < 0) return event_status(r, "run the loop");
  return Status::ok();
}

void SdEventLoop::exit(int code) {
  const int r = sd_event_exit(impl_->event.get(), code);
  if (r < 0) log()->error("ending the loop failed: {}", std::strerror(-r));
}

int SdEventLoop::exit_code() const {
  int code = 0;
  if (sd_event_get_exit_code(impl_->event.get(), &code) < 0) return 0;
  return code;
}

Status SdEventLoop::enable_watchdog(std::function<bool()> healthy) {
  uint64_t usec = 0;
  const int r = sd_watchdog_enabled(0, &usec);
  if (r < 0) return event_status(r, "read WATCHDOG_USEC");
  if (r == 0 || usec == 0) return Status::ok();
  log()->info("systemd watchdog enabled: WATCHDOG=1 every {} ms while healthy", usec / 2000);
  auto fed = std::make_shared<bool>(true);
  return add_periodic(std::chrono::microseconds(usec / 2), [healthy = std::move(healthy), fed] {
    const bool ok = !healthy || healthy();
    if (ok != *fed) {
      if (ok) {
        log()->info("watchdog: healthy again; feeding systemd");
      } else {
        log()->warn("watchdog: not feeding systemd while the node is unhealthy");
      }
      *fed = ok;
    }
    if (ok) sd_notify(0, "WATCHDOG=1");
  });
}

}  // namespace nm
