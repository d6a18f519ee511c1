// How work crosses threads. The event loop owns service state; blocking work (libvirt calls,
// image copies) runs on a WorkerPool and posts its result back through a LoopExecutor.
#pragma once

#include <functional>
#include <memory>

namespace nm {

// Runs functions on the event-loop thread.
class LoopExecutor {
 public:
  virtual ~LoopExecutor() = default;
  // Thread-safe. Queues `fn` to run on the loop thread, in posting order. Never runs it inline.
  virtual void post(std::function<void()> fn) = 0;
};

// A fixed set of threads for blocking work.
class WorkerPool {
 public:
  // Starts `threads` threads.
  explicit WorkerPool(unsigned threads);
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
