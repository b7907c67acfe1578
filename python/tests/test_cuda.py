"""EMA on a CUDA device: no host sync, CUDA graph replays, the CPU's bits. Skipped without a GPU
or without a CUDA build of the library."""
import time

import pytest

torch = pytest.importorskip("torch")
import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402

if not torch.cuda.is_available() or not polyak.backend_available("cuda"):
    pytest.skip("no CUDA device, or a library built without CUDA", allow_module_level=True)


def make_model(device, seed=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.BatchNorm1d(65), torch.nn.Linear(65, 7))
    model[2].to(torch.bfloat16)
    return model.to(device)


def perturb(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.rand(p.shape, generator=gen, device=p.device) - 0.5).to(p.dtype))


def test_update_enqueues_without_waiting_for_the_device():
    model = make_model("cuda")
    ema = EMA(model, decay=0.99)
    ema.update(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync torch makes raises
    try:
        torch.cuda._sleep(2_000_000_000)  # about a second of device work ahead of the update
        start = time.perf_counter()
        for step in range(2, 12):
            ema.update(step)
        host_seconds = time.perf_counter() - start
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert host_seconds < 0.1, "update waited for the device"
    torch.cuda.synchronize()
    assert ema.step == 11


def test_cuda_graph_replays_equal_direct_updates():
    model = make_model("cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    deltas = [(torch.rand(p.shape, generator=gen, device="cuda") * 0.1).to(p.dtype) for p in model.parameters()]
    graphed = EMA(model, schedules=[polyak.Constant(0.9), polyak.Warmup(beta=0.999)])
    direct = EMA(model, schedules=[polyak.Constant(0.9), polyak.Warmup(beta=0.999)])
    replays = 7
    graphed.graph_reserve(1, replays)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        with torch.no_grad():
            torch._foreach_add_(list(model.parameters()), deltas)  # the captured "optimizer step"
            model[1].num_batches_tracked.add_(1)  # a buffer the kernel node mirrors
        graphed.graph_update()
    for step in range(1, replays + 1):
        graph.replay()
        direct.update(step)
    assert graphed.graph_release() == replays
    assert int(graphed.model_state_dict()["1.num_batches_tracked"]) == replays
    # the library's checkpoints, byte for byte: every shadow, the mirrored buffers, the step state
    assert torch.equal(graphed.state_dict()["checkpoint"], direct.state_dict()["checkpoint"])


@pytest.mark.parametrize("shadow_dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
                                                   (torch.float32, "stochastic")])
def test_cuda_and_cpu_give_the_same_bits(shadow_dtype, rounding):
    models = {d: make_model(d) for d in ("cpu", "cuda")}
    options = dict(schedules=[polyak.Constant(0.999, rounding=rounding), polyak.Power(sigma_rel=0.1)],
                   shadow_dtype=shadow_dtype, seed=9)
    emas = {d: EMA(m, **options) for d, m in models.items()}
    gen = torch.Generator().manual_seed(2)
    for step in (1, 2, 5):
        perturb(models["cpu"], gen)
        with torch.no_grad():
            for p, q in zip(models["cpu"].parameters(), models["cuda"].parameters()):
                q.copy_(p)
        for ema in emas.values():
            ema.update(step)
    cpu, cuda = emas["cpu"].state_dict(), emas["cuda"].state_dict()
    assert torch.equal(cpu["checkpoint"], cuda["checkpoint"])  # no backend in it: the same bytes


def test_params_on_two_devices_are_refused():
    model = make_model("cuda")
    model[0].cpu()
    with pytest.raises(polyak.InvalidArgError, match="devices"):
        EMA(model)


def test_state_dict_round_trip_on_the_device(tmp_path):
    model = make_model("cuda")
    ema = EMA(model, decay=0.9)
    gen = torch.Generator(device="cuda").manual_seed(4)
    perturb(model, gen)
    ema.update(1)
    state = ema.state_dict()
    assert state["checkpoint"].device.type == "cpu"  # the library stages it through host memory
    again = EMA(model, decay=0.9)
    again.load_state_dict(state)
    perturb(model, gen)
    ema.update(2)
    again.update(2)
    assert torch.equal(ema.state_dict()["checkpoint"], again.state_dict()["checkpoint"])
    with ema.average_parameters():
        torch.cuda.synchronize()
