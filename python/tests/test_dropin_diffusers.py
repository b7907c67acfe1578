"""polyak.diffusers.EMAModel side by side with diffusers' EMAModel (the installed diffusers) on
diffusers' training-script usage: the EMA made from a copy of the model, step(unet.parameters())
after each optimizer step, store / copy_to / restore around validation, state_dict through
accelerate's checkpoints, save_pretrained / from_pretrained. Their shadow_params are compared;
diffusers' own unit tests run against it in test_dropin_diffusers_upstream.py."""
import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.training_utils import EMAModel as DiffusersEma  # noqa: E402

import polyak  # noqa: E402
from polyak.diffusers import EMAModel  # noqa: E402

TOLERANCE = 2e-6


class Tiny(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 6):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.frozen = torch.nn.Parameter(torch.randn(width), requires_grad=False)  # copied, not averaged
        self.out = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x) + self.frozen))


def make():
    torch.manual_seed(0)
    return Tiny()


def train(model, emas, first, num_steps):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(first, first + num_steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(5, 6, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model.frozen.add_(0.01)  # a frozen param that moves: diffusers copies it
        for ema in emas:
            ema.step(model.parameters())


def assert_close(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max().item() <= TOLERANCE * (b.abs().max().item() + 1e-3)


@pytest.mark.parametrize("options", [dict(), dict(decay=0.8, update_after_step=3),
                                     dict(use_ema_warmup=True, power=0.75, min_decay=0.3, decay=0.9),
                                     dict(decay=0.95, min_decay=0.1)])
def test_training_script_usage_equals_diffusers(options):
    model = make()
    start = copy.deepcopy(model)  # the scripts' ema_unet: another copy of the model
    theirs = DiffusersEma(start.parameters(), model_cls=Tiny, model_config=start.config, **options)
    ours = EMAModel(start.parameters(), model_cls=Tiny, model_config=start.config, **options)
    assert_close(ours.shadow_params, theirs.shadow_params)
    train(model, [theirs, ours], 1, 12)
    assert ours.optimization_step == theirs.optimization_step == 12
    assert ours.cur_decay_value == theirs.cur_decay_value
    assert_close(ours.shadow_params, theirs.shadow_params)
    frozen = [i for i, p in enumerate(model.parameters()) if p is model.frozen][0]
    assert torch.equal(ours.shadow_params[frozen], model.frozen)  # copied at every step


def test_store_copy_to_restore_and_state_round_trip():
    model = make()
    theirs, ours = DiffusersEma(model.parameters(), decay=0.9), EMAModel(model.parameters(), decay=0.9)
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ours.restore(model.parameters())
    train(model, [theirs, ours], 1, 6)
    live = [p.detach().clone() for p in model.parameters()]
    ours.store(model.parameters())
    ours.copy_to(model.parameters())
    assert_close(list(model.parameters()), theirs.shadow_params)
    ours.restore(model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    # accelerate's checkpoints: state_dict / load_state_dict, into a fresh EMA, either way round
    ours_again = EMAModel(model.parameters(), decay=0.9)
    ours_again.load_state_dict(ours.state_dict())
    from_theirs = EMAModel(model.parameters(), decay=0.9)
    from_theirs.load_state_dict(theirs.state_dict())
    theirs_from_ours = DiffusersEma(model.parameters(), decay=0.9)
    theirs_from_ours.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "polyak"})
    train(model, [theirs, ours, ours_again, from_theirs, theirs_from_ours], 7, 5)
    for ema in (ours, ours_again, from_theirs, theirs_from_ours):
        assert ema.optimization_step == 11
        assert_close(ema.shadow_params, theirs.shadow_params)
    assert all(torch.equal(a, b) for a, b in zip(ours_again.shadow_params, ours.shadow_params))  # exact


def test_load_state_dict_changes_the_settings():
    model = make()
    theirs, ours = DiffusersEma(model.parameters()), EMAModel(model.parameters())
    train(model, [theirs, ours], 1, 3)
    for ema in (theirs, ours):
        ema.load_state_dict({"decay": 0.7, "use_ema_warmup": True})
    train(model, [theirs, ours], 4, 4)
    assert_close(ours.shadow_params, theirs.shadow_params)


def test_module_argument_turns_warmup_on():
    model = make()
    with pytest.warns(FutureWarning):
        ours = EMAModel(model)
    assert ours.use_ema_warmup


def test_save_pretrained_keeps_the_settings_and_from_pretrained_goes_on(tmp_path):
    model = make()
    options = dict(decay=0.9, update_after_step=2, use_ema_warmup=True, power=0.8)
    theirs = DiffusersEma(model.parameters(), model_cls=Tiny, model_config=model.config, **options)
    ours = EMAModel(model.parameters(), model_cls=Tiny, model_config=model.config, **options)
    train(model, [theirs, ours], 1, 6)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = Tiny.from_pretrained(tmp_path / "ours")
    assert_close(list(saved.parameters()), theirs.shadow_params)
    for key, value in options.items():
        assert saved.config[key] == value
    assert saved.config["optimization_step"] == 6
    ours, theirs = (EMAModel.from_pretrained(tmp_path / "ours", model_cls=Tiny),
                    DiffusersEma.from_pretrained(tmp_path / "theirs", model_cls=Tiny))
    train(model, [theirs, ours], 7, 4)
    assert ours.optimization_step == 10
    assert_close(ours.shadow_params, theirs.shadow_params)


def test_what_does_not_map_is_refused():
    model = make()
    with pytest.raises(polyak.UnsupportedError, match="min_decay"):
        EMAModel(model.parameters(), min_decay=0.5)
    ema = EMAModel(model.parameters())
    ema.step(model.parameters())
    with pytest.raises(polyak.UnsupportedError, match="offload"):
        ema.to("meta")
    with pytest.raises(polyak.UnsupportedError, match="other parameters"):
        ema.step(make().parameters())
