"""Peak memory of an EMA in torch.distributed.checkpoint, per rank, on the CPU with gloo.

An MLP of 6.3M params (one f32 shadow: 25.2 MB) averaged by polyak.torch.EMA under FSDP2 and
with shard=True (DDP), saved with DCP on 2 processes and loaded on 3 and on 1; each rank's
resident high-water mark is reset before each save or load (/proc/self/clear_refs) and its rise
printed, in MiB and as a multiple of the rank's shadow bytes. With a polyak that has ema.dcp
(1.0: views of the library's memory) it saves and loads {"ema": ema.dcp}; with an older one,
{"ema": ema.state_dict()} then ema.load_state_dict, the route it had.

    POLYAK_LIBRARY=build/libpolyak.so PYTHONPATH=python python bench/dcp_memory.py [directory]
"""
import gc
import os
import re
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed import fsdp

from polyak.torch import EMA


def make(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024),
                                torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    if kind == "fsdp2" and dist.is_initialized():
        for layer in model:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
    ema = EMA(model, decay=0.999, shard=True if kind == "ddp" and dist.is_initialized() else None)
    return model, ema


def kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def growth(fn, *args):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = kib("VmRSS")
    try:
        fn(*args)
        failed = ""
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        failed = type(e).__name__
    return (kib("VmHWM") - base) / 1024, failed


def shadow_mib(ema):
    h = ema.handle
    return sum(h.tensor_info(i).local_range[1] for i in range(len(ema.names))) * 4 / 2 ** 20


def save(ema, path):
    if hasattr(ema, "dcp"):
        dcp.save({"ema": ema.dcp}, checkpoint_id=path)
    else:
        dcp.save({"ema": ema.state_dict()}, checkpoint_id=path)


def load(ema, path):
    if hasattr(ema, "dcp"):
        dcp.load({"ema": ema.dcp}, checkpoint_id=path)
    else:
        state = {"ema": ema.state_dict()}
        dcp.load(state, checkpoint_id=path)
        ema.load_state_dict(state["ema"])


def report(what, world_size, rank, ema, result):
    mib, failed = result
    print(f"{what:28} W={world_size} rank {rank}: {mib:7.1f} MiB = {mib / shadow_mib(ema):4.2f} x its shadow bytes "
          f"({shadow_mib(ema):.1f} MiB){'  FAILED: ' + failed if failed else ''}", flush=True)


def worker(rank, world_size, directory):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{directory}/store-{world_size}", rank=rank,
                            world_size=world_size)
    warm = os.path.join(directory, f"warm-{world_size}")
    dcp.save({"x": torch.zeros(4)}, checkpoint_id=warm)
    dcp.load({"x": torch.zeros(4)}, checkpoint_id=warm)
    for kind in ("fsdp2", "ddp"):
        model, ema = make(kind)
        ema.update(1)
        path = os.path.join(directory, f"{kind}-2")
        if world_size == 2:
            report(f"{kind}: save", world_size, rank, ema, growth(save, ema, path))
        else:
            report(f"{kind}: load (2 -> {world_size})", world_size, rank, ema, growth(load, ema, path))
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    print(f"torch {torch.__version__}, {'ema.dcp' if hasattr(EMA, 'dcp') else 'ema.state_dict()'} route")
    mp.spawn(worker, args=(2, directory), nprocs=2, join=True)
    mp.spawn(worker, args=(3, directory), nprocs=3, join=True)
    warm = os.path.join(directory, "warm-1")
    dcp.save({"x": torch.zeros(4)}, checkpoint_id=warm)
    dcp.load({"x": torch.zeros(4)}, checkpoint_id=warm)
    for kind in ("fsdp2", "ddp"):
        _, ema = make(kind)
        report(f"{kind}: load (2 -> 1)", 1, 0, ema, growth(load, ema, os.path.join(directory, f"{kind}-2")))


if __name__ == "__main__":
    main()
