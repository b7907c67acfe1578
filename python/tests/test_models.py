"""polyak.torch.EMA on ordinary PyTorch models as users change and save them: swapped heads and
other changes to the model caught, state dicts that load strictly (non-persistent buffers, tied
weights, torch.compile), channels_last. Real timm and transformers models, tiny and offline."""
import io

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402


def resnet(num_classes=10):
    torch.manual_seed(3)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)


def train(model, steps, on_step, seed=0, channels_last=False, first=1):
    """SGD on random 32x32 images; on_step(step) after every optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(first, first + steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        logits = model(x)
        y = torch.randint(0, logits.shape[1], (4,), generator=gen)
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
        on_step(step)


def assert_same(a, b, keys=None):
    for k in keys or a:
        assert torch.equal(a[k], b[k]), k


# ---- 1. a changed model is caught -------------------------------------------------------
@pytest.mark.parametrize("change", ["reset_classifier", "setattr"])
def test_a_swapped_head_is_refused_naming_it_and_the_averages_carry_over(change):
    model = resnet()
    ema = EMA(model, decay=0.9)
    train(model, 3, ema.update)
    if change == "reset_classifier":
        model.reset_classifier(5)  # timm: a new nn.Linear as model.fc
    else:
        model.fc = torch.nn.Linear(model.fc.in_features, 5)
    saved = ema.state_dict()
    for call in (ema.update, lambda: ema.average_parameters().__enter__(), lambda: ema.graph_reserve(4, 2)):
        with pytest.raises(polyak.StateError, match=r"'fc\.weight'.*no longer the model's.*load_state_dict"):
            call()
    assert torch.equal(ema.state_dict()["checkpoint"], saved["checkpoint"])  # nothing changed
    old = ema.model_state_dict()
    ema.close()
    with pytest.raises(polyak.MismatchError, match="fc.weight"):  # strict: names and shapes must match
        EMA(model, decay=0.9).load_state_dict(saved)
    new = EMA(model, decay=0.9)  # the model as it is now keeps the averages of what did not change
    missing, unexpected = new.load_state_dict(saved, strict=False)
    assert (missing, unexpected) == (["fc.weight", "fc.bias"], [])
    assert new.step == 3
    average = new.model_state_dict()
    assert_same(average, old, [k for k in old if not k.startswith("fc.")])
    assert torch.equal(average["fc.weight"], model.fc.weight)  # the new head starts at its params
    model.load_state_dict(average)  # strictly
    train(model, 2, new.update, first=4)
    assert new.step == 5


CHANGES = {
    "to_bf16": lambda m: m.to(torch.bfloat16),
    "half": lambda m: m.half(),
    "channels_last": lambda m: m.to(memory_format=torch.channels_last),
    "data_transposed": lambda m: setattr(m.fc.weight, "data", m.fc.weight.data.t()),  # same memory
    "data_view": lambda m: setattr(m.fc.bias, "data", m.fc.bias.data[:5]),  # same pointer, fewer elements
    "data_clone": lambda m: setattr(m.fc.weight, "data", m.fc.weight.data.clone()),
    "assign": lambda m: m.load_state_dict(resnet().state_dict(), assign=True),
    "parametrize": lambda m: torch.nn.utils.parametrizations.weight_norm(m.fc),
    "new_param": lambda m: m.fc.register_parameter("scale", torch.nn.Parameter(torch.ones(1))),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_to_the_averaged_tensors_is_refused_at_the_next_call(change):
    model = resnet()
    ema = EMA(model, decay=0.9)
    train(model, 2, ema.update)
    CHANGES[change](model)
    with pytest.raises(polyak.StateError, match="the model changed after the EMA registered it") as raised:
        ema.update(3)
    if change.startswith("data"):
        assert "'fc." in str(raised.value)
    assert ema.step == 2


def test_changes_elsewhere_in_the_process_or_without_tensors_are_not_refused():
    model = resnet()
    ema = EMA(model, decay=0.9)
    other = resnet()
    other.fc = torch.nn.Linear(other.fc.in_features, 3)  # another model
    model.act1 = torch.nn.ReLU()  # no tensors
    model.layer1[0].register_buffer("cache", torch.zeros(2), persistent=False)  # a non-persistent cache
    ema.update(1)
    ema.close()
    model.fc = torch.nn.Linear(model.fc.in_features, 3)  # a closed EMA leaves no hooks behind


def test_a_bf16_model_keeps_the_averages_of_its_f32_run():
    """The message's advice, from f32 params into bf16 ones: the f32 shadows carry on unchanged."""
    model = resnet()
    ema = EMA(model, decay=0.9)
    train(model, 3, ema.update)
    shadows = ema.model_state_dict(dtype=torch.float32)
    model.to(torch.bfloat16)
    with pytest.raises(polyak.StateError, match="bfloat16"):
        ema.update(4)
    again = EMA(model, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.step == 3
    assert_same(again.model_state_dict(dtype=torch.float32), shadows, again.names)
    again.update(4)


# ---- 3. model_state_dict() loads strictly into the model ---------------------------------
def test_swin_state_dict_has_no_non_persistent_buffers():
    torch.manual_seed(3)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5)
    assert any(name.endswith("relative_position_index") for name, _ in model.named_buffers())
    for preset in (EMA, EMA.like_timm, EMA.like_averaged_model, EMA.like_ema_pytorch, EMA.like_diffusers):
        ema = preset(model)
        ema.update(1)
        average = ema.model_state_dict()
        assert average.keys() == model.state_dict().keys(), preset
        model.load_state_dict(average)  # strictly


def test_tied_weights_load_strictly_under_every_name(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    ema.update(2)
    average = ema.model_state_dict()
    assert "lm_head.weight" in average and "transformer.wte.weight" in average
    assert average["lm_head.weight"] is average["transformer.wte.weight"]  # one tensor, as the model's
    assert ema.names.count("transformer.wte.weight") == 1  # registered once
    fresh = transformers.GPT2LMHeadModel(config)
    fresh.load_state_dict(average)  # strictly
    assert torch.equal(fresh.lm_head.weight, average["lm_head.weight"])
    safetensors = pytest.importorskip("safetensors.torch")
    path = str(tmp_path / "ema.safetensors")
    ema.save(path)  # the file holds a tied tensor once: safetensors' load_model takes it strictly
    fresh = transformers.GPT2LMHeadModel(config)
    safetensors.load_model(fresh, path, strict=True)
    assert torch.equal(fresh.lm_head.weight, average["lm_head.weight"])


def test_a_compiled_model_is_averaged_as_its_original():
    """torch.compile's wrapper is looked through: names without "_orig_mod.", a state dict that
    loads strictly into the original, and the compiled forward sees the averages inside
    average_parameters (its graph reads the params). aot_eager: inductor's compile of this model
    takes over two minutes on two cores, and the wrapper is the same for every backend."""
    model = resnet()
    compiled = torch.compile(model, backend="aot_eager")
    ema = EMA(compiled, decay=0.5)
    assert not any("_orig_mod" in name for name in ema.names)
    train(compiled, 3, ema.update)
    average = ema.model_state_dict()
    assert average.keys() == model.state_dict().keys()
    model.load_state_dict(average)  # strictly, into the original (compiled._orig_mod)
    reference = resnet()
    reference.load_state_dict(average)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference.eval()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters():
        assert torch.allclose(compiled(x), reference(x), atol=1e-5)
    assert_same(model.state_dict(), trained)


# ---- 4. channels_last --------------------------------------------------------------------
def twin_of(model):
    twin = resnet()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_channels_last_averages_element_by_element_and_saves_row_major(tmp_path, rounding):
    """A channels_last model's EMA equals, bit for bit, the EMA of a contiguous model holding the
    same values (rounding to nearest; stochastic rounding's bits follow memory order, so they
    differ, each within rounding of the average). Its checkpoints are row-major: they load into
    the contiguous model's EMA and back, and safetensors gives the contiguous model its weights."""
    model = resnet().to(memory_format=torch.channels_last)
    assert not model.conv1[0].weight.is_contiguous()
    twin = twin_of(model)
    ours = EMA(model, decay=0.9, rounding=rounding)
    theirs = EMA(twin, decay=0.9, rounding=rounding)

    def on_step(step):
        ours.update(step)
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
            for p, q in zip(twin.buffers(), model.buffers()):
                p.copy_(q)
        theirs.update(step)

    train(model, 3, on_step, channels_last=True)
    average, reference = ours.model_state_dict(), theirs.model_state_dict()
    assert average["conv1.0.weight"].is_contiguous()  # read-outs are row-major
    if rounding == "nearest":
        assert_same(average, reference)
        assert torch.equal(ours.state_dict()["checkpoint"], theirs.state_dict()["checkpoint"])
    else:
        assert not torch.equal(average["conv1.0.weight"], reference["conv1.0.weight"])
        assert torch.allclose(average["conv1.0.weight"], reference["conv1.0.weight"], rtol=1e-6, atol=1e-7)
    saved = ours.state_dict()
    back = EMA(twin, decay=0.9, rounding=rounding)  # channels_last -> contiguous
    back.load_state_dict(saved)
    assert_same(back.model_state_dict(), average)
    again = EMA(model, decay=0.9, rounding=rounding)  # contiguous -> channels_last
    again.load_state_dict(back.state_dict())
    assert torch.equal(again.state_dict()["checkpoint"], saved["checkpoint"])
    path = str(tmp_path / "ema.safetensors")
    ours.save(path)
    fresh = resnet()
    from safetensors.torch import load_file
    fresh.load_state_dict(load_file(path))
    assert_same(fresh.state_dict(), average)
    from_file = EMA(model, decay=0.9, rounding=rounding)
    from_file.load(path)
    assert torch.equal(from_file.state_dict()["checkpoint"], saved["checkpoint"])
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ours.average_parameters():  # written in memory order, read as the model's layout
        assert_same(model.state_dict(), average)
        assert not model.conv1[0].weight.is_contiguous()
    assert_same(model.state_dict(), trained)
    ours.update(4)  # and on it goes
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
