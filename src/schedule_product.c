/* schedule_product.c: the decay an update applies after a gap of steps,
 * B = prod_{s = last+1 .. step} beta(s), at a cost bounded whatever the gap.
 *
 * CONSTANT, TF, EQUAL and POWER have closed forms. WARMUP, LINEAR and COSINE
 * rise (WARMUP from a floor, beta_min) through a ramp to their ceiling,
 * beta, where they stay. Gaps of up to STEP_BY_STEP_GAP steps multiply
 * their betas one by one, as every version has, so the bits of such
 * updates never change. Longer gaps take a bounded number of evaluations:
 * the floor and the ceiling by closed forms, the ramp as a sum of
 * log-betas, its terms at t < DIRECT_BELOW_T added one by one and the rest
 * by the Euler-Maclaurin formula over a Gauss-Legendre integral; once the
 * sum is below LOG_UNDERFLOW, B is 0. On the gaps the tests try, the float
 * weight 1 - B is within one float ulp of the step-by-step product's. */
#include <math.h>

#include "polyak_internal.h"

#define STEP_BY_STEP_GAP 4096   /* gaps up to this: the product step by step */
#define DIRECT_BELOW_T   4096.0 /* ramp terms below this t are added one by one */
#define LOG_UNDERFLOW    -746.0 /* exp() of less is 0 in double */

/* prod_{t = t_first..t_last} (1+t)/(10+t) telescopes to
 * prod_{j=1..9} (t_first+j) / (t_last+1+j). */
static double tf_ramp_product(double t_first, double t_last)
{
  double product = 1.0;
  for (int j = 1; j <= 9; j++)
    product *= (t_first + j) / (t_last + 1.0 + j);
  return product;
}

static double tf_product(const polyak_schedule *s, int64_t t_first, int64_t t_last)
{
  /* (1+t)/(10+t) rises through beta at t_cap; from there on beta applies */
  int64_t t_cap = t_last + 1;
  if (s->beta < 1.0) {
    double crossing = ceil((10.0 * s->beta - 1.0) / (1.0 - s->beta));
    if (crossing < (double)t_cap)
      t_cap = crossing < (double)t_first ? t_first : (int64_t)crossing;
  }
  double product = 1.0;
  if (t_cap > t_first)
    product = tf_ramp_product((double)t_first, (double)(t_cap - 1));
  return product * pow(s->beta, (double)(t_last + 1 - t_cap));
}

/* The ramping kinds step by step, until the ceiling (then one pow) or 0. */
static double step_by_step_product(const polyak_schedule *s, int64_t t_first, int64_t t_last)
{
  double product = 1.0;
  for (int64_t t = t_first; t <= t_last; t++) {
    double beta = polyak_beta_of_t(s, (double)t);
    product *= beta;
    if (beta == s->beta)
      return product * pow(s->beta, (double)(t_last - t));
    if (product == 0.0)
      return 0.0;
  }
  return product;
}

/* ---- long gaps of the ramping kinds --------------------------------------- */

/* log beta(t) on the ramp (neither clamped nor capped), as a smooth
 * function of real t, and its derivative; log1p keeps the digits of betas
 * near 1. */
static double ramp_log_beta(const polyak_schedule *s, double t, double *derivative)
{
  switch (s->kind) {
  case POLYAK_SCHEDULE_WARMUP: { /* beta = 1 - u, u = (1 + t/inv_gamma)^-power */
    double u = pow(1.0 + t / s->inv_gamma, -s->power);
    *derivative = s->power * u / ((s->inv_gamma + t) * (1.0 - u));
    return log1p(-u);
  }
  case POLYAK_SCHEDULE_LINEAR: { /* beta = beta_min + slope t */
    double slope = (s->beta - s->beta_min) / (double)s->ramp_steps;
    double beta_minus_1 = (s->beta_min - 1.0) + (t / (double)s->ramp_steps) * (s->beta - s->beta_min);
    *derivative = slope / (1.0 + beta_minus_1);
    return log1p(beta_minus_1);
  }
  default: { /* COSINE: beta = beta - (beta - beta_min)(1 + cos(pi t/ramp))/2 */
    double ramp = (double)s->ramp_steps, span = s->beta - s->beta_min;
    double beta_minus_1 = (s->beta - 1.0) - span * (1.0 + cos(M_PI * t / ramp)) / 2.0;
    *derivative = span * (M_PI / (2.0 * ramp)) * sin(M_PI * t / ramp) / (1.0 + beta_minus_1);
    return log1p(beta_minus_1);
  }
  }
}

/* The 16-point Gauss-Legendre rule on [-1, 1]: nodes and weights of the
 * positive half (numpy.polynomial.legendre.leggauss(16)). */
static const double kGaussLegendre16[8][2] = {
    {0.09501250983763744, 0.18945061045506864}, {0.2816035507792589, 0.18260341504492364},
    {0.45801677765722737, 0.16915651939500265}, {0.6178762444026438, 0.1495959888165767},
    {0.755404408355003, 0.12462897125553407},   {0.8656312023878318, 0.0951585116824926},
    {0.9445750230732326, 0.062253523938647456}, {0.9894009349916499, 0.027152459411754176},
};

/* The integral of ramp_log_beta over [a, b], 0 < a <= b: on panels [x, 2x]
 * (at most 64), where each kind's log-beta is smooth at the panel's scale,
 * as power laws are, so that 16 nodes reach double precision. */
static double ramp_integral(const polyak_schedule *s, double a, double b)
{
  double integral = 0.0, unused;
  for (double lo = a; lo < b;) {
    double hi = fmin(2.0 * lo, b), middle = 0.5 * (lo + hi), half = 0.5 * (hi - lo);
    for (int n = 0; n < 8; n++) {
      double offset = half * kGaussLegendre16[n][0], weight = half * kGaussLegendre16[n][1];
      integral += weight * (ramp_log_beta(s, middle - offset, &unused) + ramp_log_beta(s, middle + offset, &unused));
    }
    lo = hi;
  }
  return integral;
}

/* sum_{t = a..b} log beta(t) over the ramp. The terms below DIRECT_BELOW_T
 * one by one; beyond, Euler-Maclaurin: the integral, half the end terms,
 * and (f'(b) - f'(a))/12. The next term, (f'''(b) - f'''(a))/720, is below
 * 1e-10 of the sum there: every kind's log-beta varies on the scale of t
 * (or of ramp_steps > t), so f''' is of order f / t^3. */
static double ramp_log_sum(const polyak_schedule *s, int64_t a, int64_t b)
{
  double sum = 0.0;
  int64_t t = a;
  for (; t <= b && (double)t < DIRECT_BELOW_T && sum >= LOG_UNDERFLOW; t++)
    sum += log(polyak_beta_of_t(s, (double)t));
  if (t > b || sum < LOG_UNDERFLOW)
    return sum;
  double first_slope, last_slope;
  double first = ramp_log_beta(s, (double)t, &first_slope), last = ramp_log_beta(s, (double)b, &last_slope);
  return sum + ramp_integral(s, (double)t, (double)b) + 0.5 * (first + last) + (last_slope - first_slope) / 12.0;
}

typedef enum { ABOVE_FLOOR, AT_CEILING } ramp_edge;

/* The first t in [lo, hi) where beta(t) is above beta_min (ABOVE_FLOOR) or
 * is beta (AT_CEILING), else hi: bisection, beta(t) rising with t. */
static int64_t first_t_where(const polyak_schedule *s, int64_t lo, int64_t hi, ramp_edge edge)
{
  while (lo < hi) {
    int64_t middle = lo + (hi - lo) / 2;
    double beta = polyak_beta_of_t(s, (double)middle);
    if (edge == ABOVE_FLOOR ? beta > s->beta_min : beta >= s->beta)
      hi = middle;
    else
      lo = middle + 1;
  }
  return lo;
}

/* The ramping kinds over a long gap: floor steps, ramp steps, ceiling steps. */
static double long_gap_product(const polyak_schedule *s, int64_t t_first, int64_t t_last)
{
  if (polyak_beta_of_t(s, (double)t_first) == 0.0)
    return 0.0;
  int64_t ceiling = first_t_where(s, t_first, t_last + 1, AT_CEILING);
  int64_t ramp = s->kind == POLYAK_SCHEDULE_WARMUP ? first_t_where(s, t_first, ceiling, ABOVE_FLOOR) : t_first;
  double log_sum = 0.0;
  if (ramp > t_first) /* beta_min > 0 here: beta(t_first) is not 0 */
    log_sum += (double)(ramp - t_first) * log(s->beta_min);
  if (ceiling > ramp && log_sum >= LOG_UNDERFLOW)
    log_sum += ramp_log_sum(s, ramp, ceiling - 1);
  if (t_last >= ceiling)
    log_sum += (double)(t_last + 1 - ceiling) * log(s->beta);
  return log_sum < LOG_UNDERFLOW ? 0.0 : exp(log_sum);
}

/* prod over t in [t_first, t_last] of beta at t, t_first >= 0. */
static double product_over_t(const polyak_schedule *s, int64_t t_first, int64_t t_last)
{
  int64_t count = t_last - t_first + 1;
  switch (s->kind) {
  case POLYAK_SCHEDULE_CONSTANT:
    return pow(s->beta, (double)count);
  case POLYAK_SCHEDULE_EQUAL: /* prod t/(t+1) telescopes to t_first/(t_last+1) */
    return (double)t_first / ((double)t_last + 1.0);
  case POLYAK_SCHEDULE_POWER:
    return pow((double)t_first / ((double)t_last + 1.0), s->gamma + 1.0);
  case POLYAK_SCHEDULE_TF:
    return tf_product(s, t_first, t_last);
  case POLYAK_SCHEDULE_WARMUP:
  case POLYAK_SCHEDULE_LINEAR:
  case POLYAK_SCHEDULE_COSINE:
    return count <= STEP_BY_STEP_GAP ? step_by_step_product(s, t_first, t_last) : long_gap_product(s, t_first, t_last);
  }
  return NAN;
}

double polyak_beta_product(const polyak_schedule *s, int64_t last_step, int64_t step)
{
  if (!s || polyak_schedule_check(s, NULL, 0) != POLYAK_OK)
    return NAN;
  return polyak_beta_product_checked(s, last_step, step);
}

double polyak_beta_product_checked(const polyak_schedule *s, int64_t last_step, int64_t step)
{
  if (last_step < 0 || step < last_step)
    return NAN;
  if (step == last_step)
    return 1.0;
  if (last_step + 1 <= s->start_step) /* the gap holds a step with beta = 0 */
    return 0.0;
  return product_over_t(s, last_step - s->start_step, step - s->start_step - 1);
}
