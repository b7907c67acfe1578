"""EMA against the EMAs PyTorch users run today, on real timm models trained with AdamW.

Each comparison also has a float64 reference of the published rule, which
polyak must match more tightly than the f32 libraries match each other.
Where the semantics differ by design, the test shows the difference is the
documented one. The other libraries are the versions installed.
"""
import copy

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.utils import ModelEmaV3  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from conftest import warmup_beta  # noqa: E402
from polyak.torch import EMA  # noqa: E402

STEPS = 60
F32_TOLERANCE = 2e-5   # polyak against a f32 library, relative to the tensor's scale
F64_TOLERANCE = 4e-6   # polyak against the float64 rule


def make_model(name):
    torch.manual_seed(3)
    if name == "test_vit":
        return timm.create_model(name, num_classes=10, img_size=32)
    return timm.create_model(name, num_classes=10)


def train(model, steps, on_step, seed=0):
    """AdamW on random data; on_step(step) after every optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        on_step(step)


class Float64Rule:
    """A float64 copy of the model's floating state averaged by decay(step), integers copied."""

    def __init__(self, model, decay, keys=None):
        self.model, self.decay = model, decay
        self.keys = keys or [k for k, v in model.state_dict().items() if v.is_floating_point()]
        self.avg = {k: v.double().clone() for k, v in model.state_dict().items() if k in self.keys}

    def update(self, step):
        beta = self.decay(step)
        state = self.model.state_dict()
        for k in self.keys:
            self.avg[k] = beta * self.avg[k] + (1 - beta) * state[k].double()


def worst(a, b, keys):
    """The largest difference over the tensors, each relative to its scale."""
    return max(((a[k].double() - b[k].double()).abs().max() / (b[k].double().abs().max() + 1e-3)).item()
               for k in keys)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_like_timm_equals_model_ema_v3_with_and_without_warmup(name):
    model = make_model(name)
    cases = {  # (timm options, float64 decay of step s)
        "constant": (dict(decay=0.9), lambda s: 0.0 if s <= 1 else 0.9),
        "constant_after_3": (dict(decay=0.9, update_after_step=3), lambda s: 0.0 if s <= 4 else 0.9),
        "warmup": (dict(decay=0.9999, use_warmup=True), lambda s: warmup_beta(s - 1, 0.9999)),
        "warmup_after_3": (dict(decay=0.9999, use_warmup=True, update_after_step=3, min_decay=0.2),
                           lambda s: warmup_beta(s - 4, 0.9999, 0.2)),
    }
    timm_emas = {c: ModelEmaV3(model, **o) for c, (o, _) in cases.items()}
    ours = {c: EMA.like_timm(model, **o) for c, (o, _) in cases.items()}
    rules = {c: Float64Rule(model, d) for c, (_, d) in cases.items()}

    def on_step(step):
        for c in cases:
            timm_emas[c].update(model, step=step)
            ours[c].update(step)
            rules[c].update(step)

    train(model, STEPS, on_step)
    for c in cases:
        got, theirs = ours[c].model_state_dict(), timm_emas[c].module.state_dict()
        assert got.keys() == theirs.keys()
        keys = rules[c].keys
        assert worst(got, rules[c].avg, keys) < F64_TOLERANCE, c
        assert worst(theirs, rules[c].avg, keys) < F32_TOLERANCE, c
        assert worst(got, theirs, keys) < F32_TOLERANCE, c
        for k in got.keys() - set(keys):  # num_batches_tracked: copied
            assert torch.equal(got[k], theirs[k])


def test_a_naive_mapping_of_timms_step_differs_by_the_initial_weight():
    """timm's update(model, step=1) copies the params; Constant(0.999) with start_step 0 (the naive
    mapping) keeps 0.999 of the initial weights at step 1, so after 50 steps their difference is
    0.999^50 (about 0.95) times (initial - params at step 1)."""
    model = make_model("test_resnet")
    initial = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    theirs = ModelEmaV3(model, decay=0.999, exclude_buffers=True)
    naive = EMA(model, decay=0.999, buffers="ignore")
    first = {}

    def on_step(step):
        theirs.update(model, step=step)
        naive.update(step)
        if step == 1:
            first.update({k: v.detach().double().clone() for k, v in model.named_parameters()})

    train(model, 50, on_step)
    got, ref = naive.model_state_dict(), theirs.module.state_dict()
    for k in initial:
        expected = 0.999 ** 50 * (initial[k] - first[k])
        error = ((got[k].double() - ref[k].double()) - expected).abs().max()
        assert error <= 1e-3 * expected.abs().max() + F32_TOLERANCE * ref[k].double().abs().max(), k
    assert max((initial[k] - first[k]).abs().max() for k in initial) > 1e-3  # a difference to see
    assert 0.95 < 0.999 ** 50 < 0.952


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_like_averaged_model_equals_torchs_ema_and_swa(name):
    model = make_model(name)
    torch_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    torch_swa = AveragedModel(model)
    ours_ema = EMA.like_averaged_model(model, decay=0.9)
    ours_swa = EMA.like_averaged_model(model)
    keys = [k for k, _ in model.named_parameters()]
    rule = Float64Rule(model, lambda s: 0.0 if s <= 1 else 0.9, keys)
    swa_steps = {5, 6, 13, 30, 31, 59}  # SWA's snapshots: irregular steps, each weighed 1/6
    swa_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.named_parameters()}

    def on_step(step):
        torch_ema.update_parameters(model)
        ours_ema.update(step)
        rule.update(step)
        if step in swa_steps:
            torch_swa.update_parameters(model)
            ours_swa.update(step)
            for k, v in model.named_parameters():
                swa_sum[k] += v.detach().double()

    train(model, STEPS, on_step)
    swa_mean = {k: v / len(swa_steps) for k, v in swa_sum.items()}
    for ours, theirs, ref in [(ours_ema, torch_ema, rule.avg), (ours_swa, torch_swa, swa_mean)]:
        got = ours.model_state_dict()
        theirs = {k[len("module."):]: v for k, v in theirs.state_dict().items() if k[len("module."):] in keys}
        assert worst(got, ref, keys) < F64_TOLERANCE
        assert worst(got, theirs, keys) < F32_TOLERANCE


def perturb_steps(model, steps, on_step, seed=1):
    """Cheap steps for long runs of small models: every param moves by a random amount."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        on_step(step)


def small_model():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))


def test_like_ema_pytorch_equals_its_defaults():
    """ema-pytorch's EMA(model): update_after_step 100, update_every 10, warm-up decay of the call
    count applied once per update."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = small_model()
    theirs = ema_pytorch.EMA(model)
    assert (theirs.update_after_step, theirs.update_every, theirs.beta) == (100, 10, 0.9999)
    ours = EMA.like_ema_pytorch(model)
    keys = [k for k, _ in model.named_parameters()]
    ref = {k: v.detach().double().clone() for k, v in model.named_parameters()}

    def on_step(step):
        theirs.update()
        ours.update(step)
        if (step - 1) % 10 == 0:  # the float64 rule, from ema-pytorch's docs and code
            beta = 0.0 if step - 1 <= 100 else warmup_beta(step - 101, 0.9999)
            for k, v in model.named_parameters():
                ref[k] = beta * ref[k] + (1 - beta) * v.detach().double()

    perturb_steps(model, 260, on_step)
    got = ours.model_state_dict()
    their = dict(theirs.ema_model.named_parameters())
    assert worst(got, ref, keys) < F64_TOLERANCE
    assert worst(got, their, keys) < F32_TOLERANCE


@pytest.mark.parametrize("warmup", [False, True])
def test_like_diffusers_equals_ema_model(warmup):
    """diffusers' EMAModel: decays 0, 2/11, 3/12, 4/13, ... by default (TF's rule, except that its
    first update copies), or the warm-up."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    model = small_model()
    theirs = training_utils.EMAModel(model.parameters(), use_ema_warmup=warmup, update_after_step=2)
    ours = EMA.like_diffusers(model, use_ema_warmup=warmup, update_after_step=2)
    decays = []
    keys = [k for k, _ in model.named_parameters()]
    ref = {k: v.detach().double().clone() for k, v in model.named_parameters()}

    def on_step(step):
        theirs.step(model.parameters())
        ours.update(step)
        decays.append(theirs.cur_decay_value)
        t = step - 3  # diffusers: max(0, step - update_after_step - 1)
        beta = 0.0 if t <= 0 else warmup_beta(t, 0.9999) if warmup else min(0.9999, (1 + t) / (10 + t))
        for k, v in model.named_parameters():
            ref[k] = beta * ref[k] + (1 - beta) * v.detach().double()

    perturb_steps(model, 40, on_step)
    if not warmup:
        assert decays[:6] == pytest.approx([0, 0, 0, 2 / 11, 3 / 12, 4 / 13])
    got = ours.model_state_dict()
    their = dict(zip(keys, theirs.shadow_params))
    assert worst(got, ref, keys) < F64_TOLERANCE
    assert worst(got, their, keys) < F32_TOLERANCE


def test_update_every_k_applies_beta_to_the_k():
    """Updating every k steps, polyak applies beta^k (the horizon stays k-independent); timm's
    ModelEmaV3.update(model) without a step applies beta once per call."""
    model = small_model()
    ours = EMA(model, decay=0.99, buffers="ignore")
    theirs = ModelEmaV3(model, decay=0.99)
    keys = [k for k, _ in model.named_parameters()]
    ref_ours = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    ref_theirs = copy.deepcopy(ref_ours)

    def on_step(step):
        if step % 10 == 0:
            ours.update(step)
            theirs.update(model)
            for k, v in model.named_parameters():
                ref_ours[k] = 0.99 ** 10 * ref_ours[k] + (1 - 0.99 ** 10) * v.detach().double()
                ref_theirs[k] = 0.99 * ref_theirs[k] + 0.01 * v.detach().double()

    perturb_steps(model, 100, on_step)
    assert worst(ours.model_state_dict(), ref_ours, keys) < F64_TOLERANCE
    assert worst(theirs.module.state_dict(), ref_theirs, keys) < F32_TOLERANCE


def test_timm_v3_takes_a_bf16_model_with_an_f32_ema_in_two_passes():
    """README's claims about the installed timm: ModelEmaV3 accepts a bf16 model with dtype=float32
    (by _foreach_mul_ then _foreach_add_ over the shadows: two passes) and rounds bf16 EMA shadows
    stochastically by default. polyak does the mixed case in one pass (one C call)."""
    model = small_model().to(torch.bfloat16)
    theirs = ModelEmaV3(model, decay=0.9, dtype=torch.float32)
    assert ModelEmaV3(model).stochastic_rounding is True
    calls = []
    originals = {name: getattr(torch, name) for name in ("_foreach_mul_", "_foreach_add_", "_foreach_lerp_")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    for name in originals:
        setattr(torch, name, counting(name))
    try:
        theirs.update(model)
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
    assert calls == ["_foreach_mul_", "_foreach_add_"]
    ours = EMA(small_model().to(torch.bfloat16), decay=0.9)
    assert {ours.handle.tensor_info(i).shadow_dtype for i in range(len(ours.names))} == {"f32"}


def test_timm_loads_the_saved_average(tmp_path):
    """ema.save(path) is a checkpoint timm's own loader takes, strictly, into a fresh model: the
    averaged params and running statistics, and num_batches_tracked as the library mirrored it."""
    pytest.importorskip("safetensors")
    model = make_model("test_resnet")
    ema = EMA.like_timm(model, decay=0.9)
    train(model, 3, ema.update)
    path = str(tmp_path / "ema.safetensors")
    ema.save(path)
    fresh = make_model("test_resnet")
    timm.models.load_checkpoint(fresh, path, strict=True)
    average = ema.model_state_dict()
    assert int(average["bn1.num_batches_tracked"]) == 3  # the buffers too, mirrored at each update
    for name, value in average.items():
        assert torch.equal(fresh.state_dict()[name], value), name
