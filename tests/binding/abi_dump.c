/* abi_dump: the layout of include/polyak.h as this compiler sees it, as JSON
 * on stdout: every public struct's size, alignment and fields (offset and
 * size, in declaration order), the size of each enum type, every enum value
 * and object-like #define, and the version macros. python/tests/test_binding.py
 * compares it with the ctypes mirror (python/polyak/_lib.py), and checks that
 * these lists name every struct field, enum value and #define the header
 * declares: one added to the header but not here fails that test too. */
#include <stdio.h>

#include "polyak.h"

static const char *separator = ""; /* "" before the first item of an object or array */

static void open_item(const char *key, const char *open)
{
  printf("%s\"%s\": %s", separator, key, open);
  separator = "";
}

static void close_item(const char *close)
{
  printf("%s", close);
  separator = ", ";
}

static void field(const char *name, size_t offset, size_t size)
{
  printf("%s{\"name\": \"%s\", \"offset\": %zu, \"size\": %zu}", separator, name, offset, size);
  separator = ", ";
}

static void number(const char *name, long long value)
{
  printf("%s\"%s\": %lld", separator, name, value);
  separator = ", ";
}

static void struct_begin(const char *name, size_t size, size_t align)
{
  open_item(name, "{");
  printf("\"size\": %zu, \"align\": %zu, \"fields\": [", size, align);
}

#define STRUCT(type)    struct_begin(#type, sizeof(type), _Alignof(type))
#define FIELD(type, f)  field(#f, offsetof(type, f), sizeof(((type *)0)->f))
#define CONSTANT(name)  number(#name, (long long)(name))
#define ENUM_SIZE(type) number(#type, (long long)sizeof(type))

int main(void)
{
  printf("{");
  open_item("structs", "{");
  STRUCT(polyak_schedule);
  FIELD(polyak_schedule, kind);
  FIELD(polyak_schedule, beta);
  FIELD(polyak_schedule, beta_min);
  FIELD(polyak_schedule, inv_gamma);
  FIELD(polyak_schedule, power);
  FIELD(polyak_schedule, gamma);
  FIELD(polyak_schedule, ramp_steps);
  FIELD(polyak_schedule, start_step);
  close_item("]}");
  STRUCT(polyak_shadow_config);
  FIELD(polyak_shadow_config, schedule);
  FIELD(polyak_shadow_config, rounding);
  FIELD(polyak_shadow_config, count_updates);
  FIELD(polyak_shadow_config, grad_norm_c);
  FIELD(polyak_shadow_config, layerwise_beta0);
  close_item("]}");
  STRUCT(polyak_config);
  FIELD(polyak_config, struct_size);
  FIELD(polyak_config, magic);
  FIELD(polyak_config, backend);
  FIELD(polyak_config, device);
  FIELD(polyak_config, num_shadows);
  FIELD(polyak_config, shadows);
  FIELD(polyak_config, shadow_dtype);
  FIELD(polyak_config, zero_init);
  FIELD(polyak_config, skip_nonfinite);
  FIELD(polyak_config, seed);
  FIELD(polyak_config, lookahead_every);
  FIELD(polyak_config, world_size);
  FIELD(polyak_config, rank);
  FIELD(polyak_config, nccl_comm);
  FIELD(polyak_config, cpu_threads);
  FIELD(polyak_config, shadow_location);
  close_item("]}");
  STRUCT(polyak_view);
  FIELD(polyak_view, name);
  FIELD(polyak_view, ndim);
  FIELD(polyak_view, shape);
  close_item("]}");
  STRUCT(polyak_tensor_info_t);
  FIELD(polyak_tensor_info_t, name);
  FIELD(polyak_tensor_info_t, dtype);
  FIELD(polyak_tensor_info_t, ndim);
  FIELD(polyak_tensor_info_t, shape);
  FIELD(polyak_tensor_info_t, num_elems);
  FIELD(polyak_tensor_info_t, shadow_dtype);
  FIELD(polyak_tensor_info_t, flags);
  FIELD(polyak_tensor_info_t, local_first_elem);
  FIELD(polyak_tensor_info_t, local_num_elems);
  FIELD(polyak_tensor_info_t, reserved_);
  close_item("]}");
  STRUCT(polyak_step_state);
  FIELD(polyak_step_state, struct_size);
  FIELD(polyak_step_state, num_shadows);
  FIELD(polyak_step_state, shadows_open);
  FIELD(polyak_step_state, step);
  FIELD(polyak_step_state, nonfinite_count);
  FIELD(polyak_step_state, beta_products);
  FIELD(polyak_step_state, update_counts);
  close_item("]}");
  close_item("}");
  open_item("enum_sizes", "{");
  ENUM_SIZE(polyak_status);
  ENUM_SIZE(polyak_dtype);
  ENUM_SIZE(polyak_backend);
  ENUM_SIZE(polyak_schedule_kind);
  close_item("}");
  open_item("constants", "{");
  CONSTANT(POLYAK_MAX_SHADOWS);
  CONSTANT(POLYAK_MAX_NDIM);
  CONSTANT(POLYAK_MAX_CPU_THREADS);
  CONSTANT(POLYAK_OK);
  CONSTANT(POLYAK_ERR_INVALID_ARG);
  CONSTANT(POLYAK_ERR_STATE);
  CONSTANT(POLYAK_ERR_NO_MEMORY);
  CONSTANT(POLYAK_ERR_UNSUPPORTED);
  CONSTANT(POLYAK_ERR_CUDA);
  CONSTANT(POLYAK_ERR_NCCL);
  CONSTANT(POLYAK_ERR_IO);
  CONSTANT(POLYAK_ERR_FORMAT);
  CONSTANT(POLYAK_ERR_MISMATCH);
  CONSTANT(POLYAK_F32);
  CONSTANT(POLYAK_BF16);
  CONSTANT(POLYAK_F16);
  CONSTANT(POLYAK_F64);
  CONSTANT(POLYAK_I64);
  CONSTANT(POLYAK_I32);
  CONSTANT(POLYAK_I16);
  CONSTANT(POLYAK_I8);
  CONSTANT(POLYAK_U8);
  CONSTANT(POLYAK_BOOL);
  CONSTANT(POLYAK_BACKEND_CPU);
  CONSTANT(POLYAK_BACKEND_CUDA);
  CONSTANT(POLYAK_SCHEDULE_CONSTANT);
  CONSTANT(POLYAK_SCHEDULE_TF);
  CONSTANT(POLYAK_SCHEDULE_WARMUP);
  CONSTANT(POLYAK_SCHEDULE_LINEAR);
  CONSTANT(POLYAK_SCHEDULE_COSINE);
  CONSTANT(POLYAK_SCHEDULE_EQUAL);
  CONSTANT(POLYAK_SCHEDULE_POWER);
  CONSTANT(POLYAK_ROUND_NEAREST);
  CONSTANT(POLYAK_ROUND_STOCHASTIC);
  CONSTANT(POLYAK_SHADOWS_DEVICE);
  CONSTANT(POLYAK_SHADOWS_HOST);
  CONSTANT(POLYAK_CONFIG_MAGIC);
  CONSTANT(POLYAK_CONFIG_SIZE_1_0);
  CONSTANT(POLYAK_SHADOW_ROUND_NEAREST);
  CONSTANT(POLYAK_TENSOR_CALLERS_SHADOW);
  CONSTANT(POLYAK_TENSOR_COPY);
  CONSTANT(POLYAK_BLEND_ANY_WEIGHTS);
  CONSTANT(POLYAK_MAX_SNAPSHOTS);
  CONSTANT(POLYAK_MAX_GRAPH_STEPS);
  close_item("}");
  open_item("version", "{");
  CONSTANT(POLYAK_VERSION_MAJOR);
  CONSTANT(POLYAK_VERSION_MINOR);
  CONSTANT(POLYAK_VERSION_PATCH);
  printf(", \"POLYAK_VERSION_STRING\": \"%s\"", POLYAK_VERSION_STRING);
  close_item("}");
  printf("}\n");
  return 0;
}
