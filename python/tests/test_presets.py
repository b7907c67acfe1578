"""Presets that give what their library gives, buffers included, and the selection of what to
average (names, globs, predicates, requires_grad, PEFT LoRA adapters), side by side with the
installed torch (AveragedModel), ema-pytorch, diffusers (EMAModel) and peft, each on its own
usage. Float64 references live in test_parity.py; here the comparisons are with the libraries."""
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402

F32_TOLERANCE = 2e-5  # relative to the tensor's scale


def close(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / (b.abs().max() + 1e-3)).item() < F32_TOLERANCE


def assert_state_like(got, theirs, integers=None):
    """Every entry of a state dict: floating ones within f32 rounding, integer ones equal (or,
    where given, as `integers` says)."""
    assert got.keys() == theirs.keys()
    for k, v in theirs.items():
        if v.is_floating_point():
            assert close(got[k], v), k
        else:
            assert torch.equal(got[k], (integers or {}).get(k, v)), k


def bn_net():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def mlp():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))


def steps(model, count, on_step, seed=1):
    """Cheap steps: a forward in train mode (BatchNorm's statistics move), then every param, frozen
    ones too, moves by a random amount; on_step(step) after each."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, count + 1):
        with torch.no_grad():
            if isinstance(model[0], torch.nn.Conv2d):
                model(torch.randn(2, 3, 8, 8, generator=gen))
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        on_step(step)


# ---- presets: buffers as their libraries keep them ---------------------------------------
@pytest.mark.parametrize("use_buffers", [False, True])
def test_like_averaged_model_keeps_buffers_as_averaged_model(use_buffers):
    """AveragedModel copies the buffers at every update (use_buffers=False, its default) or
    averages them with the params; its integer buffers then go through the same rule in integer
    arithmetic and stay at their first value, where polyak copies them (documented, checked)."""
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    theirs = {"ema": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers),
              "swa": AveragedModel(model, use_buffers=use_buffers)}
    options = {"use_buffers": True} if use_buffers else {}  # AveragedModel's default: the preset's
    ours = {"ema": EMA.like_averaged_model(model, decay=0.9, **options),
            "swa": EMA.like_averaged_model(model, **options)}
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 5):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=gen)),
                                          torch.randint(0, 10, (4,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
        for kind in theirs:
            theirs[kind].update_parameters(model)
            ours[kind].update(step)
    counts = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert all(int(v) == 4 for v in counts.values())
    for kind in theirs:
        got, their = ours[kind].model_state_dict(), theirs[kind].module.state_dict()
        if use_buffers:  # torch's rule on an integer counter: 1, then trunc(0.9 * 1 + 0.1 * 2) = 1, ...
            assert all(int(their[k]) == 1 for k in counts), kind
            assert_state_like(got, their, integers=counts)
        else:
            assert_state_like(got, their)
        fresh = timm.create_model("test_resnet", pretrained=False, num_classes=10)
        fresh.load_state_dict(got)  # strictly


def test_like_ema_pytorch_keeps_buffers_as_ema_pytorch():
    """ema-pytorch averages floating buffers like params and never updates the others
    (num_batches_tracked stays at its value when the EMA was made)."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = bn_net()
    theirs = ema_pytorch.EMA(model, beta=0.99, update_after_step=20, update_every=5)
    ours = EMA.like_ema_pytorch(model, beta=0.99, update_after_step=20, update_every=5)

    def on_step(step):
        theirs.update()
        ours.update(step)

    steps(model, 60, on_step)
    got, their = ours.model_state_dict(), theirs.ema_model.state_dict()
    assert int(model[1].num_batches_tracked) == 60 and int(their["1.num_batches_tracked"]) == 0
    assert_state_like(got, their)
    bn_net().load_state_dict(got)


def test_like_diffusers_averages_trainable_params_copies_frozen_and_leaves_buffers():
    """diffusers' EMAModel(model.parameters()) averages the params that require grad, copies the
    frozen ones at every step and has no buffers: the model keeps its own."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    model = bn_net()
    model[0].weight.requires_grad_(False)
    theirs = training_utils.EMAModel(model.parameters(), decay=0.9)
    ours = EMA.like_diffusers(model, decay=0.9)
    assert ours.names == ["0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]

    def on_step(step):
        theirs.step(model.parameters())
        ours.update(step)

    steps(model, 12, on_step)
    got = ours.model_state_dict()
    names = [name for name, _ in model.named_parameters()]
    assert torch.equal(got["0.weight"], model[0].weight)  # copied: the latest value
    for name, value in zip(names, theirs.shadow_params):
        assert close(got[name], value), name
    for name, value in model.named_buffers():
        assert got[name] is not value and torch.equal(got[name], value)  # the model's own, as diffusers
    bn_net().load_state_dict(got)


# ---- selection ----------------------------------------------------------------------------
def test_selection_by_name_as_ema_pytorch_ignores_and_copies():
    """ema-pytorch's param_or_buffer_names_no_ema (copied) and ignore_startswith_names (left
    out) as params= and other_params=. A param left out reads as the model's own in polyak (it
    is not the EMA's), where ema-pytorch keeps the value it copied at its first update."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = mlp()
    first = {}
    theirs = ema_pytorch.EMA(model, beta=0.9, update_after_step=0, update_every=1,
                             param_or_buffer_names_no_ema={"0.bias"}, ignore_startswith_names={"2."})
    ours = EMA.like_ema_pytorch(model, beta=0.9, update_after_step=0, update_every=1,
                                params=lambda name, p: not name.startswith("2.") and name != "0.bias",
                                other_params=["0.bias"])
    by_glob = EMA.like_ema_pytorch(model, beta=0.9, update_after_step=0, update_every=1, params="0.w*",
                                   other_params="0.bias")
    assert ours.names == by_glob.names == ["0.weight"]

    def on_step(step):
        theirs.update()
        ours.update(step)
        by_glob.update(step)
        if step == 1:
            first.update({k: v.detach().clone() for k, v in model.named_parameters()})

    steps(model, 20, on_step)
    got, their = ours.model_state_dict(), theirs.ema_model.state_dict()
    assert torch.equal(got["0.weight"], by_glob.model_state_dict()["0.weight"])
    assert close(got["0.weight"], their["0.weight"])
    assert torch.equal(got["0.bias"], their["0.bias"]) and torch.equal(got["0.bias"], model[0].bias)
    for name in ("2.weight", "2.bias"):
        assert torch.equal(their[name], first[name])
        assert got[name] is not model.get_parameter(name) and torch.equal(got[name], model.get_parameter(name))
    with pytest.raises(polyak.InvalidArgError, match="'3.*' matches no param"):
        EMA(model, params=["0.*", "3.*"])


def lora_model(modules_to_save=None):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], modules_to_save=modules_to_save)
    return peft.get_peft_model(mlp(), config)


def train_lora(model, count, on_step):
    """SGD on the trainable params (the adapters) of a regression."""
    gen = torch.Generator().manual_seed(2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, count + 1):
        x = torch.randn(8, 9, generator=gen)
        (model(x) - x[:, :3]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        on_step(step)


def test_peft_lora_adapters_as_diffusers_and_ema_pytorch_average_them():
    """params="adapters" averages exactly the LoRA weights (diffusers #9998, TRL #6829): as
    diffusers' EMAModel over the trainable params (its LoRA recipe) and ema-pytorch over the
    whole PEFT model, whose frozen base stays put."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = lora_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    diffusers = training_utils.EMAModel([p for p in model.parameters() if p.requires_grad], decay=0.9)
    like_diffusers = EMA.like_diffusers(model, decay=0.9, params="adapters", other_params="ignore")
    pytorch = ema_pytorch.EMA(model, beta=0.9, update_after_step=0, update_every=1)
    like_pytorch = EMA.like_ema_pytorch(model, beta=0.9, update_after_step=0, update_every=1, params="adapters")
    assert like_diffusers.names == like_pytorch.names == trainable
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}

    def on_step(step):
        diffusers.step([p for p in model.parameters() if p.requires_grad])
        like_diffusers.update(step)
        pytorch.update()
        like_pytorch.update(step)

    train_lora(model, 8, on_step)
    got = like_diffusers.model_state_dict()
    for name, value in zip(trainable, diffusers.shadow_params):
        assert close(got[name], value), name
    theirs, got = pytorch.ema_model.state_dict(), like_pytorch.model_state_dict()
    for name in trainable:
        assert close(got[name], theirs[name]), name
    for name, value in base.items():  # the frozen base: the model's own, unchanged
        assert torch.equal(got[name], value) and torch.equal(theirs[name], value), name
    model.load_state_dict(got)  # strictly
    peft = pytest.importorskip("peft")
    with like_pytorch.average_parameters():  # PEFT's own adapter state dict holds the averages
        adapters = peft.get_peft_model_state_dict(model)
    assert adapters and all(torch.equal(v, got[k.replace(".weight", ".default.weight")]) for k, v in adapters.items())


def test_peft_modules_to_save_count_as_adapters():
    model = lora_model(modules_to_save=["2"])
    ema = EMA(model, params="adapters")
    saved = [name for name in ema.names if ".modules_to_save." in name]
    assert saved and set(ema.names) == {name for name, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(polyak.InvalidArgError, match="no PEFT adapter layers"):
        EMA(mlp(), params="adapters")


def test_trainable_only_leaves_frozen_params_to_the_model():
    model = bn_net()
    model[4].requires_grad_(False)
    ema = EMA(model, decay=0.5, params="trainable")
    assert "4.weight" not in ema.names and "0.weight" in ema.names
    steps(model, 2, ema.update)
    with ema.average_parameters():
        assert torch.equal(model[4].weight, ema.model_state_dict()["4.weight"])  # the model's own
    bn_net().load_state_dict(ema.model_state_dict())
