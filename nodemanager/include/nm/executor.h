// How work crosses threads. The event loop owns service state; blocking work (libvirt calls,
// image copies) runs on a WorkerPool and posts its result back through a LoopExecutor.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

namespace nm {

// Runs functions on the event-loop thread.
class LoopExecutor {
 public:
  virtual ~LoopExecutor() = default;
  // Thread-safe. Queues `fn` to run on the loop thread, in posting order. Never runs it inline.
  virtual void post(std::function<void()> fn) = 0;
  // Thread-safe. Queues `fn` to run on the loop thread once `delay` has passed (CLOCK_MONOTONIC).
  virtual void post_after(std::chrono::milliseconds delay, std::function<void()> fn) = 0;
  // Loop thread only. Queues `fn` to run on the loop thread when nothing else is ready to run
  // (no bus message, posted function or timer waiting), in queuing order, never inline. Under
  // constant load that may be never: pair it with post_after() when it must happen.
  virtual void post_idle(std::function<void()> fn) = 0;
};

// Threads for blocking work. Threads start on demand, when every running one is busy, up to
// `max_threads`; they then stay for the pool's life. A job that waits (a graceful stop waits up
// to its timeout) therefore never delays work for other VMs until that many wait at once.
class WorkerPool {
 public:
  explicit WorkerPool(unsigned max_threads);
  // Discards work that has not started, waits for running work, then joins.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Thread-safe. Runs `fn` on some worker thread.
  void submit(std::function<void()> fn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nm
