"""EMA on a CUDA device: no host sync, CUDA graph replays, the CPU's bits. Skipped without a GPU
or without a CUDA build of the library."""
import math
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


# ---- what adaptive shadows read besides the params (sources.py) ----------------------------------
def test_layerwise_on_fresh_gradients_gives_the_cpus_bits():
    """zero_grad(set_to_none=True) every step: each update reads its step's new .grad tensors,
    with the CPU backend's bits."""
    models = {d: torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.Linear(65, 7)).to(d) for d in ("cpu", "cuda")}
    models["cuda"].load_state_dict(models["cpu"].state_dict())
    emas = {d: EMA(m, schedules=[polyak.Layerwise(beta0=0.99), polyak.Constant(0.9)]) for d, m in models.items()}
    gen = torch.Generator().manual_seed(6)
    for step in range(1, 6):
        for model in models.values():
            model.zero_grad(set_to_none=True)
        models["cpu"](torch.randn(9, 33, generator=gen) * step).pow(2).sum().backward()
        for p, q in zip(models["cpu"].parameters(), models["cuda"].parameters()):
            q.grad = p.grad.to("cuda")  # a new tensor every step
        perturb(models["cpu"], gen)
        models["cuda"].load_state_dict(models["cpu"].state_dict())
        for ema in emas.values():
            ema.update(step)
    assert emas["cpu"].handle.layer_betas(0) == emas["cuda"].handle.layer_betas(0)
    assert torch.equal(emas["cpu"].state_dict()["checkpoint"], emas["cuda"].state_dict()["checkpoint"])


def test_followed_gradients_outlive_a_queued_update_on_another_stream():
    """The update waits on a side stream while the main stream frees the gradients it reads and
    fills new tensors: they must not get the gradients' memory before the update has read it."""
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.Linear(65, 7)).cuda()
    ema = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    model(torch.randn(9, 33, device="cuda")).pow(2).sum().backward()
    ema.update(1)
    model.zero_grad(set_to_none=True)
    model(torch.randn(9, 33, device="cuda") * 5).pow(2).sum().backward()
    ema.set_grads()  # the table set now: the update below neither changes it nor waits
    norms = [p.grad.double().norm().item() for p in model.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)  # the update runs after this
        ema.update(2)
    model.zero_grad(set_to_none=True)  # frees the gradients on the main stream
    garbage = [torch.full_like(p, 1e6) for p in model.parameters() for _ in range(4)]
    torch.cuda.synchronize()
    betas = ema.handle.layer_betas(0)
    for i, norm in enumerate(norms):
        assert betas[i] == pytest.approx(0.9 * math.exp(-norm / sum(norms)), rel=1e-6), i
    assert garbage


def test_a_replaced_grad_norm_outlives_a_queued_update_on_another_stream():
    model = torch.nn.Linear(64, 32).cuda()
    ema = EMA(model, schedules=[polyak.GradNorm(c=0.5)])
    ema.set_grad_norm(torch.full((1,), 3.0, device="cuda"))  # only this EMA holds it
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)  # the update reads the norm after this
        ema.update(1)
    ema.set_grad_norm(torch.full((1,), 0.5, device="cuda"))  # the first tensor dropped
    garbage = [torch.full((1,), 1000.0, device="cuda") for _ in range(64)]  # on the main stream
    torch.cuda.synchronize()
    assert ema.handle.beta_product(0) == pytest.approx(1 - 0.5 / math.sqrt(1 + 9.0), rel=1e-12)
    assert garbage


def test_sources_are_refused_inside_a_capture_which_survives():
    model = torch.nn.Linear(8, 4).cuda()
    ema = EMA(model, schedules=[polyak.GradNorm(c=0.5)])
    ema.set_grad_norm(torch.ones(1, device="cuda"))
    lawa = EMA(model, schedules=[polyak.Layerwise(beta0=0.9)])
    model(torch.randn(3, 8, device="cuda")).sum().backward()
    lawa.set_grads()
    moved = [p.grad for p in model.parameters()]
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        x = torch.ones(1, device="cuda") * 2
        with pytest.raises(polyak.StateError, match="capture"):
            ema.set_grad_norm(x)
        model.zero_grad(set_to_none=True)
        model(torch.randn(3, 8, device="cuda")).sum().backward()  # new gradients in the graph's pool
        with pytest.raises(polyak.StateError):
            lawa.set_grads()
    graph.replay()
    torch.cuda.synchronize()
    assert float(x) == 2.0 and moved


def test_the_package_loads_its_cuda_library_by_name_and_runs_on_the_device(tmp_path):
    """The package as installed (python/polyak/_loader.py): this build's library under the name of its
    CUDA major, chosen, bound to the CUDA runtime the process has, and running an EMA on the device."""
    from polyak import _loader
    from test_loader import BUILT, installed
    (cudart,) = [n for n in _loader.needed(BUILT) if n.startswith("libcudart.so.")]
    major = cudart.rsplit(".", 1)[1]
    code = ("import torch, polyak\nfrom polyak.torch import EMA\nmodel = torch.nn.Linear(8, 4).cuda()\n"
            "ema = EMA(model, decay=0.5)\nema.update(1)\ntorch.cuda.synchronize()\n"
            "print(polyak.library_path())\nprint(repr(polyak.backend_reason('cuda')))\nprint(ema.step)")
    path, reason, step = installed(tmp_path, {"libpolyak_cpu.so": BUILT, f"libpolyak_cuda{major}.so": BUILT},
                                   env={"POLYAK_CUDA": major}, code=code)
    assert path.endswith(f"libpolyak_cuda{major}.so") and reason == "''" and step == "1"


def test_channels_last_on_the_device_matches_the_cpu_bit_for_bit():
    """A channels_last conv on the device: the library averages it in memory order there as on
    the CPU, and read-outs and checkpoints are row-major on both."""
    def convs(device):
        torch.manual_seed(4)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 5, 1))
        return model.to(device, memory_format=torch.channels_last)

    cpu, gpu = convs("cpu"), convs("cuda")
    assert not gpu[0].weight.is_contiguous()
    emas = [EMA(cpu, decay=0.9, rounding="stochastic"), EMA(gpu, decay=0.9, rounding="stochastic")]
    gen = torch.Generator().manual_seed(6)
    for step in range(1, 4):
        with torch.no_grad():
            for p, q in zip(cpu.parameters(), gpu.parameters()):
                p.add_(torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last)
                       if p.dim() == 4 else torch.randn(p.shape, generator=gen))
                q.copy_(p)
        for ema in emas:
            ema.update(step)
    on_cpu, on_gpu = (ema.model_state_dict() for ema in emas)
    for name, value in on_cpu.items():
        assert torch.equal(value, on_gpu[name].cpu()), name
    assert torch.equal(emas[0].state_dict()["checkpoint"], emas[1].state_dict()["checkpoint"])


def test_views_of_cuda_shadows_alias_device_memory_and_load_in_place(tmp_path):
    """shadow_views on the GPU are DLPack views of the device arena (data_ptr the library's),
    follow updates, and DCP loads into them in place."""
    import torch.distributed.checkpoint as dcp
    model = make_model("cuda")
    ema = EMA(model, decay=0.9)
    gen = torch.Generator(device="cuda").manual_seed(1)
    perturb(model, gen)
    ema.update(1)
    views = ema.shadow_views()
    name = ema.names[0]
    assert views[name].device == model.state_dict()[name].device
    assert views[name].data_ptr() == ema.handle.shadow_data(0, ema.handle.find_tensor(name))[0]
    assert torch.equal(views[name], ema.model_state_dict()[name].float())
    at_1 = {n: v.clone() for n, v in views.items()}
    dcp.save({"ema": ema.dcp}, checkpoint_id=str(tmp_path / "ckpt"))
    perturb(model, gen)
    ema.update(2)
    assert not torch.equal(views[name], at_1[name])  # the views follow the shadows
    again = EMA(model, decay=0.9)
    dcp.load({"ema": again.dcp}, checkpoint_id=str(tmp_path / "ckpt"))
    assert again.step == 1
    for n, v in again.shadow_views().items():
        assert v.is_cuda and torch.equal(v, at_1[n]), n


# ---- shadows in host memory (device="cpu"): docs/offload.md ----
@pytest.mark.parametrize("with_optimizer", [False, True])
def test_offloaded_shadows_give_the_device_shadows_bits(with_optimizer):
    model, twin = make_model("cuda"), make_model("cuda")
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, twin))
    on_device = EMA(twin, schedules=[polyak.Constant(0.9), polyak.Warmup(beta=0.999)])
    on_host = EMA(model, schedules=[polyak.Constant(0.9), polyak.Warmup(beta=0.999)], device="cpu",
                  optimizer=opt if with_optimizer else None, staging_bytes=1 << 20, cpu_threads=2)
    assert on_host.shadow_device == torch.device("cpu") and on_host.handle.shadows == "host"
    gen = torch.Generator(device="cuda").manual_seed(4)
    for step in (1, 2, 4, 5):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = (torch.rand(p.shape, generator=gen, device="cuda") - 0.5).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()  # with the optimizer given, its pre-hook waits for the last update's reads first
        twin_opt.step()
        on_device.update(step)
        on_host.update(step)
    torch.cuda.synchronize()
    a, b = on_device.state_dict(), on_host.state_dict()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key].cpu(), b[key].cpu()), key
    with on_host.average_parameters(), on_device.average_parameters():
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)


def test_views_of_offloaded_shadows_are_cpu_tensors_over_the_librarys_host_memory():
    model = make_model("cuda")
    ema = EMA(model, decay=0.9, device="cpu")
    gen = torch.Generator(device="cuda").manual_seed(2)
    perturb(model, gen)
    ema.update(1)
    expected = ema.model_state_dict()  # a read-out waits for the update's host folds
    views = ema.shadow_views()
    for name in ema.names:
        assert views[name].device.type == "cpu", name
        assert views[name].data_ptr() == ema.handle.shadow_data(0, ema.handle.find_tensor(name))[0], name
        assert torch.equal(views[name], expected[name].float().cpu()), name


def test_averaged_buffers_keep_the_offloads_reads_unoverlapped():
    # the forward writes BatchNorm's running statistics in place: averaged, they are read with
    # the params, so update() waits for every copy even with an optimizer given
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ema = EMA(model, decay=0.9, device="cpu", optimizer=opt)
    assert ema._optimizer_hook is None
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8)).cuda()
    other = EMA(plain, decay=0.9, device="cpu", optimizer=torch.optim.SGD(plain.parameters(), lr=0.01))
    assert other._optimizer_hook is not None
    for _ in range(2):
        model(torch.randn(4, 8, device="cuda")).sum().backward()
        opt.step()
        ema.update()
    torch.cuda.synchronize()
    ema.close()
    other.close()


def test_an_offloaded_update_does_not_wait_for_the_device():
    model = make_model("cuda")
    ema = EMA(model, decay=0.99, device="cpu")
    ema.update(1)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device work ahead of the update
    start = time.perf_counter()
    ema.update(2)
    assert time.perf_counter() - start < 0.1, "update waited for the device"
    torch.cuda.synchronize()
    assert ema.step == 2


def test_offloaded_shadows_take_no_device_memory_for_themselves():
    model = torch.nn.Linear(2048, 2048).cuda()
    torch.cuda.synchronize()
    before = torch.cuda.mem_get_info()[0]
    ema = EMA(model, decay=0.99, device="cpu", staging_bytes=1 << 20)
    ema.update(1)
    assert ema.step == 1
    torch.cuda.synchronize()
    used = before - torch.cuda.mem_get_info()[0]
    assert used <= (1 << 20) + (1 << 20), f"{used} bytes of device memory"  # staging + 1 MiB
