/* posthoc.c: EDM2's post-hoc averages. A power-function EMA with exponent
 * gamma, read at step t, weighs the params of step tau <= t by the profile
 * p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (integral 1 over [0, t]).
 * Snapshots of a few such EMAs, taken along a run, span a space of
 * profiles; the average for another (t, sigma_rel) is the combination of
 * snapshots whose profile is nearest the wanted one in L2: the normal
 * equations of that least-squares problem, solved directly (Gaussian
 * elimination with partial pivoting in double), then scaled to
 * sum to 1. The combination itself runs on the backend (snapshots stacked
 * as the columns of a matrix: one GEMV). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "polyak_internal.h"

/* <p_a, p_b> over [0, min(t_a, t_b)]: the integral of
 * (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)), written with
 * ratios <= 1 so that no power overflows for large steps. */
static double profile_dot(double t_a, double gamma_a, double t_b, double gamma_b)
{
  double m = fmin(t_a, t_b);
  double scale = (gamma_a + 1.0) * (gamma_b + 1.0) / ((gamma_a + gamma_b + 1.0) * m);
  return scale * pow(m / t_a, gamma_a + 1.0) * pow(m / t_b, gamma_b + 1.0);
}

/* Solves a x = b in place (a: n x n row-major, destroyed; b becomes x) by
 * Gaussian elimination with partial pivoting. -1 if a is singular. */
static int solve(double *a, double *b, int n)
{
  for (int col = 0; col < n; col++) {
    int pivot = col;
    for (int r = col + 1; r < n; r++)
      if (fabs(a[r * n + col]) > fabs(a[pivot * n + col]))
        pivot = r;
    if (!(fabs(a[pivot * n + col]) > 0.0))
      return -1;
    if (pivot != col) {
      for (int c = 0; c < n; c++) {
        double t = a[col * n + c];
        a[col * n + c] = a[pivot * n + c];
        a[pivot * n + c] = t;
      }
      double t = b[col];
      b[col] = b[pivot];
      b[pivot] = t;
    }
    for (int r = col + 1; r < n; r++) {
      double f = a[r * n + col] / a[col * n + col];
      for (int c = col; c < n; c++)
        a[r * n + c] -= f * a[col * n + c];
      b[r] -= f * b[col];
    }
  }
  for (int r = n - 1; r >= 0; r--) {
    double sum = b[r];
    for (int c = r + 1; c < n; c++)
      sum -= a[r * n + c] * b[c];
    b[r] = sum / a[r * n + r];
  }
  return 0;
}

polyak_status polyak_posthoc_coefficients(int num_snapshots, const int64_t *snapshot_steps,
                                          const double *snapshot_sigma_rels, int64_t step, double sigma_rel,
                                          double *coefficients)
{
  if (num_snapshots < 1 || num_snapshots > POLYAK_MAX_SNAPSHOTS || !snapshot_steps || !snapshot_sigma_rels ||
      !coefficients || step < 1)
    return POLYAK_ERR_INVALID_ARG;
  double gamma = polyak_gamma_from_sigma_rel(sigma_rel);
  if (isnan(gamma))
    return POLYAK_ERR_INVALID_ARG;
  int n = num_snapshots;
  double *gammas = malloc((size_t)n * sizeof *gammas);
  double *a = malloc((size_t)n * (size_t)n * sizeof *a);
  double *x = malloc((size_t)n * sizeof *x);
  polyak_status status = gammas && a && x ? POLYAK_OK : POLYAK_ERR_NO_MEMORY;
  for (int i = 0; i < n && status == POLYAK_OK; i++) {
    gammas[i] = polyak_gamma_from_sigma_rel(snapshot_sigma_rels[i]);
    if (snapshot_steps[i] < 1 || isnan(gammas[i]))
      status = POLYAK_ERR_INVALID_ARG;
  }
  for (int i = 0; i < n && status == POLYAK_OK; i++) {
    double t_i = (double)snapshot_steps[i];
    for (int j = 0; j < n; j++)
      a[i * n + j] = profile_dot(t_i, gammas[i], (double)snapshot_steps[j], gammas[j]);
    x[i] = profile_dot(t_i, gammas[i], (double)step, gamma);
  }
  /* a Gram matrix: singular where two snapshots share a profile */
  if (status == POLYAK_OK && solve(a, x, n) != 0)
    status = POLYAK_ERR_INVALID_ARG;
  double sum = 0.0;
  for (int i = 0; i < n && status == POLYAK_OK; i++)
    sum += x[i];
  if (status == POLYAK_OK && !(isfinite(sum) && sum != 0.0))
    status = POLYAK_ERR_INVALID_ARG;
  for (int i = 0; i < n && status == POLYAK_OK; i++)
    coefficients[i] = x[i] / sum;
  free(gammas);
  free(a);
  free(x);
  return status;
}

/* ---- snapshots and synthesis on a handle ---------------------------------- */

/* What snapshots need of a handle: finalized, whole shadows in arenas. */
static polyak_status check_posthoc(polyak_t *p, const char *function)
{
  POLYAK_TRY(polyak_require_finalized(p, function));
  if (p->cfg.world_size > 1)
    return polyak_fail(p, POLYAK_ERR_UNSUPPORTED, "%s: snapshots of sharded handles are not built yet", function);
  for (int i = 0; i < p->num_tensors; i++)
    if (p->tensors[i].owned)
      return polyak_fail(p, POLYAK_ERR_UNSUPPORTED,
                         "%s: tensor %d (\"%s\") has its shadow in the caller's memory, outside snapshots", function, i,
                         p->tensors[i].name);
  return POLYAK_OK;
}

polyak_status polyak_snapshot_elems(polyak_t *p, int64_t *num_elems)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  if (!num_elems)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_snapshot_elems: num_elems is NULL");
  polyak_status status = check_posthoc(p, "polyak_snapshot_elems");
  if (status == POLYAK_OK)
    *num_elems = p->arena_elems;
  return status;
}

polyak_status polyak_snapshot(polyak_t *p, int shadow, float *dst, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = check_posthoc(p, "polyak_snapshot");
  if (status != POLYAK_OK)
    return status;
  status = polyak_check_shadow(p, shadow, "polyak_snapshot");
  if (status != POLYAK_OK)
    return status;
  if (!dst && p->arena_elems > 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_snapshot: dst is NULL");
  if ((uintptr_t)dst % sizeof(float) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_snapshot: dst %p is not 4-byte aligned", (void *)dst);
  double debias_scale = 1.0;
  status = polyak_debias_scale(p, shadow, stream, "polyak_snapshot", &debias_scale);
  if (status == POLYAK_OK && p->arena_elems > 0)
    status = p->ops->check_read_out(p, dst, (size_t)p->arena_elems * sizeof(float), stream, "polyak_snapshot");
  if (status != POLYAK_OK)
    return status;
  /* the whole arena in one pass, padding (zeros) included */
  return p->ops->read_out(p, p->ops->arena(p, shadow), p->cfg.shadow_dtype, p->arena_elems, debias_scale, dst,
                          POLYAK_F32, stream);
}

polyak_status polyak_synthesize_to_params(polyak_t *p, const float *snapshots, int num_snapshots,
                                          const double *coefficients, void *stream)
{
  if (!p)
    return POLYAK_ERR_INVALID_ARG;
  polyak_status status = check_posthoc(p, "polyak_synthesize_to_params");
  if (status != POLYAK_OK)
    return status;
  if (num_snapshots < 1 || num_snapshots > POLYAK_MAX_SNAPSHOTS)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_synthesize_to_params: num_snapshots = %d is outside 1..%d",
                       num_snapshots, POLYAK_MAX_SNAPSHOTS);
  if (!coefficients || (!snapshots && p->arena_elems > 0))
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_synthesize_to_params: %s is NULL",
                       coefficients ? "snapshots" : "coefficients");
  if ((uintptr_t)snapshots % sizeof(float) != 0)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_synthesize_to_params: snapshots %p is not 4-byte aligned",
                       (const void *)snapshots);
  if (p->arena_elems > 0 && (uint64_t)num_snapshots > SIZE_MAX / sizeof(float) / (uint64_t)p->arena_elems)
    return polyak_fail(p, POLYAK_ERR_INVALID_ARG, "polyak_synthesize_to_params: the snapshots overflow size_t");
  float weights[POLYAK_MAX_SNAPSHOTS];
  for (int i = 0; i < num_snapshots; i++) {
    weights[i] = (float)coefficients[i];
    if (!isfinite(coefficients[i]) || !isfinite(weights[i]))
      return polyak_fail(p, POLYAK_ERR_INVALID_ARG,
                         "polyak_synthesize_to_params: coefficients[%d] = %g is not a finite float", i,
                         coefficients[i]);
  }
  /* it allocates scratch and waits for the stream */
  status = polyak_refuse_capture(p, stream, "polyak_synthesize_to_params: cannot be captured into a graph");
  if (status == POLYAK_OK)
    status = polyak_refuse_during_capture(p, stream, 0, "polyak_synthesize_to_params");
  if (status == POLYAK_OK && p->arena_elems > 0)
    status = p->ops->check_read_out(p, snapshots, (size_t)num_snapshots * (size_t)p->arena_elems * sizeof(float),
                                    stream, "polyak_synthesize_to_params");
  if (status == POLYAK_OK)
    status = p->ops->synthesize(p, snapshots, num_snapshots, weights, stream);
  return status == POLYAK_OK ? polyak_copies_to_params(p, stream) : status;
}
