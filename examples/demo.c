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
 * A second table compares the modes beyond one EMA on the same problem: a
 * blend of two EMAs, SWA's mean of snapshots taken every 1000 steps
 * (count_updates), an EMA whose beta follows the gradient norm, EDM2's
 * post-hoc average for sigma_rel 0.07 synthesized from snapshots of 0.05
 * and 0.10 (against one tracked at 0.07), and Lookahead (k = 5,
 * alpha = 0.5) in a run of its own, since it changes the trajectory.
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

/* Where a read-out goes: the backend's side of `host`. */
static float *readout_buffer(const weights_home *home, float *host)
{
  return home->backend == POLYAK_BACKEND_CUDA ? home->scratch : host;
}

/* After a read-out into readout_buffer(): the values into `host`. */
static polyak_status fetch(const weights_home *home, polyak_status s, float *host)
{
  (void)home, (void)host;
#ifdef POLYAK_DEMO_CUDA
  if (s == POLYAK_OK && home->backend == POLYAK_BACKEND_CUDA &&
      cudaMemcpy(host, home->scratch, DIM * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess)
    s = POLYAK_ERR_CUDA;
#endif
  return s;
}

/* Shadow k into host memory. */
static polyak_status read_average(polyak_t *p, const weights_home *home, int k, float *host)
{
  return fetch(home, polyak_get_shadow(p, k, 0, readout_buffer(home, host), POLYAK_F32, NULL), host);
}

/* The blend sum_k weights[k] * shadow_k into host memory. */
static polyak_status read_blend(polyak_t *p, const weights_home *home, const double *weights, float *host)
{
  return fetch(home, polyak_get_blend(p, weights, 0, 0, readout_buffer(home, host), POLYAK_F32, NULL), host);
}

/* theta into polyak's copy (CUDA), and back after polyak wrote it (Lookahead). */
static void upload(const weights_home *home, const float *theta)
{
  (void)home, (void)theta;
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA)
    cudaMemcpy(home->param, theta, DIM * sizeof(float), cudaMemcpyHostToDevice);
#endif
}

static void download(const weights_home *home, float *theta)
{
  (void)home, (void)theta;
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA)
    cudaMemcpy(theta, home->param, DIM * sizeof(float), cudaMemcpyDeviceToHost);
#endif
}

#ifdef POLYAK_DEMO_CUDA
/* 1 if the CUDA backend can run here; if not, and `say`, why not. */
static int cuda_usable(int say)
{
  polyak_config probe;
  char reason[512] = "";
  polyak_config_init(&probe);
  probe.backend = POLYAK_BACKEND_CUDA;
  if (polyak_check_config(&probe, reason, sizeof reason) == POLYAK_OK)
    return 1;
  if (say)
    printf("demo: the CUDA backend cannot run here (%s): running on the CPU\n\n", reason);
  return 0;
}
#endif

/* theta (DIM floats) on the backend's side: a device copy for CUDA. */
static int home_init(weights_home *home, float *theta)
{
  home->backend = POLYAK_BACKEND_CPU;
  home->param = theta;
  home->scratch = NULL;
#ifdef POLYAK_DEMO_CUDA
  if (cuda_usable(0)) {
    home->backend = POLYAK_BACKEND_CUDA;
    if (cudaMalloc((void **)&home->param, DIM * sizeof(float)) != cudaSuccess ||
        cudaMalloc((void **)&home->scratch, DIM * sizeof(float)) != cudaSuccess)
      return fprintf(stderr, "demo: cudaMalloc failed\n"), -1;
    upload(home, theta);
  }
#endif
  return 0;
}

static void home_free(weights_home *home)
{
  (void)home;
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA) {
    cudaFree(home->param);
    cudaFree(home->scratch);
  }
#endif
}

/* A handle on theta with cfg's shadows (cfg->backend set from home). */
static polyak_t *averages_of(const weights_home *home, polyak_config *cfg)
{
  cfg->backend = home->backend;
  polyak_t *p = NULL;
  polyak_status s = polyak_create(&p, cfg);
  if (s != POLYAK_OK) {
    char why[512];
    polyak_check_config(cfg, why, sizeof why);
    fprintf(stderr, "demo: polyak_create: %s: %s\n", polyak_status_name(s), why);
    return NULL;
  }
  int64_t shape[1] = {DIM};
  if ((s = polyak_add(p, "theta", home->param, POLYAK_F32, 1, shape)) == POLYAK_OK)
    s = polyak_finalize(p, NULL);
  if (s != POLYAK_OK) {
    fprintf(stderr, "demo: registering theta: %s: %s\n", polyak_status_name(s), polyak_last_error(p));
    polyak_destroy(p);
    return NULL;
  }
  return p;
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

/* One SGD step on a fresh minibatch; returns the gradient's norm. */
static double sgd_step(float *theta, const double *theta_star)
{
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
  double norm_sq = 0.0;
  for (int i = 0; i < DIM; i++) {
    theta[i] -= (float)(kLearningRate * grad[i]);
    norm_sq += grad[i] * grad[i];
  }
  return sqrt(norm_sq);
}

/* One float on the backend's side (the gradient norm polyak reads). */
static float *scalar_on(const weights_home *home, float *host)
{
  float *scalar = host;
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA && cudaMalloc((void **)&scalar, sizeof *scalar) != cudaSuccess)
    return NULL;
#else
  (void)home;
#endif
  return scalar;
}

static void set_scalar(const weights_home *home, float *scalar, float value)
{
  (void)home;
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA) {
    cudaMemcpy(scalar, &value, sizeof value, cudaMemcpyHostToDevice);
    return;
  }
#endif
  *scalar = value;
}

/* EDM2 post-hoc: POWER shadows at sigma_rel 0.05 and 0.10 snapshotted
 * along the run, and one tracked at 0.07 to check the synthesis against. */
enum { EDM2_SNAPSHOTS = 40 };
static const double kEdm2Sigma[3] = {0.05, 0.10, 0.07};

typedef struct {
  polyak_t *p;
  float *stack; /* EDM2_SNAPSHOTS snapshots of DIM-element arenas, backend side */
  int64_t steps[EDM2_SNAPSHOTS];
  double sigmas[EDM2_SNAPSHOTS];
  int count;
} edm2_run;

static int edm2_init(edm2_run *e, const weights_home *home)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = 3;
  for (int k = 0; k < 3; k++) {
    cfg.shadows[k].schedule.kind = POLYAK_SCHEDULE_POWER;
    cfg.shadows[k].schedule.gamma = polyak_gamma_from_sigma_rel(kEdm2Sigma[k]);
  }
  e->count = 0;
  e->p = averages_of(home, &cfg);
  int64_t elems = 0;
  if (!e->p || polyak_snapshot_elems(e->p, &elems) != POLYAK_OK)
    return -1;
  size_t bytes = (size_t)EDM2_SNAPSHOTS * (size_t)elems * sizeof(float);
  e->stack = malloc(bytes);
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA) {
    free(e->stack);
    if (cudaMalloc((void **)&e->stack, bytes) != cudaSuccess)
      e->stack = NULL;
  }
#endif
  return e->stack ? 0 : -1;
}

/* Snapshots of the 0.05 and 0.10 shadows at `step`. */
static polyak_status edm2_snapshot(edm2_run *e, int64_t step)
{
  int64_t elems = 0;
  polyak_status s = polyak_snapshot_elems(e->p, &elems);
  for (int k = 0; k < 2 && s == POLYAK_OK && e->count < EDM2_SNAPSHOTS; k++, e->count++) {
    s = polyak_snapshot(e->p, k, e->stack + (size_t)e->count * (size_t)elems, NULL);
    e->steps[e->count] = step;
    e->sigmas[e->count] = kEdm2Sigma[k];
  }
  return s;
}

/* The synthesized sigma_rel 0.07 at `step` into `out`, the params kept. */
static polyak_status edm2_synthesize(edm2_run *e, const weights_home *home, int64_t step, float *out)
{
  double coefficients[EDM2_SNAPSHOTS];
  polyak_status s = polyak_posthoc_coefficients(e->count, e->steps, e->sigmas, step, kEdm2Sigma[2], coefficients);
  if (s == POLYAK_OK)
    s = polyak_store(e->p, NULL);
  if (s == POLYAK_OK)
    s = polyak_synthesize_to_params(e->p, e->stack, e->count, coefficients, NULL);
  if (s == POLYAK_OK) {
    float *params = home->param;
#ifdef POLYAK_DEMO_CUDA
    if (home->backend == POLYAK_BACKEND_CUDA) {
      cudaMemcpy(out, home->param, DIM * sizeof(float), cudaMemcpyDeviceToHost);
      params = out;
    }
#endif
    for (int i = 0; i < DIM; i++)
      out[i] = params[i];
    s = polyak_restore(e->p, NULL);
  }
  return s;
}

static void edm2_free(edm2_run *e, const weights_home *home)
{
  (void)home;
  polyak_destroy(e->p);
#ifdef POLYAK_DEMO_CUDA
  if (home->backend == POLYAK_BACKEND_CUDA) {
    cudaFree(e->stack);
    return;
  }
#endif
  free(e->stack);
}

/* Lookahead in a run of its own (it writes the weights back): the time
 * averages of |w - w*|^2 over the steps after burn_in, of the fast weights
 * (what SGD steps from) and of the slow ones. */
static int lookahead_run(long steps, long burn_in, const double *theta_star, double *fast_sq, double *slow_sq)
{
  float theta[DIM] = {0}, slow[DIM];
  weights_home home;
  if (home_init(&home, theta) != 0)
    return 1;
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.lookahead_every = 5;            /* k */
  cfg.shadows[0].schedule.beta = 0.5; /* alpha = 1 - beta */
  polyak_t *p = averages_of(&home, &cfg);
  if (!p)
    return 1;
  polyak_status s = POLYAK_OK;
  *fast_sq = *slow_sq = 0.0;
  for (long step = 1; step <= steps && s == POLYAK_OK; step++) {
    sgd_step(theta, theta_star);
    upload(&home, theta);
    s = polyak_update(p, step, NULL);
    if (step % cfg.lookahead_every == 0)
      download(&home, theta); /* the fast weights restart from the slow ones */
    if (s == POLYAK_OK && step > burn_in) {
      s = read_average(p, &home, 0, slow);
      *fast_sq += squared_distance(theta, theta_star) / (steps - burn_in);
      *slow_sq += squared_distance(slow, theta_star) / (steps - burn_in);
    }
  }
  int failed = s != POLYAK_OK ? fail("lookahead run", p, s) : 0;
  polyak_destroy(p);
  home_free(&home);
  return failed;
}

int main(int argc, char **argv)
{
  long steps = argc > 1 ? atol(argv[1]) : 200000;
  if (steps < 1000) {
    fprintf(stderr, "usage: %s [steps >= 1000]\n", argv[0]);
    return 2;
  }
  long burn_in = steps / 10; /* the transient from theta = 0 is gone by then */
  const long swa_every = 1000;

  double theta_star[DIM];
  float theta[DIM] = {0};
  for (int i = 0; i < DIM; i++)
    theta_star[i] = normal();
#ifdef POLYAK_DEMO_CUDA
  cuda_usable(1); /* says why not, once */
#endif
  weights_home home;
  if (home_init(&home, theta) != 0)
    return 1;

  /* five averages, one pass: EMAs at three horizons, timm's warmup EMA, and
   * the equal average of every iterate after the burn-in */
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = NUM_SHADOWS;
  const char *labels[NUM_SHADOWS] = {"ema 0.9", "ema 0.99", "ema 0.999", "warmup (timm)", "equal (tail)"};
  cfg.shadows[0].schedule.beta = 0.9;
  cfg.shadows[1].schedule.beta = 0.99;
  cfg.shadows[2].schedule.beta = 0.999;
  cfg.shadows[3].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[3].schedule.beta = 0.9999;
  cfg.shadows[4].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  cfg.shadows[4].schedule.start_step = burn_in;
  polyak_t *p = averages_of(&home, &cfg);

  /* SWA: the plain mean of snapshots every swa_every steps after burn-in */
  polyak_config swa_cfg;
  polyak_config_init(&swa_cfg);
  swa_cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_EQUAL;
  swa_cfg.shadows[0].schedule.start_step = burn_in;
  swa_cfg.shadows[0].count_updates = 1;
  polyak_t *swa = p ? averages_of(&home, &swa_cfg) : NULL;
  if (!swa)
    return polyak_destroy(p), 1;
  const double blend_weights[NUM_SHADOWS] = {0, 0.5, 0.5, 0, 0};

  polyak_status s;
  /* an EMA whose beta follows the gradient norm: 1 - c / sqrt(1 + |g|^2) */
  polyak_config gn_cfg;
  polyak_config_init(&gn_cfg);
  gn_cfg.shadows[0].grad_norm_c = 0.01;
  float grad_norm_host = 0.0f, *grad_norm = scalar_on(&home, &grad_norm_host);
  polyak_t *gn = averages_of(&home, &gn_cfg);
  if (!gn || !grad_norm || (s = polyak_set_grad_norm(gn, grad_norm)) != POLYAK_OK)
    return fprintf(stderr, "demo: the grad-norm average: %s\n", gn ? polyak_last_error(gn) : "create failed"), 1;
  edm2_run edm2;
  if (edm2_init(&edm2, &home) != 0)
    return fprintf(stderr, "demo: the EDM2 average: %s\n", edm2.p ? polyak_last_error(edm2.p) : "create failed"), 1;
  const long snapshot_every = steps / (EDM2_SNAPSHOTS / 2);

  double raw_sq = 0.0, raw_lag = 0.0, shadow_sq[NUM_SHADOWS] = {0}, blend_sq = 0.0, gn_sq = 0.0, norm_sum = 0.0;
  float norm = 0.0f;
  float prev_dev[DIM] = {0}, shadow[NUM_SHADOWS][DIM], blend[DIM], swa_mean[DIM], gn_mean[DIM];
  long measured = 0, swa_snapshots = 0;
  clock_t start = clock();

  for (long step = 1; step <= steps; step++) {
    norm = (float)sgd_step(theta, theta_star);
    set_scalar(&home, grad_norm, norm);
    upload(&home, theta);
    if ((s = polyak_update(p, step, NULL)) != POLYAK_OK)
      return fail("polyak_update", p, s);
    if ((s = polyak_update(gn, step, NULL)) != POLYAK_OK)
      return fail("polyak_update (grad norm)", gn, s);
    if ((s = polyak_update(edm2.p, step, NULL)) != POLYAK_OK ||
        (step % snapshot_every == 0 && (s = edm2_snapshot(&edm2, step)) != POLYAK_OK))
      return fail("EDM2 update or snapshot", edm2.p, s);
    if (step > burn_in && step % swa_every == 0) {
      if ((s = polyak_update(swa, step, NULL)) != POLYAK_OK)
        return fail("polyak_update (SWA)", swa, s);
      swa_snapshots++;
    }

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
      if ((s = read_blend(p, &home, blend_weights, blend)) != POLYAK_OK)
        return fail("polyak_get_blend", p, s);
      blend_sq += squared_distance(blend, theta_star);
      if ((s = read_average(gn, &home, 0, gn_mean)) != POLYAK_OK)
        return fail("polyak_get_shadow (grad norm)", gn, s);
      gn_sq += squared_distance(gn_mean, theta_star);
      norm_sum += norm;
      measured++;
    }
  }
  if ((s = read_average(swa, &home, 0, swa_mean)) != POLYAK_OK)
    return fail("polyak_get_shadow (SWA)", swa, s);
  double seconds = (double)(clock() - start) / CLOCKS_PER_SEC;

  double raw_var = raw_sq / measured; /* E|theta - theta*|^2 */
  double rho = raw_lag / raw_sq;      /* lag-1 correlation of the SGD noise */
  long tail_samples = steps - burn_in;
  printf("polyak %s demo: SGD on least squares, dim %d, batch %d, lr %.2f, %ld steps "
         "(%s backend, %.1f s)\n",
         polyak_version_string(), DIM, BATCH, kLearningRate, steps,
         home.backend == POLYAK_BACKEND_CUDA ? "CUDA" : "CPU", seconds);
  printf("statistics over steps %ld..%ld; SGD noise lag-1 correlation rho = %.3f (1 - lr = %.3f)\n\n", burn_in + 1,
         steps, rho, 1.0 - kLearningRate);
  printf("%-15s %9s %13s   %-27s %-10s %-10s\n", "weights", "beta", "|w - w*| end", "variance / raw variance:", "iid",
         "AR(1)");
  printf("%-15s %9s %13s   %-27s %-10s %-10s\n", "", "", "", "measured", "theory", "theory");
  printf("%-15s %9s %13.5f   %-27.5f %-10s %-10s\n", "raw SGD", "-", sqrt(squared_distance(theta, theta_star)), 1.0,
         "1", "1");
  for (int k = 0; k < NUM_SHADOWS; k++) {
    double beta = polyak_beta_at(&cfg.shadows[k].schedule, steps);
    double measured_ratio, iid, ar1;
    if (cfg.shadows[k].schedule.kind == POLYAK_SCHEDULE_EQUAL) {
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

  /* ---- modes beyond one EMA ---- */
  double la_fast_sq = 0.0, la_slow_sq = 0.0;
  clock_t la_start = clock();
  if (lookahead_run(steps, burn_in, theta_star, &la_fast_sq, &la_slow_sq) != 0)
    return 1;
  printf("\nmodes beyond one EMA, same problem (Lookahead: a second run, %.1f s)\n\n",
         (double)(clock() - la_start) / CLOCKS_PER_SEC);
  printf("%-38s %13s   %s\n", "weights", "|w - w*| end", "variance / raw variance");
  printf("%-38s %13.5f   %.5f (time average)\n", "blend 0.5 ema 0.99 + 0.5 ema 0.999",
         sqrt(squared_distance(blend, theta_star)), blend_sq / measured / raw_var);
  char swa_label[64];
  snprintf(swa_label, sizeof swa_label, "SWA, %ld snapshots %ld steps apart", swa_snapshots, swa_every);
  printf("%-38s %13.5f   %.5f (one draw; iid theory %.5f)\n", swa_label, sqrt(squared_distance(swa_mean, theta_star)),
         squared_distance(swa_mean, theta_star) / raw_var, 1.0 / (double)swa_snapshots);
  double mean_norm = norm_sum / measured;
  printf("%-38s %13.5f   %.5f (time average); mean |g| %.2f: beta %.4f\n", "grad-norm beta, c = 0.01",
         sqrt(squared_distance(gn_mean, theta_star)), gn_sq / measured / raw_var, mean_norm,
         1.0 - 0.01 / sqrt(1.0 + mean_norm * mean_norm));
  float tracked[DIM], synthesized[DIM];
  if ((s = read_average(edm2.p, &home, 2, tracked)) != POLYAK_OK ||
      (s = edm2_synthesize(&edm2, &home, steps, synthesized)) != POLYAK_OK)
    return fail("EDM2 synthesis", edm2.p, s);
  double gap_sq = 0.0;
  for (int i = 0; i < DIM; i++)
    gap_sq += ((double)synthesized[i] - tracked[i]) * ((double)synthesized[i] - tracked[i]);
  char edm2_label[64];
  snprintf(edm2_label, sizeof edm2_label, "EDM2 sigma_rel 0.07 from %d snapshots", edm2.count);
  printf("%-38s %13.5f   %.5f (one draw); %.1e from the tracked 0.07\n", edm2_label,
         sqrt(squared_distance(synthesized, theta_star)), squared_distance(synthesized, theta_star) / raw_var,
         sqrt(gap_sq));
  printf("%-38s %13.5f   %.5f (one draw)\n", "EDM2 sigma_rel 0.07 tracked", sqrt(squared_distance(tracked, theta_star)),
         squared_distance(tracked, theta_star) / raw_var);
  printf("%-38s %13s   %.5f (time average)\n", "Lookahead k=5 alpha=0.5, fast weights", "", la_fast_sq / raw_var);
  printf("%-38s %13s   %.5f (time average)\n", "Lookahead k=5 alpha=0.5, slow weights", "", la_slow_sq / raw_var);

  edm2_free(&edm2, &home);
  polyak_destroy(gn);
  polyak_destroy(swa);
  polyak_destroy(p);
#ifdef POLYAK_DEMO_CUDA
  if (home.backend == POLYAK_BACKEND_CUDA)
    cudaFree(grad_norm);
#endif
  home_free(&home);
  return 0;
}
