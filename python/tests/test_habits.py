"""Habits of PyTorch users: evaluating inside average_parameters (modes and autograd), copying and
pickling, SWA's update_bn, and half-lives in steps or as a fraction of training."""
import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import polyak  # noqa: E402
from polyak.torch import EMA, update_bn  # noqa: E402


def resnet():
    torch.manual_seed(3)
    return timm.create_model("test_resnet", pretrained=False, num_classes=10)


def train(model, count, on_step, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(1, count + 1):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=gen)),
                                          torch.randint(0, 10, (4,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
        on_step(step)


def loader(count=3, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.zeros(4, dtype=torch.int64)) for _ in range(count)]


def test_average_parameters_restores_modes_and_builds_no_graph():
    model = resnet()
    ema = EMA(model, decay=0.5)
    train(model, 2, ema.update)
    model.train()
    model.bn1.eval()  # a frozen BatchNorm stays in eval mode
    with ema.average_parameters():
        assert not torch.is_grad_enabled()
        model.eval()
        out = model(torch.randn(2, 3, 32, 32))
        assert not out.requires_grad and out.grad_fn is None
    assert torch.is_grad_enabled()
    assert model.training and not model.bn1.training and model.layer1.training
    with pytest.raises(RuntimeError, match="boom"):  # the same after an exception inside
        with ema.average_parameters():
            model.eval()
            raise RuntimeError("boom")
    assert torch.is_grad_enabled() and model.training and not model.bn1.training


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle", "torch.save"])
def test_copying_or_pickling_is_refused_saying_what_to_do(how):
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    do = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": pickle.dumps,
          "torch.save": lambda obj: torch.save(obj, io.BytesIO())}[how]
    with pytest.raises(polyak.UnsupportedError, match=r"cannot be pickled or copied.*state_dict\(\)"):
        do(ema)
    if how != "copy":  # copy.copy of a dict copies no value
        with pytest.raises(polyak.UnsupportedError, match="cannot be pickled or copied"):
            do({"model": model, "ema": ema})
    with pytest.raises(polyak.UnsupportedError, match="cannot be pickled or copied"):
        do(ema.handle)
    ema.update(1)  # untouched
    copy.deepcopy(model)  # the model itself copies as ever


def test_update_bn_gives_torchs_statistics_for_the_average_and_keeps_the_models():
    """polyak.torch.update_bn on a like_averaged_model EMA gives what torch's update_bn gives on an
    AveragedModel (the statistics of the averaged weights, the batch count), kept in the EMA;
    the model's own buffers, params and modes stay as they were."""
    from torch.optim.swa_utils import AveragedModel
    from torch.optim.swa_utils import update_bn as torch_update_bn
    model = resnet()
    theirs = AveragedModel(model)
    ours = EMA.like_averaged_model(model)

    def on_step(step):
        theirs.update_parameters(model)
        ours.update(step)

    train(model, 3, on_step)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch_update_bn(loader(), theirs)
    update_bn(loader(), ours)
    got, their = ours.model_state_dict(), theirs.module.state_dict()
    for name, value in their.items():
        if name.endswith("num_batches_tracked"):
            assert int(got[name]) == int(value) == 3, name
        else:
            scale = value.double().abs().max() + 1e-3
            assert ((got[name].double() - value.double()).abs().max() / scale).item() < 1e-4, name
    assert not torch.equal(got["bn1.running_mean"], before["bn1.running_mean"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not model.training and not model.bn1.training
    ours.update(4)  # averaging goes on from there


def test_update_bn_writes_averaged_statistics_into_the_shadow_exactly():
    """With averaged buffers (EMA's default), the statistics land in the shadow: model_state_dict
    gives exactly what torch's update_bn computes on a model holding the average."""
    from torch.optim.swa_utils import update_bn as torch_update_bn
    model = resnet()
    ema = EMA(model, schedules=[polyak.Constant(0.5), polyak.Constant(0.9)])
    train(model, 3, ema.update)
    reference = resnet()
    reference.load_state_dict(ema.model_state_dict(1))
    torch_update_bn(loader(), reference)
    untouched = ema.model_state_dict(0)
    update_bn(loader(), ema, shadow=1)
    got = ema.model_state_dict(1)
    for name, value in reference.state_dict().items():
        assert torch.equal(got[name], value), name
    for name, value in ema.model_state_dict(0).items():  # the other shadow as it was
        assert torch.equal(value, untouched[name]), name
    with pytest.raises(polyak.StateError, match="buffers='ignore'"):
        update_bn(loader(), EMA(model, buffers="ignore"))


def test_half_life_in_steps_or_as_a_fraction_of_training_maps_onto_a_constant():
    """Composer's EMA takes half_life='1000ba' and uses smoothing 2 ** (-(1 / 1000)) per batch
    (composer 0.32.1, algorithms/ema/ema.py); a fraction of training is that of total_steps."""
    model = torch.nn.Linear(3, 2)
    beta = 2 ** (-(1 / 1000))
    for ema in (EMA(model, half_life=1000), EMA(model, half_life="1000ba"),
                EMA(model, half_life="0.05dur", total_steps=20000), EMA(model, half_life=1000.0)):
        (schedule,) = ema.schedules
        assert isinstance(schedule, polyak.Constant)
        assert abs(schedule.beta - beta) <= 2 ** -52
        assert abs(schedule.beta_product(0, 1000) - 0.5) < 1e-12  # the weight of step 0's params halves
    assert polyak.half_life_steps("0.3dur", total_steps=1001) == pytest.approx(300.3, rel=1e-15)
    ema = EMA(model, half_life=10, warmup=True)  # the decay's cap, with timm's warm-up
    assert isinstance(ema.schedules[0], polyak.Warmup) and ema.schedules[0].beta == 0.5 ** (1 / 10)
    for bad, match in [(dict(half_life="0.05dur"), "total_steps"), (dict(half_life="3ep"), "'<steps>ba'"),
                       (dict(half_life=0), "positive"), (dict(half_life="1.5dur", total_steps=10), r"\(0, 1\]"),
                       (dict(half_life=10, decay=0.9), "not two"), (dict(total_steps=10), "fraction")]:
        with pytest.raises(polyak.InvalidArgError, match=match):
            EMA(model, **bad)
