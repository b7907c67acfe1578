"""polyak.timm.ModelEmaV3 side by side with timm's ModelEmaV3 (the installed timm) on timm's own
usage: train.py's update(model, step=num_updates) after each optimizer step, validation through
the EMA, CheckpointSaver's 'state_dict_ema' and the --resume path load_checkpoint(model_ema.module,
use_ema=True). Both EMAs average the same model; their modules' state dicts are compared."""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models import load_checkpoint, resume_checkpoint  # noqa: E402
from timm.utils import CheckpointSaver  # noqa: E402
from timm.utils import ModelEmaV3 as TimmEma  # noqa: E402

import polyak  # noqa: E402
from polyak.timm import ModelEmaV3  # noqa: E402

TOLERANCE = 2e-5  # f32 against f32, relative to each tensor's scale


def make_model(seed=3):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=4)


def train(model, first_step, num_steps, emas, stepped=True):
    """SGD on random data (seeded by the step); every EMA updated after each optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(first_step, first_step + num_steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 4, (2,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for ema in emas:
            ema.update(model, step=step if stepped else None)
    return opt


def assert_same_state(ours, theirs):
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        if value.is_floating_point():
            scale = value.abs().max().item() + 1e-3
            assert (ours[name] - value).abs().max().item() <= TOLERANCE * scale, name
        else:
            assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("options", [dict(decay=0.9), dict(decay=0.95, update_after_step=3),
                                     dict(decay=0.99, use_warmup=True, warmup_power=0.75, min_decay=0.2)])
def test_update_with_steps_equals_timm(options):
    model = make_model()
    theirs, ours = TimmEma(model, **options), ModelEmaV3(model, **options)
    train(model, 1, 12, [theirs, ours])
    assert ours.ema.step == 12
    assert_same_state(ours.module.state_dict(), theirs.module.state_dict())
    assert ours.get_decay(12) == theirs.get_decay(12)


def test_update_without_steps_equals_timm():
    model = make_model()
    theirs, ours = TimmEma(model, decay=0.8), ModelEmaV3(model, decay=0.8)
    train(model, 1, 8, [theirs, ours], stepped=False)
    assert_same_state(ours.module.state_dict(), theirs.module.state_dict())


def test_validation_through_the_ema_and_timms_unwrap():
    model = make_model()
    theirs, ours = TimmEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    train(model, 1, 6, [theirs, ours])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    assert timm.utils.unwrap_model(ours) is ours.module
    assert not ours.module.training


def test_checkpoint_saver_and_resume_equal_timms(tmp_path):
    """train.py's cycle: CheckpointSaver writes 'state_dict_ema' from model_ema; --resume runs
    resume_checkpoint(model) and load_checkpoint(model_ema.module, use_ema=True) into fresh
    objects, then training goes on with update(model, step=num_updates)."""
    options = dict(decay=0.95, use_warmup=True)
    paths = {}
    for side, cls in (("timm", TimmEma), ("polyak", ModelEmaV3)):
        model = make_model()
        ema = cls(model, **options)
        opt = train(model, 1, 6, [ema])
        (tmp_path / side).mkdir()
        saver = CheckpointSaver(model, opt, model_ema=ema, checkpoint_dir=str(tmp_path / side),
                                recovery_dir=str(tmp_path / side))
        saver.save_checkpoint(epoch=0, metric=1.0)
        paths[side] = saver.checkpoint_files[0][0]
    resumed = {}
    for side, cls in (("timm", TimmEma), ("polyak", ModelEmaV3)):
        model = make_model(seed=5)  # other initial weights: the checkpoint brings them
        ema = cls(model, **options)
        resume_checkpoint(model, paths[side], log_info=False)
        load_checkpoint(ema.module, paths[side], use_ema=True)
        train(model, 7, 6, [ema])
        resumed[side] = ema.module.state_dict()
    assert_same_state(resumed["polyak"], resumed["timm"])
    saved = torch.load(paths["polyak"], weights_only=False)["state_dict_ema"]
    assert_same_state(saved, torch.load(paths["timm"], weights_only=False)["state_dict_ema"])


def test_writes_into_module_are_read_back_at_the_next_update():
    model = make_model()
    theirs, ours = TimmEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    train(model, 1, 4, [theirs, ours])
    other = {k: v + 0.5 if v.is_floating_point() else v for k, v in make_model(seed=7).state_dict().items()}
    for ema in (theirs, ours):
        ema.module.load_state_dict(other)
    assert_same_state(ours.module.state_dict(), other)
    train(model, 5, 3, [theirs, ours])
    assert_same_state(ours.module.state_dict(), theirs.module.state_dict())
    theirs.set(model)
    ours.set(model)
    train(model, 8, 2, [theirs, ours])
    assert_same_state(ours.module.state_dict(), theirs.module.state_dict())


def test_module_is_built_on_meta_and_shares_nothing_with_the_model():
    from polyak.timm import _module_on_meta
    model = make_model()
    meta = _module_on_meta(model)
    assert all(t.is_meta for t in meta.state_dict().values())
    ours = ModelEmaV3(model, dtype=torch.float32)
    model_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert not model_ptrs & {t.data_ptr() for t in ours.module.state_dict().values()}
    assert_same_state(ours.module.state_dict(), model.state_dict())


def test_refusals_are_clear():
    model = make_model()
    with pytest.raises(polyak.UnsupportedError, match="where the params are"):
        ModelEmaV3(model, device="meta")
    with pytest.raises(polyak.UnsupportedError, match="stochastically"):
        ModelEmaV3(model, dtype=torch.bfloat16, stochastic_rounding=False)
    ema = ModelEmaV3(model)
    with pytest.raises(polyak.MismatchError, match="made with"):
        ema.update(make_model())


def test_import_leaves_timm_out():
    code = "import sys, polyak.timm; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_tied_tensor_is_averaged_once_where_timm_lerps_it_per_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied, as a language model's embedding and head
    theirs, ours = TimmEma(model, decay=0.5), ModelEmaV3(model, decay=0.5)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    for ema in (theirs, ours):
        ema.update(model)
    after = model[0].weight.detach()
    assert torch.allclose(ours.module[0].weight, after - 0.5 * (after - before))
    assert torch.allclose(theirs.module[0].weight, after - 0.25 * (after - before))  # lerped twice
    assert ours.module[1].weight is ours.module[0].weight
