// test_launch_counter.cpp: the last-block counter of graph replays and
// LAWA's betas (kernels/launch_counter.h), run by host threads standing in
// for the blocks of launches, overlapping ones included.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "launch_counter.h"

namespace {

// One launch's blocks arriving one after another: only the last is told
// so, and the counter is back at 0 for the next launch.
TEST(LaunchCounter, TheLastBlockOfALaunchAloneIsLastAndTheCounterWraps)
{
  uint32_t counter = 0;
  const uint32_t blocks = 5;
  for (int launch = 0; launch < 3; launch++) {
    for (uint32_t b = 0; b + 1 < blocks; b++)
      EXPECT_FALSE(polyak_block_is_last(&counter, blocks)) << "launch " << launch << " block " << b;
    EXPECT_TRUE(polyak_block_is_last(&counter, blocks)) << "launch " << launch;
    EXPECT_EQ(counter, 0u);
  }
}

TEST(LaunchCounter, AOneBlockLaunchIsAlwaysLast)
{
  uint32_t counter = 0;
  for (int launch = 0; launch < 4; launch++)
    EXPECT_TRUE(polyak_block_is_last(&counter, 1));
  EXPECT_EQ(counter, 0u);
}

// Launch B's blocks arrive while launch A's last block is still running:
// every num_blocks arrivals make one last block, whoever's they are, and
// the counts add up to the launches.
TEST(LaunchCounter, InterleavedLaunchesEachCountOnce)
{
  const uint32_t blocks = 4;
  uint32_t counter = 0;
  int64_t consumed = 0, dropped = 0;
  // A0 A1 A2 B0 B1 B2 B3 A3 (A applies a step, B finds none left)
  const char order[] = "AAABBBBA";
  for (char launch : std::string(order))
    if (polyak_block_is_last(&counter, blocks))
      polyak_count_launch(launch == 'A' ? &consumed : &dropped);
  EXPECT_EQ(consumed + dropped, 2);
  EXPECT_EQ(counter, 0u);
}

// Threads standing in for the blocks of many launches of one handle, two
// or more in flight at once: one last block per launch, the counter at 0
// when all are done, consumed + dropped == launches.
TEST(LaunchCounter, OverlappingLaunchesOnThreadsCountEveryLaunch)
{
  const uint32_t blocks = 7;
  const int launches = 600, threads = 6;
  uint32_t counter = 0;
  int64_t consumed = 0, dropped = 0;
  std::atomic<int> next_arrival{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < threads; w++)
    workers.emplace_back([&] {
      // arrival n is block n % blocks of launch n / blocks, so up to
      // `threads` arrivals of neighbouring launches race
      for (int n; (n = next_arrival.fetch_add(1)) < launches * (int)blocks;)
        if (polyak_block_is_last(&counter, blocks))
          polyak_count_launch((n / blocks) % 3 == 0 ? &dropped : &consumed);
    });
  for (auto &w : workers)
    w.join();
  EXPECT_EQ(consumed + dropped, launches);
  EXPECT_EQ(counter, 0u);
}

} // namespace
