/* cuda_span.h: whether a span of bytes lies in device memory that is there
 * to read: the pointer checks' arithmetic, apart from the driver so that
 * the CPU tests run it over made-up address maps. No CUDA header. */
#ifndef POLYAK_CUDA_SPAN_H
#define POLYAK_CUDA_SPAN_H

#include <stdint.h>

/* The mapped piece holding address `addr`: *base and *num_bytes, returning
 * 0; nonzero where nothing is mapped there (cuMemGetAddressRange). */
typedef int (*polyak_piece_lookup)(void *context, uint64_t addr, uint64_t *base, uint64_t *num_bytes);

typedef enum {
  POLYAK_SPAN_INSIDE,  /* every byte is mapped, within the allocation */
  POLYAK_SPAN_OUTSIDE, /* it runs past the allocation or into unmapped addresses */
  POLYAK_SPAN_UNKNOWN  /* the lookup knows nothing of the first byte */
} polyak_span_verdict;

/* [start, start + num_bytes) against the allocation holding `start`,
 * [alloc_base, alloc_base + alloc_num_bytes) (CU_POINTER_ATTRIBUTE_RANGE_*:
 * a cudaMalloc's block, or for memory mapped piece by piece with the VMM
 * API, as PyTorch's expandable segments and stream-ordered pools are, the
 * whole reservation, parts of which may be unmapped). The span must lie in
 * it and be mapped throughout: walked piece by piece, each lookup from the
 * end of the last, since for VMM memory a lookup reports one mapped piece,
 * not the run of pieces a tensor may span. *usable_num_bytes gets how many
 * bytes from start are good (for messages). */
static inline polyak_span_verdict polyak_span_check(uint64_t start, uint64_t num_bytes, uint64_t alloc_base,
                                                    uint64_t alloc_num_bytes, polyak_piece_lookup lookup, void *context,
                                                    uint64_t *usable_num_bytes)
{
  uint64_t alloc_end = alloc_num_bytes > UINT64_MAX - alloc_base ? UINT64_MAX : alloc_base + alloc_num_bytes;
  uint64_t end = num_bytes > UINT64_MAX - start ? UINT64_MAX : start + num_bytes;
  uint64_t addr = start;
  *usable_num_bytes = 0;
  if (start < alloc_base || start >= alloc_end)
    return POLYAK_SPAN_UNKNOWN;
  while (addr < end) {
    uint64_t base = 0, size = 0;
    if (lookup(context, addr, &base, &size) != 0 || base > addr || size <= addr - base) {
      if (addr == start)
        return POLYAK_SPAN_UNKNOWN;
      break; /* unmapped from addr on */
    }
    addr = size > UINT64_MAX - base ? UINT64_MAX : base + size;
    if (addr > alloc_end)
      addr = alloc_end; /* a piece beyond the allocation is another's */
    *usable_num_bytes = addr - start;
    if (addr >= alloc_end)
      break;
  }
  if (addr >= end) {
    *usable_num_bytes = num_bytes;
    return POLYAK_SPAN_INSIDE;
  }
  return POLYAK_SPAN_OUTSIDE;
}

#endif /* POLYAK_CUDA_SPAN_H */
