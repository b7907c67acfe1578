/* schedule.c: the decay schedules beta(step) and the conversions between
 * beta, half-life, window and EDM2's sigma_rel (the products of betas over
 * step gaps are schedule_product.c's). Pure host code in double precision. */
#include <math.h>
#include <string.h>

#include "polyak_internal.h"

const char *polyak_schedule_kind_name(polyak_schedule_kind kind)
{
  switch (kind) {
  case POLYAK_SCHEDULE_CONSTANT:
    return "CONSTANT";
  case POLYAK_SCHEDULE_TF:
    return "TF";
  case POLYAK_SCHEDULE_WARMUP:
    return "WARMUP";
  case POLYAK_SCHEDULE_LINEAR:
    return "LINEAR";
  case POLYAK_SCHEDULE_COSINE:
    return "COSINE";
  case POLYAK_SCHEDULE_EQUAL:
    return "EQUAL";
  case POLYAK_SCHEDULE_POWER:
    return "POWER";
  }
  return NULL;
}

int polyak_schedule_kind_from_name(const char *name)
{
  for (int kind = POLYAK_SCHEDULE_CONSTANT; kind <= POLYAK_SCHEDULE_POWER; kind++)
    if (strcmp(name, polyak_schedule_kind_name((polyak_schedule_kind)kind)) == 0)
      return kind;
  return -1;
}

int polyak_schedule_same(const polyak_schedule *a, const polyak_schedule *b)
{
  if (a->kind != b->kind || a->start_step != b->start_step)
    return 0;
  switch (a->kind) {
  case POLYAK_SCHEDULE_CONSTANT:
  case POLYAK_SCHEDULE_TF:
    return a->beta == b->beta;
  case POLYAK_SCHEDULE_WARMUP:
    return a->beta == b->beta && a->beta_min == b->beta_min && a->inv_gamma == b->inv_gamma && a->power == b->power;
  case POLYAK_SCHEDULE_LINEAR:
  case POLYAK_SCHEDULE_COSINE:
    return a->beta == b->beta && a->beta_min == b->beta_min && a->ramp_steps == b->ramp_steps;
  case POLYAK_SCHEDULE_EQUAL:
    return 1;
  case POLYAK_SCHEDULE_POWER:
    return a->gamma == b->gamma;
  }
  return 0;
}

static polyak_status check_beta_range(const polyak_schedule *s, int uses_beta_min, char *msg, size_t msg_num_bytes)
{
  if (!isfinite(s->beta) || s->beta < 0.0 || s->beta > 1.0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "beta = %g is outside [0, 1]", s->beta);
  if (uses_beta_min && (!isfinite(s->beta_min) || s->beta_min < 0.0 || s->beta_min > s->beta))
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "beta_min = %g is outside [0, beta = %g]",
                          s->beta_min, s->beta);
  return POLYAK_OK;
}

polyak_status polyak_schedule_check(const polyak_schedule *s, char *msg, size_t msg_num_bytes)
{
  polyak_status status = POLYAK_OK;
  const char *kind = polyak_schedule_kind_name(s->kind);
  if (!kind)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "kind = %d is not a polyak_schedule_kind",
                          (int)s->kind);
  if (s->start_step < 0)
    return polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "start_step = %lld is negative",
                          (long long)s->start_step);
  switch (s->kind) {
  case POLYAK_SCHEDULE_CONSTANT:
  case POLYAK_SCHEDULE_TF:
    status = check_beta_range(s, 0, msg, msg_num_bytes);
    break;
  case POLYAK_SCHEDULE_WARMUP:
    status = check_beta_range(s, 1, msg, msg_num_bytes);
    if (status == POLYAK_OK && !(isfinite(s->inv_gamma) && s->inv_gamma > 0.0))
      status = polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "WARMUP needs a finite inv_gamma > 0, got %g",
                              s->inv_gamma);
    if (status == POLYAK_OK && !(isfinite(s->power) && s->power > 0.0))
      status = polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "WARMUP needs a finite power > 0, got %g",
                              s->power);
    break;
  case POLYAK_SCHEDULE_LINEAR:
  case POLYAK_SCHEDULE_COSINE:
    status = check_beta_range(s, 1, msg, msg_num_bytes);
    if (status == POLYAK_OK && s->ramp_steps <= 0)
      status = polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "%s needs ramp_steps > 0, got %lld", kind,
                              (long long)s->ramp_steps);
    break;
  case POLYAK_SCHEDULE_EQUAL:
    break;
  case POLYAK_SCHEDULE_POWER:
    if (!(isfinite(s->gamma) && s->gamma > -1.0))
      status = polyak_message(msg, msg_num_bytes, POLYAK_ERR_INVALID_ARG, "POWER needs a finite gamma > -1, got %g",
                              s->gamma);
    break;
  }
  return status;
}

/* beta at t = step - start_step - 1 >= 0, for a valid schedule. */
double polyak_beta_of_t(const polyak_schedule *s, double t)
{
  switch (s->kind) {
  case POLYAK_SCHEDULE_CONSTANT:
    return s->beta;
  case POLYAK_SCHEDULE_TF:
    return fmin(s->beta, (1.0 + t) / (10.0 + t));
  case POLYAK_SCHEDULE_WARMUP: {
    if (t == 0.0)
      return 0.0;
    double beta = 1.0 - pow(1.0 + t / s->inv_gamma, -s->power);
    return fmin(fmax(beta, s->beta_min), s->beta);
  }
  case POLYAK_SCHEDULE_LINEAR: {
    double ramp = (double)s->ramp_steps;
    return fmin(s->beta, s->beta_min + (t / ramp) * (s->beta - s->beta_min));
  }
  case POLYAK_SCHEDULE_COSINE: {
    double ramp = (double)s->ramp_steps;
    double rise = (1.0 + cos(M_PI * fmin(t, ramp) / ramp)) / 2.0;
    return s->beta - (s->beta - s->beta_min) * rise;
  }
  case POLYAK_SCHEDULE_EQUAL:
    return t / (t + 1.0);
  case POLYAK_SCHEDULE_POWER:
    return pow(t / (t + 1.0), s->gamma + 1.0);
  }
  return NAN;
}

double polyak_beta_at(const polyak_schedule *s, int64_t step)
{
  if (!s || polyak_schedule_check(s, NULL, 0) != POLYAK_OK)
    return NAN;
  if (step <= s->start_step)
    return 0.0;
  return polyak_beta_of_t(s, (double)(step - s->start_step - 1));
}

double polyak_half_life_from_beta(double beta)
{
  if (!(beta > 0.0 && beta < 1.0))
    return NAN;
  return -M_LN2 / log1p(beta - 1.0);
}

double polyak_beta_from_half_life(double half_life_steps)
{
  if (!(half_life_steps > 0.0) || isinf(half_life_steps))
    return NAN;
  return exp2(-1.0 / half_life_steps);
}

double polyak_window_from_beta(double beta)
{
  if (!(beta >= 0.0 && beta < 1.0))
    return NAN;
  return 1.0 / (1.0 - beta);
}

double polyak_beta_from_window(double window_steps)
{
  if (!(window_steps >= 1.0) || isinf(window_steps))
    return NAN;
  return 1.0 - 1.0 / window_steps;
}

double polyak_update_decay(const polyak_t *p, int k, int64_t last_step, int64_t step, int64_t counted)
{
  const polyak_schedule *s = &p->cfg.shadows[k].schedule;
  if (polyak_is_lookahead(&p->cfg, k) && step % p->cfg.lookahead_every != 0)
    return 1.0;
  if (!polyak_counts_updates(&p->cfg, k))
    return polyak_beta_product_checked(s, last_step, step);
  return step <= s->start_step ? 0.0 : polyak_beta_of_t(s, (double)counted);
}

int64_t polyak_updates_counted_in(const polyak_t *p, int k, int64_t after, int64_t upto)
{
  int64_t start = p->cfg.shadows[k].schedule.start_step;
  after = after > start ? after : start;
  if (upto <= after)
    return 0;
  if (!polyak_is_lookahead(&p->cfg, k))
    return upto - after;
  return upto / p->cfg.lookahead_every - after / p->cfg.lookahead_every; /* both >= 0 */
}

int64_t polyak_next_sync(const polyak_config *c, int64_t step)
{
  int64_t every = c->lookahead_every;
  if (every <= 0 || step / every >= INT64_MAX / every)
    return INT64_MAX;
  return (step / every + 1) * every;
}

double polyak_beta_from_horizon(double horizon_steps)
{
  if (!(horizon_steps >= 4.0) || isinf(horizon_steps))
    return NAN;
  return 1.0 - 2.0 / sqrt(horizon_steps);
}

double polyak_sigma_rel_from_gamma(double gamma)
{
  if (!(gamma > -1.0) || isinf(gamma))
    return NAN;
  return sqrt((gamma + 1.0) / ((gamma + 2.0) * (gamma + 2.0) * (gamma + 3.0)));
}

double polyak_gamma_from_sigma_rel(double sigma_rel)
{
  /* sigma_rel(gamma) rises from 0 at gamma = -1 to its peak at
   * gamma = (sqrt(5) - 3)/2 and falls towards 0 beyond: the largest root of
   * the cubic lies on the falling branch, where bisection brackets it. */
  const double gamma_peak = (sqrt(5.0) - 3.0) / 2.0;
  if (!(sigma_rel > 0.0) || sigma_rel > polyak_sigma_rel_from_gamma(gamma_peak))
    return NAN;
  double inv_sq = 1.0 / (sigma_rel * sigma_rel);
  double lo = gamma_peak, hi = fmax(1.0 / sigma_rel, 1.0); /* sigma_rel(g) < 1/g */
  for (int i = 0; i < 200; i++) {
    double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi)
      break;
    double cubic = ((mid + 7.0) * mid + (16.0 - inv_sq)) * mid + (12.0 - inv_sq);
    if (cubic > 0.0)
      hi = mid;
    else
      lo = mid;
  }
  return 0.5 * (lo + hi);
}
