// test_cuda_span.cpp: the CUDA backend's pointer-range arithmetic
// (src/cuda/cuda_span.h) over made-up address maps: a span must lie in the
// allocation of its first byte and be mapped throughout, piece by piece
// where memory is mapped so (the VMM API: PyTorch's expandable segments).
#include <gtest/gtest.h>

#include <vector>

#include "cuda/cuda_span.h"

namespace {

struct Piece {
  uint64_t base, num_bytes;
};

// The lookup over a list of mapped pieces, counting its calls.
struct Map {
  std::vector<Piece> pieces;
  int lookups = 0;
  static int lookup(void *context, uint64_t addr, uint64_t *base, uint64_t *num_bytes)
  {
    Map *map = static_cast<Map *>(context);
    map->lookups++;
    for (const Piece &piece : map->pieces)
      if (addr >= piece.base && addr - piece.base < piece.num_bytes) {
        *base = piece.base;
        *num_bytes = piece.num_bytes;
        return 0;
      }
    return 1;
  }
  polyak_span_verdict check(uint64_t start, uint64_t num_bytes, uint64_t alloc_base, uint64_t alloc_num_bytes,
                            uint64_t *usable)
  {
    return polyak_span_check(start, num_bytes, alloc_base, alloc_num_bytes, lookup, this, usable);
  }
};

// A cudaMalloc'ed block: its allocation is its one mapped piece.
TEST(CudaSpan, ASpanInsideOneAllocationPassesAndOneByteMoreDoesNot)
{
  Map map{{{0x10000, 0x1000}}};
  uint64_t usable = 0;
  EXPECT_EQ(map.check(0x10000, 0x1000, 0x10000, 0x1000, &usable), POLYAK_SPAN_INSIDE);
  EXPECT_EQ(map.check(0x10800, 0x800, 0x10000, 0x1000, &usable), POLYAK_SPAN_INSIDE);
  EXPECT_EQ(map.check(0x10800, 0x801, 0x10000, 0x1000, &usable), POLYAK_SPAN_OUTSIDE);
  EXPECT_EQ(usable, 0x800u) << "the bytes up to the allocation's end";
}

// Two cudaMalloc blocks side by side: the neighbour is mapped, but it is
// another allocation.
TEST(CudaSpan, ASpanRunningIntoTheNextAllocationIsOutside)
{
  Map map{{{0x10000, 0x1000}, {0x11000, 0x1000}}};
  uint64_t usable = 0;
  EXPECT_EQ(map.check(0x10f00, 0x200, 0x10000, 0x1000, &usable), POLYAK_SPAN_OUTSIDE);
  EXPECT_EQ(usable, 0x100u);
}

// A VMM reservation with two pieces mapped one after the other and the
// rest unmapped: a tensor may span the two pieces, not run past them.
TEST(CudaSpan, MappedPiecesOfOneReservationJoinAndTheUnmappedRestDoesNot)
{
  const uint64_t reserved = 0x100000, reserved_bytes = 0x100000;
  Map map{{{0x100000, 0x20000}, {0x120000, 0x20000}}};
  uint64_t usable = 0;
  EXPECT_EQ(map.check(0x110000, 0x20000, reserved, reserved_bytes, &usable), POLYAK_SPAN_INSIDE);
  EXPECT_EQ(map.lookups, 2) << "one lookup per piece";
  EXPECT_EQ(map.check(0x130000, 0x10001, reserved, reserved_bytes, &usable), POLYAK_SPAN_OUTSIDE);
  EXPECT_EQ(usable, 0x10000u) << "mapped up to 0x140000";
}

TEST(CudaSpan, AnEmptySpanIsInsideAndAnOverflowingOneOutside)
{
  Map map{{{0x10000, 0x1000}}};
  uint64_t usable = 1;
  EXPECT_EQ(map.check(0x10000, 0, 0x10000, 0x1000, &usable), POLYAK_SPAN_INSIDE);
  EXPECT_EQ(map.check(0x10000, UINT64_MAX, 0x10000, 0x1000, &usable), POLYAK_SPAN_OUTSIDE);
}

// Where the driver knows nothing of the first byte the check cannot say
// (the caller then keeps to what the runtime's attributes said).
TEST(CudaSpan, AFirstByteTheLookupDoesNotKnowIsUnknown)
{
  Map map{{}};
  uint64_t usable = 0;
  EXPECT_EQ(map.check(0x10000, 16, 0x10000, 0x1000, &usable), POLYAK_SPAN_UNKNOWN);
  Map elsewhere{{{0x10000, 0x1000}}};
  EXPECT_EQ(elsewhere.check(0x20000, 16, 0x10000, 0x1000, &usable), POLYAK_SPAN_UNKNOWN)
      << "a start outside the allocation reported for it";
}

} // namespace
