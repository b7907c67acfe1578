// test_posthoc.cpp: EDM2 post-hoc averages: the coefficients against least
// squares over numerically integrated profiles, a synthesized sigma_rel
// against a shadow tracked at it in the same run, snapshots and bad inputs.
#include "test_util.h"

#include <cfloat>

using namespace polyak_test;

namespace {

// The profile of a POWER EMA read at t: (gamma + 1) tau^gamma / t^(gamma + 1).
double profile(double tau, double t, double gamma)
{
  return tau > t ? 0.0 : (gamma + 1) * std::pow(tau / t, gamma) / t;
}

// Least squares over profiles sampled by the midpoint rule on [0, t_max]:
// an oracle independent of the closed-form inner products.
std::vector<double> numeric_coefficients(const std::vector<int64_t> &steps, const std::vector<double> &sigmas,
                                         int64_t step, double sigma)
{
  size_t n = steps.size();
  std::vector<double> gammas(n);
  for (size_t i = 0; i < n; i++)
    gammas[i] = polyak_gamma_from_sigma_rel(sigmas[i]);
  double gamma = polyak_gamma_from_sigma_rel(sigma), t_max = (double)step;
  for (int64_t s : steps)
    t_max = std::max(t_max, (double)s);
  const int cells = 400000;
  double h = t_max / cells;
  std::vector<double> a(n * n, 0.0), b(n, 0.0), p(n);
  for (int c = 0; c < cells; c++) {
    double tau = (c + 0.5) * h;
    for (size_t i = 0; i < n; i++)
      p[i] = profile(tau, (double)steps[i], gammas[i]);
    double target = profile(tau, (double)step, gamma);
    for (size_t i = 0; i < n; i++) {
      b[i] += p[i] * target * h;
      for (size_t j = 0; j < n; j++)
        a[i * n + j] += p[i] * p[j] * h;
    }
  }
  for (size_t col = 0; col < n; col++) { // Gauss-Jordan, partial pivoting
    size_t pivot = col;
    for (size_t r = col; r < n; r++)
      if (std::fabs(a[r * n + col]) > std::fabs(a[pivot * n + col]))
        pivot = r;
    for (size_t c = 0; c < n; c++)
      std::swap(a[col * n + c], a[pivot * n + c]);
    std::swap(b[col], b[pivot]);
    for (size_t r = 0; r < n; r++) {
      if (r == col)
        continue;
      double f = a[r * n + col] / a[col * n + col];
      for (size_t c = 0; c < n; c++)
        a[r * n + c] -= f * a[col * n + c];
      b[r] -= f * b[col];
    }
  }
  double sum = 0;
  for (size_t i = 0; i < n; i++)
    sum += b[i] /= a[i * n + i];
  for (double &x : b)
    x /= sum;
  return b;
}

TEST(Posthoc, CoefficientsSolveTheLeastSquaresOverTheProfiles)
{
  const std::vector<int64_t> steps = {400, 400, 800, 800, 1200, 1200};
  const std::vector<double> sigmas = {0.05, 0.10, 0.05, 0.10, 0.05, 0.10};
  for (auto [step, sigma] : std::vector<std::pair<int64_t, double>>{{1200, 0.07}, {1000, 0.12}, {1200, 0.15}}) {
    std::vector<double> got(steps.size());
    ASSERT_EQ(polyak_posthoc_coefficients((int)steps.size(), steps.data(), sigmas.data(), step, sigma, got.data()),
              POLYAK_OK);
    auto want = numeric_coefficients(steps, sigmas, step, sigma);
    double sum = 0;
    for (size_t i = 0; i < got.size(); i++) {
      sum += got[i];
      EXPECT_NEAR(got[i], want[i], 2e-5 * (1 + std::fabs(want[i]))) << "snapshot " << i << " for " << sigma;
    }
    EXPECT_NEAR(sum, 1.0, 1e-12);
  }
}

TEST(Posthoc, AProfileAmongTheSnapshotsTakesAllTheWeight)
{
  const int64_t steps[] = {100, 100, 200, 200, 300, 300};
  const double sigmas[] = {0.05, 0.10, 0.05, 0.10, 0.05, 0.10};
  double c[6];
  ASSERT_EQ(polyak_posthoc_coefficients(6, steps, sigmas, 200, 0.10, c), POLYAK_OK);
  for (int i = 0; i < 6; i++)
    EXPECT_NEAR(c[i], i == 3 ? 1.0 : 0.0, 1e-9) << i;
  double alone;
  ASSERT_EQ(polyak_posthoc_coefficients(1, steps, sigmas, 5000, 0.2, &alone), POLYAK_OK);
  EXPECT_EQ(alone, 1.0) << "one snapshot: normalized to 1";
}

TEST(Posthoc, CoefficientsRefuseBadInputsAndWriteNothing)
{
  const int64_t steps[] = {100, 100, 200};
  const double sigmas[] = {0.05, 0.05, 0.10};
  const int64_t good_steps[] = {100, 200};
  const double good_sigmas[] = {0.05, 0.10}, bad_sigma[] = {0.05, 0.5};
  const int64_t bad_step[] = {100, 0};
  double c[3] = {7, 7, 7};
  EXPECT_EQ(polyak_posthoc_coefficients(3, steps, sigmas, 300, 0.07, c), POLYAK_ERR_INVALID_ARG) << "singular";
  EXPECT_EQ(polyak_posthoc_coefficients(0, good_steps, good_sigmas, 300, 0.07, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(POLYAK_MAX_SNAPSHOTS + 1, good_steps, good_sigmas, 300, 0.07, c),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, good_steps, good_sigmas, 0, 0.07, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, good_steps, good_sigmas, 300, 0.31, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, good_steps, good_sigmas, 300, NAN, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, good_steps, bad_sigma, 300, 0.07, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, bad_step, good_sigmas, 300, 0.07, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, nullptr, good_sigmas, 300, 0.07, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, good_steps, nullptr, 300, 0.07, c), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_posthoc_coefficients(2, good_steps, good_sigmas, 300, 0.07, nullptr), POLYAK_ERR_INVALID_ARG);
  for (double x : c)
    EXPECT_EQ(x, 7.0);
}

// A run with POWER shadows at sigma_rel 0.05 and 0.10 (snapshotted every
// `every` steps) and one tracked directly at `sigma`.
struct PosthocRun {
  std::vector<Tensor> tensors;
  Handle h;
  std::vector<float> stack; // snapshots, one after another
  std::vector<int64_t> steps;
  std::vector<double> sigmas;
  int64_t elems = 0;
  PosthocRun(double sigma, int64_t num_steps, int64_t every)
  {
    polyak_config cfg = cpu_config(3);
    const double tracked[3] = {0.05, 0.10, sigma};
    for (int k = 0; k < 3; k++) {
      cfg.shadows[k].schedule.kind = POLYAK_SCHEDULE_POWER;
      cfg.shadows[k].schedule.gamma = polyak_gamma_from_sigma_rel(tracked[k]);
    }
    tensors.emplace_back("w", POLYAK_F32, 2049);
    tensors.emplace_back("b", POLYAK_BF16, 77, 2);
    h = make_handle(cfg);
    add_all(h.get(), tensors);
    set_params(0);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    EXPECT_EQ(polyak_snapshot_elems(h.get(), &elems), POLYAK_OK);
    for (int64_t step = 1; step <= num_steps; step++) {
      set_params(step);
      EXPECT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
      if (step % every == 0)
        for (int k = 0; k < 2; k++) {
          stack.resize(stack.size() + elems);
          EXPECT_EQ(polyak_snapshot(h.get(), k, stack.data() + stack.size() - elems, nullptr), POLYAK_OK);
          steps.push_back(step);
          sigmas.push_back(tracked[k]);
        }
    }
  }
  // Params that wander: a slow oscillation per element plus noise.
  void set_params(int64_t step)
  {
    std::mt19937_64 rng(3000 + step);
    std::normal_distribution<float> noise(0.0f, 0.2f);
    for (auto &t : tensors)
      for (int64_t e = 0; e < t.num_elems; e++)
        t.set(e, std::sin(0.004f * (float)step + 0.37f * (float)e) + noise(rng));
  }
  double distance_to_shadow(int k) // RMS over every element: params vs shadow k
  {
    double sq = 0;
    int64_t n = 0;
    for (size_t i = 0; i < tensors.size(); i++) {
      auto s = read_shadow(h.get(), k, (int)i, tensors[i].num_elems);
      for (int64_t e = 0; e < tensors[i].num_elems; e++, n++)
        sq += std::pow(tensors[i].get(e) - s[e], 2);
    }
    return std::sqrt(sq / n);
  }
};

TEST(Posthoc, ASynthesizedSigmaRelMatchesTheShadowTrackedAtIt)
{
  const double sigma = 0.07;
  PosthocRun run(sigma, 2000, 100);
  std::vector<double> c(run.steps.size());
  ASSERT_EQ(polyak_posthoc_coefficients((int)c.size(), run.steps.data(), run.sigmas.data(), 2000, sigma, c.data()),
            POLYAK_OK);
  // the synthesis as float64 would do it, from the same snapshots
  std::vector<double> want(run.elems, 0.0);
  for (size_t s = 0; s < c.size(); s++)
    for (int64_t e = 0; e < run.elems; e++)
      want[e] += c[s] * run.stack[s * run.elems + e];
  ASSERT_EQ(polyak_synthesize_to_params(run.h.get(), run.stack.data(), (int)c.size(), c.data(), nullptr), POLYAK_OK)
      << polyak_last_error(run.h.get());
  int64_t base = 0; // tensor 0 starts the arena
  for (int64_t e = 0; e < run.tensors[0].num_elems; e++)
    ASSERT_NEAR(run.tensors[0].get(e), want[base + e], 1e-5 * (1 + std::fabs(want[base + e]))) << e;
  // within 0.1% RMS of the directly tracked average (0.03% measured), where
  // the tracked neighbours at 0.05 and 0.10 are ~600x further away
  double synthesized = run.distance_to_shadow(2);
  double near = std::min(run.distance_to_shadow(0), run.distance_to_shadow(1));
  double scale = 0;
  for (int64_t e = 0; e < run.tensors[0].num_elems; e++)
    scale += std::pow(read_shadow(run.h.get(), 2, 0, run.tensors[0].num_elems)[e], 2);
  scale = std::sqrt(scale / run.tensors[0].num_elems);
  EXPECT_LT(synthesized, 1e-3 * scale) << "RMS error " << synthesized << " of RMS " << scale;
  EXPECT_LT(synthesized * 100, near) << "nearest tracked: " << near;
}

TEST(Posthoc, SnapshotsKeptAsCheckpointFilesSynthesizeTheSame)
{
  // the snapshots as polyak_save files, read back later through a second
  // handle of the same layout: the same floats as snapshots taken live
  polyak_config cfg = cpu_config(2);
  for (int k = 0; k < 2; k++) {
    cfg.shadows[k].schedule.kind = POLYAK_SCHEDULE_POWER;
    cfg.shadows[k].schedule.gamma = polyak_gamma_from_sigma_rel(k == 0 ? 0.05 : 0.10);
  }
  auto make = [&](std::vector<Tensor> &tensors) {
    tensors.emplace_back("w", POLYAK_F32, 300);
    tensors.emplace_back("b", POLYAK_BF16, 33, 2);
    std::mt19937_64 rng(9);
    for (auto &t : tensors)
      t.randomize(rng);
    Handle h = make_handle(cfg);
    add_all(h.get(), tensors);
    EXPECT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
    return h;
  };
  std::vector<Tensor> tensors, reader_tensors;
  Handle h = make(tensors), reader = make(reader_tensors);
  int64_t elems = 0;
  ASSERT_EQ(polyak_snapshot_elems(h.get(), &elems), POLYAK_OK);
  TempDir dir;
  std::vector<float> live, from_files;
  std::vector<std::string> files;
  for (int64_t step = 1; step <= 300; step++) {
    std::mt19937_64 rng(step);
    for (auto &t : tensors)
      t.randomize(rng, std::sin(0.01f * (float)step), 0.3f);
    ASSERT_EQ(polyak_update(h.get(), step, nullptr), POLYAK_OK);
    if (step % 100 == 0) {
      files.push_back(dir.file("step" + std::to_string(step)));
      ASSERT_EQ(polyak_save(h.get(), files.back().c_str()), POLYAK_OK);
      for (int k = 0; k < 2; k++) {
        live.resize(live.size() + elems);
        ASSERT_EQ(polyak_snapshot(h.get(), k, live.data() + live.size() - elems, nullptr), POLYAK_OK);
      }
    }
  }
  for (const auto &file : files) {
    ASSERT_EQ(polyak_load(reader.get(), file.c_str()), POLYAK_OK) << polyak_last_error(reader.get());
    for (int k = 0; k < 2; k++) {
      from_files.resize(from_files.size() + elems);
      ASSERT_EQ(polyak_snapshot(reader.get(), k, from_files.data() + from_files.size() - elems, nullptr), POLYAK_OK);
    }
  }
  ASSERT_EQ(0, std::memcmp(live.data(), from_files.data(), live.size() * sizeof(float)));
}

TEST(Posthoc, SnapshotsAreTheDebiasedShadowsAndBadCallsChangeNothing)
{
  polyak_config cfg = cpu_config(2);
  cfg.zero_init = 1;
  cfg.shadows[1].rounding = POLYAK_ROUND_STOCHASTIC; // the snapshot reads it as any f32 shadow
  std::vector<Tensor> tensors;
  tensors.emplace_back("w", POLYAK_F32, 100);
  tensors.emplace_back("v", POLYAK_F16, 9, 2);
  std::mt19937_64 rng(4);
  for (auto &t : tensors)
    t.randomize(rng);
  Handle h = make_handle(cfg);
  add_all(h.get(), tensors);
  int64_t elems = -1;
  EXPECT_EQ(polyak_snapshot_elems(h.get(), &elems), POLYAK_ERR_STATE);
  ASSERT_EQ(polyak_finalize(h.get(), nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_update(h.get(), 1, nullptr), POLYAK_OK);
  ASSERT_EQ(polyak_snapshot_elems(h.get(), &elems), POLYAK_OK);
  EXPECT_GE(elems, 109);
  std::vector<float> snap(elems);
  ASSERT_EQ(polyak_snapshot(h.get(), 1, snap.data(), nullptr), POLYAK_OK);
  auto w = read_shadow(h.get(), 1, 0, 100);
  for (int64_t e = 0; e < 100; e++)
    ASSERT_EQ(float_bits(snap[e]), float_bits(w[e])) << e; // tensor 0 starts the arena
  EXPECT_EQ(polyak_snapshot(h.get(), 2, snap.data(), nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_snapshot(h.get(), 0, nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_snapshot_elems(h.get(), nullptr), POLYAK_ERR_INVALID_ARG);

  std::vector<float> params_before(100);
  for (int64_t e = 0; e < 100; e++)
    params_before[e] = tensors[0].get(e);
  const double good[1] = {1.0}, nan[1] = {NAN}, huge[1] = {1e300};
  EXPECT_EQ(polyak_synthesize_to_params(h.get(), snap.data(), 0, good, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_synthesize_to_params(h.get(), snap.data(), POLYAK_MAX_SNAPSHOTS + 1, good, nullptr),
            POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_synthesize_to_params(h.get(), nullptr, 1, good, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_synthesize_to_params(h.get(), snap.data(), 1, nullptr, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_synthesize_to_params(h.get(), snap.data(), 1, nan, nullptr), POLYAK_ERR_INVALID_ARG);
  EXPECT_EQ(polyak_synthesize_to_params(h.get(), snap.data(), 1, huge, nullptr), POLYAK_ERR_INVALID_ARG);
  for (int64_t e = 0; e < 100; e++)
    ASSERT_EQ(tensors[0].get(e), params_before[e]);
  ASSERT_EQ(polyak_synthesize_to_params(h.get(), snap.data(), 1, good, nullptr), POLYAK_OK);
  for (int64_t e = 0; e < 100; e++)
    ASSERT_EQ(float_bits(tensors[0].get(e)), float_bits(w[e])) << "one snapshot, weight 1: itself";

  // shadows in the caller's memory are outside snapshots
  polyak_config one = cpu_config(1);
  Handle owned = make_handle(one);
  std::vector<float> param(8, 1.0f), shadow(8);
  int64_t shape[1] = {8};
  ASSERT_EQ(polyak_add_with_shadow(owned.get(), "o", param.data(), POLYAK_F32, 1, shape, shadow.data(), POLYAK_F32, 0),
            POLYAK_OK);
  ASSERT_EQ(polyak_finalize(owned.get(), nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_snapshot_elems(owned.get(), &elems), POLYAK_ERR_UNSUPPORTED);
}

} // namespace
