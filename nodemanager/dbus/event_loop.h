// SdEventLoop: the daemon's one event loop (sd-event), the LoopExecutor of the service.
//
// Everything that owns service state runs on the thread that calls run(): bus method handlers,
// observer callbacks, periodic audits, signal handlers and every function given to post().
// Other threads hand work to the loop with post(), which is the only thread-safe method.
//
// sd-event stays out of this header; the D-Bus layer reaches the raw sd_event through
// event_loop_internal.h, which only .cc files include.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "nm/core/status.h"
#include "nm/executor.h"

namespace nm {

class SdEventLoop final : public LoopExecutor {
 public:
  // A new loop (sd_event_new) with its wake-up eventfd registered. Unavailable when the kernel
  // refuses the epoll or eventfd.
  static Result<std::unique_ptr<SdEventLoop>> create();

  // Releases every event source, then the loop. Objects attached to the loop (DbusServer) must be
  // destroyed first. Functions still queued by post() are dropped without running.
  ~SdEventLoop() override;
  SdEventLoop(const SdEventLoop&) = delete;
  SdEventLoop& operator=(const SdEventLoop&) = delete;

  // Thread-safe. Queues `fn`; it runs on the loop thread, in posting order, never inline. One
  // wake-up drains everything queued so far. An exception escaping `fn` is logged and dropped.
  void post(std::function<void()> fn) override;
  // Thread-safe. A one-shot timer, armed on the loop thread (so `delay` counts from when the loop
  // takes the request, microseconds later). Dropped unrun when the loop is destroyed first.
  void post_after(std::chrono::milliseconds delay, std::function<void()> fn) override;
  // Loop thread only. Runs `fn` from a defer source of idle priority (SD_EVENT_PRIORITY_IDLE):
  // after every bus message, posted function and timer that is ready.
  void post_idle(std::function<void()> fn) override;

  // Loop thread (or before run()). Calls `fn` on the loop whenever `fd` is readable (level
  // triggered: `fn` must drain it). The fd stays owned by the caller and must outlive the loop
  // or the returned watch; lives as long as the loop.
  Status watch_readable(int fd, std::function<void()> fn);

  // Loop thread (or before run()). Calls `fn` every `interval` on CLOCK_MONOTONIC, the first
  // time one interval from now; the timer is re-armed after each call, so a slow `fn` delays the
  // next call rather than stacking them. Lives as long as the loop.
  Status add_periodic(std::chrono::microseconds interval, std::function<void()> fn);

  // Loop thread (or before run()). Blocks `signals` in the calling thread (the thread that will
  // call run() must be that thread, and must do this before it starts other threads, which
  // inherit the mask) and delivers each one to `fn` on the loop through a signalfd.
  Status on_signals(const std::vector<int>& signals, std::function<void(int signal)> fn);

  // Runs until exit(). OK when the loop ended through exit() (whatever the code; see
  // exit_code()), the sd-event failure otherwise.
  Status run();

  // Loop thread only (from another thread: post([&] { loop.exit(0); })). Ends run() after the
  // current iteration.
  void exit(int code);

  // The code given to exit() (or EXIT_FAILURE when an attached bus connection dropped); 0 before.
  int exit_code() const;

  // Sends WATCHDOG=1 to systemd from the loop at half the WATCHDOG_USEC interval while
  // `healthy()` holds, so a wedged loop (or whatever `healthy` judges, e.g. a lost hypervisor
  // connection) gets the daemon restarted. Each change of `healthy()` is logged. OK and a no-op
  // when the service manager asked for no watchdog (WATCHDOG_USEC unset).
  Status enable_watchdog(std::function<bool()> healthy);

 private:
  struct Impl;
  friend struct SdEventLoopAccess;
  explicit SdEventLoop(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nm
