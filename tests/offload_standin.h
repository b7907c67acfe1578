// offload_standin.h: a stand-in for the device side of an offloaded handle
// (polyak_transfer_ops), so that the offload's pipeline runs in the CPU tests.
//
// "Device memory" is host memory the test allocates here. Copies, event
// records and stream waits queue per stream and run on the stand-in's own
// thread in stream order, late: each copy after a random delay, and the
// test's own work on a stream (enqueue()) as early as its stream allows, so
// that a missing wait shows. Whatever would be a race on a GPU is recorded
// as a violation, which the tests expect to be none:
//   - work that runs while work enqueued earlier on another stream, touching
//     the same device bytes (one of them writing), has not finished;
//   - a copy's host side that is not pinned memory from alloc_pinned, or
//     whose source the host changed between the copy's enqueue and its run;
//   - pinned memory freed while a copy into or out of it is unfinished.
// A copy into host memory fills it with 0xFF bytes when it starts, so a
// host that reads before waiting reads NaNs.
#ifndef POLYAK_TEST_OFFLOAD_STANDIN_H
#define POLYAK_TEST_OFFLOAD_STANDIN_H

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "offload/offload.h"

namespace polyak_test {

class Standin {
public:
  explicit Standin(uint64_t seed = 1, int max_delay_us = 100);
  ~Standin();
  Standin(const Standin &) = delete;
  Standin &operator=(const Standin &) = delete;

  static const polyak_transfer_ops ops; // the arg of polyak_offload_use: this

  // num_bytes of device memory (64-byte aligned, zeroed), freed with the stand-in.
  void *device_alloc(size_t num_bytes);

  // fn runs on the stand-in's thread in `stream`'s order; it reads (or, with
  // writes, writes) device bytes [range, range + num_bytes).
  void enqueue(void *stream, std::function<void()> fn, const void *range, size_t num_bytes, bool writes);
  // Device memory written from host data (copied now), in stream order.
  void write_device(void *stream, void *dst, const void *src, size_t num_bytes);
  // Device memory read into host memory once the stream gets there (returns
  // after it did).
  void read_device(void *stream, void *dst, const void *src, size_t num_bytes);
  // Returns once everything enqueued so far has run; _work: the test's own work.
  void synchronize();
  void synchronize_work();

  // Faults: the n-th copy from now (1: the next) is refused at its enqueue,
  // or runs and fails, which the next event recorded on its stream reports.
  void fail_copy_at(int64_t n);
  void fail_running_copy_at(int64_t n);
  void set_capturing(void *stream, bool capturing);
  // The threads that called the ops' thread_start, in order.
  std::vector<std::thread::id> thread_starts();
  // Holds every copy back until release_copies (0: none held).
  void hold_copies(bool hold);

  // The violations so far, cleared.
  std::vector<std::string> take_violations();
  int64_t copies_enqueued();
  int64_t copies_done();
  size_t pinned_peak_bytes();
  size_t pinned_bytes();

  // ---- what the ops call (public for the C callbacks) ----
  struct Ctx;
  polyak_status open(const polyak_t *p, int num_events, void **ctx, void **side, char *why);
  void close(Ctx *ctx);
  void *alloc_pinned(size_t num_bytes);
  void free_pinned(void *host);
  polyak_status copy(Ctx *ctx, void *dst, const void *src, size_t num_bytes, int direction, void *stream, char *why);
  polyak_status record(Ctx *ctx, int event, void *stream, char *why);
  polyak_status stream_wait(Ctx *ctx, void *stream, int event, char *why);
  polyak_status wait(Ctx *ctx, int event, char *why);
  polyak_status locate(const void *ptr, size_t num_bytes, int *where, char *why);
  polyak_status capturing(void *stream, int any_visible, int *capturing, char *why);
  void thread_start();

private:
  enum Kind { COPY, RECORD, WAIT, WORK };
  struct Event {
    int64_t recorded = 0, completed = 0;
    int64_t failed_version = -1; // the record that reports a failed copy
  };
  struct Op {
    Kind kind;
    int64_t seq;
    void *stream;
    // COPY
    void *dst = nullptr;
    const void *src = nullptr;
    size_t num_bytes = 0;
    int direction = 0;
    uint64_t src_sum = 0;
    bool fails = false;
    // RECORD, WAIT
    Ctx *ctx = nullptr;
    int event = 0;
    int64_t version = 0;
    // WORK
    std::function<void()> fn;
    const char *range = nullptr;
    size_t range_bytes = 0;
    bool writes = false;
    bool started = false;
  };
  struct Range {
    const char *begin;
    size_t num_bytes;
  };

  void run();
  bool runnable(const Op &op);
  void check_races(const Op &op);
  bool is_pinned(const void *ptr, size_t num_bytes);
  bool is_device(const void *ptr, size_t num_bytes);
  void violation(const std::string &what);
  void push(Op op);

  std::mutex lock_;
  std::condition_variable changed_;
  std::map<void *, std::deque<Op>> streams_;
  std::vector<std::unique_ptr<Ctx>> contexts_;
  std::vector<std::unique_ptr<char[]>> device_blocks_;
  std::vector<Range> device_;
  std::map<const char *, size_t> pinned_;
  size_t pinned_bytes_ = 0, pinned_peak_ = 0;
  std::map<void *, bool> capturing_;
  std::vector<std::thread::id> thread_starts_;
  std::vector<std::string> violations_;
  std::mt19937_64 rng_;
  int max_delay_us_;
  int64_t seq_ = 0, copies_enqueued_ = 0, copies_done_ = 0, queued_ = 0, queued_work_ = 0;
  int64_t fail_copy_at_ = 0, fail_running_at_ = 0;
  bool hold_ = false, stop_ = false;
  std::map<void *, bool> stream_failed_;
  int side_tags_ = 0;
  std::thread thread_;
};

} // namespace polyak_test

#endif // POLYAK_TEST_OFFLOAD_STANDIN_H
