// test_offload.cpp: the offload's pipeline against the stand-in device side
// (copies and events completed late on a thread of its own): groups and
// copies, the staging ring wrapping around, the order of reads and writes on
// the streams, the host never waiting in polyak_update, errors in the middle
// of queued work, destroy with transfers in flight, pinned memory, and what
// an offloaded handle refuses. The stand-in records any race it sees; every
// Pair checks there was none.
#include <atomic>
#include <thread>

#include "offload_pair.h"

using namespace polyak_test;

namespace {

polyak_config config(int num_shadows = 2)
{
  polyak_config cfg = cpu_config(num_shadows, 0.9);
  cfg.cpu_threads = 2;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  return cfg;
}

bool contains(const char *text, const char *part)
{
  return std::strstr(text, part) != nullptr;
}

int64_t param_bytes(const std::vector<Spec> &specs, bool copy_only)
{
  int64_t total = 0;
  for (const Spec &s : specs)
    if (s.copy_only == copy_only)
      total += s.num_elems * (int64_t)dtype_bytes(s.dtype);
  return total;
}

} // namespace

TEST(Offload, GroupsHoldAStagingSlotOfParamsAndAdjacentParamsShareACopy)
{
  // end to end on the device: sizes of whole 16 bytes, none copy-only
  const std::vector<Spec> aligned = {
      {"w1", POLYAK_BF16, 4096}, {"w2", POLYAK_F32, 1028}, {"w3", POLYAK_BF16, 65544}, {"w4", POLYAK_F16, 808}};
  for (bool adjacent : {false, true}) {
    Pair pair(config(), adjacent ? aligned : odd_specs(), 64 << 10, 1, adjacent);
    pair.finalize();
    const offload_state *s = offload_of(pair.off.get());
    int64_t slot = (64 << 10) / OFFLOAD_RING_SLOTS;
    int64_t bytes = param_bytes(pair.specs, false);
    // each group but the last brings at least a slot's bytes, and less than a slot and a chunk
    EXPECT_GE(s->num_groups, (int)(bytes / (slot + POLYAK_CHUNK_ELEMS * 4)));
    EXPECT_LE(s->num_groups, (int)((bytes + slot - 1) / slot));
    int64_t copied = 0;
    for (int g = 0; g < s->num_groups; g++)
      for (int64_t c = s->groups[g].first_copy; c < s->groups[g].end_copy; c++)
        copied += s->copies[c].num_bytes;
    EXPECT_EQ(copied, bytes);
    if (adjacent) // one run of device memory: one copy per group
      EXPECT_EQ(s->num_copies, s->num_groups);
    else // a copy per tensor piece in a group at least
      EXPECT_GT(s->num_copies, s->num_groups);
    pair.set_params(3);
    pair.update(1);
    pair.expect_same();
  }
}

TEST(Offload, GroupsAreAtLeast4MiBAndAtMostAbout256WhateverTheStaging)
{
  EXPECT_EQ(polyak_offload_group_bytes(0), OFFLOAD_MIN_GROUP_BYTES);
  EXPECT_EQ(polyak_offload_group_bytes(1 << 20), OFFLOAD_MIN_GROUP_BYTES);
  for (int64_t bytes : {(int64_t)1 << 30, (int64_t)13476831232, (int64_t)137960000000}) { // 1 GiB, 7B and 70B bf16
    size_t group = polyak_offload_group_bytes(bytes);
    EXPECT_GE(group, OFFLOAD_MIN_GROUP_BYTES);
    EXPECT_LE((bytes + (int64_t)group - 1) / (int64_t)group, OFFLOAD_MAX_GROUPS) << bytes;
  }
  // a model of 24 MiB with the least staging (slots of 4 KiB): 6 groups, not 6144
  Pair pair(config(1), {{"w", POLYAK_BF16, 12 << 20}, {"bn", POLYAK_F32, 5, true}}, OFFLOAD_MIN_STAGING_BYTES);
  pair.off->offload_group_bytes = 0; // the library's own size
  pair.checkpoints = false;
  pair.finalize();
  const offload_state *s = offload_of(pair.off.get());
  EXPECT_EQ(s->slot_num_bytes, OFFLOAD_MIN_STAGING_BYTES / OFFLOAD_RING_SLOTS);
  EXPECT_GE(s->num_groups, 6);
  EXPECT_LE(s->num_groups, 7);
  pair.set_params(2);
  pair.update(1);
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(pair.off.get(), &count), POLYAK_OK) << polyak_last_error(pair.off.get());
}

TEST(Offload, ReadOutsIntoTheCallersBuffersAreNoWritesOfTheParams)
{
  // only writes into the params chain the next reads after them (EV_WRITES)
  Pair pair(config(), odd_specs());
  pair.train({1});
  const offload_state *s = offload_of(pair.off.get());
  ASSERT_EQ(s->writes_recorded, 0);
  const int tensor = 5;
  void *dst = pair.standin.device_alloc(pair.specs[tensor].num_elems * sizeof(float));
  void *a = reinterpret_cast<void *>(0xa0);
  ASSERT_EQ(polyak_get_shadow(pair.off.get(), 0, tensor, dst, POLYAK_F32, a), POLYAK_OK)
      << polyak_last_error(pair.off.get());
  EXPECT_EQ(s->writes_recorded, 0); // a read-out into the caller's buffer
  ASSERT_EQ(polyak_copy_to_params(pair.off.get(), 0, a), POLYAK_OK) << polyak_last_error(pair.off.get());
  EXPECT_EQ(s->writes_recorded, 1); // a write of the params
  EXPECT_EQ(s->writes_stream, a);
  ASSERT_EQ(polyak_copy_to_params(pair.cpu.get(), 0, nullptr), POLYAK_OK);
  pair.expect_same();
}

TEST(Offload, PinnedMemoryIsTheStagingAndACopyOfTheParams)
{
  Pair pair(config(), odd_specs(), 32 << 10);
  pair.finalize();
  const offload_state *s = offload_of(pair.off.get());
  size_t tensors = pair.specs.size();
  size_t bound = (32 << 10) + (size_t)param_bytes(pair.specs, false) + (size_t)param_bytes(pair.specs, true) +
                 64 * (tensors + 3) + 4 * (tensors + 1);
  EXPECT_EQ(pair.standin.pinned_bytes(), (size_t)(32 << 10) + s->mirror_num_bytes);
  EXPECT_LE(pair.standin.pinned_bytes(), bound);
  pair.set_params(2);
  pair.update(1);
  pair.expect_same(); // read-outs and checkpoints pin nothing more
  EXPECT_EQ(pair.standin.pinned_peak_bytes(), pair.standin.pinned_bytes());
}

TEST(Offload, ReadOutsLargerThanTheStagingWrapAroundTheRing)
{
  Pair pair(config(), odd_specs(), 16 << 10); // slots of 4 KiB
  pair.train({1, 2});
  const int tensor = 6; // 65537 elements: 64 slots as f32
  int64_t n = pair.specs[tensor].num_elems;
  for (polyak_dtype d : {POLYAK_F32, POLYAK_F16}) {
    size_t bytes = n * dtype_bytes(d);
    std::vector<char> want(bytes), got(bytes);
    void *dst = pair.standin.device_alloc(bytes);
    int64_t before = pair.standin.copies_enqueued();
    ASSERT_EQ(polyak_get_shadow(pair.cpu.get(), 0, tensor, want.data(), d, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_get_shadow(pair.off.get(), 0, tensor, dst, d, nullptr), POLYAK_OK)
        << polyak_last_error(pair.off.get());
    EXPECT_EQ(pair.standin.copies_enqueued() - before, (int64_t)((bytes + 4095) / 4096)); // one per slot's worth
    pair.standin.read_device(nullptr, got.data(), dst, bytes);
    EXPECT_EQ(want, got) << dtype_label(d);
  }
}

TEST(Offload, UpdateReturnsBeforeAnyCopyRuns)
{
  Pair pair(config(), odd_specs());
  pair.finalize();
  pair.set_params(4);
  pair.standin.synchronize();
  pair.standin.hold_copies(true);
  int64_t done = pair.standin.copies_done();
  pair.update(1); // the CPU handle folds at once, the offloaded one only enqueues
  EXPECT_EQ(pair.standin.copies_done(), done);
  EXPECT_GT(pair.standin.copies_enqueued(), done);
  pair.standin.hold_copies(false);
  pair.expect_same();
}

TEST(Offload, TheNextUpdateWaitsOnTheHostForTheOneInFlight)
{
  Pair pair(config(), odd_specs());
  pair.finalize();
  pair.set_params(5);
  pair.standin.hold_copies(true);
  pair.update(1);
  pair.set_params(6); // ordered after the reads on the stream: waits with them
  std::atomic<bool> returned{false};
  polyak_status second = POLYAK_ERR_STATE;
  std::thread trainer([&] {
    second = polyak_update(pair.off.get(), 2, nullptr);
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(returned.load()); // the host blocks while update 1 is in flight
  pair.standin.hold_copies(false);
  trainer.join();
  ASSERT_EQ(second, POLYAK_OK) << polyak_last_error(pair.off.get());
  ASSERT_EQ(polyak_update(pair.cpu.get(), 2, nullptr), POLYAK_OK);
  pair.expect_same();
}

TEST(Offload, TheCallersNextWriteWaitsForTheReadsByDefault)
{
  Pair pair(config(), odd_specs(), 16 << 10, 2, false, 300);
  pair.finalize();
  for (int64_t step = 1; step <= 4; step++) {
    pair.set_params(100 + (uint64_t)step); // enqueued right behind the last update's reads
    pair.update(step);
  }
  pair.expect_same();
}

TEST(Offload, OverlappedReadsAreSafeWithTheWaitCall)
{
  Pair pair(config(), odd_specs(), 16 << 10, 3, false, 300);
  ASSERT_EQ(polyak_overlap_param_reads(pair.off.get(), 1), POLYAK_OK);
  pair.finalize();
  for (int64_t step = 1; step <= 4; step++) {
    ASSERT_EQ(polyak_wait_param_reads(pair.off.get(), nullptr), POLYAK_OK); // before the optimizer writes
    pair.set_params(200 + (uint64_t)step);
    pair.update(step);
  }
  pair.expect_same();
}

TEST(Offload, OverlappedReadsWithoutTheWaitCallAreARaceTheStandinSees)
{
  Pair pair(config(), odd_specs());
  ASSERT_EQ(polyak_overlap_param_reads(pair.off.get(), 1), POLYAK_OK);
  pair.finalize();
  pair.set_params(7);
  pair.standin.hold_copies(true);
  pair.update(1);
  // the optimizer's write, without polyak_wait_param_reads, on a stream of
  // its own (on the update's, it would wait for the held small reads first)
  pair.set_params(8, reinterpret_cast<void *>(0xd0));
  pair.standin.synchronize_work();
  pair.standin.hold_copies(false);
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(pair.off.get(), &count), POLYAK_OK);
  std::vector<std::string> seen = pair.standin.take_violations();
  ASSERT_FALSE(seen.empty()) << "the stand-in saw no race";
  EXPECT_TRUE(contains(seen[0].c_str(), "missing wait")) << seen[0];
}

TEST(Offload, OverlappedReadsStillComeBeforeTheWritesOfTheForwardAndTheGradNorm)
{
  // the forward writes BatchNorm's statistics and counters (copy-only or
  // averaged buffers), clip_grad_norm_ the norm: all before the optimizer
  // step, so the caller's stream waits for those reads even with overlap
  polyak_config cfg = config();
  cfg.shadows[0].grad_norm_c = 1.0;
  Pair pair(cfg, odd_specs());
  ASSERT_EQ(polyak_overlap_param_reads(pair.off.get(), 1), POLYAK_OK);
  pair.finalize();
  pair.set_params(7);
  pair.standin.hold_copies(true);
  ASSERT_EQ(polyak_update(pair.off.get(), 1, nullptr), POLYAK_OK) << polyak_last_error(pair.off.get());
  std::vector<char> zeros(4096);                 // more than any copy-only tensor's bytes
  for (size_t i = 0; i < pair.specs.size(); i++) // the forward's writes
    if (pair.specs[i].copy_only)
      pair.standin.write_device(nullptr, pair.device[i], zeros.data(),
                                pair.specs[i].num_elems * dtype_bytes(pair.specs[i].dtype));
  pair.standin.write_device(nullptr, pair.grad_norm, zeros.data(), sizeof(float)); // the backward's norm
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  pair.standin.hold_copies(false);
  pair.standin.synchronize();
  int64_t count = 0;
  ASSERT_EQ(polyak_nonfinite_count(pair.off.get(), &count), POLYAK_OK);
  for (const std::string &v : pair.standin.take_violations())
    ADD_FAILURE() << "stand-in: " << v;
}

TEST(Offload, TheHandlesOwnWritesComeBeforeItsNextReadsWhateverTheStreams)
{
  Pair pair(config(), odd_specs(), 16 << 10, 4, false, 300);
  pair.train({1});
  void *a = reinterpret_cast<void *>(0xa0), *b = reinterpret_cast<void *>(0xb0); // two of the caller's streams
  const double weights[2] = {0.5, 0.5};
  ASSERT_EQ(polyak_copy_to_params(pair.cpu.get(), 0, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_blend_to_params(pair.cpu.get(), weights, 0, nullptr), POLYAK_OK);
  // the second write is computed in the mirror while the first's copies may still read it
  ASSERT_EQ(polyak_copy_to_params(pair.off.get(), 0, a), POLYAK_OK) << polyak_last_error(pair.off.get());
  ASSERT_EQ(polyak_blend_to_params(pair.off.get(), weights, 0, a), POLYAK_OK) << polyak_last_error(pair.off.get());
  // the next update reads the params on another stream: after those writes
  ASSERT_EQ(polyak_update(pair.cpu.get(), 2, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(pair.off.get(), 2, b), POLYAK_OK) << polyak_last_error(pair.off.get());
  pair.expect_same();
  pair.expect_params_same(a);
}

TEST(Offload, AnErrorOfQueuedWorkIsReportedByTheNextCallAndUpdatesWaitForALoad)
{
  Pair pair(config(), odd_specs());
  pair.train({1, 2});
  const offload_state *s = offload_of(pair.off.get());
  pair.set_params(9);
  pair.standin.synchronize();
  pair.standin.fail_running_copy_at(s->num_copies / 2 + 1);        // a copy in the middle of the groups
  ASSERT_EQ(polyak_update(pair.off.get(), 3, nullptr), POLYAK_OK); // enqueued fine
  ASSERT_EQ(polyak_update(pair.cpu.get(), 3, nullptr), POLYAK_OK);
  int64_t count = 0;
  EXPECT_EQ(polyak_nonfinite_count(pair.off.get(), &count), POLYAK_ERR_CUDA);
  const char *why = polyak_last_error(pair.off.get());
  EXPECT_TRUE(contains(why, "step 3") && contains(why, "after polyak_update returned")) << why;
  EXPECT_EQ(polyak_nonfinite_count(pair.off.get(), &count), POLYAK_OK); // reported once
  pair.set_params(10);
  EXPECT_EQ(polyak_update(pair.off.get(), 4, nullptr), POLYAK_ERR_STATE);
  why = polyak_last_error(pair.off.get());
  EXPECT_TRUE(contains(why, "step 3") && contains(why, "loaded")) << why;
  int64_t step = 0;
  ASSERT_EQ(polyak_get_step(pair.off.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 3);
  // a load replaces the half-updated shadows; updates go on
  std::vector<char> saved = Pair::checkpoint(pair.cpu.get());
  ASSERT_EQ(polyak_load_from_memory(pair.off.get(), saved.data(), saved.size()), POLYAK_OK)
      << polyak_last_error(pair.off.get());
  pair.update(4);
  pair.expect_same();
}

TEST(Offload, TheWaitCallReportsAnErrorOfQueuedWork)
{
  Pair pair(config(), odd_specs());
  ASSERT_EQ(polyak_overlap_param_reads(pair.off.get(), 1), POLYAK_OK);
  pair.finalize();
  pair.set_params(11);
  pair.standin.synchronize();
  pair.standin.fail_running_copy_at(2);
  ASSERT_EQ(polyak_update(pair.off.get(), 1, nullptr), POLYAK_OK);
  polyak_status status = POLYAK_OK;
  for (int tries = 0; tries < 2000 && status == POLYAK_OK; tries++) { // known once the thread met it
    status = polyak_wait_param_reads(pair.off.get(), nullptr);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(status, POLYAK_ERR_CUDA);
  EXPECT_TRUE(contains(polyak_last_error(pair.off.get()), "polyak_wait_param_reads"));
  EXPECT_EQ(polyak_update(pair.off.get(), 2, nullptr), POLYAK_ERR_STATE);
}

TEST(Offload, AnEnqueueFailureChangesNothing)
{
  Pair pair(config(), odd_specs());
  pair.train({1});
  pair.set_params(12);
  pair.standin.synchronize();
  std::vector<char> before = Pair::checkpoint(pair.off.get());
  pair.standin.fail_copy_at(3);
  EXPECT_EQ(polyak_update(pair.off.get(), 2, nullptr), POLYAK_ERR_CUDA);
  EXPECT_TRUE(contains(polyak_last_error(pair.off.get()), "refused")) << polyak_last_error(pair.off.get());
  EXPECT_EQ(Pair::checkpoint(pair.off.get()), before);
  pair.update(2); // not refused: nothing was folded
  pair.expect_same();
}

TEST(Offload, DestroyWithTransfersInFlight)
{
  for (int variant = 0; variant < 3; variant++) {
    Pair pair(config(), odd_specs(), 16 << 10, 13 + (uint64_t)variant, false, 2000);
    pair.finalize();
    pair.set_params(14);
    pair.update(1);
    if (variant == 1) { // and a read-out into device memory still in the ring
      void *dst = pair.standin.device_alloc(65537 * 4);
      ASSERT_EQ(polyak_get_shadow(pair.off.get(), 0, 6, dst, POLYAK_F32, nullptr), POLYAK_OK);
    }
    if (variant == 2) { // and the params being written back
      ASSERT_EQ(polyak_copy_to_params(pair.off.get(), 0, nullptr), POLYAK_OK);
    }
    pair.off.reset(); // waits for its work; the stand-in sees no pinned memory freed under a copy
  }
}

TEST(Offload, RefusesWhatCannotWorkWithShadowsInHostMemory)
{
  Pair pair(config(), odd_specs());
  int64_t shape[1] = {4};
  void *param = pair.standin.device_alloc(16), *shadow = pair.standin.device_alloc(16);
  polyak_config one = config(1);
  Handle lone = make_handle(one);
  ASSERT_EQ(polyak_offload_use(lone.get(), &Standin::ops, &pair.standin), POLYAK_OK);
  EXPECT_EQ(polyak_add_with_shadow(lone.get(), "w", param, POLYAK_F32, 1, shape, shadow, POLYAK_F32, 0),
            POLYAK_ERR_UNSUPPORTED);
  EXPECT_TRUE(contains(polyak_last_error(lone.get()), "POLYAK_SHADOWS_HOST")) << polyak_last_error(lone.get());
  EXPECT_EQ(polyak_wait_param_reads(pair.off.get(), nullptr), POLYAK_ERR_STATE); // before finalize
  EXPECT_EQ(polyak_overlap_param_reads(pair.off.get(), 2), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_set_offload_staging(pair.off.get(), 1000), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_set_offload_staging(pair.cpu.get(), 1 << 20), POLYAK_ERR_STATE); // not offloaded
  pair.finalize();
  EXPECT_EQ(polyak_set_offload_staging(pair.off.get(), 1 << 20), POLYAK_ERR_STATE);
  EXPECT_EQ(polyak_graph_reserve(pair.off.get(), 1, 4, nullptr), POLYAK_ERR_UNSUPPORTED);
  polyak_config lawa = config(1);
  lawa.shadows[0].layerwise_beta0 = 0.9;
  Pair layered(lawa, {{"w", POLYAK_F32, 4}});
  layered.finalize();
  void *grad = layered.standin.device_alloc(16);
  EXPECT_EQ(polyak_set_grads(layered.off.get(), &grad), POLYAK_ERR_UNSUPPORTED);
  EXPECT_TRUE(contains(polyak_last_error(layered.off.get()), "polyak_set_layer_norms"));
  // an update being captured: refused, the step unchanged
  pair.standin.set_capturing(nullptr, true);
  EXPECT_EQ(polyak_update(pair.off.get(), 1, nullptr), POLYAK_ERR_STATE);
  EXPECT_TRUE(contains(polyak_last_error(pair.off.get()), "captured")) << polyak_last_error(pair.off.get());
  pair.standin.set_capturing(nullptr, false);
  int64_t step = -1;
  ASSERT_EQ(polyak_get_step(pair.off.get(), &step), POLYAK_OK);
  EXPECT_EQ(step, 0);
  pair.update(1);
  pair.expect_same();
}

TEST(Offload, TransfersAndWaitsAreRefusedDuringACaptureAndChangeNothing)
{
  Pair pair(config(), odd_specs());
  pair.train({1});
  const int tensor = 1;
  size_t bytes = pair.specs[tensor].num_elems * sizeof(float);
  void *dst = pair.standin.device_alloc(bytes);
  const double weights[2] = {0.5, 0.5};
  void *other = reinterpret_cast<void *>(0xc0); // a capture on another stream is under way too
  for (void *captured : {static_cast<void *>(nullptr), other}) {
    pair.standin.set_capturing(captured, true);
    int64_t before = pair.standin.copies_enqueued();
    polyak_t *off = pair.off.get();
    EXPECT_EQ(polyak_offload_ring_write(off, dst, 16, 4, nullptr, nullptr, nullptr, "w"), POLYAK_ERR_STATE);
    EXPECT_EQ(polyak_offload_ring_read(off, dst, 16, 4, nullptr, nullptr, nullptr, "r"), POLYAK_ERR_STATE);
    EXPECT_EQ(polyak_offload_push(off, offload_of(off), nullptr, "push"), POLYAK_ERR_STATE);
    EXPECT_TRUE(contains(polyak_last_error(off), "captured")) << polyak_last_error(off);
    EXPECT_EQ(polyak_wait_param_reads(off, nullptr), POLYAK_ERR_STATE);
    EXPECT_EQ(polyak_get_shadow(off, 0, tensor, dst, POLYAK_F32, nullptr), POLYAK_ERR_STATE);
    EXPECT_EQ(polyak_copy_to_params(off, 0, nullptr), POLYAK_ERR_STATE);
    EXPECT_EQ(polyak_blend_to_params(off, weights, 0, nullptr), POLYAK_ERR_STATE);
    EXPECT_EQ(pair.standin.copies_enqueued(), before); // nothing enqueued
    pair.standin.set_capturing(captured, false);
  }
  pair.set_params(2);
  pair.update(2);
  pair.expect_same();
}

TEST(Offload, AnUpdateBeingCapturedIsRefusedBeforeTheHostWaitsForTheOneInFlight)
{
  Pair pair(config(), odd_specs());
  pair.finalize();
  pair.set_params(5);
  pair.standin.hold_copies(true);
  pair.update(1);
  pair.standin.set_capturing(nullptr, true);
  std::atomic<bool> returned{false};
  polyak_status second = POLYAK_OK;
  std::thread trainer([&] {
    second = polyak_update(pair.off.get(), 2, nullptr);
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_TRUE(returned.load()); // refused at once, no host wait
  pair.standin.hold_copies(false);
  trainer.join();
  EXPECT_EQ(second, POLYAK_ERR_STATE);
  pair.standin.set_capturing(nullptr, false);
  pair.expect_same();
}

TEST(Offload, TheFoldThreadAsksTheDeviceSideToRelaxItsCaptureModeFirst)
{
  // CUDA: its cudaEventSynchronize would invalidate a global-mode capture
  // begun on another thread (tests/test_cuda_offload.cu)
  Pair pair(config(), odd_specs());
  EXPECT_TRUE(pair.standin.thread_starts().empty());
  pair.train({1, 2});
  std::vector<std::thread::id> starts = pair.standin.thread_starts();
  ASSERT_EQ(starts.size(), 1u);
  EXPECT_NE(starts[0], std::this_thread::get_id());
  pair.expect_same();
}

TEST(Offload, ParamsInHostMemoryAreRefusedAtFinalize)
{
  Standin standin;
  polyak_config cfg = config(1);
  Handle p = make_handle(cfg);
  ASSERT_EQ(polyak_offload_use(p.get(), &Standin::ops, &standin), POLYAK_OK);
  std::vector<float> host(8, 1.0f);
  int64_t shape[1] = {8};
  ASSERT_EQ(polyak_add(p.get(), "w", host.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  EXPECT_EQ(polyak_finalize(p.get(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_TRUE(contains(polyak_last_error(p.get()), "host memory")) << polyak_last_error(p.get());
  EXPECT_EQ(polyak_update(p.get(), 1, nullptr), POLYAK_ERR_STATE);
}

TEST(Offload, TheCpuBackendTakesShadowsInHostMemoryAsItsOwn)
{
  polyak_config cfg = config(1);
  cfg.shadow_location = POLYAK_SHADOWS_HOST;
  char why[256];
  EXPECT_EQ(polyak_check_config(&cfg, why, sizeof why), POLYAK_OK) << why;
  Handle p = make_handle(cfg);
  std::vector<float> w(5, 2.0f);
  int64_t shape[1] = {5};
  ASSERT_EQ(polyak_add(p.get(), "w", w.data(), POLYAK_F32, 1, shape), POLYAK_OK);
  ASSERT_EQ(polyak_finalize(p.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_set_offload_staging(p.get(), 0), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_wait_param_reads(p.get(), nullptr), POLYAK_OK); // nothing in flight on the CPU
}

TEST(Offload, TheHostSideRunsTheCpuBackendsKernelTable)
{
  Pair pair(config(), odd_specs());
  const char *isa = nullptr, *cpu_isa = nullptr;
  EXPECT_EQ(polyak_cpu_isa(pair.off.get(), &isa), POLYAK_ERR_STATE); // before finalize
  pair.finalize();
  ASSERT_EQ(polyak_cpu_isa(pair.cpu.get(), &cpu_isa), POLYAK_OK);
  ASSERT_EQ(polyak_cpu_isa(pair.off.get(), &isa), POLYAK_OK);
  EXPECT_STREQ(isa, cpu_isa);
}
