"""EMA(model, device="cpu"): on a CPU model the ordinary CPU EMA; the arguments that go with
offloading refused where there is nothing to offload. (Offloaded shadows of a CUDA model:
test_cuda.py.)"""
import pytest

torch = pytest.importorskip("torch")
import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402


def make_model(seed=5):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.BatchNorm1d(17), torch.nn.Linear(17, 3))


def train(model, ema, steps):
    gen = torch.Generator().manual_seed(7)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.rand(p.shape, generator=gen) - 0.5)
        ema.update(step)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_cpu_on_a_cpu_model_is_the_ordinary_cpu_ema(device):
    model = make_model()
    twin = make_model()
    plain, on_cpu = EMA(twin, decay=0.9), EMA(model, decay=0.9, device=device)
    assert on_cpu.shadow_device == torch.device("cpu") and on_cpu.handle.shadows == "device"
    train(twin, plain, [1, 2, 5])
    train(model, on_cpu, [1, 2, 5])
    a, b = plain.state_dict(), on_cpu.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def test_another_device_than_the_models_is_refused():
    with pytest.raises(polyak.InvalidArgError, match="model's device"):
        EMA(make_model(), device="cuda:0")
    with pytest.raises(polyak.InvalidArgError, match="device="):
        EMA(make_model(), device="nowhere")


def test_optimizer_and_staging_go_with_offloaded_shadows_only():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(polyak.InvalidArgError, match="device='cpu' for a CUDA model"):
        EMA(model, device="cpu", optimizer=opt)
    with pytest.raises(polyak.InvalidArgError, match="staging_bytes"):
        EMA(model, device="cpu", staging_bytes=1 << 20)


def test_wait_param_reads_is_a_no_op_without_offloaded_shadows():
    model = make_model()
    ema = EMA(model, decay=0.9, device="cpu")
    train(model, ema, [1])
    ema.wait_param_reads()
    assert ema.step == 1


def test_a_handle_takes_shadows_device_or_host_only():
    with pytest.raises(polyak.InvalidArgError, match="'device' or 'host'"):
        polyak.Handle(shadows="gpu")
    with pytest.raises(polyak.PolyakError):
        polyak.Handle(shadows="device", staging_bytes=1 << 20)  # not an offloaded handle: refused
