#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "nm/core/log.h"
#include "nm/executor.h"

namespace nm {

struct WorkerPool::Impl {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  bool stopping = false;
  std::vector<std::thread> threads;

  void run() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (stopping) return;
        fn = std::move(queue.front());
        queue.pop_front();
      }
      try {
        fn();
      } catch (const std::exception& e) {
        logger("service")->error("worker task threw: {}", e.what());
      }
    }
  }
};

WorkerPool::WorkerPool(unsigned threads) : impl_(std::make_unique<Impl>()) {
  for (unsigned i = 0; i < threads; ++i) impl_->threads.emplace_back([this] { impl_->run(); });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  for (auto& t : impl_->threads) t.join();
}

void WorkerPool::submit(std::function<void()> fn) {
  {
    std::lock_guard lock(impl_->mu);
    impl_->queue.push_back(std::move(fn));
  }
  impl_->cv.notify_one();
}

}  // namespace nm
