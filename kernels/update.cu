/* update.cu: the fused multi-tensor update (the kernel lands with the CUDA
 * backend; this translation unit checks that the shared headers compile
 * for the device). */
#include "polyak_math.h"
#include "polyak_plan.h"

__global__ void polyak_update_kernel_placeholder(float *shadow, float param, float weight)
{
  *shadow = polyak_lerp(*shadow, param, weight);
}
