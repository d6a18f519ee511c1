#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "nm/core/log.h"
#include "nm/executor.h"

namespace nm {

struct WorkerPool::Impl {
  explicit Impl(unsigned max) : max_threads(max == 0 ? 1 : max) {}

  const unsigned max_threads;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  bool stopping = false;
  unsigned idle = 0;
  std::vector<std::thread> threads;

  void run() {
    std::unique_lock lock(mu);
    for (;;) {
      ++idle;
      cv.wait(lock, [&] { return stopping || !queue.empty(); });
      --idle;
      if (stopping) return;
      std::function<void()> fn = std::move(queue.front());
      queue.pop_front();
      lock.unlock();
      try {
        fn();
      } catch (const std::exception& e) {
        logger("service")->error("worker task threw: {}", e.what());
      }
      lock.lock();
    }
  }
};

WorkerPool::WorkerPool(unsigned threads) : impl_(std::make_unique<Impl>(threads)) {}

WorkerPool::~WorkerPool() {
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(impl_->mu);
    impl_->stopping = true;
    threads.swap(impl_->threads);
  }
  impl_->cv.notify_all();
  for (auto& t : threads) t.join();
}

void WorkerPool::submit(std::function<void()> fn) {
  {
    std::lock_guard lock(impl_->mu);
    impl_->queue.push_back(std::move(fn));
    // Grow while every thread is busy (a graceful stop waits up to its timeout on one): work for
    // other VMs never queues behind waits, up to the limit.
    if (impl_->idle < impl_->queue.size() && impl_->threads.size() < impl_->max_threads) {
      impl_->threads.emplace_back([impl = impl_.get()] { impl->run(); });
    }
  }
  impl_->cv.notify_one();
}

}  // namespace nm
