"""What adaptive shadows read besides the params, through polyak.torch.EMA on the CPU: LAWA's gradients
followed across zero_grad(set_to_none=True), missing and held ones, the table's length; grad norms given
fresh each step. The CUDA side (streams, captures) is in test_cuda.py."""
import math

import pytest

torch = pytest.importorskip("torch")
import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402


class Net(torch.nn.Module):
    """Two dtypes, a BatchNorm (averaged buffers without gradients, a copied one) and a frozen param."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 9)
        self.norm = torch.nn.BatchNorm1d(9)
        self.b = torch.nn.Linear(9, 4).to(torch.bfloat16)
        self.frozen = torch.nn.Parameter(torch.randn(300), requires_grad=False)

    def forward(self, x):
        return self.b(self.norm(self.a(x)).to(torch.bfloat16)).float().pow(2).sum() + self.frozen.sum()


@pytest.fixture
def gen():
    torch.manual_seed(5)
    return torch.Generator().manual_seed(5)


def backward(model, gen, scale=1.0):
    model.train()
    inputs = model[0].in_features if isinstance(model, torch.nn.Sequential) else 6
    model(torch.randn(8, inputs, generator=gen) * scale).pow(2).sum().backward()


def expected_betas(ema, beta0):
    """LAWA's rule from the current .grad of every averaged tensor (None: zero), by name."""
    tensors = {s.name: s.tensor for s in ema._averaged}
    norms = {n: 0.0 if tensors[n].grad is None else tensors[n].grad.double().norm().item() for n in ema.names}
    total = sum(norms.values())
    return {n: beta0 * math.exp(-norms[n] / total) for n in ema.names}


def assert_betas(ema, expected):
    got = ema.handle.layer_betas(0)
    for name, beta in expected.items():
        assert got[ema.handle.find_tensor(name)] == pytest.approx(beta, rel=1e-6), name


def test_layerwise_reads_each_steps_fresh_gradients(gen):
    """zero_grad(set_to_none=True) makes new .grad tensors every step: every update reads those of its
    step, not the first step's (set_grads() called once, as the docs used to say, or never)."""
    for call_set_grads in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
        for step in range(1, 6):
            opt.zero_grad(set_to_none=True)
            backward(model, gen, scale=float(step))
            if step == 1 and call_set_grads:
                ema.set_grads()
            expected = expected_betas(ema, 0.9)
            opt.step()
            ema.update(step)
            assert_betas(ema, expected)


def test_missing_gradients_count_as_zero_and_copied_buffers_get_no_slot(gen):
    model = Net()
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.95), polyak.Constant(0.9)])
    assert ema.handle.num_tensors == len(ema.names) + 1  # num_batches_tracked, copied
    backward(model, gen)
    expected = expected_betas(ema, 0.95)
    for name in ("frozen", "norm.running_mean", "norm.running_var"):  # no gradient: beta0
        assert expected[name] == 0.95
    ema.update(1)
    assert_betas(ema, expected)
    model.zero_grad(set_to_none=True)
    model.a.weight.grad = torch.ones_like(model.a.weight)  # one gradient only: the others zero
    ema.update(2)
    assert_betas(ema, {**dict.fromkeys(ema.names, 0.95), "a.weight": 0.95 * math.exp(-1.0)})


def test_an_update_without_any_gradient_is_refused(gen):
    model = Net()
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    backward(model, gen)
    ema.update(1)
    before = ema.model_state_dict()
    model.zero_grad(set_to_none=True)  # cleared before the update
    with pytest.raises(polyak.StateError, match="None"):
        ema.update(2)
    assert ema.step == 1
    for name, value in ema.model_state_dict().items():
        assert torch.equal(value, before[name]), name


def test_an_unchanged_table_is_not_passed_again(gen, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    calls = []  # the tables passed to polyak_set_grads
    call = ema.handle._call

    def counted(name, *args):
        if name == "polyak_set_grads":
            calls.append(list(args[0]))
        return call(name, *args)
    monkeypatch.setattr(ema.handle, "_call", counted)
    for step in range(1, 6):
        model.zero_grad(set_to_none=False)  # the .grad tensors stay where they are
        backward(model, gen)
        ema.update(step)
    assert len(calls) == 1
    held = [p.grad for p in model.parameters()]  # kept: the next ones cannot take their memory
    model.zero_grad(set_to_none=True)
    backward(model, gen)
    expected = expected_betas(ema, 0.9)
    ema.update(6)
    assert len(calls) == 2 and calls[1] != calls[0] and held
    assert_betas(ema, expected)


def test_given_gradients_are_read_until_set_again(gen):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    backward(model, gen)
    given = [p.grad.clone() for p in model.parameters()]
    expected = expected_betas(ema, 0.9)
    ema.set_grads(given)
    model.zero_grad(set_to_none=True)
    backward(model, gen, scale=3.0)  # the params' own gradients: not read
    ema.update(1)
    assert_betas(ema, expected)
    with pytest.raises(polyak.InvalidArgError, match="gradients for"):
        ema.set_grads(given[:1])
    with pytest.raises(polyak.InvalidArgError, match="not like the param"):
        ema.set_grads([given[0].t().contiguous()] + given[1:])
    with pytest.raises(polyak.InvalidArgError, match="registered tensors"):  # the library reads one per tensor
        ema.handle.set_grads([g.data_ptr() for g in given[:-1]])
    ema.set_grads()  # back to following .grad
    expected = expected_betas(ema, 0.9)
    ema.update(2)
    assert_betas(ema, expected)


def test_moved_gradients_are_refused_by_graph_update(gen):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    backward(model, gen)
    ema.graph_reserve(1, 2)  # sets the table the replays read
    ema.graph_update()
    held = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    backward(model, gen)  # new addresses: the old ones are held
    with pytest.raises(polyak.StateError, match="moved"):
        ema.graph_update()
    assert ema.graph_release() == 1 and held


def test_a_grad_norm_given_fresh_each_step_is_read_by_its_update(gen):
    model = torch.nn.Linear(5, 3)
    ema = EMA(model, schedules=[polyak.GradNorm(c=0.5)])
    ref = {k: v.double().clone() for k, v in model.state_dict().items()}
    for step, norm in enumerate((3.0, 0.5, 7.0), start=1):
        ema.set_grad_norm(torch.tensor([norm]))  # a new tensor each step, as clip_grad_norm_ returns
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.rand(p.shape, generator=gen))
        ema.update(step)
        beta = 1 - 0.5 / math.sqrt(1 + norm * norm)
        ref = {k: beta * ref[k] + (1 - beta) * v.double() for k, v in model.state_dict().items()}
    got = ema.model_state_dict(dtype=torch.float32)
    for k, v in ref.items():
        assert (got[k].double() - v).abs().max() < 1e-5, k


def test_a_followed_gradient_that_is_not_contiguous_is_refused(gen):
    model = torch.nn.Sequential(torch.nn.Linear(7, 7), torch.nn.Linear(7, 3))
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    backward(model, gen)
    ema.update(1)
    model[0].weight.grad = torch.randn(7, 7).t()  # the param's shape, transposed strides
    with pytest.raises(polyak.InvalidArgError, match="0.weight.*contiguous"):
        ema.update(2)
    assert ema.step == 1


def test_set_grads_without_layerwise_shadows_is_refused_and_leaves_updates_alone(gen):
    model = torch.nn.Linear(5, 3)
    ema = EMA(model, decay=0.9)
    backward(torch.nn.Sequential(model), gen)
    with pytest.raises(polyak.StateError, match="layer-wise"):
        ema.set_grads()
    ema.update(1)
    assert ema.step == 1
