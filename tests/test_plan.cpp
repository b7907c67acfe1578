// test_plan.cpp: the chunk table that every update walks, on both backends.
#include "test_util.h"

#include "polyak_internal.h"
#include "polyak_plan.h"

using namespace polyak_test;

namespace {

const int64_t kSizes[] = {0, 1, 3, 4, 5, 65535, 65536, 65537, 130001, 0, 200000, 7};

Handle finalized_handle(std::vector<Tensor> &tensors, polyak_dtype shadow_dtype)
{
  polyak_config cfg = cpu_config(2);
  cfg.shadow_dtype = shadow_dtype;
  Handle h = make_handle(cfg);
  std::mt19937_64 rng(3);
  for (auto &t : tensors)
    t.randomize(rng);
  add_all(h.get(), tensors);
  EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK) << polyak_last_error(h.get());
  return h;
}

std::vector<Tensor> odd_sized_tensors()
{
  std::vector<Tensor> tensors;
  const polyak_dtype dtypes[] = {POLYAK_F32, POLYAK_BF16, POLYAK_F16};
  int i = 0;
  for (int64_t size : kSizes) {
    tensors.emplace_back("t" + std::to_string(i), dtypes[i % 3], size);
    i++;
  }
  return tensors;
}

TEST(Plan, ChunksCoverEveryElementOnceInRegistrationOrder)
{
  auto tensors = odd_sized_tensors();
  Handle h = finalized_handle(tensors, POLYAK_F32);
  const polyak_t *p = h.get();
  std::vector<int64_t> covered(tensors.size(), 0);
  int last_tensor = -1;
  int64_t expected_chunks = 0;
  for (auto &t : tensors)
    expected_chunks += (t.num_elems + POLYAK_CHUNK_ELEMS - 1) / POLYAK_CHUNK_ELEMS;
  ASSERT_EQ(p->num_chunks, expected_chunks);
  for (int64_t c = 0; c < p->num_chunks; c++) {
    const polyak_chunk &chunk = p->chunks[c];
    ASSERT_GE(chunk.tensor, last_tensor);
    ASSERT_GT(chunk.num_elems, 0);
    ASSERT_LE(chunk.num_elems, POLYAK_CHUNK_ELEMS);
    ASSERT_EQ(chunk.first_elem, covered[chunk.tensor]) << "chunk " << c; // contiguous
    covered[chunk.tensor] += chunk.num_elems;
    last_tensor = chunk.tensor;
  }
  for (size_t i = 0; i < tensors.size(); i++)
    EXPECT_EQ(covered[i], tensors[i].num_elems) << tensors[i].name;
}

TEST(Plan, ZeroSizeTensorsHaveNoChunk)
{
  std::vector<Tensor> tensors;
  tensors.emplace_back("empty0", POLYAK_F32, 0);
  tensors.emplace_back("one", POLYAK_F32, 1);
  tensors.emplace_back("empty2", POLYAK_BF16, 0);
  Handle h = finalized_handle(tensors, POLYAK_F32);
  ASSERT_EQ(h->num_chunks, 1);
  EXPECT_EQ(h->chunks[0].tensor, 1);
}

TEST(Plan, ShadowSlicesAre16ByteAlignedAndDisjoint)
{
  for (polyak_dtype shadow_dtype : {POLYAK_F32, POLYAK_BF16}) {
    auto tensors = odd_sized_tensors();
    Handle h = finalized_handle(tensors, shadow_dtype);
    const polyak_t *p = h.get();
    int64_t bytes = (int64_t)dtype_bytes(shadow_dtype), global = 0;
    for (int i = 0; i < p->num_tensors; i++) {
      const polyak_tensor_desc &d = p->descs[i];
      EXPECT_EQ(d.shadow_offset_elems * bytes % 16, 0) << i;
      int64_t end = d.shadow_offset_elems + d.num_elems;
      int64_t next = i + 1 < p->num_tensors ? p->descs[i + 1].shadow_offset_elems : p->arena_elems;
      EXPECT_LE(end, next) << i;
      EXPECT_LT(next - end, 16 / bytes) << "no more padding than alignment needs";
      EXPECT_EQ(d.global_offset_elems, global) << "flattened registration order";
      global += d.num_elems;
    }
  }
}

TEST(Plan, TensorsBeyond2To31ElementsIndexWithInt64)
{
  // plan building never touches param memory: a fake address stands in
  // for 3 * 2^30 bf16 elements (6 GiB)
  Handle h = make_handle(cpu_config());
  int64_t huge[2] = {3, int64_t(1) << 30};
  int64_t small[1] = {10};
  ASSERT_EQ(polyak_add(h.get(), "huge", reinterpret_cast<void *>(uintptr_t(1) << 40), POLYAK_BF16, 2, huge), POLYAK_OK);
  ASSERT_EQ(polyak_add(h.get(), "after", reinterpret_cast<void *>(uintptr_t(1) << 44), POLYAK_F32, 1, small),
            POLYAK_OK);
  ASSERT_EQ(polyak_plan_build(h.get()), POLYAK_OK);
  const polyak_t *p = h.get();
  int64_t huge_elems = huge[0] * huge[1];
  ASSERT_EQ(p->num_chunks, huge_elems / POLYAK_CHUNK_ELEMS + 1);
  const polyak_chunk &last_huge = p->chunks[p->num_chunks - 2];
  EXPECT_EQ(last_huge.first_elem, huge_elems - POLYAK_CHUNK_ELEMS);
  EXPECT_GT(last_huge.first_elem, INT32_MAX);
  EXPECT_EQ(p->descs[1].global_offset_elems, huge_elems);
  EXPECT_EQ(p->descs[1].shadow_offset_elems, huge_elems);
  EXPECT_EQ(p->arena_elems, huge_elems + 12); // 10 rounded up to 16 bytes of f32
  polyak_plan_free(h.get());
}

} // namespace
