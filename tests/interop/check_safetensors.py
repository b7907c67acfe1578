"""Reads polyak checkpoints with Python's safetensors and checks names, shapes,
dtypes, metadata and values against what polyak_get_shadow read.

Usage: check_safetensors.py WRITER DIR
WRITER is tests/interop/write_checkpoint, run first to fill DIR. Needs numpy
and safetensors (exit 77, "skipped", without them); with PyTorch importable it
also loads the files with safetensors.torch into a model's state_dict.
"""
import json
import os
import struct
import subprocess
import sys

SKIP = 77
NAMES = {"layer.weight": (3, 5), "layer.bias": (3,), "embed.weight": (1000, 67), "scale": ()}
COPIES = {"bn.num_batches_tracked": ((), "I64", "<i8"), "bn.running_var": ((3,), "F32", "<f4")}

try:
    import numpy as np
    import safetensors
    from safetensors import safe_open
    from safetensors.numpy import load_file
except ImportError as error:
    print(f"skipped: {error} (scripts/test.sh installs numpy and safetensors into .venv)")
    sys.exit(SKIP)


def expected(directory, dtype, saved_name):
    return np.fromfile(os.path.join(directory, dtype, saved_name + ".f32"), dtype="<f4")


def saved_names():
    for name, shape in NAMES.items():
        yield name, shape
        yield "polyak.shadow.1." + name, shape


def bf16_to_f32(raw):
    return (raw.astype(np.uint32) << 16).view(np.float32)


def check_file(directory, dtype):
    path = os.path.join(directory, dtype + ".safetensors")
    with safe_open(path, framework="np") as f:
        assert set(f.keys()) == {n for n, _ in saved_names()} | set(COPIES), sorted(f.keys())
        meta = f.metadata()
        assert meta["format"] == "polyak" and meta["step"] == "4", meta
        assert meta["shadow_dtype"] == dtype.upper(), meta
        assert len(json.loads(meta["schedules"])) == 2
        for name, shape in saved_names():
            s = f.get_slice(name)
            assert tuple(s.get_shape()) == shape, (name, s.get_shape())
            assert s.get_dtype() == dtype.upper(), (name, s.get_dtype())
        for name, (shape, st_dtype, np_dtype) in COPIES.items():  # in their own dtypes, once
            s = f.get_slice(name)
            assert tuple(s.get_shape()) == shape and s.get_dtype() == st_dtype, (name, s.get_shape(), s.get_dtype())
            got = f.get_tensor(name)
            want = np.fromfile(os.path.join(directory, dtype, name + ".raw"), dtype=np_dtype).reshape(shape)
            assert got.tobytes() == want.tobytes(), (name, got, want)
    if dtype == "f32":
        tensors = load_file(path)
        for name, shape in saved_names():
            got = tensors[name]
            assert got.dtype == np.float32 and got.shape == shape, (name, got.dtype, got.shape)
            want = expected(directory, dtype, name)
            assert np.array_equal(got.reshape(-1).view(np.uint32), want.view(np.uint32)), name
    else:  # numpy has no bfloat16: read the buffer through the header's offsets
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        for name, shape in saved_names():
            begin, end = header[name]["data_offsets"]
            got = bf16_to_f32(np.frombuffer(data[begin:end], dtype="<u2"))
            assert np.array_equal(got.view(np.uint32), expected(directory, dtype, name).view(np.uint32)), name
    print(f"{dtype}: {len(NAMES) * 2 + len(COPIES)} tensors read with safetensors {safetensors.__version__}: "
          "names, shapes, dtypes, metadata and values exact")


def check_torch(directory):
    try:
        import torch
        from safetensors.torch import load_file as load_torch
    except ImportError:
        print("PyTorch not importable: the state_dict check is left to a machine with PyTorch")
        return
    for dtype in ("f32", "bf16"):
        model = torch.nn.Module()
        model.layer = torch.nn.Linear(5, 3)
        missing, unexpected = model.load_state_dict(
            load_torch(os.path.join(directory, dtype + ".safetensors")), strict=False)
        assert not missing, missing
        assert "embed.weight" in unexpected and "layer.weight" not in unexpected, unexpected
        for name in ("layer.weight", "layer.bias"):
            got = model.state_dict()[name].detach().reshape(-1).float().numpy()
            assert np.array_equal(got.view(np.uint32), expected(directory, dtype, name).view(np.uint32)), name
    print(f"PyTorch {torch.__version__}: load_state_dict(strict=False) gives the model shadow 0 exactly")


def main():
    writer, directory = sys.argv[1], sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    subprocess.run([writer, directory], check=True)
    for dtype in ("f32", "bf16"):
        check_file(directory, dtype)
    check_torch(directory)


if __name__ == "__main__":
    main()
