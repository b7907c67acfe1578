/* checkpoint_keys.c: the metadata of a checkpoint, both ways: every key
 * the writer writes (polyak_ckpt_metadata) and the reader checks, its form
 * (polyak_ckpt_check_format) and its values against the handle's
 * (polyak_ckpt_check_config). */
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"

#define CHECKSUM_PREFIX "xxh3-64:"

#define FORMAT_ERROR(...) polyak_ckpt_fail(p, POLYAK_ERR_FORMAT, function, __VA_ARGS__)
#define MISMATCH(...)     polyak_ckpt_fail(p, POLYAK_ERR_MISMATCH, function, __VA_ARGS__)

/* ---- numbers: one text per value ------------------------------------------
 * The writer prints integers with %lld: "0", or an optional '-' and digits
 * with no leading zero. Only that is read back, not what strtoll would also
 * take (" 10", "+10", "010", "10 "), so no other text stands for a value. */

/* 1 if text is a canonical decimal integer, with a sign if `negative_ok`. */
static int is_canonical_integer(const char *text, int negative_ok)
{
  if (!text)
    return 0;
  const char *digits = text + (negative_ok && text[0] == '-');
  size_t n = strspn(digits, "0123456789");
  return n > 0 && digits[n] == '\0' && !(digits[0] == '0' && (n > 1 || digits != text));
}

int polyak_ckpt_parse_int64(const char *text, int64_t *out)
{
  if (!is_canonical_integer(text, 1))
    return -1;
  errno = 0;
  long long value = strtoll(text, NULL, 10);
  if (errno)
    return -1;
  *out = value;
  return 0;
}

int polyak_ckpt_parse_uint64(const char *text, uint64_t *out)
{
  if (!is_canonical_integer(text, 0))
    return -1;
  errno = 0;
  unsigned long long value = strtoull(text, NULL, 10);
  if (errno)
    return -1;
  *out = value;
  return 0;
}

/* ---- the metadata -------------------------------------------------------------
 * Every key is written by polyak_ckpt_metadata and read by polyak_ckpt_check_format
 * (which must be there) and polyak_ckpt_check_config (their values against
 * the handle), all below; a new key goes into both, read as its default
 * when absent, so older files still load. Doubles are written with the
 * fewest digits that read back exactly (0.999, not 0.99899999999999999);
 * files from before that hold 17 digits, which read back to the same
 * doubles. */

/* Text built piece by piece; `failed` once out of memory. */
typedef struct {
  char *text;
  size_t length, capacity;
  int failed;
} text_builder;

static void append(text_builder *b, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void append(text_builder *b, const char *format, ...)
{
  va_list args;
  va_start(args, format);
  int n = vsnprintf(NULL, 0, format, args);
  va_end(args);
  if (b->failed || n < 0)
    return;
  if (b->length + (size_t)n + 1 > b->capacity) {
    size_t capacity = 2 * (b->length + (size_t)n + 1);
    char *text = realloc(b->text, capacity);
    if (!text) {
      b->failed = 1;
      return;
    }
    b->text = text;
    b->capacity = capacity;
  }
  va_start(args, format);
  vsnprintf(b->text + b->length, (size_t)n + 1, format, args);
  va_end(args);
  b->length += (size_t)n;
}

/* Adds key = the text `b` built (freed) to `metadata`. */
static int set_built(json_t *metadata, const char *key, text_builder *b)
{
  int rc = b->failed || !b->text || json_object_set_new(metadata, key, json_string(b->text));
  free(b->text);
  return rc;
}

#define D(x) polyak_format_double(x).text

/* The names of polyak_config.rounding's values in checkpoints. */
static const char *const rounding_names[] = {"nearest", "stochastic"};

static int set_schedules(json_t *metadata, const polyak_config *cfg)
{
  text_builder b = {0};
  for (int k = 0; k < cfg->num_shadows; k++) {
    const polyak_shadow_config *c = &cfg->shadows[k];
    const polyak_schedule *s = &c->schedule;
    append(&b,
           "%s{\"kind\":\"%s\",\"beta\":%s,\"beta_min\":%s,\"inv_gamma\":%s,\"power\":%s,\"gamma\":%s,"
           "\"ramp_steps\":%" PRId64 ",\"start_step\":%" PRId64 ",\"count_updates\":%s,\"grad_norm_c\":%s,"
           "\"layerwise_beta0\":%s,\"rounding\":\"%s\"}",
           k ? "," : "[", polyak_schedule_kind_name(s->kind), D(s->beta), D(s->beta_min), D(s->inv_gamma), D(s->power),
           D(s->gamma), s->ramp_steps, s->start_step, c->count_updates ? "true" : "false", D(c->grad_norm_c),
           D(c->layerwise_beta0), rounding_names[c->rounding]);
  }
  append(&b, "]");
  return set_built(metadata, "schedules", &b);
}

/* "[a,b,...]" of shadow k's double or int64 for k < num_shadows (malloc'd;
 * NULL: no memory): what the writer writes, and what format 2 must hold. */
static char *list_text(int num_shadows, const double *doubles, const int64_t *ints)
{
  text_builder b = {0};
  for (int k = 0; k < num_shadows; k++) {
    if (doubles)
      append(&b, "%s%s", k ? "," : "[", D(doubles[k]));
    else
      append(&b, "%s%" PRId64, k ? "," : "[", ints[k]);
  }
  append(&b, "]");
  if (b.failed) {
    free(b.text);
    return NULL;
  }
  return b.text;
}

static int set_list(json_t *metadata, const char *key, int num_shadows, const double *doubles, const int64_t *ints)
{
  char *text = list_text(num_shadows, doubles, ints);
  int rc = !text || json_object_set_new(metadata, key, json_string(text));
  free(text);
  return rc;
}

static int set_text(json_t *metadata, const char *key, const char *format, ...) __attribute__((format(printf, 3, 4)));
static int set_text(json_t *metadata, const char *key, const char *format, ...)
{
  char text[64];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  return json_object_set_new(metadata, key, json_string(text));
}

/* "copies": the names of the copy-only tensors, a JSON list (only where
 * there are some: files without them stay what older versions read). */
static int set_copies(json_t *metadata, const polyak_t *p)
{
  json_t *names = json_array();
  for (int i = 0; i < p->num_tensors && names; i++)
    if (p->tensors[i].copy_only && json_array_append_new(names, json_string(p->tensors[i].name)))
      json_decref(names), names = NULL;
  char *text = names && json_array_size(names) > 0 ? json_dumps(names, JSON_COMPACT) : NULL;
  int failed =
      !names || (json_array_size(names) > 0 && (!text || json_object_set_new(metadata, "copies", json_string(text))));
  free(text);
  json_decref(names);
  return failed;
}

/* The file's copy-only tensors are this handle's: a tensor averaged in one
 * and copied in the other would load the wrong numbers. */
static polyak_status check_copies(polyak_t *p, const char *text, const char *function)
{
  json_error_t error;
  json_t *names = text ? json_loads(text, 0, &error) : json_array(), *name;
  polyak_status status = json_is_array(names) ? POLYAK_OK : FORMAT_ERROR("metadata \"copies\" is not a list of names");
  size_t n;
  json_array_foreach(names, n, name)
  {
    int i = polyak_registry_find(p, json_string_value(name) ? json_string_value(name) : "");
    if (status == POLYAK_OK && !json_is_string(name))
      status = FORMAT_ERROR("metadata \"copies\" is not a list of names");
    else if (status == POLYAK_OK && i >= 0 && !p->tensors[i].copy_only)
      status = MISMATCH("tensor \"%s\" is copy-only in the file and averaged here", p->tensors[i].name);
  }
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++) {
    int listed = 0;
    json_array_foreach(names, n, name) listed |= strcmp(json_string_value(name), p->tensors[i].name) == 0;
    if (p->tensors[i].copy_only && !listed)
      status = MISMATCH("tensor \"%s\" is averaged in the file and copy-only here", p->tensors[i].name);
  }
  json_decref(names);
  return status;
}

/* "param_dtypes": {"<name>": "<dtype>", ...} of every registered tensor, a
 * JSON object: a resumed run must read its params as the run that saved. */
static int set_param_dtypes(json_t *metadata, const polyak_t *p)
{
  json_t *dtypes = json_object();
  for (int i = 0; i < p->num_tensors && dtypes; i++)
    if (json_object_set_new(dtypes, p->tensors[i].name, json_string(polyak_dtype_name(p->tensors[i].dtype))))
      json_decref(dtypes), dtypes = NULL;
  char *text = dtypes ? json_dumps(dtypes, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
  int failed = !text || json_object_set_new(metadata, "param_dtypes", json_string(text));
  free(text);
  json_decref(dtypes);
  return failed;
}

/* The file's param dtypes are this handle's, tensor by tensor. */
static polyak_status check_param_dtypes(polyak_t *p, const char *text, const char *function)
{
  json_error_t error;
  json_t *dtypes = json_loads(text, JSON_REJECT_DUPLICATES, &error), *dtype;
  polyak_status status =
      json_is_object(dtypes) ? POLYAK_OK : FORMAT_ERROR("metadata \"param_dtypes\" is not an object of dtype names");
  const char *name;
  json_object_foreach(dtypes, name, dtype)
  {
    int i = polyak_registry_find(p, name), known = 0;
    for (int d = POLYAK_F32; d <= POLYAK_BOOL; d++)
      known |= json_is_string(dtype) && strcmp(json_string_value(dtype), polyak_dtype_name((polyak_dtype)d)) == 0;
    if (status != POLYAK_OK)
      break;
    if (!known)
      status = FORMAT_ERROR("metadata \"param_dtypes\" gives tensor \"%s\" no polyak dtype", name);
    else if (i < 0)
      status = MISMATCH("the file's model has a tensor \"%s\" that this handle does not register", name);
    else if (strcmp(json_string_value(dtype), polyak_dtype_name(p->tensors[i].dtype)) != 0)
      status = MISMATCH("tensor \"%s\" was averaged from %s params, and this handle's are %s (the updates "
                        "would not continue the same way)",
                        name, json_string_value(dtype), polyak_dtype_name(p->tensors[i].dtype));
  }
  for (int i = 0; i < p->num_tensors && status == POLYAK_OK; i++)
    if (!json_object_get(dtypes, p->tensors[i].name))
      status = MISMATCH("tensor \"%s\" is not in the file's model", p->tensors[i].name);
  json_decref(dtypes);
  return status;
}

json_t *polyak_ckpt_metadata(const polyak_t *p, const polyak_ckpt_state *state)
{
  json_t *metadata = json_object();
  char checksum_text[32];
  snprintf(checksum_text, sizeof checksum_text, CHECKSUM_PREFIX "%016" PRIx64, state->checksum);
  int failed = !metadata || json_object_set_new(metadata, "format", json_string("polyak")) ||
               set_text(metadata, "format_version", "%d", POLYAK_CKPT_FORMAT) ||
               json_object_set_new(metadata, "library_version", json_string(polyak_version_string())) ||
               set_text(metadata, "step", "%" PRId64, state->step) ||
               set_text(metadata, "num_shadows", "%d", p->cfg.num_shadows) ||
               json_object_set_new(metadata, "shadow_dtype", json_string(polyak_dtype_name(p->cfg.shadow_dtype))) ||
               set_text(metadata, "seed", "%" PRIu64, p->cfg.seed) ||
               set_text(metadata, "zero_init", "%d", p->cfg.zero_init) ||
               set_text(metadata, "skip_nonfinite", "%d", p->cfg.skip_nonfinite) ||
               set_text(metadata, "lookahead_every", "%" PRId64, p->cfg.lookahead_every) ||
               set_text(metadata, "nonfinite_count", "%" PRId64, state->nonfinite) ||
               set_list(metadata, "beta_products", p->cfg.num_shadows, state->beta_prod, NULL) ||
               set_list(metadata, "update_counts", p->cfg.num_shadows, NULL, state->updates_counted) ||
               set_schedules(metadata, &p->cfg) || set_copies(metadata, p) || set_param_dtypes(metadata, p) ||
               json_object_set_new(metadata, "checksum", json_string(checksum_text));
  if (failed) {
    json_decref(metadata);
    return NULL;
  }
  return metadata;
}

static const char *metadata_text(json_t *metadata, const char *key)
{
  return json_string_value(json_object_get(metadata, key));
}

/* A schedule as "WARMUP (beta 0.9999, beta_min 0.0, inv_gamma 1.0, power
 * 0.75, start_step 0)": the fields its kind uses. */
static void describe_schedule(const polyak_schedule *s, char *out, size_t out_num_bytes)
{
  const char *kind = polyak_schedule_kind_name(s->kind);
  switch (s->kind) {
  case POLYAK_SCHEDULE_WARMUP:
    snprintf(out, out_num_bytes, "%s (beta %s, beta_min %s, inv_gamma %s, power %s, start_step %" PRId64 ")", kind,
             D(s->beta), D(s->beta_min), D(s->inv_gamma), D(s->power), s->start_step);
    break;
  case POLYAK_SCHEDULE_LINEAR:
  case POLYAK_SCHEDULE_COSINE:
    snprintf(out, out_num_bytes, "%s (beta %s, beta_min %s, ramp_steps %" PRId64 ", start_step %" PRId64 ")", kind,
             D(s->beta), D(s->beta_min), s->ramp_steps, s->start_step);
    break;
  case POLYAK_SCHEDULE_EQUAL:
    snprintf(out, out_num_bytes, "%s (start_step %" PRId64 ")", kind, s->start_step);
    break;
  case POLYAK_SCHEDULE_POWER:
    snprintf(out, out_num_bytes, "%s (gamma %s, start_step %" PRId64 ")", kind, D(s->gamma), s->start_step);
    break;
  default: /* CONSTANT, TF */
    snprintf(out, out_num_bytes, "%s (beta %s, start_step %" PRId64 ")", kind, D(s->beta), s->start_step);
  }
}

static polyak_status check_schedules(polyak_t *p, const char *text, const char *function)
{
  json_error_t error;
  json_t *list = json_loads(text, JSON_REJECT_DUPLICATES, &error);
  polyak_status status = POLYAK_OK;
  if (!json_is_array(list) || (int)json_array_size(list) != p->cfg.num_shadows)
    status = FORMAT_ERROR("metadata \"schedules\" is not a list of %d schedules", p->cfg.num_shadows);
  for (int k = 0; k < p->cfg.num_shadows && status == POLYAK_OK; k++) {
    polyak_schedule s;
    const char *kind = NULL;
    json_int_t ramp = 0, start = 0;
    /* the modes beyond a schedule: absent from files older than them, and 0 (nearest) there */
    int count_updates = 0, rounding = -1;
    double grad_norm_c = 0.0, layerwise_beta0 = 0.0;
    const char *rounding_name = rounding_names[POLYAK_ROUND_NEAREST];
    if (json_unpack(json_array_get(list, k), "{s:s, s:F, s:F, s:F, s:F, s:F, s:I, s:I, s?b, s?F, s?F, s?s}", "kind",
                    &kind, "beta", &s.beta, "beta_min", &s.beta_min, "inv_gamma", &s.inv_gamma, "power", &s.power,
                    "gamma", &s.gamma, "ramp_steps", &ramp, "start_step", &start, "count_updates", &count_updates,
                    "grad_norm_c", &grad_norm_c, "layerwise_beta0", &layerwise_beta0, "rounding",
                    &rounding_name) != 0 ||
        polyak_schedule_kind_from_name(kind) < 0) {
      status = FORMAT_ERROR("metadata \"schedules\"[%d] is not a schedule", k);
      break;
    }
    for (int r = 0; r < 2; r++)
      rounding = strcmp(rounding_name, rounding_names[r]) == 0 ? r : rounding;
    if (rounding < 0) {
      status = FORMAT_ERROR("metadata \"schedules\"[%d] has rounding \"%s\", not \"nearest\" or \"stochastic\"", k,
                            rounding_name);
      break;
    }
    if (rounding != p->cfg.shadows[k].rounding) {
      status = MISMATCH("shadow %d was averaged with %s rounding, this handle has %s rounding (the bits would "
                        "not continue the same way)",
                        k, rounding_names[rounding], rounding_names[p->cfg.shadows[k].rounding]);
      break;
    }
    s.kind = (polyak_schedule_kind)polyak_schedule_kind_from_name(kind);
    s.ramp_steps = ramp;
    s.start_step = start;
    if (count_updates != p->cfg.shadows[k].count_updates) {
      status = MISMATCH("shadow %d was averaged with count_updates = %d, this handle has %d", k, count_updates,
                        p->cfg.shadows[k].count_updates);
      break;
    }
    if (grad_norm_c != p->cfg.shadows[k].grad_norm_c || layerwise_beta0 != p->cfg.shadows[k].layerwise_beta0) {
      status = MISMATCH("shadow %d was averaged with grad_norm_c = %s, layerwise_beta0 = %s; this handle "
                        "has %s, %s",
                        k, D(grad_norm_c), D(layerwise_beta0), D(p->cfg.shadows[k].grad_norm_c),
                        D(p->cfg.shadows[k].layerwise_beta0));
      break;
    }
    if (!polyak_schedule_same(&s, &p->cfg.shadows[k].schedule)) {
      char file[224], here[224];
      describe_schedule(&s, file, sizeof file);
      describe_schedule(&p->cfg.shadows[k].schedule, here, sizeof here);
      status =
          MISMATCH("shadow %d was averaged with another schedule: the file's is %s, this handle's %s", k, file, here);
    }
  }
  json_decref(list);
  return status;
}

/* Metadata keys every polyak file has; format 1's files may lack the ones
 * added while it was current ("lookahead_every" and "update_counts" then
 * read as 0, "skip_nonfinite" and "param_dtypes" go unchecked), format 2's
 * have them all. */
static const char *const kRequired[] = {"step",          "num_shadows", "shadow_dtype",
                                        "seed",          "zero_init",   "nonfinite_count",
                                        "beta_products", "schedules",   "checksum"};
static const char *const kRequiredSince2[] = {"library_version", "skip_nonfinite", "lookahead_every", "update_counts",
                                              "param_dtypes"};

/* "1.0.0", "2.1.3-rc1": dot-separated numbers, then an optional -/+ suffix. */
static int is_version_text(const char *text)
{
  size_t n = strspn(text, "0123456789");
  while (n > 0 && text[n] == '.' && strspn(text + n + 1, "0123456789") > 0)
    n += 1 + strspn(text + n + 1, "0123456789");
  return n > 0 && (text[n] == '\0' || ((text[n] == '-' || text[n] == '+') && text[n + 1] != '\0'));
}

polyak_status polyak_ckpt_check_strings(polyak_t *p, json_t *metadata, const char *function)
{
  if (!json_is_object(metadata))
    return FORMAT_ERROR("no \"__metadata__\" object: not a polyak checkpoint");
  const char *key;
  json_t *value;
  json_object_foreach(metadata, key, value)
  {
    if (!json_is_string(value))
      return FORMAT_ERROR("metadata \"%s\" is not a string", key);
  }
  return POLYAK_OK;
}

polyak_status polyak_ckpt_check_keys(polyak_t *p, json_t *metadata, int format_version, const char *function)
{
  const char *library = metadata_text(metadata, "library_version");
  for (size_t n = 0; n < sizeof kRequired / sizeof kRequired[0]; n++)
    if (!metadata_text(metadata, kRequired[n]))
      return FORMAT_ERROR("metadata \"%s\" is missing", kRequired[n]);
  for (size_t n = 0; n < sizeof kRequiredSince2 / sizeof kRequiredSince2[0] && format_version >= 2; n++)
    if (!metadata_text(metadata, kRequiredSince2[n]))
      return FORMAT_ERROR("metadata \"%s\" is missing (format 2 has it)", kRequiredSince2[n]);
  if (library && !is_version_text(library))
    return FORMAT_ERROR("metadata \"library_version\" is not a version");
  return POLYAK_OK;
}

polyak_status polyak_ckpt_check_format(polyak_t *p, json_t *metadata, int *format_version, const char *function)
{
  POLYAK_TRY(polyak_ckpt_check_strings(p, metadata, function));
  const char *format = metadata_text(metadata, "format");
  const char *version = metadata_text(metadata, "format_version");
  const char *library = metadata_text(metadata, "library_version");
  if (format && strcmp(format, POLYAK_SHARD_FORMAT) == 0)
    return FORMAT_ERROR("this is one rank's file of a set that polyak_save_shards wrote: load the set's directory "
                        "with polyak_load_shards, or join the set into one checkpoint with polyak-consolidate");
  if (!format || strcmp(format, "polyak") != 0)
    return FORMAT_ERROR("metadata \"format\" is not \"polyak\": not a polyak checkpoint");
  *format_version = version && strcmp(version, "1") == 0 ? 1 : version && strcmp(version, "2") == 0 ? 2 : 0;
  if (*format_version == 0)
    return FORMAT_ERROR("format version \"%.40s\" is not one this library (%s) reads (1, 2)%s%.40s",
                        version ? version : "(missing)", polyak_version_string(),
                        library ? "; the file was written by polyak " : "", library ? library : "");
  return polyak_ckpt_check_keys(p, metadata, *format_version, function);
}

/* "beta_products" (doubles) or "update_counts" (ints): num_shadows values;
 * format 2 holds exactly the text the writer writes (list_text), format 1
 * any JSON list of them. 0 if they read, else -1. */
static int parse_list(const char *text, int format_version, int num_shadows, double *doubles, int64_t *ints)
{
  json_error_t error;
  json_t *list = json_loads(text, 0, &error);
  int bad = !json_is_array(list) || (int)json_array_size(list) != num_shadows;
  for (int k = 0; k < num_shadows && !bad; k++) {
    json_t *v = json_array_get(list, k);
    bad = doubles ? !json_is_number(v) : !json_is_integer(v);
    if (doubles)
      doubles[k] = json_number_value(v);
    else
      ints[k] = json_integer_value(v);
  }
  json_decref(list);
  if (!bad && format_version >= 2) {
    char *canonical = list_text(num_shadows, doubles, ints);
    bad = !canonical || strcmp(canonical, text) != 0;
    free(canonical);
  }
  return bad ? -1 : 0;
}

/* The state a load restores, each value read from its one text. */
static polyak_status parse_state(polyak_t *p, json_t *metadata, polyak_ckpt_state *h, const char *function)
{
  int num_shadows = p->cfg.num_shadows;
  if (polyak_ckpt_parse_int64(metadata_text(metadata, "step"), &h->step) != 0 || h->step < 0)
    return FORMAT_ERROR("metadata \"step\" is not a step");
  if (polyak_ckpt_parse_int64(metadata_text(metadata, "nonfinite_count"), &h->nonfinite) != 0 || h->nonfinite < 0)
    return FORMAT_ERROR("metadata \"nonfinite_count\" is not a count");
  int bad = parse_list(metadata_text(metadata, "beta_products"), h->format_version, num_shadows, h->beta_prod, NULL);
  for (int k = 0; k < num_shadows && !bad; k++)
    bad = !(h->beta_prod[k] >= 0.0 && h->beta_prod[k] <= 1.0);
  if (bad)
    return FORMAT_ERROR("metadata \"beta_products\" is not a list of %d numbers in [0, 1]", num_shadows);
  const char *counts = metadata_text(metadata, "update_counts");
  memset(h->updates_counted, 0, sizeof h->updates_counted); /* absent from old files: 0 */
  bad = counts && parse_list(counts, h->format_version, num_shadows, NULL, h->updates_counted) != 0;
  for (int k = 0; k < num_shadows && !bad; k++)
    bad = h->updates_counted[k] < 0;
  if (bad)
    return FORMAT_ERROR("metadata \"update_counts\" is not a list of %d counts", num_shadows);
  const char *checksum = metadata_text(metadata, "checksum");
  size_t prefix = strlen(CHECKSUM_PREFIX);
  if (strncmp(checksum, CHECKSUM_PREFIX, prefix) != 0 || strlen(checksum) != prefix + 16 ||
      strspn(checksum + prefix, "0123456789abcdef") != 16)
    return FORMAT_ERROR("metadata \"checksum\" is not " CHECKSUM_PREFIX "<16 lowercase hex digits>");
  h->checksum = strtoull(checksum + prefix, NULL, 16);
  return POLYAK_OK;
}

/* A 0/1 setting: *value, or -1 where a format 1 file lacks it. */
static polyak_status parse_flag(polyak_t *p, json_t *metadata, const char *key, int64_t *value, const char *function)
{
  const char *text = metadata_text(metadata, key);
  *value = -1;
  if (text && (polyak_ckpt_parse_int64(text, value) != 0 || *value < 0 || *value > 1))
    return FORMAT_ERROR("metadata \"%s\" is not 0 or 1", key);
  return POLYAK_OK;
}

/* The settings besides the schedules, against this handle's. */
static polyak_status check_settings(polyak_t *p, json_t *metadata, const char *function)
{
  int64_t num_shadows, zero_init, skip_nonfinite, lookahead_every = 0;
  uint64_t seed;
  if (polyak_ckpt_parse_int64(metadata_text(metadata, "num_shadows"), &num_shadows) != 0)
    return FORMAT_ERROR("metadata \"num_shadows\" is not a number");
  if (num_shadows != p->cfg.num_shadows)
    return MISMATCH("the file has %lld shadows, this handle %d", (long long)num_shadows, p->cfg.num_shadows);
  const char *dtype = metadata_text(metadata, "shadow_dtype");
  if (strcmp(dtype, polyak_dtype_name(p->cfg.shadow_dtype)) != 0)
    return MISMATCH("the file's shadows are %s, this handle's %s", dtype, polyak_dtype_name(p->cfg.shadow_dtype));
  if (polyak_ckpt_parse_uint64(metadata_text(metadata, "seed"), &seed) != 0)
    return FORMAT_ERROR("metadata \"seed\" is not a number");
  if (seed != p->cfg.seed)
    return MISMATCH("the file's seed is %" PRIu64 ", this handle's %" PRIu64
                    " (stochastic rounding would not continue the same way)",
                    seed, p->cfg.seed);
  POLYAK_TRY(parse_flag(p, metadata, "zero_init", &zero_init, function));
  if (zero_init != p->cfg.zero_init)
    return MISMATCH("the file has zero_init = %lld, this handle %d", (long long)zero_init, p->cfg.zero_init);
  POLYAK_TRY(parse_flag(p, metadata, "skip_nonfinite", &skip_nonfinite, function));
  if (skip_nonfinite >= 0 && skip_nonfinite != p->cfg.skip_nonfinite)
    return MISMATCH("the file was averaged with skip_nonfinite = %lld, this handle has %d (a non-finite param "
                    "would not be treated the same way)",
                    (long long)skip_nonfinite, p->cfg.skip_nonfinite);
  const char *lookahead_text = metadata_text(metadata, "lookahead_every");
  if (lookahead_text && (polyak_ckpt_parse_int64(lookahead_text, &lookahead_every) != 0 || lookahead_every < 0))
    return FORMAT_ERROR("metadata \"lookahead_every\" is not a count of steps");
  if (lookahead_every != p->cfg.lookahead_every)
    return MISMATCH("the file has lookahead_every = %lld, this handle %lld", (long long)lookahead_every,
                    (long long)p->cfg.lookahead_every);
  return POLYAK_OK;
}

polyak_status polyak_ckpt_check_config(polyak_t *p, json_t *metadata, polyak_ckpt_state *h, const char *function)
{
  POLYAK_TRY(parse_state(p, metadata, h, function));
  POLYAK_TRY(check_settings(p, metadata, function));
  POLYAK_TRY(check_copies(p, metadata_text(metadata, "copies"), function));
  const char *param_dtypes = metadata_text(metadata, "param_dtypes");
  if (param_dtypes) /* format 1 files did not record them */
    POLYAK_TRY(check_param_dtypes(p, param_dtypes, function));
  return check_schedules(p, metadata_text(metadata, "schedules"), function);
}
