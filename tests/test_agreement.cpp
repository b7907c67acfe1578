// test_agreement.cpp: the ranks' agreements of sharded handles
// (src/agreement.h) with stand-ins for NCCL and the device copies: threads
// play the ranks, a rendezvous plays the collectives (a rank that skipped
// one would leave the others waiting: the rendezvous gives up after a few
// seconds and says so), and a rank's copies fail on demand.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "agreement.h"

namespace {

// The collectives of `ranks` threads: each call waits until every rank
// made it, or gives up (a rank skipped it: the hang this guards against).
struct Rendezvous {
  int ranks;
  std::mutex mutex;
  std::condition_variable all_here;
  int arrived = 0;
  uint64_t round = 0;
  std::vector<std::vector<uint64_t>> sent;
  std::vector<uint64_t> gathered;
  int collectives = 0, timeouts = 0;
  explicit Rendezvous(int n) : ranks(n), sent(n)
  {
  }

  // Every rank's `count` values, in rank order; false on a timeout.
  bool gather(int rank, const uint64_t *send, size_t count, std::vector<uint64_t> *out)
  {
    std::unique_lock<std::mutex> lock(mutex);
    sent[rank].assign(send, send + count);
    uint64_t mine = round;
    if (++arrived == ranks) {
      gathered.clear();
      for (auto &values : sent)
        gathered.insert(gathered.end(), values.begin(), values.end());
      arrived = 0;
      round++;
      collectives++;
      all_here.notify_all();
    } else if (!all_here.wait_for(lock, std::chrono::seconds(3), [&] { return round != mine; })) {
      timeouts++;
      return false;
    }
    *out = gathered;
    return true;
  }
};

// One rank: its "device" slots (host memory here) and which copies fail.
struct Rank {
  Rendezvous *all;
  int rank;
  std::vector<uint64_t> slots;
  bool write_fails = false, read_fails = false;
  char msg[256] = "";
  Rank(Rendezvous *r, int i, int world_size) : all(r), rank(i), slots(POLYAK_AGREEMENT_SLOTS(world_size), 0)
  {
  }

  static polyak_status write(void *context, uint64_t *device, const uint64_t *host, size_t count, char *, size_t)
  {
    Rank *self = static_cast<Rank *>(context);
    if (self->write_fails)
      return POLYAK_ERR_CUDA;
    std::memcpy(device, host, count * sizeof *host);
    return POLYAK_OK;
  }
  static polyak_status read(void *context, uint64_t *host, const uint64_t *device, size_t count, char *, size_t)
  {
    Rank *self = static_cast<Rank *>(context);
    if (self->read_fails)
      return POLYAK_ERR_CUDA;
    std::memcpy(host, device, count * sizeof *host);
    return POLYAK_OK;
  }
  static polyak_status all_reduce_min(void *context, const uint64_t *send, uint64_t *recv, size_t count, char *, size_t)
  {
    Rank *self = static_cast<Rank *>(context);
    std::vector<uint64_t> values;
    if (!self->all->gather(self->rank, send, count, &values))
      return POLYAK_ERR_NCCL;
    for (size_t j = 0; j < count; j++) {
      recv[j] = UINT64_MAX;
      for (int r = 0; r < self->all->ranks; r++)
        recv[j] = std::min(recv[j], values[r * count + j]);
    }
    return POLYAK_OK;
  }
  static polyak_status all_gather(void *context, const uint64_t *send, uint64_t *recv, size_t count, char *, size_t)
  {
    Rank *self = static_cast<Rank *>(context);
    std::vector<uint64_t> values;
    if (!self->all->gather(self->rank, send, count, &values))
      return POLYAK_ERR_NCCL;
    std::memcpy(recv, values.data(), values.size() * sizeof values[0]);
    return POLYAK_OK;
  }
  polyak_agreement_io io()
  {
    return {this, msg, sizeof msg, write, read, all_reduce_min, all_gather};
  }
};

struct Outcome {
  polyak_status status = POLYAK_ERR_STATE;
  int all_ok = -1, same = -1, other = -2;
};

// Runs `step` on every rank at once.
template <typename Step> std::vector<Outcome> on_every_rank(std::vector<Rank> &ranks, Step step)
{
  std::vector<Outcome> out(ranks.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < ranks.size(); r++)
    threads.emplace_back([&, r] { out[r] = step(ranks[r], (int)r); });
  for (auto &t : threads)
    t.join();
  return out;
}

std::vector<Rank> make_ranks(Rendezvous &all, int world_size)
{
  std::vector<Rank> ranks;
  for (int r = 0; r < world_size; r++)
    ranks.emplace_back(&all, r, world_size);
  return ranks;
}

Outcome agree(Rank &rank, uint64_t sequence, int local_ok, int can_copy = 1)
{
  polyak_agreement_io io = rank.io();
  Outcome o;
  o.status = polyak_agreement_run(&io, rank.slots.data(), sequence, local_ok, can_copy, &o.all_ok);
  return o;
}

TEST(Agreement, EveryRankReadyAgreesSo)
{
  Rendezvous all(3);
  std::vector<Rank> ranks = make_ranks(all, 3);
  for (uint64_t sequence = 1; sequence <= 3; sequence++)
    for (const Outcome &o : on_every_rank(ranks, [&](Rank &r, int) { return agree(r, sequence, 1); })) {
      EXPECT_EQ(o.status, POLYAK_OK);
      EXPECT_EQ(o.all_ok, 1);
    }
  EXPECT_EQ(all.timeouts, 0);
}

TEST(Agreement, ARankNotReadyMakesEveryRankFail)
{
  Rendezvous all(3);
  std::vector<Rank> ranks = make_ranks(all, 3);
  auto out = on_every_rank(ranks, [&](Rank &r, int i) { return agree(r, 1, i != 1); });
  for (const Outcome &o : out) {
    EXPECT_EQ(o.status, POLYAK_OK);
    EXPECT_EQ(o.all_ok, 0);
  }
}

// The copy of a rank's answer to its device fails: it still takes part in
// the collective (nobody waits), and what its slot held before, a past
// agreement's "yes", does not count as one now.
TEST(Agreement, ARankWhoseWriteFailsStillTakesPartAndSaysNo)
{
  Rendezvous all(3);
  std::vector<Rank> ranks = make_ranks(all, 3);
  on_every_rank(ranks, [&](Rank &r, int) { return agree(r, 1, 1); });
  ranks[2].write_fails = true;
  auto out = on_every_rank(ranks, [&](Rank &r, int) { return agree(r, 2, 1); });
  EXPECT_EQ(all.timeouts, 0) << "every rank reached the collective";
  EXPECT_EQ(all.collectives, 2);
  EXPECT_EQ(out[2].status, POLYAK_ERR_CUDA);
  for (const Outcome &o : out)
    EXPECT_EQ(o.all_ok, 0);
}

// A rank that could not enter its device copies nothing but still issues
// the collective. A rank whose read of the answer fails reports its
// failure, while the others, having seen every rank say yes, go on: the
// one failure an agreement cannot carry (a device that fails that copy
// fails the collective that follows too).
TEST(Agreement, ARankThatCannotCopyStillIssuesTheCollective)
{
  Rendezvous all(2);
  std::vector<Rank> ranks = make_ranks(all, 2);
  auto out = on_every_rank(ranks, [&](Rank &r, int i) { return agree(r, 1, 1, i == 0); });
  EXPECT_EQ(all.timeouts, 0);
  EXPECT_EQ(out[0].all_ok, 0);
  EXPECT_EQ(out[1].all_ok, 0);
  ranks[0].read_fails = true;
  out = on_every_rank(ranks, [&](Rank &r, int) { return agree(r, 2, 1); });
  EXPECT_EQ(all.timeouts, 0);
  EXPECT_EQ(out[0].status, POLYAK_ERR_CUDA);
  EXPECT_EQ(out[0].all_ok, 0);
  EXPECT_EQ(out[1].all_ok, 1) << "every rank sent its yes; only rank 0 failed to read the answer";
}

Outcome handshake(Rank &rank, int world_size, uint64_t hash, int local_ok)
{
  polyak_agreement_io io = rank.io();
  Outcome o;
  o.status = polyak_handshake_run(&io, rank.slots.data(), world_size, hash, local_ok, &o.all_ok, &o.same, &o.other);
  return o;
}

TEST(Handshake, SameHashesAllOkAgree)
{
  Rendezvous all(3);
  std::vector<Rank> ranks = make_ranks(all, 3);
  for (const Outcome &o : on_every_rank(ranks, [&](Rank &r, int) { return handshake(r, 3, 77, 1); })) {
    EXPECT_EQ(o.status, POLYAK_OK);
    EXPECT_EQ(o.all_ok, 1);
    EXPECT_EQ(o.same, 1);
  }
}

TEST(Handshake, ARankRegisteredOtherwiseIsNamed)
{
  Rendezvous all(3);
  std::vector<Rank> ranks = make_ranks(all, 3);
  auto out = on_every_rank(ranks, [&](Rank &r, int i) { return handshake(r, 3, i == 2 ? 78 : 77, 1); });
  EXPECT_EQ(out[0].same, 0);
  EXPECT_EQ(out[0].other, 2);
  EXPECT_EQ(out[2].same, 0);
  EXPECT_EQ(out[2].other, 0);
}

// A rank whose finalize failed, and one whose copy of its answer failed
// (its slot zeroed at allocation): both still gather, and every rank
// learns that not all are ok.
TEST(Handshake, ARankThatFailedOrCannotWriteStillGathersAndEveryRankFails)
{
  Rendezvous all(3);
  std::vector<Rank> ranks = make_ranks(all, 3);
  ranks[1].write_fails = true;
  auto out = on_every_rank(ranks, [&](Rank &r, int i) { return handshake(r, 3, 77, i != 2); });
  EXPECT_EQ(all.timeouts, 0) << "every rank reached the gather";
  EXPECT_EQ(out[1].status, POLYAK_ERR_CUDA);
  for (const Outcome &o : out)
    EXPECT_NE(o.all_ok, 1);
  EXPECT_EQ(out[0].all_ok, 0);
}

} // namespace
