// offload_standin.cpp: the stand-in device side (offload_standin.h).
#include "offload_standin.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace polyak_test {

struct Standin::Ctx {
  Standin *standin;
  std::vector<Event> events;
  void *side;
};

namespace {

void say(char *why, const char *text)
{
  std::snprintf(why, POLYAK_ERROR_BYTES, "%s", text);
}

uint64_t checksum(const void *data, size_t num_bytes)
{
  uint64_t sum = 1469598103934665603ull; // FNV-1a
  const unsigned char *bytes = static_cast<const unsigned char *>(data);
  for (size_t i = 0; i < num_bytes; i++)
    sum = (sum ^ bytes[i]) * 1099511628211ull;
  return sum;
}

bool overlap(const char *a, size_t a_bytes, const char *b, size_t b_bytes)
{
  return a < b + b_bytes && b < a + a_bytes;
}

Standin *of(void *arg)
{
  return static_cast<Standin *>(arg);
}

Standin::Ctx *ctx_of(void *ctx)
{
  return static_cast<Standin::Ctx *>(ctx);
}

} // namespace

// ---- the C table ----------------------------------------------------------------

extern "C" {
static polyak_status standin_open(void *arg, const polyak_t *p, int num_events, void **ctx, void **side, char *why)
{
  return of(arg)->open(p, num_events, ctx, side, why);
}
static void standin_close(void *ctx)
{
  ctx_of(ctx)->standin->close(ctx_of(ctx));
}
static void *standin_alloc_pinned(void *ctx, size_t num_bytes)
{
  return ctx_of(ctx)->standin->alloc_pinned(num_bytes);
}
static void standin_free_pinned(void *ctx, void *host)
{
  ctx_of(ctx)->standin->free_pinned(host);
}
static polyak_status standin_copy(void *ctx, void *dst, const void *src, size_t num_bytes, int direction, void *stream,
                                  char *why)
{
  return ctx_of(ctx)->standin->copy(ctx_of(ctx), dst, src, num_bytes, direction, stream, why);
}
static polyak_status standin_record(void *ctx, int event, void *stream, char *why)
{
  return ctx_of(ctx)->standin->record(ctx_of(ctx), event, stream, why);
}
static polyak_status standin_stream_wait(void *ctx, void *stream, int event, char *why)
{
  return ctx_of(ctx)->standin->stream_wait(ctx_of(ctx), stream, event, why);
}
static polyak_status standin_wait(void *ctx, int event, char *why)
{
  return ctx_of(ctx)->standin->wait(ctx_of(ctx), event, why);
}
static polyak_status standin_locate(void *ctx, const void *ptr, size_t num_bytes, int *where, char *why)
{
  return ctx_of(ctx)->standin->locate(ptr, num_bytes, where, why);
}
static polyak_status standin_capturing(void *ctx, void *stream, int any_visible, int *capturing, char *why)
{
  return ctx_of(ctx)->standin->capturing(stream, any_visible, capturing, why);
}
static void standin_thread_start(void *ctx)
{
  ctx_of(ctx)->standin->thread_start();
}
}

const polyak_transfer_ops Standin::ops = {
    "stand-in",
    standin_open,
    standin_close,
    standin_alloc_pinned,
    standin_free_pinned,
    standin_copy,
    standin_record,
    standin_stream_wait,
    standin_wait,
    standin_locate,
    standin_capturing,
    nullptr,
    nullptr,
    nullptr,
    standin_thread_start,
};

// ---- set-up ----------------------------------------------------------------------

Standin::Standin(uint64_t seed, int max_delay_us) : rng_(seed), max_delay_us_(max_delay_us)
{
  thread_ = std::thread([this] { run(); });
}

Standin::~Standin()
{
  {
    std::unique_lock<std::mutex> guard(lock_);
    hold_ = false;
    stop_ = true;
    changed_.notify_all();
  }
  thread_.join();
  for (auto &entry : pinned_)
    std::free(const_cast<char *>(entry.first));
}

void *Standin::device_alloc(size_t num_bytes)
{
  std::unique_lock<std::mutex> guard(lock_);
  device_blocks_.emplace_back(new char[num_bytes + 64]());
  char *base = device_blocks_.back().get();
  char *aligned = base + (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  device_.push_back({aligned, num_bytes});
  return aligned;
}

polyak_status Standin::open(const polyak_t *p, int num_events, void **ctx, void **side, char *why)
{
  (void)p, (void)why;
  std::unique_lock<std::mutex> guard(lock_);
  contexts_.emplace_back(new Ctx{this, std::vector<Event>((size_t)num_events), nullptr});
  Ctx *c = contexts_.back().get();
  c->side = reinterpret_cast<void *>(static_cast<uintptr_t>(0x51de0000u + 16u * (unsigned)++side_tags_));
  *ctx = c;
  *side = c->side;
  return POLYAK_OK;
}

void Standin::close(Ctx *ctx)
{
  // the contexts stay until the stand-in goes: waits queued on a caller's
  // stream may still name their events
  char why[POLYAK_ERROR_BYTES];
  for (int e = 0; e < (int)ctx->events.size(); e++)
    wait(ctx, e, why);
}

void *Standin::alloc_pinned(size_t num_bytes)
{
  void *host = std::aligned_alloc(64, (num_bytes + 63) / 64 * 64);
  std::unique_lock<std::mutex> guard(lock_);
  pinned_[static_cast<char *>(host)] = num_bytes;
  pinned_bytes_ += num_bytes;
  pinned_peak_ = std::max(pinned_peak_, pinned_bytes_);
  return host;
}

void Standin::free_pinned(void *host)
{
  std::unique_lock<std::mutex> guard(lock_);
  auto found = pinned_.find(static_cast<char *>(host));
  if (found == pinned_.end()) {
    violations_.push_back("free_pinned of memory alloc_pinned did not give");
    return;
  }
  for (auto &stream : streams_)
    for (const Op &op : stream.second)
      if (op.kind == COPY && (overlap(static_cast<const char *>(op.dst), op.num_bytes, found->first, found->second) ||
                              overlap(static_cast<const char *>(op.src), op.num_bytes, found->first, found->second)))
        violations_.push_back("pinned memory freed while a copy into or out of it is unfinished");
  pinned_bytes_ -= found->second;
  pinned_.erase(found);
  std::free(host);
}

// ---- enqueueing -----------------------------------------------------------------

void Standin::push(Op op)
{
  op.seq = ++seq_;
  queued_++;
  queued_work_ += op.kind == WORK;
  streams_[op.stream].push_back(std::move(op));
  changed_.notify_all();
}

bool Standin::is_pinned(const void *ptr, size_t num_bytes)
{
  const char *p = static_cast<const char *>(ptr);
  for (auto &entry : pinned_)
    if (p >= entry.first && p + num_bytes <= entry.first + entry.second)
      return true;
  return false;
}

bool Standin::is_device(const void *ptr, size_t num_bytes)
{
  const char *p = static_cast<const char *>(ptr);
  for (const Range &r : device_)
    if (p >= r.begin && p + num_bytes <= r.begin + r.num_bytes)
      return true;
  return false;
}

polyak_status Standin::copy(Ctx *ctx, void *dst, const void *src, size_t num_bytes, int direction, void *stream,
                            char *why)
{
  (void)ctx;
  std::unique_lock<std::mutex> guard(lock_);
  if (fail_copy_at_ > 0 && --fail_copy_at_ == 0) {
    say(why, "stand-in: this copy is refused (injected)");
    return POLYAK_ERR_CUDA;
  }
  const void *host = direction == POLYAK_TO_HOST ? dst : src;
  const void *device = direction == POLYAK_TO_HOST ? src : dst;
  if (!is_pinned(host, num_bytes))
    violations_.push_back("a copy's host side is not pinned memory from alloc_pinned");
  if (!is_device(device, num_bytes))
    violations_.push_back("a copy's device side is not device memory");
  Op op{};
  op.kind = COPY;
  op.stream = stream;
  op.dst = dst;
  op.src = src;
  op.num_bytes = num_bytes;
  op.direction = direction;
  op.src_sum = direction == POLYAK_TO_DEVICE ? checksum(src, num_bytes) : 0;
  op.fails = fail_running_at_ > 0 && --fail_running_at_ == 0;
  op.range = static_cast<const char *>(device);
  op.range_bytes = num_bytes;
  op.writes = direction == POLYAK_TO_DEVICE;
  copies_enqueued_++;
  push(std::move(op));
  return POLYAK_OK;
}

polyak_status Standin::record(Ctx *ctx, int event, void *stream, char *why)
{
  std::unique_lock<std::mutex> guard(lock_);
  if (event < 0 || event >= (int)ctx->events.size()) {
    say(why, "stand-in: no such event");
    return POLYAK_ERR_CUDA;
  }
  Op op{};
  op.kind = RECORD;
  op.stream = stream;
  op.ctx = ctx;
  op.event = event;
  op.version = ++ctx->events[(size_t)event].recorded;
  push(std::move(op));
  return POLYAK_OK;
}

polyak_status Standin::stream_wait(Ctx *ctx, void *stream, int event, char *why)
{
  std::unique_lock<std::mutex> guard(lock_);
  if (event < 0 || event >= (int)ctx->events.size()) {
    say(why, "stand-in: no such event");
    return POLYAK_ERR_CUDA;
  }
  Op op{};
  op.kind = WAIT;
  op.stream = stream;
  op.ctx = ctx;
  op.event = event;
  op.version = ctx->events[(size_t)event].recorded; // its last record, as cudaStreamWaitEvent
  push(std::move(op));
  return POLYAK_OK;
}

polyak_status Standin::wait(Ctx *ctx, int event, char *why)
{
  std::unique_lock<std::mutex> guard(lock_);
  Event &e = ctx->events[(size_t)event];
  int64_t version = e.recorded;
  changed_.wait(guard, [&] { return e.completed >= version; });
  if (e.failed_version >= 0 && e.failed_version <= version && e.failed_version > version - 1) {
    say(why, "stand-in: a copy before this event failed (injected)");
    return POLYAK_ERR_CUDA;
  }
  return POLYAK_OK;
}

polyak_status Standin::locate(const void *ptr, size_t num_bytes, int *where, char *why)
{
  std::unique_lock<std::mutex> guard(lock_);
  const char *p = static_cast<const char *>(ptr);
  for (const Range &r : device_)
    if (p >= r.begin && p < r.begin + r.num_bytes) {
      if (p + num_bytes > r.begin + r.num_bytes) {
        say(why, "stand-in: the span runs past its device allocation");
        return POLYAK_ERR_INVALID_ARG;
      }
      *where = POLYAK_MEMORY_DEVICE;
      return POLYAK_OK;
    }
  *where = POLYAK_MEMORY_HOST;
  return POLYAK_OK;
}

polyak_status Standin::capturing(void *stream, int any_visible, int *capturing, char *why)
{
  (void)why;
  std::unique_lock<std::mutex> guard(lock_);
  *capturing = 0;
  for (auto &entry : capturing_)
    if (entry.second && (any_visible || entry.first == stream))
      *capturing = 1;
  return POLYAK_OK;
}

// ---- the test's side -----------------------------------------------------------

void Standin::enqueue(void *stream, std::function<void()> fn, const void *range, size_t num_bytes, bool writes)
{
  std::unique_lock<std::mutex> guard(lock_);
  Op op{};
  op.kind = WORK;
  op.stream = stream;
  op.fn = std::move(fn);
  op.range = static_cast<const char *>(range);
  op.range_bytes = num_bytes;
  op.writes = writes;
  push(std::move(op));
}

void Standin::write_device(void *stream, void *dst, const void *src, size_t num_bytes)
{
  auto data =
      std::make_shared<std::vector<char>>(static_cast<const char *>(src), static_cast<const char *>(src) + num_bytes);
  enqueue(
      stream,
      [dst, data] {
        if (!data->empty()) // an empty vector's data() may be NULL
          std::memcpy(dst, data->data(), data->size());
      },
      dst, num_bytes, true);
}

void Standin::read_device(void *stream, void *dst, const void *src, size_t num_bytes)
{
  enqueue(
      stream,
      [dst, src, num_bytes] {
        if (num_bytes > 0)
          std::memcpy(dst, src, num_bytes);
      },
      src, num_bytes, false);
  synchronize();
}

void Standin::synchronize()
{
  std::unique_lock<std::mutex> guard(lock_);
  changed_.wait(guard, [&] { return queued_ == 0; });
}

void Standin::synchronize_work()
{
  std::unique_lock<std::mutex> guard(lock_);
  changed_.wait(guard, [&] { return queued_work_ == 0; });
}

void Standin::fail_copy_at(int64_t n)
{
  std::unique_lock<std::mutex> guard(lock_);
  fail_copy_at_ = n;
}

void Standin::fail_running_copy_at(int64_t n)
{
  std::unique_lock<std::mutex> guard(lock_);
  fail_running_at_ = n;
}

void Standin::thread_start()
{
  std::lock_guard<std::mutex> guard(lock_);
  thread_starts_.push_back(std::this_thread::get_id());
}

std::vector<std::thread::id> Standin::thread_starts()
{
  std::lock_guard<std::mutex> guard(lock_);
  return thread_starts_;
}

void Standin::set_capturing(void *stream, bool capturing)
{
  std::unique_lock<std::mutex> guard(lock_);
  capturing_[stream] = capturing;
}

void Standin::hold_copies(bool hold)
{
  std::unique_lock<std::mutex> guard(lock_);
  hold_ = hold;
  changed_.notify_all();
}

std::vector<std::string> Standin::take_violations()
{
  std::unique_lock<std::mutex> guard(lock_);
  std::vector<std::string> taken;
  taken.swap(violations_);
  return taken;
}

int64_t Standin::copies_enqueued()
{
  std::unique_lock<std::mutex> guard(lock_);
  return copies_enqueued_;
}

int64_t Standin::copies_done()
{
  std::unique_lock<std::mutex> guard(lock_);
  return copies_done_;
}

size_t Standin::pinned_peak_bytes()
{
  std::unique_lock<std::mutex> guard(lock_);
  return pinned_peak_;
}

size_t Standin::pinned_bytes()
{
  std::unique_lock<std::mutex> guard(lock_);
  return pinned_bytes_;
}

// ---- the device's thread ---------------------------------------------------------

bool Standin::runnable(const Op &op)
{
  if (op.kind == WAIT)
    return op.ctx->events[(size_t)op.event].completed >= op.version;
  if (op.kind == COPY)
    return !hold_;
  return true;
}

// Work touching device bytes that work enqueued earlier on another stream
// touches (one of the two writing) must not run before that work finished.
void Standin::check_races(const Op &op)
{
  if (!op.range)
    return;
  for (auto &stream : streams_) {
    if (stream.first == op.stream)
      continue;
    for (const Op &other : stream.second)
      if (other.seq < op.seq && other.range && (other.writes || op.writes) &&
          overlap(op.range, op.range_bytes, other.range, other.range_bytes)) {
        char text[256];
        std::snprintf(text, sizeof text,
                      "%s (op %lld) ran before %s (op %lld), enqueued earlier on another stream, "
                      "finished: a missing wait",
                      op.kind == COPY ? "a copy" : "the test's work", (long long)op.seq,
                      other.kind == COPY ? "a copy" : "the test's work", (long long)other.seq);
        violations_.push_back(text);
      }
  }
}

void Standin::run()
{
  std::unique_lock<std::mutex> guard(lock_);
  for (;;) {
    // the test's work first, as early as its stream allows; then any other head at random
    std::vector<std::deque<Op> *> ready, work;
    for (auto &stream : streams_)
      if (!stream.second.empty() && !stream.second.front().started && runnable(stream.second.front())) {
        ready.push_back(&stream.second);
        if (stream.second.front().kind == WORK)
          work.push_back(&stream.second);
      }
    if (ready.empty()) {
      if (stop_ && queued_ == 0)
        return;
      changed_.wait(guard);
      continue;
    }
    std::deque<Op> *queue = !work.empty() ? work[0] : ready[rng_() % ready.size()];
    Op &op = queue->front();
    op.started = true;
    check_races(op);
    int delay = op.kind == COPY && max_delay_us_ > 0 ? (int)(rng_() % (uint64_t)max_delay_us_) : 0;
    if (op.kind == COPY && op.direction == POLYAK_TO_HOST)
      std::memset(op.dst, 0xFF, op.num_bytes); // being written: not the data yet
    guard.unlock();
    if (delay > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
    if (op.kind == WORK)
      op.fn();
    guard.lock();
    if (op.kind == COPY) {
      if (op.direction == POLYAK_TO_DEVICE && checksum(op.src, op.num_bytes) != op.src_sum)
        violations_.push_back("the host changed a copy's source before the copy ran");
      if (op.fails)
        stream_failed_[op.stream] = true;
      else
        std::memcpy(op.dst, op.src, op.num_bytes);
      copies_done_++;
    } else if (op.kind == RECORD) {
      Event &e = op.ctx->events[(size_t)op.event];
      if (stream_failed_[op.stream]) { // this record reports the failed copy
        e.failed_version = op.version;
        stream_failed_[op.stream] = false;
      }
      e.completed = op.version;
    }
    queued_work_ -= op.kind == WORK;
    queue->pop_front();
    queued_--;
    changed_.notify_all();
  }
}

} // namespace polyak_test
