/*
 * demo.c: noisy minibatch SGD on a least-squares problem with a known
 * optimum, with five averages of the weights kept by polyak in one pass per
 * step. It prints how close each average ends up and how much of the SGD
 * noise it removes, against the theory.
 *
 * Problem: x ~ N(0, I_dim), y = x . theta_star + noise, loss (x.theta - y)^2/2.
 * Fresh minibatches every step, so the optimum is theta_star itself and the
 * SGD iterates fluctuate around it. An EMA with decay beta of iid noise
 * keeps (1-beta)/(1+beta) of its variance; SGD noise is correlated from step
 * to step (lag-1 correlation rho ~ 1 - lr), which raises that to
 * (1-beta)/(1+beta) * (1+rho*beta)/(1-rho*beta).
 *
 * Usage: polyak_demo [steps]   (default 200000)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <polyak.h>

#ifdef POLYAK_DEMO_CUDA
#include <cuda_runtime.h>
#endif

enum { DIM = 32, BATCH = 32, NUM_SHADOWS = 5 };
static const double kLearningRate = 0.05;
static const double kLabelNoise = 1.0;

/* ---- a small deterministic random source --------------------------------- */

static uint64_t rng_state = 0x853C49E6748FEA9Bull;

static double uniform01(void)
{
  rng_state += 0x9E3779B97F4A7C15ull; /* splitmix64 */
  uint64_t z = rng_state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return ((z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double normal(void)
{
  return sqrt(-2.0 * log(uniform01())) * cos(2.0 * M_PI * uniform01());
}

/* ---- where the weights live for polyak --------------------------------------- */

typedef struct {
  polyak_backend backend;
  float *param;   /* what polyak reads: theta itself (CPU) or a device copy */
  float *scratch; /* CUDA: device buffer for read-outs */
} weights_home;

/* Shadow k into host memory: read-outs land on the backend's side. */
static polyak_status read_average(polyak_t *p, const weights_home *home, int k, float *host)
{
  (void)home;
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA) {
    polyak_status s = polyak_get_shadow(p, k, 0, home->scratch, POLYAK_F32, NULL);
    if (s == POLYAK_OK && cudaMemcpy(host, home->scratch, DIM * sizeof(float),
                                     cudaMemcpyDeviceToHost) != cudaSuccess)
      s = POLYAK_ERR_CUDA;
    return s;
  }
#endif
  return polyak_get_shadow(p, k, 0, host, POLYAK_F32, NULL);
}

static int fail(const char *what, polyak_t *p, polyak_status s)
{
  fprintf(stderr, "demo: %s: %s: %s\n", what, polyak_status_name(s), polyak_last_error(p));
  return 1;
}

static double squared_distance(const float *a, const double *b)
{
  double sum = 0.0;
  for (int i = 0; i < DIM; i++)
    sum += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
  return sum;
}

int main(int argc, char **argv)
{
  long steps = argc > 1 ? atol(argv[1]) : 200000;
  if (steps < 1000) {
    fprintf(stderr, "usage: %s [steps >= 1000]\n", argv[0]);
    return 2;
  }
  long burn_in = steps / 10; /* the transient from theta = 0 is gone by then */

  double theta_star[DIM];
  float theta[DIM] = {0};
  for (int i = 0; i < DIM; i++)
    theta_star[i] = normal();

  weights_home home = {POLYAK_BACKEND_CPU, theta, NULL};
#ifdef POLYAK_DEMO_CUDA
  if (polyak_backend_available(POLYAK_BACKEND_CUDA)) {
    home.backend = POLYAK_BACKEND_CUDA;
    if (cudaMalloc((void **)&home.param, sizeof theta) != cudaSuccess ||
        cudaMalloc((void **)&home.scratch, sizeof theta) != cudaSuccess)
      return fprintf(stderr, "demo: cudaMalloc failed\n"), 1;
    cudaMemcpy(home.param, theta, sizeof theta, cudaMemcpyHostToDevice);
  }
#endif

  /* five averages, one pass: EMAs at three horizons, timm's warmup EMA, and
   * the equal average of every iterate after the burn-in */
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.backend = home.backend;
  cfg.num_shadows = NUM_SHADOWS;
  const char *labels[NUM_SHADOWS] = {"ema 0.9", "ema 0.99", "ema 0.999", "warmup (timm)",
                                     "equal (tail)"};
  cfg.schedules[0].beta = 0.9;
  cfg.schedules[1].beta = 0.99;
  cfg.schedules[2].beta = 0.999;
  cfg.schedules[3].kind = POLYAK_SCHEDULE_WARMUP;
  cfg.schedules[3].beta = 0.9999;
  cfg.schedules[4].kind = POLYAK_SCHEDULE_EQUAL;
  cfg.schedules[4].start_step = burn_in;

  polyak_t *p = NULL;
  polyak_status s = polyak_create(&p, &cfg);
  if (s != POLYAK_OK) {
    char why[512];
    polyak_check_config(&cfg, why, sizeof why);
    fprintf(stderr, "demo: polyak_create: %s: %s\n", polyak_status_name(s), why);
    return 1;
  }
  int64_t shape[1] = {DIM};
  if ((s = polyak_add(p, "theta", home.param, POLYAK_F32, 1, shape)) != POLYAK_OK)
    return fail("polyak_add", p, s);
  if ((s = polyak_finalize(p, NULL)) != POLYAK_OK)
    return fail("polyak_finalize", p, s);

  double raw_sq = 0.0, raw_lag = 0.0, shadow_sq[NUM_SHADOWS] = {0};
  float prev_dev[DIM] = {0}, shadow[NUM_SHADOWS][DIM];
  long measured = 0;
  clock_t start = clock();

  for (long step = 1; step <= steps; step++) {
    /* one SGD step on a fresh minibatch */
    double grad[DIM] = {0};
    for (int b = 0; b < BATCH; b++) {
      double x[DIM], residual = kLabelNoise * -normal();
      for (int i = 0; i < DIM; i++) {
        x[i] = normal();
        residual += x[i] * ((double)theta[i] - theta_star[i]);
      }
      for (int i = 0; i < DIM; i++)
        grad[i] += residual * x[i] / BATCH;
    }
    for (int i = 0; i < DIM; i++)
      theta[i] -= (float)(kLearningRate * grad[i]);
#ifdef POLYAK_DEMO_CUDA
    if (home.backend == POLYAK_BACKEND_CUDA)
      cudaMemcpy(home.param, theta, sizeof theta, cudaMemcpyHostToDevice);
#endif

    if ((s = polyak_update(p, step, NULL)) != POLYAK_OK)
      return fail("polyak_update", p, s);

    /* stationary statistics after the burn-in */
    if (step > burn_in) {
      float dev[DIM];
      for (int i = 0; i < DIM; i++) {
        dev[i] = (float)((double)theta[i] - theta_star[i]);
        raw_sq += (double)dev[i] * dev[i];
        raw_lag += (double)dev[i] * prev_dev[i];
        prev_dev[i] = dev[i];
      }
      for (int k = 0; k < NUM_SHADOWS; k++) {
        if ((s = read_average(p, &home, k, shadow[k])) != POLYAK_OK)
          return fail("polyak_get_shadow", p, s);
        shadow_sq[k] += squared_distance(shadow[k], theta_star);
      }
      measured++;
    }
  }
  double seconds = (double)(clock() - start) / CLOCKS_PER_SEC;

  double raw_var = raw_sq / measured; /* E|theta - theta*|^2 */
  double rho = raw_lag / raw_sq;      /* lag-1 correlation of the SGD noise */
  long tail_samples = steps - burn_in;
  printf("polyak %s demo: SGD on least squares, dim %d, batch %d, lr %.2f, %ld steps "
         "(%s backend, %.1f s)\n",
         polyak_version_string(), DIM, BATCH, kLearningRate, steps,
         home.backend == POLYAK_BACKEND_CUDA ? "CUDA" : "CPU", seconds);
  printf("statistics over steps %ld..%ld; SGD noise lag-1 correlation rho = %.3f (1 - lr = %.3f)\n\n",
         burn_in + 1, steps, rho, 1.0 - kLearningRate);
  printf("%-15s %9s %13s   %-27s %-10s %-10s\n", "weights", "beta", "|w - w*| end",
         "variance / raw variance:", "iid", "AR(1)");
  printf("%-15s %9s %13s   %-27s %-10s %-10s\n", "", "", "", "measured", "theory", "theory");
  printf("%-15s %9s %13.5f   %-27.5f %-10s %-10s\n", "raw SGD", "-",
         sqrt(squared_distance(theta, theta_star)), 1.0, "1", "1");
  for (int k = 0; k < NUM_SHADOWS; k++) {
    double beta = polyak_beta_at(&cfg.schedules[k], steps);
    double measured_ratio, iid, ar1;
    if (cfg.schedules[k].kind == POLYAK_SCHEDULE_EQUAL) {
      /* a mean of n correlated samples: one end-of-run draw, not a time average */
      measured_ratio = squared_distance(shadow[k], theta_star) / raw_var;
      iid = 1.0 / tail_samples;
      ar1 = iid * (1.0 + rho) / (1.0 - rho);
    } else {
      measured_ratio = shadow_sq[k] / measured / raw_var;
      iid = (1.0 - beta) / (1.0 + beta);
      ar1 = iid * (1.0 + rho * beta) / (1.0 - rho * beta);
    }
    printf("%-15s %9.6f %13.5f   %-27.5f %-10.5f %-10.5f\n", labels[k], beta,
           sqrt(squared_distance(shadow[k], theta_star)), measured_ratio, iid, ar1);
  }
  printf("\nbeta is the schedule's value at the last step; the equal average's measured\n"
         "ratio is a single end-of-run draw (its theory is for the mean of %ld steps).\n",
         tail_samples);

  polyak_destroy(p);
#ifdef POLYAK_DEMO_CUDA
  if (home.backend == POLYAK_BACKEND_CUDA) {
    cudaFree(home.param);
    cudaFree(home.scratch);
  }
#endif
  return 0;
}
