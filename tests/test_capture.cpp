// test_capture.cpp: calls that a CUDA graph capture cannot hold refuse
// while one is under way, with POLYAK_ERR_STATE, changing nothing. The
// backend is the CPU's with a stand-in for what the CUDA backend sees of
// captures: a captured stream, or a capture under way elsewhere (a blocking
// stream's, or the one the handle's graph update joined).
#include "test_util.h"

#include "polyak_internal.h"

using namespace polyak_test;

namespace {

// What the stand-in reports.
void *captured_stream = nullptr; // this stream is being captured (nullptr: none)
int under_way = 0;               // a capture is under way elsewhere

polyak_status standin_capturing(polyak_t *, void *stream, int *capturing)
{
  *capturing = captured_stream != nullptr && stream == captured_stream;
  return POLYAK_OK;
}

polyak_status standin_under_way(polyak_t *, int *capturing)
{
  *capturing = under_way;
  return POLYAK_OK;
}

void *const CAPTURED = reinterpret_cast<void *>(0x5);
void *const OTHER = reinterpret_cast<void *>(0x9);

// A finalized CPU handle (3 shadows: EMA, grad-norm, LAWA) whose backend
// reports captures as the test says.
struct Captured : ::testing::Test {
  std::vector<Tensor> tensors;
  std::vector<void *> grads;
  std::vector<Tensor> grad_tensors;
  std::vector<float> layer_norms{0.5f, 1.5f};
  float norm = 2.0f, other_norm = 5.0f;
  Handle h;
  polyak_backend_ops standin;
  polyak_t *p = nullptr;

  void SetUp() override
  {
    polyak_config cfg = cpu_config(3);
    cfg.shadows[1].grad_norm_c = 0.3;
    cfg.shadows[2].layerwise_beta0 = 0.9;
    h = make_handle(cfg);
    p = h.get();
    std::mt19937_64 rng(3);
    for (int i = 0; i < 2; i++) {
      tensors.emplace_back("t" + std::to_string(i), POLYAK_F32, 100 + 30 * i);
      tensors.back().randomize(rng, 0.5f);
      grad_tensors.emplace_back("g" + std::to_string(i), POLYAK_F32, 100 + 30 * i);
      grad_tensors.back().randomize(rng, 0.0f, 0.1f);
      grads.push_back(grad_tensors.back().data());
    }
    add_all(p, tensors);
    ASSERT_EQ(polyak_finalize(p, nullptr), POLYAK_OK);
    ASSERT_EQ(polyak_set_grad_norm(p, &norm), POLYAK_OK);
    ASSERT_EQ(polyak_set_grads(p, grads.data()), POLYAK_OK);
    ASSERT_EQ(polyak_update(p, 1, nullptr), POLYAK_OK);
    standin = polyak_cpu_ops;
    standin.capturing = standin_capturing;
    standin.capture_under_way = standin_under_way;
    p->ops = &standin;
  }
  void TearDown() override
  {
    captured_stream = nullptr;
    under_way = 0;
  }
  void expect_refused(const char *what, polyak_status status)
  {
    EXPECT_EQ(status, POLYAK_ERR_STATE) << what;
    EXPECT_TRUE(contains(polyak_last_error(p), "being captured")) << what << ": " << polyak_last_error(p);
  }
};

// store, restore, a reservation, a hard update: each on a stream being
// captured, refused; nothing pending, reserved or reset afterwards.
TEST_F(Captured, CallsThatWaitOrChangeHostStateRefuseOnACapturedStream)
{
  captured_stream = CAPTURED;
  Snapshot before = snapshot(p, 3, tensors);
  expect_refused("polyak_store", polyak_store(p, CAPTURED));
  expect_refused("polyak_graph_reserve", polyak_graph_reserve(p, 2, 4, CAPTURED));
  EXPECT_EQ(polyak_hard_update(p, 0, CAPTURED), POLYAK_ERR_STATE);
  captured_stream = nullptr;
  EXPECT_TRUE(snapshot(p, 3, tensors) == before) << "the shadows, the step and the count are as they were";
  EXPECT_EQ(polyak_restore(p, nullptr), POLYAK_ERR_STATE) << "nothing was stored";
  EXPECT_EQ(polyak_graph_update(p, nullptr), POLYAK_ERR_STATE) << "nothing was reserved";
  double product = -1;
  ASSERT_EQ(polyak_get_beta_product(p, 0, &product), POLYAK_OK);
  EXPECT_GT(product, 0.0) << "no hard update reset it";

  // a store made outside the capture, then its restore inside: refused too
  ASSERT_EQ(polyak_store(p, nullptr), POLYAK_OK);
  captured_stream = CAPTURED;
  expect_refused("polyak_restore", polyak_restore(p, CAPTURED));
  captured_stream = nullptr;
  EXPECT_EQ(polyak_update(p, 2, nullptr), POLYAK_ERR_STATE) << "the store is still pending";
  EXPECT_EQ(polyak_restore(p, nullptr), POLYAK_OK);
}

// Calls that take no stream refuse while the backend sees a capture under
// way, and change nothing: the grad norm, the gradients, the store and a
// reservation stay as they were.
TEST_F(Captured, CallsWithoutAStreamRefuseWhileACaptureIsUnderWay)
{
  ASSERT_EQ(polyak_store(p, nullptr), POLYAK_OK);
  under_way = 1;
  std::vector<void *> other_grads = {grads[1], grads[0]};
  int64_t count = -1;
  double product = -1;
  std::vector<double> betas(2);
  expect_refused("polyak_set_grad_norm", polyak_set_grad_norm(p, &other_norm));
  expect_refused("polyak_set_grads", polyak_set_grads(p, other_grads.data()));
  expect_refused("polyak_set_layer_norms", polyak_set_layer_norms(p, layer_norms.data()));
  expect_refused("polyak_discard_store", polyak_discard_store(p));
  expect_refused("polyak_nonfinite_count", polyak_nonfinite_count(p, &count));
  expect_refused("polyak_get_beta_product (grad-norm)", polyak_get_beta_product(p, 1, &product));
  expect_refused("polyak_get_layer_betas", polyak_get_layer_betas(p, 2, betas.data()));
  expect_refused("polyak_restore on another stream", polyak_restore(p, OTHER));
  EXPECT_EQ(count, -1);
  EXPECT_EQ(product, -1);
  under_way = 0;
  EXPECT_EQ(p->grad_norm, &norm);
  EXPECT_EQ(p->layer_source, 1) << "still the gradients";
  EXPECT_EQ(p->grads_set[0], grads[0]);
  EXPECT_EQ(polyak_update(p, 2, nullptr), POLYAK_ERR_STATE) << "the store is still pending";
  ASSERT_EQ(polyak_restore(p, nullptr), POLYAK_OK);

  // a reservation's release waits for the device: refused, still reserved
  ASSERT_EQ(polyak_graph_reserve(p, 2, 2, nullptr), POLYAK_OK);
  under_way = 1;
  int64_t done = -1;
  expect_refused("polyak_graph_release", polyak_graph_release(p, &done));
  EXPECT_EQ(done, -1);
  under_way = 0;
  EXPECT_EQ(polyak_graph_update(p, nullptr), POLYAK_OK) << "still reserved";
  ASSERT_EQ(polyak_graph_release(p, &done), POLYAK_OK);
  EXPECT_EQ(done, 1);
}

// A capture elsewhere does not stop what only enqueues work on a stream
// of its own: updates, graph updates, read-outs, the host's beta product.
TEST_F(Captured, UpdatesAndReadOutsOnOtherStreamsGoOnDuringACaptureElsewhere)
{
  under_way = 1;
  ASSERT_EQ(polyak_update(p, 2, OTHER), POLYAK_OK) << polyak_last_error(p);
  std::vector<float> out(100);
  EXPECT_EQ(polyak_get_shadow(p, 0, 0, out.data(), POLYAK_F32, OTHER), POLYAK_OK) << polyak_last_error(p);
  double product = -1;
  EXPECT_EQ(polyak_get_beta_product(p, 0, &product), POLYAK_OK) << "the host keeps it: nothing waits";
  EXPECT_EQ(polyak_copy_to_params(p, 0, OTHER), POLYAK_OK) << polyak_last_error(p);
  under_way = 0;
  int64_t step = -1;
  ASSERT_EQ(polyak_get_step(p, &step), POLYAK_OK);
  EXPECT_EQ(step, 2);
}

// The gradients' table set again unchanged changes nothing and waits for
// nothing, so it is accepted during a capture and a reservation: a trainer
// may set it before every update (fresh .grad tensors usually reuse their
// addresses). A changed table is refused there.
TEST_F(Captured, TheSameGradientsSetAgainAreAcceptedEvenDuringACapture)
{
  ASSERT_EQ(polyak_graph_reserve(p, 2, 2, nullptr), POLYAK_OK);
  under_way = 1;
  EXPECT_EQ(polyak_set_grads(p, grads.data()), POLYAK_OK) << polyak_last_error(p);
  std::vector<void *> other_grads = {grads[1], grads[0]};
  EXPECT_EQ(polyak_set_grads(p, other_grads.data()), POLYAK_ERR_STATE);
  under_way = 0;
  EXPECT_EQ(polyak_set_grads(p, other_grads.data()), POLYAK_ERR_STATE) << "reserved";
  ASSERT_EQ(polyak_graph_release(p, nullptr), POLYAK_OK);
  EXPECT_EQ(polyak_set_grads(p, other_grads.data()), POLYAK_OK) << polyak_last_error(p);
  EXPECT_EQ(p->grads_set[0], grads[1]);
}

} // namespace
