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


def test_a_held_module_stays_the_average_across_updates():
    """`ema_net = model_ema.module` held (as validation loops and timm's distribute_bn do), and its
    parameters() / buffers() and the wrapper's: the average after every update, as timm's."""
    model = make_model()
    theirs, ours = TimmEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    held_theirs, held_ours = theirs.module, ours.module
    weight = dict(ours.named_parameters())["module.conv1.0.weight"]
    running_mean = dict(ours.named_buffers())["module.conv1.1.running_mean"]
    for first in (1, 4):
        train(model, first, 3, [theirs, ours])
        assert_same_state(held_ours.state_dict(keep_vars=True), held_theirs.state_dict())
        average = ours.ema.model_state_dict()
        assert torch.equal(weight, average["conv1.0.weight"])
        assert torch.equal(running_mean, average["conv1.1.running_mean"])
        assert [t.data_ptr() for t in ours.parameters()] == [t.data_ptr() for t in held_ours.parameters()]


def test_writes_through_a_held_module_are_taken_never_undoing_updates():
    """Writes through a module held across updates (timm's distribute_bn and load_checkpoint take
    model_ema.module once): taken at the next update, as timm's, also after updates made around
    the wrapper (model_ema.ema.update: the views follow them)."""
    model = make_model()
    theirs, ours = TimmEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    held_theirs, held_ours = theirs.module, ours.module
    train(model, 1, 3, [theirs, ours])
    with torch.no_grad():
        for held in (held_theirs, held_ours):
            held.conv1[1].running_var.mul_(2.0)  # distribute_bn's reduce, in place
            held.fc.weight.add_(0.5)
    train(model, 4, 3, [theirs, ours])
    assert_same_state(held_ours.state_dict(), held_theirs.state_dict())
    theirs.update(model, step=7)
    ours.ema.update(7)
    with torch.no_grad():
        for held in (held_theirs, held_ours):
            held.fc.weight.add_(0.5)
    theirs.update(model, step=8)
    ours.update(model, step=8)
    assert_same_state(held_ours.state_dict(), held_theirs.state_dict())
    assert not ours.ema.handle.step_state()["shadows_open"]


def test_module_is_shadow_0_in_place_where_it_can_be():
    """An f32 module over f32 shadows: its tensors are the library's memory (shadow views), the
    same objects and addresses across updates; a resume's load into it (load_checkpoint after
    the first update) goes through the library's checked path for writes and sets timm's step."""
    model = make_model()
    ours = ModelEmaV3(model, decay=0.9, use_warmup=True)
    weight = ours.module.fc.weight
    train(model, 1, 2, [ours])
    views = ours.ema.shadow_views(0)
    assert ours.module.fc.weight is weight and weight.data_ptr() == views["fc.weight"].data_ptr()
    assert ours.module.conv1[1].running_mean.data_ptr() == views["conv1.1.running_mean"].data_ptr()
    train(model, 3, 2, [ours])
    assert weight.data_ptr() == views["fc.weight"].data_ptr()
    other = make_model(seed=7).state_dict()
    ours.module.load_state_dict(other)
    assert torch.equal(ours.ema.model_state_dict()["fc.weight"], other["fc.weight"])
    ours.update(model, step=11)  # as timm after a resume at num_updates 11: decay of step 11 on `other`
    decay = ours.get_decay(11)
    expected = other["fc.weight"] * decay + model.fc.weight.detach() * (1 - decay)
    assert torch.allclose(ours.module.fc.weight, expected, rtol=1e-5, atol=1e-6)
    assert ours.ema.step == 11


def test_a_copied_module_is_refreshed_at_every_update_and_never_undoes_updates():
    """Where views cannot hold it (an f16 module over f32 shadows), `.module` is a copy refilled at
    every update: held references stay the average; a write into it after updates made around
    the wrapper that it has not seen is refused."""
    model = make_model()
    ours = ModelEmaV3(model, decay=0.9, dtype=torch.float16)
    held = ours.module
    weight = held.fc.weight
    train(model, 1, 3, [ours])
    assert held.fc.weight is weight and weight.dtype == torch.float16
    assert torch.allclose(weight.float(), ours.ema.model_state_dict()["fc.weight"], rtol=1e-3, atol=1e-4)
    ours.ema.update(4)  # around the wrapper: the held copy is one update behind
    with torch.no_grad():
        held.fc.weight.add_(0.5)
    with pytest.raises(polyak.UnsupportedError, match="undo those updates"):
        ours.update(model, step=5)


def test_module_keeps_channels_last():
    model = make_model().to(memory_format=torch.channels_last)
    ours = ModelEmaV3(model, decay=0.9)
    assert ours.module.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    theirs = TimmEma(model, decay=0.9)
    train(model, 1, 2, [theirs, ours])
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
