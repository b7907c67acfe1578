"""The EMA in torch.distributed.checkpoint (DCP) over views of the library's memory: FSDP2 and
shard=True EMAs saved on 2 gloo processes, loaded on 3 and on 1 and continued, equal bits to an
uninterrupted single-process run; an unsharded checkpoint loaded on 2; each rank's peak memory
while saving and loading grows by at most the largest stored piece and a few MiB, and by at most
half its shadow bytes; views alias the shadows (data_ptr), survive loads and close(); a DCP load
that fails half-way leaves the EMA refusing updates, saves and read-outs until a load succeeds;
dcp.async_save stages before update() can run.

One pytest test drives it all, to share the process groups (slow to start): this process runs
the reference and the single-process parts, torch.multiprocessing the 2- and 3-rank ones."""
import gc
import os
import re
import shutil
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)
dcp = pytest.importorskip("torch.distributed.checkpoint")
import torch.multiprocessing as mp  # noqa: E402

import polyak  # noqa: E402
from polyak.torch import EMA  # noqa: E402

SAVED, LAST = 3, 5  # steps before the checkpoint, and the last step after it
LAYERS, WIDTH = 12, 512  # 3.1M params: 12.6 MB per f32 shadow
# "a few MiB": the allocator, DCP's plans and metadata, and a new thread's malloc arena (one run
# in a few on a loaded 2-core machine measured 5.0 MiB against a usual 1); the bound is also at
# most half a rank's shadow bytes (memory_bound), so a second copy of one shadow fails the check
SLACK = 8 * 2 ** 20
LARGEST_PIECE = WIDTH * WIDTH * 4  # one whole f32 layer: the largest entry any checkpoint here stores
SCHEDULES = (polyak.Constant(0.9), polyak.Equal())


class Net(torch.nn.Module):
    """Wide layers (the memory checks), a param of 7 rows (uneven Shard(0) at 2 and 3 ranks), a
    BatchNorm (an averaged buffer, and a copied integer one)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))
        self.odd = torch.nn.Parameter(torch.zeros(7, 3))
        self.norm = torch.nn.BatchNorm1d(7)


def value(name, shape, step):
    """The deterministic value of a tensor at a step, whatever the world size."""
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    return torch.randn(shape, generator=gen)


def set_step(model, step):
    """Every rank's params and buffers as they are after `step` (its shard of each under FSDP2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            whole = value(name, p.shape, step)
            if hasattr(p, "to_local"):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                p.to_local().copy_(whole[offset[0]:offset[0] + shape[0]])
            else:
                p.copy_(whole)
        if hasattr(model, "norm"):
            model.norm.running_mean.copy_(value("mean", (7,), step))
            model.norm.num_batches_tracked.fill_(step)


class ConvNet(torch.nn.Module):
    """A channels_last convolution: shard=True slices its memory order, whose boxes DCP sees
    permuted back to the logical (row-major) tensor."""

    def __init__(self, channels_last):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 13, 3)
        if channels_last:
            self.conv.to(memory_format=torch.channels_last)


def conv_model(channels_last):
    model = ConvNet(channels_last)
    set_step(model, 0)
    return model


def conv_checks(directory, world_size):
    """shard=True over a channels_last convolution: saved at 2, loaded at 3 (and at 1, by the
    test) into channels_last and contiguous ones, the averages as saved."""
    path, averages_path = os.path.join(directory, "conv-2"), os.path.join(directory, "conv-2.pt")
    if world_size == 2:
        model = conv_model(channels_last=True)
        assert not model.conv.weight.is_contiguous()
        ema = EMA(model, decay=0.8, shard=True)
        run(model, ema, 1, 2)
        dcp.save({"ema": ema.dcp}, checkpoint_id=path)
        saved = {n: t.clone() for n, t in ema.model_state_dict().items()}
        if dist.get_rank() == 0:
            torch.save(saved, averages_path)
    else:
        for channels_last in (True, False):
            ema = EMA(conv_model(channels_last), decay=0.8, shard=True)
            dcp.load({"ema": ema.dcp}, checkpoint_id=path)
            saved = torch.load(averages_path)
            for n, t in ema.model_state_dict().items():
                assert torch.equal(t, saved[n]), (channels_last, n)


def run(model, ema, first, last):
    for step in range(first, last + 1):
        set_step(model, step)
        ema.update(step)


def kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_growth(fn):
    """Bytes the process's resident high-water mark rose above its resident size while fn ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS
    base = kib("VmRSS")
    fn()
    return (kib("VmHWM") - base) * 1024


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_averages(ema, reference, what):
    for k in range(len(SCHEDULES)):
        got = ema.model_state_dict(k)
        for name, ref in reference[k].items():
            assert torch.equal(whole(got[name]), ref), (what, k, name)


def fsdp2_model():
    model = Net()
    for layer in model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    set_step(model, 0)  # what the shadows start from
    return model


def ddp_model():
    model = torch.nn.parallel.DistributedDataParallel(Net()).module
    set_step(model, 0)
    return model


def plain_model():
    model = Net()
    set_step(model, 0)
    return model


def memory_bound(ema):
    """The most a save or load may grow a rank's peak: the largest piece and the slack, and at
    most half the rank's shadow bytes, so a second copy of one shadow fails (4.2 MB at 3 ranks)."""
    h = ema.handle
    total = 0
    for k in range(h.num_shadows):
        for s in ema._averaged:
            _, dtype, num_elems = h.shadow_data(k, s.info.index)
            total += num_elems * {"f32": 4, "bf16": 2}[dtype]
    return min(LARGEST_PIECE + SLACK, total // 2)


def measured_growth(fn, bound):
    """peak_growth(fn), measured again where it exceeds the bound on any rank (all ranks
    together: fn is collective), the smaller kept: a second copy of a shadow rises every time, a
    loaded machine's stray MiB (a new thread's malloc arena) not twice in a row."""
    growth = peak_growth(fn)
    over = torch.tensor([int(growth > bound)])
    if dist.is_initialized():
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
    if int(over):
        growth = min(growth, peak_growth(fn))
    return growth


def save_and_check(ema, directory, name, memory):
    bound = memory_bound(ema)
    growth = measured_growth(lambda: dcp.save({"ema": ema.dcp}, checkpoint_id=os.path.join(directory, name)), bound)
    memory.append((name, "save", growth))
    assert growth <= bound, f"{name}: saving grew the peak by {growth / 2 ** 20:.1f} MiB (> {bound / 2 ** 20:.1f})"


def load_and_check(ema, directory, name, memory, what):
    state = ema.dcp_state_dict()
    views = {n: t.to_local() if hasattr(t, "to_local") else t for n, t in state["shadows"][1].items()}

    def load():
        dcp.load({"ema": state}, checkpoint_id=os.path.join(directory, name))
        ema.load_state_dict(state)
    bound = memory_bound(ema)
    growth = measured_growth(load, bound)
    memory.append((f"{name} -> {what}", "load", growth))
    assert growth <= bound, \
        f"{name} -> {what}: loading grew the peak by {growth / 2 ** 20:.1f} MiB (> {bound / 2 ** 20:.1f})"
    for s in ema._averaged:  # the views DCP wrote are the library's shadows
        assert views[s.name].data_ptr() == ema.handle.shadow_data(1, s.info.index)[0]
    for k in range(len(SCHEDULES)):  # and the state still holds them after dcp.load: load_state_dict copied nothing
        for s in ema._averaged:
            address, _, num_elems = ema.handle.shadow_data(k, s.info.index)
            local = state["shadows"][k][s.name]
            local = local.to_local() if hasattr(local, "to_local") else local
            assert num_elems == 0 or local.data_ptr() == address, (what, k, s.name)
            assert ema._planned_write(s, k, state["shadows"][k][s.name], ema.shadow_dtype) == [], (what, k, s.name)
    assert ema.step == SAVED


def worker(rank, world_size, directory):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = os.path.join(directory, f"store-{world_size}")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    memory = []
    try:
        warm_up(directory)
        reference = torch.load(os.path.join(directory, "reference.pt"))
        if world_size == 2:
            for kind, make in (("fsdp2", fsdp2_model), ("ddp", ddp_model)):
                model = make()
                ema = EMA(model, schedules=SCHEDULES, shard=None if kind == "fsdp2" else True)
                run(model, ema, 1, SAVED)
                check_averages(ema, reference[SAVED], f"{kind} at 2")
                state = ema.dcp_state_dict()
                if kind == "fsdp2":  # FSDP2's state_dict() is this form, DTensors over the shadows
                    w = state["shadows"][0]["layers.0.weight"]
                    assert w.placements == model.layers[0].weight.placements
                    index = ema.handle.find_tensor("layers.0.weight")
                    assert w.to_local().data_ptr() == ema.handle.shadow_data(0, index)[0]
                    assert set(ema.state_dict()) == set(state)
                del state
                save_and_check(ema, directory, f"{kind}-2", memory)
                ema.update(SAVED + 1)  # the views go on being the shadows
                # an unsharded checkpoint (1 -> 2), loaded and continued
                again = EMA(model, schedules=SCHEDULES, shard=None if kind == "fsdp2" else True)
                load_and_check(again, directory, "whole-1", memory, f"{kind} at 2")
                run(model, again, SAVED + 1, LAST)
                check_averages(again, reference[LAST], f"whole-1 -> {kind} at 2")
        else:
            for kind, make in (("fsdp2", fsdp2_model), ("ddp", ddp_model)):
                model = make()
                for saved in ("fsdp2-2", "ddp-2"):  # any checkpoint into any kind, 2 -> 3
                    ema = EMA(model, schedules=SCHEDULES, shard=None if kind == "fsdp2" else True)
                    load_and_check(ema, directory, saved, memory, f"{kind} at 3")
                    check_averages(ema, reference[SAVED], f"{saved} -> {kind} at 3")
                    run(model, ema, SAVED + 1, LAST)
                    check_averages(ema, reference[LAST], f"{saved} -> {kind} at 3, continued")
                    ema.close()
        conv_checks(directory, world_size)
        torch.save(memory, os.path.join(directory, f"memory-{world_size}-{rank}.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # past gloo's teardown, which sometimes aborts after everything passed


def warm_up(directory):
    """One small DCP save and load first: the modules they import stay out of the measurements."""
    path = os.path.join(directory, f"warm-{dist.get_world_size() if dist.is_initialized() else 1}")
    dcp.save({"x": torch.zeros(4)}, checkpoint_id=path)
    dcp.load({"x": torch.zeros(4)}, checkpoint_id=path)


def averages(ema):
    return [{n: whole(t).clone() for n, t in ema.model_state_dict(k).items()} for k in range(len(SCHEDULES))]


def single_process(directory, memory):
    """The reference run, the unsharded checkpoint, and what one process checks."""
    warm_up(directory)
    model = plain_model()
    ema = EMA(model, schedules=SCHEDULES)
    reference = {}
    run(model, ema, 1, SAVED)
    reference[SAVED] = averages(ema)
    views = ema.shadow_views(1)
    index = ema.handle.find_tensor("layers.0.weight")
    assert views["layers.0.weight"].data_ptr() == ema.handle.shadow_data(1, index)[0]
    assert torch.equal(views["odd"], reference[SAVED][1]["odd"])
    save_and_check(ema, directory, "whole-1", memory)
    # async_save stages (copies) the state before it returns: an update at once does not reach
    # the checkpoint
    future = dcp.async_save({"ema": ema.dcp}, checkpoint_id=os.path.join(directory, "async-1"))
    run(model, ema, SAVED + 1, SAVED + 1)
    (future.upload_completion if hasattr(future, "upload_completion") else future).result()
    assert not torch.equal(views["odd"], reference[SAVED][1]["odd"])  # the views follow the shadows
    check = EMA(Net(), schedules=SCHEDULES)
    dcp.load({"ema": check.dcp}, checkpoint_id=os.path.join(directory, "async-1"))
    check_averages(check, reference[SAVED], "async_save then update")
    run(model, ema, SAVED + 2, LAST)
    reference[LAST] = averages(ema)
    torch.save(reference, os.path.join(directory, "reference.pt"))
    # views outlive close(): the EMA refuses every call, the memory stays until the last view goes
    views = ema.shadow_views(0)
    handle = ema.handle
    ema.close()
    with pytest.raises(polyak.StateError):
        ema.update(LAST + 1)
    assert torch.equal(views["odd"], reference[LAST][0]["odd"])
    assert handle._held is not None
    del views
    gc.collect()
    assert handle._held is None  # freed with the last view
    return reference


def test_dcp_views_reshard_across_world_sizes_in_place(tmp_path):
    directory = str(tmp_path)
    memory = []
    reference = single_process(directory, memory)
    mp.spawn(worker, args=(2, directory), nprocs=2, join=True)
    mp.spawn(worker, args=(3, directory), nprocs=3, join=True)
    for name in ("fsdp2-2", "ddp-2"):  # 2 -> 1: into an unsharded EMA
        model = Net()
        ema = EMA(model, schedules=SCHEDULES)
        load_and_check(ema, directory, name, memory, "whole at 1")
        check_averages(ema, reference[SAVED], f"{name} -> 1")
        run(model, ema, SAVED + 1, LAST)
        check_averages(ema, reference[LAST], f"{name} -> 1, continued")
    conv = EMA(conv_model(channels_last=False), decay=0.8)  # shard=True's channels_last slices, 2 -> 1
    dcp.load({"ema": conv.dcp}, checkpoint_id=os.path.join(directory, "conv-2"))
    saved = torch.load(os.path.join(directory, "conv-2.pt"))
    for n, t in conv.model_state_dict().items():
        assert torch.equal(t, saved[n]), n
    # a load that fails half-way: one rank's file gone; the EMA refuses updates until a load succeeds
    broken = os.path.join(directory, "broken")
    shutil.copytree(os.path.join(directory, "fsdp2-2"), broken)
    os.remove(os.path.join(broken, "__1_0.distcp"))
    model = Net()
    ema = EMA(model, schedules=SCHEDULES)
    run(model, ema, 1, 1)
    state = ema.dcp_state_dict()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    with pytest.raises((CheckpointException, OSError)):
        dcp.load({"ema": state}, checkpoint_id=broken)
    with pytest.raises(polyak.StateError, match="written"):
        ema.update(2)
    with pytest.raises(polyak.StateError):
        ema.save(os.path.join(directory, "torn.safetensors"))
    with pytest.raises((CheckpointException, polyak.StateError)):  # nor through DCP, nor read
        dcp.save({"ema": ema.dcp}, checkpoint_id=os.path.join(directory, "torn"))
    with pytest.raises(polyak.StateError, match="load a checkpoint"):
        ema.model_state_dict()
    with pytest.raises(polyak.StateError, match="load a checkpoint"):
        ema.copy_to(Net())
    dcp.load({"ema": ema.dcp}, checkpoint_id=os.path.join(directory, "fsdp2-2"))
    run(model, ema, SAVED + 1, LAST)
    check_averages(ema, reference[LAST], "after a failed load, a good one")
    for path in sorted(os.listdir(directory)):
        if path.startswith("memory-"):
            memory += torch.load(os.path.join(directory, path))
    print("\npeak memory growth per rank (MiB):")
    for name, what, growth in memory:
        print(f"  {what:4} {name:28} {growth / 2 ** 20:6.2f}")


# ---- one process, no process group ------------------------------------------------------------

def test_boxes_tile_a_flat_range_of_any_shape_contiguously():
    """Each box is a contiguous run of the flat range, and together they cover it once, in order."""
    from polyak.torch.dcp import _boxes
    gen = torch.Generator().manual_seed(5)
    for shape in [(), (7,), (7, 3), (4, 5, 6), (2, 1, 3, 5), (3, 0, 2)]:
        total = 1
        for d in shape:
            total *= d
        index = torch.arange(total).reshape(shape)
        for _ in range(20):
            first = int(torch.randint(0, total + 1, (1,), generator=gen))
            count = int(torch.randint(0, total - first + 1, (1,), generator=gen))
            covered = []
            for offsets, sizes, start in _boxes(shape, first, count):
                box = index[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))].reshape(-1)
                assert box.tolist() == list(range(start, start + box.numel())), (shape, first, count)
                covered += box.tolist()
            assert covered == list(range(first, first + count)), (shape, first, count)


def test_a_half_loaded_ema_is_neither_saved_nor_read(tmp_path):
    """A DCP load that fails half-way (a file gone) leaves the shadows open: dcp.save, the
    library's saves, model_state_dict and copy_to refuse until a load succeeds."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    model = plain_model()
    ema = EMA(model, schedules=SCHEDULES)
    run(model, ema, 1, 2)
    good = str(tmp_path / "good")
    dcp.save({"ema": ema.dcp}, checkpoint_id=good)
    broken = str(tmp_path / "broken")
    shutil.copytree(good, broken)
    for name in os.listdir(broken):
        if name.endswith(".distcp"):
            os.remove(os.path.join(broken, name))
    with pytest.raises((CheckpointException, OSError)):
        dcp.load({"ema": ema.dcp}, checkpoint_id=broken)
    assert ema._handle.step_state()["shadows_open"]
    with pytest.raises((CheckpointException, polyak.StateError), match="load a checkpoint"):
        dcp.save({"ema": ema.dcp}, checkpoint_id=str(tmp_path / "torn"))
    assert not os.path.exists(str(tmp_path / "torn" / ".metadata"))
    with pytest.raises(polyak.StateError, match="load a checkpoint"):
        ema.model_state_dict()
    with pytest.raises(polyak.StateError, match="load a checkpoint"):
        ema.copy_to(plain_model())
    with pytest.raises(polyak.StateError, match="load a checkpoint"):
        with ema.average_parameters():
            pass
    assert torch.equal(model.odd, value("odd", (7, 3), 2))  # the params untouched
    dcp.load({"ema": ema.dcp}, checkpoint_id=good)
    assert ema.step == 2 and ema.model_state_dict()
    dcp.save({"ema": ema.dcp}, checkpoint_id=str(tmp_path / "again"))


def test_a_step_state_opens_only_its_own_ema():
    """The step-state tensor holds its EMA weakly (not by id(), which a later EMA may reuse):
    once that EMA is gone, loading into the tensor opens nothing; while it lives, that EMA."""
    import weakref
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9)
    marker = ema.dcp_state_dict()["step_state"]
    assert isinstance(marker._polyak_target, weakref.ref) and marker._polyak_target() is ema
    marker.__create_chunk_list__()
    assert ema.handle.step_state()["shadows_open"]
    alive = weakref.ref(ema)
    del ema
    gc.collect()
    assert alive() is None and marker._polyak_target() is None
    other = EMA(torch.nn.Linear(2, 2), decay=0.9)
    other.dcp_state_dict()
    marker.__create_chunk_list__()
    assert not other.handle.step_state()["shadows_open"]


def test_a_capsule_dropped_unconsumed_releases_the_handle():
    """A "dltensor" capsule freed without a consumer runs its deleter (the DLPack rule): the
    handle's count of views goes back, and close() then frees the memory; a consumed one is the
    consumer's to free."""
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9)
    handle = ema.handle
    capsule = handle.shadow_capsule(0, 0)
    assert handle._views == 1
    del capsule
    gc.collect()
    assert handle._views == 0
    view = torch.from_dlpack(handle.shadow_capsule(0, 0))  # consumed: the capsule is freed, the view holds
    assert handle._views == 1
    ema.close()
    assert handle._held is not None
    del view
    gc.collect()
    assert handle._views == 0 and handle._held is None


def test_views_freed_on_many_threads_keep_count():
    """Views made and freed on several threads at once: the count ends at 0 and close() frees."""
    import threading
    ema = EMA(torch.nn.Linear(64, 64), decay=0.9)
    handle = ema.handle

    def churn():
        for _ in range(300):
            views = [torch.from_dlpack(handle.shadow_capsule(0, 0)) for _ in range(4)]
            del views
    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert handle._views == 0
    ema.close()
    assert handle._held is None


def test_the_dcp_route_names_its_torch_floor(monkeypatch):
    """On a torch older than 2.5, ema.dcp and dcp_state_dict say which torch they need."""
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9)
    state = ema.dcp_state_dict()
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    for call in (lambda: ema.dcp, ema.dcp_state_dict, lambda: ema.load_state_dict(state)):
        with pytest.raises(polyak.UnsupportedError, match=r"torch >= 2\.5.*this is torch 2\.4\.1"):
            call()
    monkeypatch.setattr(torch, "__version__", "2.5.0")
    ema.load_state_dict(ema.dcp_state_dict())


def test_counts_are_summed_over_the_shard_dimension_only():
    """HSDP (Replicate, Shard) meshes sum the ranks' non-finite counts over the shard dimension's
    group: replicas hold the same shard and would count it again over the world."""
    from torch.distributed.tensor import Replicate, Shard

    from polyak.torch.dcp import _count_group

    class Mesh:
        def __init__(self, shape):
            self.ndim, self.shape = len(shape), shape

        def size(self):
            n = 1
            for d in self.shape:
                n *= d
            return n

        def get_group(self, dim=None):
            assert dim is not None or self.ndim == 1
            return f"group {dim}"
    assert _count_group(Mesh((2, 3)), (Replicate(), Shard(0)), 6) == "group 1"
    assert _count_group(Mesh((3, 2)), (Shard(0), Replicate()), 6) == "group 0"
    assert _count_group(Mesh((4,)), (Shard(0),), 4) == "group None"
    assert _count_group(Mesh((2, 2)), (Replicate(), Replicate()), 4) is None
    assert _count_group(Mesh((2, 2)), (Shard(0), Shard(1)), 4) is dist.group.WORLD
    with pytest.raises(polyak.UnsupportedError, match="mesh"):
        _count_group(Mesh((2, 2)), (Shard(0), Shard(1)), 8)


def test_views_survive_loads(tmp_path):
    """A load copies into the shadows: a view taken before shows the loaded values after."""
    model = plain_model()
    ema = EMA(model, schedules=SCHEDULES)
    run(model, ema, 1, 2)
    views = ema.shadow_views(1)
    saved = views["odd"].clone()
    ema.save(str(tmp_path / "ema.safetensors"))
    run(model, ema, 3, 3)
    assert not torch.equal(views["odd"], saved)
    ema.load(str(tmp_path / "ema.safetensors"))
    assert torch.equal(views["odd"], saved) and ema.step == 2


def test_views_and_their_refusals():
    model = plain_model()
    with pytest.raises(polyak.UnsupportedError, match="zero_init"):
        EMA(model, decay=0.9, zero_init=True).shadow_views()
    ema = EMA(model, schedules=SCHEDULES)
    with pytest.raises(polyak.InvalidArgError):
        ema.shadow_views(2)
    run(model, ema, 1, 2)
    views = ema.shadow_views(0)
    assert views["norm.num_batches_tracked"].dtype == torch.int64 and int(views["norm.num_batches_tracked"]) == 2
    assert torch.equal(views["odd"], ema.model_state_dict()["odd"])
    # a state of another EMA (not views of this one) is checked, then copied
    other = EMA(plain_model(), schedules=SCHEDULES)
    state = ema.dcp_state_dict()
    state["settings"] = state["settings"].replace('"seed":0', '"seed":1')
    with pytest.raises(polyak.MismatchError, match="settings"):
        other.load_state_dict(state)
    state = ema.dcp_state_dict()
    state["shadows"][1]["odd"] = state["shadows"][1]["odd"][:3]
    with pytest.raises(polyak.MismatchError, match="odd"):
        other.load_state_dict(state)
    assert other.step == 0
    other.update(1)  # nothing was opened: updates go on
    other.load_state_dict(ema.dcp_state_dict())
    assert other.step == 2 and torch.equal(other.shadow_views(1)["odd"], ema.shadow_views(1)["odd"])
    # the step state is checked (as the library checks it) before a shadow is written: a refused
    # state changes nothing, and updates go on
    run(model, ema, 3, 3)
    before = {n: t.clone() for n, t in other.shadow_views(1).items()}
    import struct
    nan_bits = struct.unpack("<q", struct.pack("<d", float("nan")))[0]
    for index, bad, message in [(0, -5, "step -5"), (1, -1, "nonfinite_count"), (2, 4, r"update_counts\[0\]"),
                                (3, -1, r"update_counts\[1\]"), (4, nan_bits, r"beta_products\[0\]")]:
        state = ema.dcp_state_dict()
        state["step_state"][index] = bad
        with pytest.raises(polyak.InvalidArgError, match=message):
            other.load_state_dict(state)
        assert not other.handle.step_state()["shadows_open"] and other.step == 2
        for n, t in other.shadow_views(1).items():
            assert torch.equal(t, before[n]), (index, n)
    other.update(3)
    other.load_state_dict(ema.dcp_state_dict())
    assert other.step == 3
    other.update(4)
