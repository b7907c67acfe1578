/* status.c: status names, error text, dtype facts. */
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "polyak_internal.h"

const char *polyak_status_name(polyak_status s)
{
  switch (s) {
#define POLYAK_STATUS_CASE(name, value) \
  case name:                            \
    return #name;
    POLYAK_STATUS_LIST(POLYAK_STATUS_CASE)
#undef POLYAK_STATUS_CASE
  }
  return "POLYAK_UNKNOWN_STATUS";
}

const char *polyak_last_error(const polyak_t *p)
{
  return p ? p->last_error : "";
}

const char *polyak_version_string(void)
{
  return POLYAK_VERSION_STRING;
}

polyak_status polyak_fail(polyak_t *p, polyak_status status, const char *format, ...)
{
  if (p) {
    va_list args;
    va_start(args, format);
    vsnprintf(p->last_error, sizeof p->last_error, format, args);
    va_end(args);
  }
  return status;
}

polyak_status polyak_message(char *msg, size_t msg_num_bytes, polyak_status status, const char *format, ...)
{
  if (msg && msg_num_bytes > 0) {
    va_list args;
    va_start(args, format);
    vsnprintf(msg, msg_num_bytes, format, args);
    va_end(args);
  }
  return status;
}

polyak_double_text polyak_format_double(double value)
{
  polyak_double_text out;
  for (int digits = 1; digits <= 17; digits++) { /* 17 always reads back */
    snprintf(out.text, sizeof out.text, "%.*g", digits, value);
    if (strtod(out.text, NULL) == value || isnan(value))
      break;
  }
  /* printf and strtod use the locale's decimal point; JSON and messages '.' */
  const char *point = localeconv()->decimal_point;
  char *at = strcmp(point, ".") != 0 ? strstr(out.text, point) : NULL;
  if (at) {
    *at = '.';
    memmove(at + 1, at + strlen(point), strlen(at + strlen(point)) + 1);
  }
  if (isfinite(value) && !strpbrk(out.text, ".e"))
    strcat(out.text, ".0");
  return out;
}

/* Every dtype: its safetensors name and element size. */
static const struct {
  const char *name;
  size_t num_bytes;
} dtypes[] = {
    [POLYAK_F32] = {"F32", 4}, [POLYAK_BF16] = {"BF16", 2}, [POLYAK_F16] = {"F16", 2}, [POLYAK_F64] = {"F64", 8},
    [POLYAK_I64] = {"I64", 8}, [POLYAK_I32] = {"I32", 4},   [POLYAK_I16] = {"I16", 2}, [POLYAK_I8] = {"I8", 1},
    [POLYAK_U8] = {"U8", 1},   [POLYAK_BOOL] = {"BOOL", 1},
};

int polyak_dtype_copyable(polyak_dtype dtype)
{
  return (unsigned)dtype < sizeof dtypes / sizeof dtypes[0];
}

int polyak_dtype_valid(polyak_dtype dtype)
{
  return dtype == POLYAK_F32 || dtype == POLYAK_BF16 || dtype == POLYAK_F16;
}

size_t polyak_dtype_num_bytes(polyak_dtype dtype)
{
  return polyak_dtype_copyable(dtype) ? dtypes[dtype].num_bytes : 0;
}

/* Also the safetensors names of these dtypes. */
const char *polyak_dtype_name(polyak_dtype dtype)
{
  return polyak_dtype_copyable(dtype) ? dtypes[dtype].name : "unknown dtype";
}
