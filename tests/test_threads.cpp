// test_threads.cpp: cpu_threads. Every call that walks the shadows on the
// CPU backend leaves the same bits with 1, 2, 3 and 7 threads (and 0, one
// per core): the shadows, the non-finite count, the params it writes and
// what it reads out, across updates with gaps, stochastic rounding, the
// guard, graph replays, Lookahead's write-back, LAWA's norms, shadows in the
// caller's memory, sharded handles and the evaluation calls. And: the pool
// is started once and joined at destroy; bad values are refused.
#include "test_util.h"

#include <dirent.h>
#include <pthread.h>
#include <unistd.h>

#include <mutex>

#include "cpu/cpu_pool.h"

using namespace polyak_test;

namespace {

const int kThreadCounts[] = {1, 2, 3, 7, 0};

// Large enough for many work items (65536 elements each), odd enough for
// heads and tails; every dtype.
std::vector<Tensor> model()
{
  const int64_t sizes[] = {0, 1, 3, 65535, 65537, 130001, 200003, 17, 4099, 70000};
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
  std::vector<Tensor> tensors;
  for (size_t i = 0; i < std::size(sizes); i++)
    tensors.emplace_back("t" + std::to_string(i), dtypes[i % 3], sizes[i], dtype_bytes(dtypes[i % 3]) * (i % 4));
  std::mt19937_64 rng(31);
  for (auto &t : tensors)
    t.randomize(rng, 0.5f, 1.0f);
  return tensors;
}

// The params of the next step, the same for every thread count; `poison`
// puts a NaN and an Inf into each tensor of more than two elements.
void advance(std::vector<Tensor> &tensors, int64_t step, bool poison)
{
  std::mt19937_64 rng(1000 + step);
  for (auto &t : tensors) {
    t.randomize(rng, 0.5f, 1.0f);
    if (poison && t.num_elems > 2) {
      t.set(1, NAN);
      t.set(t.num_elems - 1, -INFINITY);
    }
  }
}

void append_bytes(std::vector<char> &out, const void *data, size_t num_bytes)
{
  out.insert(out.end(), static_cast<const char *>(data), static_cast<const char *>(data) + num_bytes);
}

// What a scenario reads out, and memory of its that the handle uses until
// it is destroyed (the caller's shadows).
struct RunState {
  std::vector<char> read;
  std::vector<Tensor> kept;
};

// Everything a run leaves: the handle's state, the params' bytes, and what
// the scenario read out.
struct Outcome {
  Snapshot state;
  std::vector<char> params, read;
};

// Runs `scenario(handle, params, run)` with cfg at every thread count on
// its own copy of `tensors`; every outcome must equal the one-thread run's.
template <class Scenario>
void expect_same_bits(polyak_config cfg, const std::vector<Tensor> &tensors, Scenario scenario)
{
  std::vector<Outcome> outcomes;
  for (int threads : kThreadCounts) {
    cfg.cpu_threads = threads;
    std::vector<Tensor> own = tensors;
    RunState run;
    Handle h = make_handle(cfg);
    Outcome o;
    scenario(h.get(), own, run);
    o.state = snapshot(h.get(), cfg.num_shadows, own);
    o.read = std::move(run.read);
    for (auto &t : own)
      append_bytes(o.params, t.data(), t.num_elems * dtype_bytes(t.dtype));
    outcomes.push_back(std::move(o));
  }
  for (size_t i = 1; i < outcomes.size(); i++) {
    EXPECT_GT(outcomes[i].state.step, 0);
    EXPECT_TRUE(outcomes[i].state == outcomes[0].state) << "shadows, step or count, cpu_threads " << kThreadCounts[i];
    EXPECT_TRUE(outcomes[i].params == outcomes[0].params) << "params, cpu_threads " << kThreadCounts[i];
    EXPECT_TRUE(outcomes[i].read == outcomes[0].read) << "read-outs, cpu_threads " << kThreadCounts[i];
  }
}

void finalize(polyak_t *p, std::vector<Tensor> &tensors)
{
  add_all(p, tensors);
  ASSERT_EQ(polyak_finalize(p, nullptr), POLYAK_OK) << polyak_last_error(p);
}

void updates(polyak_t *p, std::vector<Tensor> &tensors, std::initializer_list<int64_t> steps, bool poison)
{
  for (int64_t step : steps) {
    advance(tensors, step, poison);
    ASSERT_EQ(polyak_update(p, step, nullptr), POLYAK_OK) << polyak_last_error(p);
  }
}

TEST(Threads, UpdatesGiveTheSameBitsAndCountForEveryThreadCount)
{
  for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16})
    for (int variant = 0; variant < 3; variant++) { // guard; no guard; zero_init with a start_step
      polyak_config cfg = cpu_config(4, 0.95);
      cfg.shadow_dtype = shadow_dtype;
      cfg.seed = 77;
      cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_WARMUP;
      cfg.shadows[2].schedule.kind = POLYAK_SCHEDULE_POWER;
      cfg.shadows[0].rounding = cfg.shadows[2].rounding = POLYAK_ROUND_STOCHASTIC;
      cfg.skip_nonfinite = variant != 1;
      cfg.zero_init = variant == 2;
      cfg.shadows[3].schedule.start_step = variant == 2 ? 2 : 0;
      expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &) {
        finalize(p, tensors);
        updates(p, tensors, {1, 2, 5, 6, 40}, true);
      });
      if (HasFailure())
        FAIL() << "shadows " << dtype_label(shadow_dtype) << " variant " << variant;
    }
}

TEST(Threads, GraphReplaysAndGradNormShadows)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[1].grad_norm_c = 0.5;
  cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
  expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &run) {
    float norm = 1.5f;
    ASSERT_EQ(polyak_set_grad_norm(p, &norm), POLYAK_OK);
    finalize(p, tensors);
    updates(p, tensors, {1}, true);
    ASSERT_EQ(polyak_graph_reserve(p, 3, 4, nullptr), POLYAK_OK);
    for (int replay = 0; replay < 6; replay++) { // two past the reservation
      advance(tensors, 10 + replay, replay % 2);
      norm = 0.25f * (float)replay;
      ASSERT_EQ(polyak_graph_update(p, nullptr), POLYAK_OK);
    }
    int64_t done = 0;
    EXPECT_EQ(polyak_graph_release(p, &done), POLYAK_ERR_STATE); // dropped replays
    append_bytes(run.read, &done, sizeof done);
  });
}

TEST(Threads, LookaheadWritesTheSameParamsBack)
{
  for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16}) {
    polyak_config cfg = cpu_config(2, 0.9);
    cfg.shadow_dtype = shadow_dtype;
    cfg.lookahead_every = 2;
    cfg.shadows[1].schedule.beta = 0.5;
    cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC;
    expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &) {
      finalize(p, tensors);
      updates(p, tensors, {1, 2, 3, 4, 6}, true);
    });
  }
}

TEST(Threads, LayerwiseNormsFromGradients)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.shadows[0].layerwise_beta0 = 0.99;
  expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &run) {
    finalize(p, tensors);
    std::vector<Tensor> grads = model();
    std::vector<void *> table;
    for (auto &g : grads)
      table.push_back(g.data());
    ASSERT_EQ(polyak_set_grads(p, table.data()), POLYAK_OK);
    for (int64_t step : {1, 2, 4}) {
      advance(grads, 50 + step, false);
      advance(tensors, step, false);
      ASSERT_EQ(polyak_update(p, step, nullptr), POLYAK_OK);
    }
    std::vector<double> betas(tensors.size());
    ASSERT_EQ(polyak_get_layer_betas(p, 0, betas.data()), POLYAK_OK);
    append_bytes(run.read, betas.data(), betas.size() * sizeof(double));
  });
}

TEST(Threads, ShadowsInTheCallersMemory)
{
  polyak_config cfg = cpu_config(1, 0.99);
  cfg.seed = 3;
  cfg.shadows[0].rounding = POLYAK_ROUND_STOCHASTIC;
  expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &run) {
    const polyak_dtype dtypes[] = {POLYAK_BF16, POLYAK_F16, POLYAK_F32};
    std::vector<Tensor> &shadows = run.kept;
    for (size_t i = 0; i < tensors.size(); i++)
      shadows.emplace_back("s", dtypes[i % 3], tensors[i].num_elems, dtype_bytes(dtypes[i % 3]) * (i % 2));
    for (size_t i = 0; i < tensors.size(); i++) {
      int64_t shape[1] = {tensors[i].num_elems};
      ASSERT_EQ(polyak_add_with_shadow(p, tensors[i].name.c_str(), tensors[i].data(), tensors[i].dtype, 1, shape,
                                       shadows[i].data(), shadows[i].dtype,
                                       i % 4 == 3 ? POLYAK_SHADOW_ROUND_NEAREST : 0),
                POLYAK_OK)
          << polyak_last_error(p);
    }
    ASSERT_EQ(polyak_finalize(p, nullptr), POLYAK_OK);
    updates(p, tensors, {1, 2, 3, 9}, true);
    for (auto &s : shadows)
      append_bytes(run.read, s.data(), s.num_elems * dtype_bytes(s.dtype));
  });
}

TEST(Threads, ShardedHandlesKeepTheSameSlices)
{
  for (int rank = 0; rank < 3; rank++) {
    polyak_config cfg = cpu_config(2, 0.9);
    cfg.shadow_dtype = POLYAK_BF16;
    cfg.world_size = 3;
    cfg.rank = rank;
    expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &) {
      finalize(p, tensors);
      updates(p, tensors, {1, 2, 7}, true);
      advance(tensors, 8, false); // a hard update refuses non-finite params
      ASSERT_EQ(polyak_hard_update(p, 1, nullptr), POLYAK_OK);
      updates(p, tensors, {9}, false);
    });
  }
}

TEST(Threads, ReadOutsBlendsCopiesAndTheSynthesis)
{
  polyak_config cfg = cpu_config(2, 0.9);
  cfg.zero_init = 1;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  expect_same_bits(cfg, model(), [](polyak_t *p, std::vector<Tensor> &tensors, RunState &run) {
    finalize(p, tensors);
    updates(p, tensors, {1, 2, 3}, false);
    std::vector<float> out(200003);
    ASSERT_EQ(polyak_get_shadow(p, 0, 6, out.data(), POLYAK_F32, nullptr), POLYAK_OK);
    append_bytes(run.read, out.data(), out.size() * 4);
    const double weights[2] = {0.25, 0.75};
    ASSERT_EQ(polyak_get_blend(p, weights, 0, 5, out.data(), POLYAK_BF16, nullptr), POLYAK_OK);
    append_bytes(run.read, out.data(), 130001 * 2);
    int64_t snapshot_elems = 0;
    ASSERT_EQ(polyak_snapshot_elems(p, &snapshot_elems), POLYAK_OK);
    std::vector<float> stack(2 * snapshot_elems);
    ASSERT_EQ(polyak_snapshot(p, 0, stack.data(), nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_snapshot(p, 1, stack.data() + snapshot_elems, nullptr), POLYAK_OK);
    append_bytes(run.read, stack.data(), stack.size() * 4);
    ASSERT_EQ(polyak_store(p, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_copy_to_params(p, 1, nullptr), POLYAK_OK);
    for (auto &t : tensors)
      append_bytes(run.read, t.data(), t.num_elems * dtype_bytes(t.dtype));
    ASSERT_EQ(polyak_blend_to_params(p, weights, 0, nullptr), POLYAK_OK);
    for (auto &t : tensors)
      append_bytes(run.read, t.data(), t.num_elems * dtype_bytes(t.dtype));
    const double coefficients[2] = {-0.5, 1.5};
    ASSERT_EQ(polyak_synthesize_to_params(p, stack.data(), 2, coefficients, nullptr), POLYAK_OK);
    for (auto &t : tensors)
      append_bytes(run.read, t.data(), t.num_elems * dtype_bytes(t.dtype));
    ASSERT_EQ(polyak_restore(p, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_hard_update(p, 0, nullptr), POLYAK_OK);
    updates(p, tensors, {4}, true);
  });
}

int threads_of_this_process()
{
  int count = 0;
  DIR *dir = opendir("/proc/self/task");
  while (dir && readdir(dir))
    count++;
  if (dir)
    closedir(dir);
  return count - 2; // "." and ".."
}

TEST(Threads, ThePoolStartsAtFinalizeAndIsJoinedAtDestroy)
{
  int before = threads_of_this_process(), started = 0;
  polyak_config cfg = cpu_config(1);
  cfg.cpu_threads = 5;
  std::vector<Tensor> tensors = model();
  {
    Handle h = make_handle(cfg);
    EXPECT_EQ(threads_of_this_process(), before) << "create starts nothing";
    finalize(h.get(), tensors);
    started = threads_of_this_process();
    // the caller is the fifth (a sanitizer may start a thread of its own at the first)
    EXPECT_GE(started - before, 4);
    EXPECT_LE(started - before, 5);
    updates(h.get(), tensors, {1, 2, 3, 4}, false);
    EXPECT_EQ(threads_of_this_process(), started) << "no thread per update";
  }
  EXPECT_EQ(threads_of_this_process(), started - 4) << "joined at destroy";
  cfg.cpu_threads = 1;
  Handle one = make_handle(cfg);
  finalize(one.get(), tensors);
  EXPECT_EQ(threads_of_this_process(), started - 4) << "one thread: the caller's alone";
}

// Items that take a while, recording who ran them.
struct Recorder {
  std::mutex lock;
  std::set<pthread_t> threads;
  std::vector<int> runs;
};

int64_t record_item(void *arg, int64_t item)
{
  auto *r = static_cast<Recorder *>(arg);
  usleep(2000);
  std::lock_guard<std::mutex> hold(r->lock);
  r->threads.insert(pthread_self());
  r->runs[item]++;
  return item;
}

TEST(Threads, ThePoolRunsEachItemOnceAcrossItsThreads)
{
  cpu_pool *pool = nullptr;
  char why[256];
  ASSERT_EQ(cpu_pool_create(&pool, 4, why, sizeof why), POLYAK_OK) << why;
  EXPECT_EQ(cpu_pool_threads(pool), 4);
  for (int job = 0; job < 3; job++) { // the same workers, job after job
    Recorder r;
    r.runs.assign(40, 0);
    EXPECT_EQ(cpu_pool_run(pool, 40, record_item, &r), 40 * 39 / 2);
    EXPECT_EQ(r.runs, std::vector<int>(40, 1));
    EXPECT_GT(r.threads.size(), 1u) << "the workers took no item";
  }
  cpu_pool_destroy(pool);
  ASSERT_EQ(cpu_pool_create(&pool, 1, why, sizeof why), POLYAK_OK);
  EXPECT_EQ(pool, nullptr) << "one thread needs no pool";
  Recorder alone;
  alone.runs.assign(3, 0);
  EXPECT_EQ(cpu_pool_run(nullptr, 3, record_item, &alone), 3);
  EXPECT_EQ(alone.threads, std::set<pthread_t>{pthread_self()});
}

TEST(Threads, BadCountsAreRefused)
{
  polyak_config cfg = cpu_config(1);
  EXPECT_EQ(cfg.cpu_threads, 1) << "the default";
  char why[512];
  for (int bad : {-1, -100, POLYAK_MAX_CPU_THREADS + 1}) {
    cfg.cpu_threads = bad;
    EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_ERR_INVALID_ARG) << bad;
    EXPECT_TRUE(contains(why, "cpu_threads")) << why;
    polyak_t *p = reinterpret_cast<polyak_t *>(&cfg);
    EXPECT_EQ(polyak_create(&p, &cfg), POLYAK_ERR_INVALID_ARG);
    EXPECT_EQ(p, nullptr);
  }
  for (int good : {0, 1, POLYAK_MAX_CPU_THREADS}) {
    cfg.cpu_threads = good;
    EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_OK) << why;
  }
}

} // namespace
