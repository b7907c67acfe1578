"""Reads polyak-consolidate's files with Python's safetensors: a read-out of one shadow is a
state_dict under the model's names (values bit for bit what polyak_get_shadow gives, buffers in
their own dtypes), and with PyTorch importable, safetensors.torch.load_file of it loads into a
model with load_state_dict; the consolidated checkpoint is a polyak file of the set's step.

Usage: check_consolidated.py WRITER CONSOLIDATE DIR
WRITER is tests/interop/write_shards, run first to fill DIR. Needs numpy and safetensors (exit
77, "skipped", without them).
"""
import json
import os
import struct
import subprocess
import sys

SKIP = 77
SHAPES = {"layer.weight": (3, 5), "layer.bias": (3,), "embed.weight": (1000, 67), "scale": (),
          "bn.num_batches_tracked": (), "bn.running_var": (3,)}
BUFFERS = {"bn.num_batches_tracked": ("I64", "<i8"), "bn.running_var": ("F32", "<f4")}

try:
    import numpy  # noqa: F401 (safe_open(framework="np") needs it)
    import safetensors
    from safetensors import safe_open
except ImportError as error:
    print(f"skipped: {error} (scripts/test.sh installs numpy and safetensors into .venv)")
    sys.exit(SKIP)


def expected_bytes(directory, name, label):
    with open(os.path.join(directory, "expected", f"{name}.{label}"), "rb") as f:
        return f.read()


def raw_tensors(path):
    """{name: (dtype, shape, bytes)} read through the header's offsets (numpy has no bfloat16)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, entry in header.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            out[name] = (entry["dtype"], tuple(entry["shape"]), data[begin:end])
    return header.get("__metadata__", {}), out


def check_readout(directory, label, dtype):
    path = os.path.join(directory, label + ".safetensors")
    with safe_open(path, framework="np") as f:
        assert set(f.keys()) == set(SHAPES), sorted(f.keys())
        for name, shape in SHAPES.items():
            s = f.get_slice(name)
            want = BUFFERS[name][0] if name in BUFFERS else dtype
            assert tuple(s.get_shape()) == shape and s.get_dtype() == want, (name, s.get_shape(), s.get_dtype())
    metadata, tensors = raw_tensors(path)
    assert metadata.get("format") == "pt", metadata
    for name in SHAPES:
        assert tensors[name][2] == expected_bytes(directory, name, label), f"{label}: {name} differs"
    print(f"{label}: {len(SHAPES)} tensors read with safetensors {safetensors.__version__}: names, shapes, "
          "dtypes and values exact")


def check_full(directory):
    with safe_open(os.path.join(directory, "full.safetensors"), framework="np") as f:
        meta = f.metadata()
        assert meta["format"] == "polyak" and meta["format_version"] == "2" and meta["step"] == "4", meta
        names = set(f.keys())
    averaged = [n for n in SHAPES if n not in BUFFERS]
    assert names == set(averaged) | {"polyak.shadow.1." + n for n in averaged} | set(BUFFERS), sorted(names)
    print("full: the checkpoint of step 4, every shadow and buffer")


def check_torch(directory):
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError:
        print("PyTorch not importable: the load_state_dict check is left to a machine with PyTorch")
        return
    for label, dtype in (("shadow0-f32", torch.float32), ("shadow1-bf16", torch.bfloat16)):
        model = torch.nn.Module()  # params in the read-out's dtype, the BatchNorm's buffers in theirs
        model.layer = torch.nn.Linear(5, 3, dtype=dtype)
        model.embed = torch.nn.Embedding(1000, 67, dtype=dtype)
        model.scale = torch.nn.Parameter(torch.zeros((), dtype=dtype))
        model.bn = torch.nn.BatchNorm1d(3)
        state = load_file(os.path.join(directory, label + ".safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) == {"bn.weight", "bn.bias", "bn.running_mean"}, (missing, unexpected)
        loaded = model.state_dict()
        for name in SHAPES:
            got = loaded[name].detach().contiguous()
            if name in BUFFERS:
                got = got.to(torch.int64 if name == "bn.num_batches_tracked" else torch.float32)
            raw = got.view(torch.int16).numpy().tobytes() if got.dtype == torch.bfloat16 else got.numpy().tobytes()
            assert raw == expected_bytes(directory, name, label), f"{label}: {name} differs after load_state_dict"
    print(f"PyTorch {torch.__version__}: load_file + load_state_dict give the model the read-outs exactly")


def main():
    writer, consolidate, directory = sys.argv[1], sys.argv[2], sys.argv[3]
    subprocess.run(["rm", "-rf", directory], check=True)
    os.makedirs(directory)
    subprocess.run([writer, consolidate, directory], check=True)
    check_readout(directory, "shadow0-f32", "F32")
    check_readout(directory, "shadow1-bf16", "BF16")
    check_full(directory)
    check_torch(directory)


if __name__ == "__main__":
    main()
