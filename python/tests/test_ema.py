"""polyak.torch.EMA on the CPU: averages against float64, buffers, evaluation, checkpoints, bad input."""
import io
import math
import os

import pytest

torch = pytest.importorskip("torch")
import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402


class Mixed(torch.nn.Module):
    """Params of three dtypes and odd sizes, and a BatchNorm for buffers."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.norm = torch.nn.BatchNorm1d(13)
        self.b = torch.nn.Linear(13, 5).to(torch.bfloat16)
        self.c = torch.nn.Parameter(torch.randn(33, dtype=torch.float16))

    def forward(self, x):
        return self.b(self.norm(self.a(x)).to(torch.bfloat16)).float().sum() + self.c.float().sum()


def perturb(model, gen):
    """What an optimizer step does: every param moves in place (random, never zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.rand(p.shape, generator=gen) + 0.5).to(p.dtype))


def train_step(model, gen):
    """A forward pass in train mode (moves BatchNorm's statistics), then perturb."""
    model.train()
    model(torch.randn(6, 7, generator=gen))
    perturb(model, gen)


def shadows(ema, k=0):
    """Shadow k of every averaged tensor in the shadow dtype: the shadows' bits (debiased with zero_init)."""
    average = ema.model_state_dict(k, dtype=ema.shadow_dtype)
    return {name: average[name] for name in ema.names}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def gen():
    torch.manual_seed(11)
    return torch.Generator().manual_seed(11)


def test_every_shadow_follows_its_float64_average_across_dtypes_and_gaps(gen):
    model = Mixed()
    ema = EMA(model, schedules=[polyak.Constant(0.9), polyak.Warmup(beta=0.99), polyak.Equal()])
    names = ema.names
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    ref = [{n: params[n].detach().double().clone() for n in names} for _ in range(3)]
    last = 0
    for step in (1, 2, 3, 6, 7, 12):
        train_step(model, gen)
        ema.update(step)
        for k in range(3):
            decay = 1.0
            for s in range(last + 1, step + 1):
                t = s - 1
                decay *= [0.9, 0.0 if t == 0 else min(0.99, 1 - (1 + t) ** (-2 / 3)), t / (t + 1)][k]
            for n in names:
                ref[k][n] = decay * ref[k][n] + (1 - decay) * params[n].detach().double()
        last = step
    for k in range(3):
        got = shadows(ema, k)
        for n in names:
            scale = ref[k][n].abs().max().item() + 1
            assert (got[n].double() - ref[k][n]).abs().max().item() < 1e-6 * scale, (k, n)
    assert ema.step == 12 and ema.nonfinite_count() == 0


def test_floating_buffers_are_averaged_and_the_others_copied(gen):
    model = Mixed()
    ema = EMA(model, decay=0.5)
    assert "norm.running_mean" in ema.names and "norm.num_batches_tracked" not in ema.names
    mean = model.norm.running_mean.double().clone()
    for step in (1, 2, 3):
        train_step(model, gen)
        ema.update(step)
        mean = 0.5 * mean + 0.5 * model.norm.running_mean.double()
    train_step(model, gen)  # after the last update: not in the average
    avg = ema.model_state_dict()
    assert (avg["norm.running_mean"].double() - mean).abs().max() < 1e-6
    assert int(avg["norm.num_batches_tracked"]) == 3 and int(model.norm.num_batches_tracked) == 4


def test_buffers_copy_and_ignore(gen):
    model = Mixed()
    copying = EMA(model, decay=0.5, buffers="copy")
    ignoring = EMA(model, decay=0.5, buffers="ignore")
    train_step(model, gen)
    copying.update(1)
    ignoring.update(1)
    avg = copying.model_state_dict()
    assert torch.equal(avg["norm.running_var"], model.norm.running_var)
    assert not any(n.startswith("norm.running") for n in ignoring.names)
    ignored = ignoring.model_state_dict()  # the model's own buffers: a state dict that loads strictly
    assert ignored.keys() == model.state_dict().keys()
    assert torch.equal(ignored["norm.running_var"], model.norm.running_var)


def test_buffers_are_mirrored_by_the_library_in_the_update_call(gen):
    """num_batches_tracked is the library's copy-only tensor: the update call itself mirrors it
    (also a CPU graph replay), read out in its dtype; float64 buffers are copied too."""
    model = Mixed()
    model.register_buffer("scale", torch.tensor([0.1, 0.2], dtype=torch.float64))
    ema = EMA(model, decay=0.5)
    h = ema.handle
    info = h.tensor_info(h.find_tensor("norm.num_batches_tracked"))
    assert info.copy_only and (info.dtype, info.shape) == ("i64", ())
    assert h.tensor_info(h.find_tensor("scale")).copy_only and "scale" not in ema.names
    assert not h.tensor_info(h.find_tensor("norm.running_var")).copy_only
    train_step(model, gen)
    ema.update(1)
    out = torch.zeros((), dtype=torch.int64)
    h.get_shadow(0, info.index, out.data_ptr(), "i64", dst_num_bytes=8)
    assert int(out) == 1
    ema.graph_reserve(2, 2)
    for _ in range(2):
        train_step(model, gen)
        with torch.no_grad():
            model.scale.add_(1)
        ema.graph_update()
    assert ema.graph_release() == 2
    average = ema.model_state_dict()
    assert int(average["norm.num_batches_tracked"]) == 3 and average["scale"].dtype == torch.float64
    assert torch.equal(average["scale"], model.scale)


def test_a_batchnorm_model_through_state_dict_and_save(gen, tmp_path):
    """BatchNorm's buffers travel in the library's checkpoint: a state_dict restored into a new EMA
    gives the mirrors back (average_parameters writes them into the model), and both EMAs go on
    with the same bits, buffers included."""
    model = Mixed()
    first = EMA(model, decay=0.8)
    for step in (1, 2):
        train_step(model, gen)
        first.update(step)
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    train_step(model, gen)  # the model's buffers move on; the state holds those of step 2
    second = EMA(model, decay=0.8)
    blob.seek(0)
    second.load_state_dict(torch.load(blob))
    with second.average_parameters():
        assert int(model.norm.num_batches_tracked) == 2
    assert int(model.norm.num_batches_tracked) == 3
    for ema in (first, second):
        ema.update(3)
    assert torch.equal(first.state_dict()["checkpoint"], second.state_dict()["checkpoint"])
    path = tmp_path / "ema.safetensors"
    second.save(path)
    third = EMA(model, decay=0.8)
    third.handle.load(str(path))
    assert int(third.model_state_dict()["norm.num_batches_tracked"]) == 3


def test_average_parameters_evaluates_the_average_and_restores_every_bit(gen):
    model = Mixed()
    ema = EMA(model, decay=0.7)
    for step in range(1, 5):
        train_step(model, gen)
        ema.update(step)
    train_step(model, gen)
    before, average = snapshot(model), ema.model_state_dict()
    with ema.average_parameters():
        assert_same(snapshot(model), average)
        with pytest.raises(polyak.StateError, match="average_parameters"):
            ema.update(5)  # it would fold the average into itself
        with pytest.raises(polyak.StateError):
            with ema.average_parameters(shadow=0):
                pass
    assert_same(snapshot(model), before)
    assert ema.step == 4 and torch.equal(ema.model_state_dict()["a.weight"], average["a.weight"])
    with pytest.raises(RuntimeError, match="inside"):
        with ema.average_parameters():
            raise RuntimeError("inside")
    assert_same(snapshot(model), before)
    ema.update(6)  # the store is over: updates go on


def test_copy_to_writes_the_average_into_another_model(gen):
    model, other = Mixed(), Mixed()
    ema = EMA(model, decay=0.7)
    train_step(model, gen)
    ema.update(1)
    ema.copy_to(other)
    assert_same(snapshot(other), ema.model_state_dict())
    with pytest.raises(polyak.MismatchError):
        ema.copy_to(torch.nn.Linear(7, 13))


@pytest.mark.parametrize("shadow_dtype,zero_init", [(torch.float32, False), (torch.bfloat16, False),
                                                    (torch.float32, True)])
def test_state_dict_round_trips_through_torch_save_bit_exactly(gen, shadow_dtype, zero_init):
    model = Mixed()
    options = dict(schedules=[polyak.Constant(0.99), polyak.Power(sigma_rel=0.1)], shadow_dtype=shadow_dtype,
                   zero_init=zero_init, seed=5)
    first = EMA(model, **options)
    for step in (1, 2, 4):
        train_step(model, gen)
        first.update(step)
    blob = io.BytesIO()
    torch.save({"ema": first.state_dict()}, blob)
    blob.seek(0)
    second = EMA(model, **options)  # starts from the current params
    second.load_state_dict(torch.load(blob)["ema"])
    assert second.step == 4
    for step in (5, 9):  # both go on: the same bits
        train_step(model, gen)
        first.update(step)
        second.update(step)
    # the library's checkpoints of both, byte for byte: every shadow's bits and the step state
    assert torch.equal(first.state_dict()["checkpoint"], second.state_dict()["checkpoint"])
    assert shadows(second)["a.weight"].dtype == shadow_dtype


def test_a_mismatching_state_is_refused_and_changes_nothing(gen):
    model = Mixed()
    ema = EMA(model, decay=0.9)
    train_step(model, gen)
    ema.update(1)
    before = ema.state_dict()
    other = EMA(model, decay=0.99)
    other.update(2)
    with pytest.raises(polyak.MismatchError, match="schedule"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(polyak.MismatchError, match="missing"):
        ema.load_state_dict(EMA(torch.nn.Linear(7, 13), decay=0.9).state_dict())  # another model
    corrupt = ema.state_dict()
    corrupt["checkpoint"] = corrupt["checkpoint"].clone()
    corrupt["checkpoint"][-1] ^= 1
    with pytest.raises(polyak.FormatError, match="checksum"):
        ema.load_state_dict(corrupt)
    for bad in ({"shadows": []}, {"checkpoint": torch.zeros(8)}, [1, 2]):
        with pytest.raises(polyak.FormatError):
            ema.load_state_dict(bad)
    # the form FSDP2 EMAs give (the shadows as tensors), made here without processes
    parts = other._parts()
    parts["shadows"][0]["a.weight"] = parts["shadows"][0]["a.weight"][:3]
    with pytest.raises(polyak.MismatchError, match="a.weight"):
        ema.load_state_dict(parts)
    del parts["shadows"][0]["a.weight"]
    with pytest.raises(polyak.MismatchError, match="lacks"):
        ema.load_state_dict(parts)
    assert torch.equal(ema.state_dict()["checkpoint"], before["checkpoint"])


def test_a_state_as_tensors_loads_through_the_librarys_checks(gen):
    """The tensor form of the state (FSDP2's, so that torch.distributed.checkpoint can reshard
    it) is checked by the library too: its metadata against this EMA's configuration."""
    model = Mixed()
    options = dict(schedules=[polyak.Constant(0.9), polyak.Power(gamma=7.0, rounding="stochastic")], seed=4)
    ema = EMA(model, **options)
    for step in (1, 3):
        train_step(model, gen)
        ema.update(step)
    parts = ema._parts()
    assert parts["shadows"][1]["a.weight"].dtype == torch.float32 and "checksum" not in parts["metadata"]
    assert int(parts["copies"]["norm.num_batches_tracked"]) == 2
    again = EMA(model, **options)
    again.load_state_dict(parts)
    assert torch.equal(again.state_dict()["checkpoint"], ema.state_dict()["checkpoint"])
    nearest = EMA(model, schedules=[polyak.Constant(0.9), polyak.Power(gamma=7.0)], seed=4)
    with pytest.raises(polyak.MismatchError, match="rounding"):
        nearest.load_state_dict(parts)
    del parts["copies"]["norm.num_batches_tracked"]
    with pytest.raises(polyak.MismatchError, match="num_batches_tracked"):
        again.load_state_dict(parts)
    assert nearest.step == 0 and torch.equal(again.state_dict()["checkpoint"], ema.state_dict()["checkpoint"])


def test_save_gives_a_file_safetensors_loads_into_the_model(gen, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = Mixed()
    ema = EMA(model, decay=0.8)
    for step in (1, 2):
        train_step(model, gen)
        ema.update(step)
    path = tmp_path / "ema.safetensors"
    ema.save(path)
    saved = safetensors_torch.load_file(path)
    assert saved["norm.num_batches_tracked"].dtype == torch.int64  # the copied buffer, in its dtype
    fresh = Mixed()
    fresh.load_state_dict(saved)  # strict: every param and buffer
    average = ema.model_state_dict()
    assert int(average["norm.num_batches_tracked"]) == 2
    for name, value in average.items():  # averages f32 in the file, the param's dtype in the model
        assert torch.equal(fresh.state_dict()[name], value), name
    again = EMA(model, decay=0.8)
    again.handle.load(str(path))  # the library's own checkpoint: the exact state
    assert_same(shadows(again), shadows(ema))


def test_a_reallocated_param_is_refused_before_anything_changes(gen):
    model = Mixed()
    ema = EMA(model, decay=0.9)
    train_step(model, gen)
    ema.update(1)
    before = shadows(ema)
    model.a.weight.data = model.a.weight.data.clone()  # same values, new memory
    with pytest.raises(polyak.StateError, match="a.weight"):
        ema.update(2)
    assert_same(shadows(ema), before) and ema.step == 1


@pytest.mark.parametrize("change", ["assign", "to", "buffer"])
def test_every_kind_of_reallocation_is_noticed(gen, change):
    model = Mixed()
    ema = EMA(model, decay=0.9)
    if change == "assign":
        model.load_state_dict(Mixed().state_dict(), assign=True)
    elif change == "to":
        model.a.to(torch.float64)
    else:
        model.norm.running_mean = torch.zeros(13)
    with pytest.raises(polyak.StateError, match="model changed"):
        ema.update(1)
    with pytest.raises(polyak.StateError, match="model changed"), ema.average_parameters():
        pass
    ema.model_state_dict()  # the shadows themselves can still be read and saved


def test_bad_input_raises_the_right_exception():
    model = Mixed()
    with pytest.raises(polyak.InvalidArgError, match="'weight' is not dense"):
        EMA(torch.nn.ParameterDict({"weight": torch.randn(6, 8)[:, ::2]}))  # every other column: gaps
    with pytest.raises(polyak.InvalidArgError, match="devices"):
        two = torch.nn.Module()
        two.x = torch.nn.Parameter(torch.randn(3))
        two.y = torch.nn.Parameter(torch.randn(3, device="meta"))
        EMA(two)
    with pytest.raises(polyak.UnsupportedError, match="float64"):
        EMA(torch.nn.Linear(3, 3).double())  # params are averaged, never copied
    odd = torch.nn.Linear(3, 3)
    odd.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(polyak.UnsupportedError, match="phase"):
        EMA(odd)
    assert EMA(odd, buffers="ignore").names == ["weight", "bias"]
    with pytest.raises(polyak.InvalidArgError):
        EMA(model, schedules=[polyak.Constant(0.9)], rounding="stochastic")
    with pytest.raises(polyak.InvalidArgError):
        EMA(model, buffers="average-all")
    with pytest.raises(polyak.InvalidArgError):
        EMA(model, decay=0.9, schedules=[polyak.Constant(0.9)])
    with pytest.raises(polyak.InvalidArgError):
        EMA([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(polyak.InvalidArgError):
        EMA(model, shadow_dtype=torch.float16)
    ema = EMA(model, decay=0.9)
    ema.update(5)
    before = shadows(ema)
    with pytest.raises(polyak.InvalidArgError, match="step"):
        ema.update(5)  # not after the last
    with pytest.raises(polyak.InvalidArgError):
        ema.model_state_dict(shadow=1)
    assert_same(shadows(ema), before) and ema.step == 5
    ema.close()
    with pytest.raises(polyak.StateError, match="closed"):
        ema.update(6)


def test_update_without_a_step_counts_calls_and_a_given_step_compensates_gaps(gen):
    """update() applies the step after the last one, as timm's and ema-pytorch's update() count
    calls; an explicit step keeps the skipped steps' decay exact; a load or graph replays move
    the count to the handle's step."""
    model = Mixed()
    counted, explicit = (EMA(model, schedules=[polyak.Warmup(beta=0.99), polyak.Equal()]) for _ in range(2))
    for step in range(1, 13):
        perturb(model, gen)
        if step == 10:
            counted.update(10)  # after update(6): steps 7..9 compensated, then update() gives 11
        elif step not in (7, 8, 9):
            counted.update()
        if step not in (7, 8, 9):
            explicit.update(step)
        assert counted.step == explicit.step
    assert counted.step == 12
    assert torch.equal(counted.state_dict()["checkpoint"], explicit.state_dict()["checkpoint"])
    state = counted.state_dict()
    counted.update()
    counted.update()  # step 14
    counted.load_state_dict(state)
    counted.update()  # from the loaded step 12
    assert counted.step == 13
    counted.graph_reserve(20, 2)
    counted.graph_update()
    counted.graph_update()
    assert counted.graph_release() == 2
    counted.update()
    assert counted.step == 22


def test_update_without_a_step_follows_a_preset_that_updates_every_k_steps(gen):
    """like_ema_pytorch updates at steps 1, 11, 21, ...: update() counts the calls it leaves out,
    so it updates at the same calls as update(step) does (and as ema-pytorch's update())."""
    model = Mixed()
    counted, explicit = (EMA.like_ema_pytorch(model, update_after_step=10, update_every=5) for _ in range(2))
    for step in range(1, 33):
        perturb(model, gen)
        counted.update()
        explicit.update(step)
        assert counted.step == explicit.step
    assert counted.step == 31
    assert torch.equal(counted.state_dict()["checkpoint"], explicit.state_dict()["checkpoint"])


def test_arguments_of_a_wrong_type_raise_invalid_arg_naming_them():
    """ema.update(2.5) and the like: polyak's InvalidArgError naming the argument, never ctypes'
    ArgumentError or a TypeError, and the EMA unchanged."""
    model = Mixed()
    ema = EMA(model, schedules=[polyak.Constant(0.9), polyak.Equal()])
    ema.update(1)
    before = shadows(ema)
    calls = [
        (lambda: ema.update(2.5), "step"), (lambda: ema.update("3"), "step"),
        (lambda: ema.update(torch.tensor(2.0)), "step"), (lambda: ema.update(2 ** 64 + 2), "step"),
        (lambda: ema.model_state_dict(shadow="0"), "shadow"), (lambda: ema.model_state_dict(dtype=[1]), "dtype"),
        (lambda: ema.copy_to(Mixed(), shadow=0.0), "shadow"), (lambda: ema.snapshot(1.0), "shadow"),
        (lambda: ema.graph_reserve(2.0, 4), "first_step"),
        (lambda: ema.set_grad_norm(1.0), "grad_norm"), (lambda: ema.set_grads([1.0, 2.0, 3.0, 4.0]), "gradient"),
        (lambda: EMA(model, decay="0.9"), "beta"), (lambda: EMA(model, decay=0.9, start_step=1.5), "start_step"),
        (lambda: EMA(model, seed="1"), "seed"), (lambda: EMA(model, cpu_threads=2.0), "cpu_threads"),
        (lambda: EMA.like_timm(model, update_after_step=1.5), "update_after_step"),
        (lambda: EMA.like_ema_pytorch(model, update_every="10"), "update_every"),
        (lambda: EMA.like_diffusers(model, update_after_step=None), "update_after_step"),
    ]
    for call, name in calls:
        with pytest.raises(polyak.InvalidArgError, match=name) as raised:
            call()
        assert not isinstance(raised.value, TypeError), name
    with pytest.raises(polyak.InvalidArgError, match="weights"), ema.average_parameters(weights=["a", 1]):
        pass
    with pytest.raises(polyak.InvalidArgError, match="snapshots"), ema.posthoc_parameters([1.0], [1.0]):
        pass
    assert_same(shadows(ema), before) and ema.step == 1
    ema.update(torch.tensor(2))  # an integer tensor is an integer
    assert ema.step == 2


def test_a_nonfinite_param_leaves_its_shadow_and_is_counted(gen):
    model = Mixed()
    ema = EMA(model, decay=0.5)
    before = shadows(ema)["a.bias"].clone()
    perturb(model, gen)
    with torch.no_grad():
        model.a.bias[3] = float("nan")
    ema.update(1)
    after = shadows(ema)["a.bias"]
    assert after[3] == before[3] and ema.nonfinite_count() == 1
    assert not torch.equal(after[:3], before[:3])


def test_lookahead_writes_the_slow_weights_into_the_params(gen):
    model = torch.nn.Linear(5, 3)
    start = {k: v.double().clone() for k, v in model.state_dict().items()}
    ema = EMA(model, schedules=[polyak.Constant(0.9), polyak.Lookahead(alpha=0.5, every=2)])
    perturb(model, gen)
    ema.update(1)  # no sync
    perturb(model, gen)
    fast = {k: v.double().clone() for k, v in model.state_dict().items()}
    ema.update(2)  # a sync: slow += 0.5 (fast - slow); params <- slow
    for k, v in model.state_dict().items():
        assert (v.double() - (start[k] + 0.5 * (fast[k] - start[k]))).abs().max() < 1e-6


def test_grad_norm_decay_reads_the_norm_tensor(gen):
    model = torch.nn.Linear(5, 3)
    start = {k: v.double().clone() for k, v in model.state_dict().items()}
    ema = EMA(model, schedules=[polyak.GradNorm(c=0.5)])
    norm = torch.tensor([3.0])
    ema.set_grad_norm(norm)
    perturb(model, gen)
    ema.update(1)
    beta = 1 - 0.5 / math.sqrt(1 + 9.0)
    for k, v in shadows(ema).items():
        ref = beta * start[k] + (1 - beta) * model.state_dict()[k].double()
        assert (v.double() - ref).abs().max() < 1e-6
    with pytest.raises(polyak.InvalidArgError):
        ema.set_grad_norm(torch.tensor([3.0], dtype=torch.float64))


def test_layerwise_decay_follows_each_tensors_gradient_share(gen):
    model = torch.nn.Linear(5, 3)
    start = {k: v.double().clone() for k, v in model.state_dict().items()}
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    model(torch.randn(4, 5, generator=gen)).pow(2).sum().backward()
    ema.set_grads()
    norms = {k: p.grad.double().norm().item() for k, p in model.named_parameters()}
    perturb(model, gen)
    ema.update(1)
    for k, v in shadows(ema).items():
        beta = 0.9 * math.exp(-norms[k] / sum(norms.values()))
        ref = beta * start[k] + (1 - beta) * model.state_dict()[k].double()
        assert (v.double() - ref).abs().max() < 1e-6


def test_blends_and_posthoc_synthesis_through_torch(gen):
    model = Mixed()
    ema = EMA(model, schedules=[polyak.Power(sigma_rel=0.05), polyak.Power(sigma_rel=0.10)])
    for step in range(1, 6):
        train_step(model, gen)
        ema.update(step)
    s0, s1 = shadows(ema, 0), shadows(ema, 1)
    with ema.average_parameters(weights=[0.25, 0.75]):
        for n in ["a.weight", "c"]:
            got = dict(model.named_parameters())[n].double()
            ref = (0.25 * s0[n].double() + 0.75 * s1[n].double()).to(got.dtype if n != "c" else torch.float16)
            assert (got - ref.double()).abs().max() < 2e-3 if n == "c" else 1e-6
    stack = torch.stack([ema.snapshot(0), ema.snapshot(1)])
    with ema.posthoc_parameters(stack, [1.0, 0.0]):
        assert torch.equal(model.a.weight.detach(), s0["a.weight"])
    with pytest.raises(polyak.InvalidArgError):
        with ema.posthoc_parameters(stack[:, :5], [1.0, 0.0]):
            pass


def wide_model():
    """Mixed, and tensors of several of the CPU backend's work items (65,536 elements each) in each
    param dtype, so that threads share every walk; a float64 buffer, copied."""
    torch.manual_seed(3)
    model = Mixed()
    model.wide = torch.nn.Linear(512, 300)
    model.wide_bf16 = torch.nn.Parameter(torch.randn(3 * 65536 + 17, dtype=torch.bfloat16))
    model.wide_f16 = torch.nn.Parameter(torch.randn(2 * 65536 + 5, dtype=torch.float16))
    model.register_buffer("scale", torch.tensor([0.1, 0.2], dtype=torch.float64))
    return model


def threads_now():
    """The threads of this process (the library's workers among them)."""
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("shadow_dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_thread_count_gives_the_same_bits(shadow_dtype):
    """cpu_threads 1, 2 and 0 (one per core): the same checkpoint bytes (every shadow, the copied
    buffers, the step state), read-outs and blends written into the model, after updates with gaps,
    a non-finite param and stochastic rounding."""
    results = []
    for threads in (1, 2, 0):
        model = wide_model()
        gen = torch.Generator().manual_seed(5)
        ema = EMA(model, schedules=[polyak.Constant(0.9), polyak.Power(sigma_rel=0.1, rounding="stochastic")],
                  shadow_dtype=shadow_dtype, seed=7, cpu_threads=threads)
        for step in (1, 2, 5, 9):
            train_step(model, gen)
            with torch.no_grad():
                model.scale.add_(step)
                model.wide.weight[3, step] = float("nan")
            ema.update(step)
        with ema.average_parameters(weights=[0.25, 0.75]):
            blend = snapshot(model)
        results.append((ema.state_dict()["checkpoint"], ema.model_state_dict(1), blend, ema.nonfinite_count()))
        ema.close()
    (checkpoint, average, blend, count), others = results[0], results[1:]
    assert count == 1 + 2 + 3 + 4 and int(average["norm.num_batches_tracked"]) == 4  # NaNs stay NaN
    for other in others:
        assert torch.equal(other[0], checkpoint)
        assert_same(other[1], average)
        assert_same(other[2], blend)
        assert other[3] == count


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_cpu_threads_start_workers_until_close_and_bad_counts_create_nothing():
    model = wide_model()
    model(torch.randn(6, 7))  # torch's own threads, if any, start before the counts
    before = threads_now()
    for bad in (-1, -(2 ** 31), polyak.MAX_CPU_THREADS + 1, 2 ** 32, 1.5, "2"):
        with pytest.raises(polyak.InvalidArgError, match="cpu_threads"):
            EMA(model, cpu_threads=bad)
        with pytest.raises(polyak.InvalidArgError, match="cpu_threads"):
            polyak.Handle(cpu_threads=bad)
    assert threads_now() == before
    cores = len(os.sched_getaffinity(0))
    for threads, workers in ((1, 0), (3, 2), (0, min(cores, polyak.MAX_CPU_THREADS) - 1)):
        ema = EMA(model, cpu_threads=threads)
        assert ema.handle.config.cpu_threads == threads and threads_now() == before + workers
        ema.update(1)
        ema.close()
        assert threads_now() == before
