"""polyak's Python layer without PyTorch: schedules, helpers, Handle, errors."""
import array
import ctypes
import math
import os
import re
import struct
import subprocess
import sys

import pytest

import polyak
from conftest import buffer, close, warmup_beta


def test_import_polyak_does_not_import_torch():
    code = "import sys, polyak; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def run_installed(code):
    """Runs `code` in a new interpreter on the installed package with its own library; its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("POLYAK_LIBRARY", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    if out.returncode and "no libpolyak next to" in out.stderr:
        pytest.skip("polyak is imported from the source tree, not installed")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_installed_package_carries_its_library():
    path, version = run_installed("import polyak; print(polyak.library_path()); print(polyak.version())").split()
    assert os.path.basename(os.path.dirname(path)) == "polyak" and version == polyak.__version__


def test_torch_imports_after_the_installed_polyak():
    """The package's library must not take the place of a CUDA library torch needs (one per soname
    in a process): the wheel leaves NCCL out and binds the environment's CUDA libraries."""
    pytest.importorskip("torch")
    assert run_installed("import polyak, torch; print(float(torch.ones(3).sum()))").split()[-1] == "3.0"


@pytest.mark.parametrize("t", [0, 1, 2, 7, 100, 12345])
def test_schedules_evaluate_the_published_formulas(t):
    step = t + 1  # start_step 0: t = step - 1
    assert close(polyak.Constant(0.99).beta_at(step), 0.99)
    assert close(polyak.TF(0.999).beta_at(step), min(0.999, (1 + t) / (10 + t)))
    assert close(polyak.Warmup(beta=0.9999, beta_min=0.1, inv_gamma=3.0, power=0.75).beta_at(step),
                 warmup_beta(t, 0.9999, 0.1, 3.0, 0.75))
    assert close(polyak.Linear(beta=0.99, beta_min=0.5, ramp_steps=50).beta_at(step),
                 min(0.99, 0.5 + t / 50 * (0.99 - 0.5)))
    cosine = 0.99 - (0.99 - 0.5) * (1 + math.cos(math.pi * min(t, 50) / 50)) / 2
    assert close(polyak.Cosine(beta=0.99, beta_min=0.5, ramp_steps=50).beta_at(step), cosine)
    assert close(polyak.Equal().beta_at(step), t / (t + 1))
    assert close(polyak.Power(gamma=6.94).beta_at(step), (t / (t + 1)) ** 7.94)


def test_start_step_copies_then_shifts_t():
    s = polyak.Constant(0.9, start_step=3)
    assert [s.beta_at(k) for k in (1, 2, 3, 4)] == [0.0, 0.0, 0.0, 0.9]
    assert close(s.beta_product(3, 6), 0.9 ** 3)


def test_helpers_are_the_closed_forms():
    assert close(polyak.half_life_from_beta(0.999), math.log(2) / math.log(1 / 0.999))
    assert close(polyak.beta_from_half_life(693.0), 2 ** (-1 / 693.0))
    assert close(polyak.window_from_beta(0.99), 100.0, 1e-9)
    assert close(polyak.beta_from_window(1000.0), 0.999)
    assert close(polyak.beta_from_horizon(10000.0), 0.98)
    gamma = 6.94
    assert close(polyak.sigma_rel_from_gamma(gamma), math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))
    assert close(polyak.gamma_from_sigma_rel(polyak.sigma_rel_from_gamma(16.97)), 16.97, 1e-9)
    assert polyak.Power(sigma_rel=0.10).gamma == pytest.approx(6.94, abs=0.01)


def test_helpers_refuse_values_outside_their_domain():
    for call, value in [(polyak.half_life_from_beta, 1.5), (polyak.beta_from_horizon, 2.0),
                        (polyak.gamma_from_sigma_rel, 0.5), (polyak.window_from_beta, -0.1)]:
        with pytest.raises(polyak.InvalidArgError):
            call(value)


def test_bad_schedules_raise_with_the_librarys_reason():
    with pytest.raises(polyak.InvalidArgError, match="beta"):
        polyak.Constant(1.5)
    with pytest.raises(polyak.InvalidArgError):
        polyak.Linear(ramp_steps=0)
    with pytest.raises(polyak.InvalidArgError):
        polyak.Power()  # neither gamma nor sigma_rel
    with pytest.raises(ValueError):  # InvalidArgError is a ValueError
        polyak.Constant(float("nan"))


def test_errors_have_one_class_per_status():
    classes = [polyak.InvalidArgError, polyak.StateError, polyak.NoMemoryError, polyak.UnsupportedError,
               polyak.CudaError, polyak.NcclError, polyak.FileIOError, polyak.FormatError, polyak.MismatchError]
    assert [c.status for c in classes] == list(range(1, 10))
    assert [c().status_name for c in classes] == [polyak.status_name(s) for s in range(1, 10)]
    assert polyak.status_name(2) == "POLYAK_ERR_STATE" and issubclass(polyak.FileIOError, OSError)


def test_handle_updates_every_shadow_with_the_compensated_decay(rng):
    sizes = [1, 7, 33, 1000]  # odd sizes: heads and tails of every chunk
    values = [[rng.uniform(-2, 2) for _ in range(n)] for n in sizes]
    arrays = [buffer(v) for v in values]
    schedules = [polyak.Constant(0.9), polyak.Equal(), polyak.Warmup(beta=0.99)]
    with polyak.Handle(schedules) as h:
        for i, (a, ptr) in enumerate(arrays):
            assert h.add(f"t{i}", ptr, "f32", (len(a),)) == i
        h.finalize()
        shadows = [[[float(x) for x in a] for a, _ in arrays] for _ in schedules]  # float64 oracle
        last = 0
        for step in (1, 2, 5, 6, 11):
            for a, _ in arrays:
                for j in range(len(a)):
                    a[j] = rng.uniform(-2, 2)
            h.update(step)
            for k in range(len(schedules)):
                decay = 1.0
                for m in range(last + 1, step + 1):  # the betas of the steps skipped, multiplied
                    t = m - 1
                    decay *= [0.9, t / (t + 1), warmup_beta(t, 0.99)][k]
                for i, (a, _) in enumerate(arrays):
                    shadows[k][i] = [decay * x + (1 - decay) * float(p) for x, p in zip(shadows[k][i], a)]
            last = step
        assert h.step == 11 and h.num_tensors == 4
        for k in range(len(schedules)):
            for i, n in enumerate(sizes):
                out, _ = buffer([0.0] * n)
                h.get_shadow(k, i, out)
                assert max(abs(o - r) for o, r in zip(out, shadows[k][i])) < 2e-6


def test_update_without_a_step_applies_the_next_one(rng):
    values = [rng.uniform(-1, 1) for _ in range(17)]
    arrays = [buffer(values) for _ in range(2)]
    handles = [polyak.Handle([polyak.Warmup(beta=0.99), polyak.Equal()]) for _ in range(2)]
    for h, (_, ptr) in zip(handles, arrays):
        h.add("w", ptr, "f32", (17,))
        h.finalize()
    counted, explicit = handles
    for step in (1, 2, 3, 7, 8):  # a gap: 4..6 compensated where the step is given
        for a, _ in arrays:
            a[step] += 0.25
        if step == 7:
            counted.update(7)
        else:
            counted.update()
        explicit.update(step)
        assert counted.step == step
    assert counted.save_bytes() == explicit.save_bytes()
    counted.close(), explicit.close()


def test_a_failing_call_raises_its_class_and_changes_nothing(rng):
    a, ptr = buffer([rng.uniform(1, 2) for _ in range(9)])
    h = polyak.Handle([polyak.Constant(0.5)])
    with pytest.raises(polyak.StateError):
        h.update(1)  # before finalize
    h.add("w", ptr, "f32", (9,))
    with pytest.raises(polyak.InvalidArgError, match="w"):
        h.add("w", ptr, "f32", (9,))  # a duplicate name
    h.finalize()
    h.update(3)
    before, out = buffer([0.0] * 9), buffer([0.0] * 9)
    h.get_shadow(0, 0, before[0])
    a[0] = 100.0
    with pytest.raises(polyak.InvalidArgError, match="step"):
        h.update(2)  # backwards
    with pytest.raises(polyak.InvalidArgError):
        h.get_shadow(1, 0, out[0])  # no shadow 1
    with pytest.raises(polyak.InvalidArgError):
        h.get_shadow(0, 0, out[0], dst_dtype="f64")
    with pytest.raises(polyak.FileIOError):
        h.load("/nonexistent/dir/ema.safetensors")
    h.get_shadow(0, 0, out[0])
    assert list(out[0]) == list(before[0]) and h.step == 3
    h.close()
    h.close()  # idempotent
    with pytest.raises(polyak.StateError, match="closed"):
        h.update(4)


def test_arguments_of_a_wrong_type_raise_invalid_arg_naming_them():
    """Never ctypes' ArgumentError or TypeError (which name no argument), and never an integer
    silently truncated to its C type: each bad value raises InvalidArgError naming its argument,
    and the handle is as it was."""
    w, ptr = buffer([1.0] * 4)
    h = polyak.Handle([polyak.Constant(0.5), polyak.Equal()])
    h.add("w", ptr, "f32", (4,))
    h.finalize()
    h.update(1)
    blob = h.save_bytes()
    fresh = polyak.Handle()
    out = array.array("f", [0.0] * 4)
    calls = [
        (lambda: h.update(2.5), "step"), (lambda: h.update("3"), "step"), (lambda: h.update([2]), "step"),
        (lambda: h.update(2 ** 64 + 3), "step"),  # ctypes would pass step 3
        (lambda: h.update(2, stream="0"), "stream"), (lambda: h.update(2, stream=-1), "stream"),
        (lambda: h.get_shadow(0, 0.0, out), "tensor"), (lambda: h.get_shadow(1.0, 0, out), "shadow"),
        (lambda: h.get_shadow(2 ** 32, 0, out), "shadow"),  # ctypes would read shadow 0
        (lambda: h.get_shadow(0, 0, ptr, dst_num_bytes="16"), "dst_num_bytes"),
        (lambda: h.get_shadow(0, 0, out, dst_dtype=["f32"]), "dst_dtype"),
        (lambda: h.get_local_shadow(0, "0", out), "tensor"), (lambda: h.local_range(None), "tensor"),
        (lambda: h.tensor_info("0"), "tensor"), (lambda: h.find_tensor(b"w"), "name"),
        (lambda: h.hard_update(0.0), "shadow"), (lambda: h.copy_to_params("1"), "shadow"),
        (lambda: h.blend_to_params(["a", 0.5]), "weights[0]"), (lambda: h.blend_to_params(0.5), "weights"),
        (lambda: h.get_blend([0.5, 0.5], 0.5, out), "tensor"), (lambda: h.beta_product("0"), "shadow"),
        (lambda: h.graph_reserve(2.0, 3), "first_step"), (lambda: h.graph_reserve(2, "3"), "num_steps"),
        (lambda: h.save(3.5), "path"), (lambda: h.load(None), "path"), (lambda: h.save_fd(2 ** 40), "file"),
        (lambda: h.load_bytes(ptr, src_num_bytes=-1), "src_num_bytes"),
        (lambda: fresh.add(5, ptr, "f32", (4,)), "name"), (lambda: fresh.add("v", "0", "f32", (4,)), "param"),
        (lambda: fresh.add("v", ptr, "f32", (4.0,)), "shape[0]"), (lambda: fresh.add("v", ptr, "f32", 4), "shape"),
        (lambda: fresh.add("v", ptr, ["f32"], (4,)), "dtype"),
        (lambda: fresh.add_copy("v", ptr, "f32", ("4",)), "shape[0]"),
        (lambda: fresh.add_arena(ptr, "f32", 4.0, [("a", (4,))]), "arena_num_elems"),
        (lambda: fresh.add_arena(ptr, "f32", 4, [(1, (4,))]), "views[0] name"),
        (lambda: fresh.add_with_shadow("v", ptr, "f32", (4,), 1.5, "f32"), "shadow"),
        (lambda: fresh.finalize(stream="default"), "stream"),
        (lambda: polyak.Handle(device="0"), "device"), (lambda: polyak.Handle(seed=-1), "seed"),
        (lambda: polyak.Handle(world_size=1.0), "world_size"), (lambda: polyak.Handle(backend=["cpu"]), "backend"),
        (lambda: polyak.Handle(shadow_dtype=["f32"]), "shadow_dtype"),
        (lambda: polyak.Constant("0.9"), "beta"), (lambda: polyak.Linear(ramp_steps=10.5), "ramp_steps"),
        (lambda: polyak.Constant(0.9, start_step=1.5), "start_step"),
        (lambda: polyak.Constant(0.9, rounding=["nearest"]), "rounding"),
        (lambda: polyak.Lookahead(alpha="half"), "alpha"), (lambda: polyak.Lookahead(every=2.0), "every"),
        (lambda: polyak.GradNorm(c="0.1"), "c"), (lambda: polyak.Layerwise(beta0=None), "beta0"),
        (lambda: polyak.Power(sigma_rel="0.05"), "sigma_rel"),
        (lambda: polyak.Constant(0.9).beta_at(1.5), "step"),
        (lambda: polyak.Constant(0.9).beta_product("1", 3), "last_step"),
        (lambda: polyak.half_life_from_beta("0.9"), "beta"), (lambda: polyak.beta_from_window(None), "window"),
        (lambda: polyak.posthoc_coefficients([1000.5], [0.05], 1000, 0.07), "snapshot_steps[0]"),
        (lambda: polyak.posthoc_coefficients([1000], ["a"], 1000, 0.07), "snapshot_sigma_rels[0]"),
        (lambda: polyak.posthoc_coefficients([1000], [0.05], 1000, "0.07"), "sigma_rel"),
        (lambda: polyak.status_name("1"), "status"), (lambda: polyak.backend_available(0), "backend"),
        (lambda: h._call("polyak_hard_update", "0", None), "shadow"),  # the ctypes safety net
    ]
    for call, name in calls:
        with pytest.raises(polyak.InvalidArgError, match=re.escape(name)) as raised:
            call()
        assert not isinstance(raised.value, (ctypes.ArgumentError, TypeError)), name
    assert h.step == 1 and h.save_bytes() == blob and fresh.num_tensors == 0
    np = pytest.importorskip("numpy")  # numpy's integers and floats are integers and floats
    h.update(np.int64(2))
    h.get_shadow(np.int32(1), np.int64(0), out)
    assert h.step == 2 and polyak.half_life_from_beta(np.float32(0.5)) == 1.0
    h.close(), fresh.close()


def test_posthoc_coefficients_reproduce_a_tracked_profile():
    # a snapshot of sigma_rel 0.07 at step 1000 is itself the best combination for 0.07 at 1000
    coefficients = polyak.posthoc_coefficients([1000, 1000], [0.05, 0.07], 1000, 0.07)
    assert coefficients == pytest.approx([0.0, 1.0], abs=1e-9)
    with pytest.raises(polyak.InvalidArgError):
        polyak.posthoc_coefficients([1000, 1000], [0.05, 0.05], 1000, 0.07)


def test_config_mirror_has_the_c_layout():
    from polyak import _lib
    cfg = _lib.config_defaults(_lib.lib)
    assert cfg.struct_size == ctypes.sizeof(_lib.Config) == _lib.config_size(_lib.lib) and cfg.num_shadows == 1
    assert cfg.world_size == 1 and cfg.shadows[7].schedule.beta == 0.999 and cfg.skip_nonfinite == 1
    assert [s.rounding for s in cfg.shadows] == [0] * 8 and cfg.cpu_threads == 1
    assert cfg.magic == _lib.CONFIG_MAGIC and cfg.shadow_location == _lib.SHADOWS_DEVICE  # the last field


def test_the_package_version_is_the_repositorys_and_the_librarys():
    from polyak import _lib
    root = os.path.join(os.path.dirname(os.path.abspath(_lib.__file__)), os.pardir, os.pardir)
    if os.path.exists(os.path.join(root, "VERSION")):  # a source checkout: the file itself
        with open(os.path.join(root, "VERSION")) as f:
            assert polyak.__version__ == f.read().strip()
    assert polyak.__version__ == polyak.version() and polyak.__version__.count(".") == 2


class FakeLibrary:
    """Stands in for a libpolyak of another version or struct layout."""

    def __init__(self, version, config_size):
        self.version, self.size = version, config_size

    def polyak_version_string(self):
        return self.version.encode()

    def polyak_config_init(self, cfg):
        cfg[0].struct_size = self.size


def test_a_library_of_another_version_or_config_size_is_refused_naming_both():
    from polyak import _lib
    size = ctypes.sizeof(_lib.Config)
    _lib.check_library(FakeLibrary(polyak.__version__, size), "libpolyak.so.1", polyak.__version__)  # the same
    with pytest.raises(ImportError, match=r"libpolyak\.so\.1 is version 0\.9\.0, this package 1\.2\.3"):
        _lib.check_library(FakeLibrary("0.9.0", size), "libpolyak.so.1", "1.2.3")
    for other in (size - 8, size + 8):
        with pytest.raises(ImportError, match=f"polyak_config of {other} bytes, this package's mirror {size}"):
            _lib.check_library(FakeLibrary(polyak.__version__, other), "libpolyak.so.1", polyak.__version__)
    with pytest.raises(ImportError, match="0.0.1"):  # the real library against another package version
        _lib.check_library(_lib.lib, _lib.path, "0.0.1")


def test_a_shadow_in_the_callers_memory_is_updated_in_place(rng):
    param, param_ptr = buffer([rng.uniform(-1, 1) for _ in range(13)])
    teacher, teacher_ptr = buffer([0.0] * 13)
    with polyak.Handle([polyak.Constant(0.75)]) as h:
        h.add_with_shadow("w", param_ptr, "f32", (13,), teacher_ptr, "f32")
        h.finalize()
        assert list(teacher) == list(param)  # finalize copies the param in
        ref = [float(x) for x in param]
        for j in range(13):
            param[j] += rng.uniform(0.5, 1.5)
        h.update(1)
        ref = [0.75 * r + 0.25 * float(p) for r, p in zip(ref, param)]
        assert max(abs(t - r) for t, r in zip(teacher, ref)) < 1e-6


def test_graph_reservations_apply_the_steps_of_direct_updates_on_the_cpu(rng):
    values = [rng.uniform(-1, 1) for _ in range(21)]
    arrays = [buffer(values) for _ in range(2)]
    handles = [polyak.Handle([polyak.Warmup(beta=0.99), polyak.Equal()]) for _ in range(2)]
    for h, (_, ptr) in zip(handles, arrays):
        h.add("w", ptr, "f32", (21,))
        h.finalize()
    graphed, direct = handles
    graphed.graph_reserve(4, 3)  # steps 4, 5, 6
    for step in (4, 5, 6):
        for a, _ in arrays:
            for j in range(21):
                a[j] += 0.5
        graphed.graph_update()
        direct.update(step)
    assert graphed.graph_release() == 3 and graphed.step == 6
    for k in range(2):
        outs = [buffer([0.0] * 21) for _ in range(2)]
        for h, (out, _) in zip(handles, outs):
            h.get_shadow(k, 0, out)
        assert list(outs[0][0]) == list(outs[1][0])
    with pytest.raises(polyak.StateError):
        graphed.graph_update()  # nothing reserved


# ---- tensor lookup, sized read-outs, copy-only tensors, arenas ------------------------------------

def test_tensor_info_and_find_tensor_describe_each_registration():
    w, w_ptr = buffer([1.0] * 6)
    count, count_ptr = buffer([3], "q")
    with polyak.Handle([polyak.Constant(0.9)], shadow_dtype="bf16") as h:
        assert h.add("w", w_ptr, "f32", (2, 3)) == 0
        assert h.add_copy("count", count_ptr, "i64", ()) == 1
        before = h.tensor_info(0)
        assert (before.name, before.dtype, before.shape, before.num_elems, before.num_bytes) == ("w", "f32", (2, 3),
                                                                                             6, 24)
        assert before.shadow_dtype == "bf16" and not before.copy_only and before.local_range is None
        h.finalize()
        assert h.tensor_info(0).local_range == (0, 6)
        info = h.tensor_info(1)
        assert (info.name, info.dtype, info.shape, info.num_elems, info.copy_only, info.shadow_dtype) == \
            ("count", "i64", (), 1, True, "i64")
        assert [t.name for t in h.tensors()] == ["w", "count"]
        assert h.find_tensor("count") == 1 and h.find_tensor("w") == 0
        with pytest.raises(polyak.InvalidArgError, match="nope"):
            h.find_tensor("nope")
        for bad in (2, -1):
            with pytest.raises(polyak.InvalidArgError):
                h.tensor_info(bad)


def test_read_outs_refuse_a_short_destination_and_write_nothing():
    w, w_ptr = buffer([0.25 * i for i in range(10)])
    with polyak.Handle([polyak.Constant(0.5), polyak.Equal()]) as h:
        h.add("w", w_ptr, "f32", (10,))
        h.finalize()
        canary = array.array("f", [-7.0] * 16)  # 10 elements' room, then the canary
        address = canary.buffer_info()[0]
        calls = [lambda **kw: h.get_shadow(0, 0, address, **kw),
                 lambda **kw: h.get_local_shadow(1, 0, address, **kw),
                 lambda **kw: h.get_blend([0.5, 0.5], 0, address, **kw)]
        for call in calls:
            with pytest.raises(polyak.InvalidArgError, match="holds 36 bytes"):
                call(dst_num_bytes=36)
            assert list(canary) == [-7.0] * 16
            with pytest.raises(polyak.InvalidArgError, match="dst_num_bytes"):
                call()  # an address alone: its size unknown
            call(dst_num_bytes=40)
            assert list(canary[:10]) == list(w) and list(canary[10:]) == [-7.0] * 6
            canary[:10] = array.array("f", [-7.0] * 10)
        short = array.array("f", [-7.0] * 9)  # a buffer carries its size
        with pytest.raises(polyak.InvalidArgError, match=r"\"w\""):
            h.get_shadow(0, 0, short)
        assert list(short) == [-7.0] * 9
        with pytest.raises(polyak.InvalidArgError, match="read-only"):
            h.get_shadow(0, 0, bytes(40))


def test_unknown_dtypes_are_refused_with_nothing_registered():
    w, w_ptr = buffer([1.0] * 4)
    with polyak.Handle() as h:
        for call in (lambda: h.add("w", w_ptr, "f8", (4,)), lambda: h.add_copy("w", w_ptr, "complex64", (4,)),
                     lambda: h.add_copy("w", w_ptr, 3, (4,))):
            with pytest.raises(polyak.InvalidArgError, match="dtype"):
                call()
        assert h.num_tensors == 0
        h.add("w", w_ptr, "f32", (4,))
        h.finalize()
        out = array.array("q", [0] * 4)
        with pytest.raises(polyak.InvalidArgError, match="dst_dtype"):
            h.get_shadow(0, 0, out, "i64")  # an average reads out as f32, bf16 or f16 only
        assert list(out) == [0] * 4


@pytest.mark.parametrize("dtype,typecode,values", [("i64", "q", [5, -3]), ("i32", "i", [1 << 30, -1]),
                                                   ("i16", "h", [7, -7]), ("i8", "b", [1, -128]),
                                                   ("u8", "B", [255, 0]), ("bool", "B", [1, 0]),
                                                   ("f64", "d", [1e300, -2.5])])
def test_copy_only_tensors_mirror_the_param_at_every_update(dtype, typecode, values):
    w, w_ptr = buffer([1.0, 2.0])
    buf, buf_ptr = buffer(values, typecode)
    with polyak.Handle([polyak.Constant(0.5), polyak.Equal()]) as h:
        h.add("w", w_ptr, "f32", (2,))
        h.add_copy("buf", buf_ptr, dtype, (2,))
        h.finalize()
        for step in (1, 3):
            buf[0], buf[1] = buf[1], buf[0]  # new values; the mirror follows in the same update
            w[0] += 1.0
            h.update(step)
            for k in range(2):
                out = array.array(typecode, [0, 0])
                h.get_shadow(k, 1, out, dtype)
                assert list(out) == list(buf)
        saved = list(buf)
        blob = h.save_bytes()
        buf[0] = buf[1] = 0
        h.store()
        h.copy_to_params(1)  # the mirror back into the param
        assert list(buf) == saved
        h.restore()
        assert list(buf) == [0, 0]
        again_buf, again_ptr = buffer([0, 0], typecode)
        with polyak.Handle([polyak.Constant(0.5), polyak.Equal()]) as again:
            again.add("w", buffer([0.0, 0.0])[1], "f32", (2,))
            again.add_copy("buf", again_ptr, dtype, (2,))
            again.finalize()
            again.load_bytes(blob)
            out = array.array(typecode, [0, 0])
            again.get_shadow(0, 1, out, dtype)
            assert list(out) == saved and again.save_bytes() == blob


def test_an_arena_of_views_registers_its_tensors_or_nothing():
    arena, base = buffer([float(i) for i in range(10)])
    with polyak.Handle() as h:
        with pytest.raises(polyak.InvalidArgError, match="view 1"):
            h.add_arena(base, "f32", 10, [("a", (2, 3)), ("b", (5,))])  # runs past the end
        with pytest.raises(polyak.InvalidArgError, match="elements 9"):
            h.add_arena(base, "f32", 10, [("a", (2, 3)), ("b", (3,))])  # the last element in no view
        with pytest.raises(polyak.InvalidArgError, match="dimensions"):
            h.add_arena(base, "f32", 10, [("a", (1,) * 9)])
        assert h.num_tensors == 0
        assert h.add_arena(base, "f32", 10, [("a", (2, 3)), ("b", (4,))]) == [0, 1]
        h.finalize()
        assert [(t.name, t.shape) for t in h.tensors()] == [("a", (2, 3)), ("b", (4,))]
        out = array.array("f", [0.0] * 4)
        h.get_shadow(0, h.find_tensor("b"), out)
        assert list(out) == [6.0, 7.0, 8.0, 9.0]


# ---- a pending store ------------------------------------------------------------------------------

def test_a_pending_store_refuses_updates_until_restore_or_discard():
    w, w_ptr = buffer([1.0, 2.0, 3.0])
    with polyak.Handle([polyak.Constant(0.5)]) as h:
        h.add("w", w_ptr, "f32", (3,))
        h.finalize()
        h.update(1)
        before = h.save_bytes()
        h.store()
        h.copy_to_params()
        for call in (lambda: h.update(2), lambda: h.hard_update(0), lambda: h.graph_reserve(2, 4), h.store):
            with pytest.raises(polyak.StateError, match="polyak_restore"):
                call()
        assert h.save_bytes() == before and h.step == 1
        h.restore()
        h.update(2)
        w[0] = 10.0
        h.store()
        w[0] = 20.0  # say, an average copied in on purpose
        h.discard_store()
        assert w[0] == 20.0
        with pytest.raises(polyak.StateError):
            h.restore()  # the copy was dropped
        with pytest.raises(polyak.StateError):
            h.discard_store()  # nothing pending
        h.update(3)


# ---- stochastic rounding of f32 shadows ------------------------------------------------------------

def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def f32_neighbours(x):
    """The two f32 values around the double x (equal if x is one)."""
    nearest = f32(x)
    if nearest == x:
        return nearest, nearest
    bits = struct.unpack("I", struct.pack("f", nearest))[0]
    away = struct.unpack("f", struct.pack("I", bits + (1 if (nearest < x) == (nearest > 0) else -1)))[0]
    return min(nearest, away), max(nearest, away)


def test_rounding_is_a_keyword_of_every_schedule():
    assert polyak.Constant(0.9).rounding == "nearest"
    assert polyak.Power(gamma=7.0, rounding="stochastic").rounding == "stochastic"
    with pytest.raises(polyak.InvalidArgError, match="rounding"):
        polyak.Constant(0.9, rounding="up")
    h = polyak.Handle([polyak.Constant(0.9), polyak.Equal(rounding="stochastic")])
    assert [s.rounding for s in h.config.shadows][:2] == [0, 1]


def test_stochastic_rounding_moves_where_nearest_stalls_and_lands_on_a_neighbour():
    """Params 128 ulps above shadows at 1.0, beta 0.9999: every increment (0.013 of an ulp) rounds
    away to nearest, while stochastic shadows land on one of the two f32 values around the exact
    update each time and move by the float64 average's amount on average."""
    num_elems, steps, beta = 1000, 500, 0.9999
    ones, ptr = buffer([1.0] * num_elems)
    h = polyak.Handle([polyak.Constant(beta), polyak.Constant(beta, rounding="stochastic")], seed=7)
    h.add("w", ptr, "f32", (num_elems,))
    h.finalize()
    for j in range(num_elems):
        ones[j] = 1.0 + 2.0 ** -16
    shadows = [array.array("f", [1.0] * num_elems) for _ in range(2)]
    w = 1.0 - beta
    for step in range(1, steps + 1):
        before = array.array("f", shadows[1])
        h.update(step)
        for k in range(2):
            h.get_shadow(k, 0, shadows[k])
        if step % 50 == 1:  # every element on a neighbour of s + w (p - s), computed in double
            for j in range(num_elems):
                below, above = f32_neighbours(before[j] + w * (ones[j] - before[j]))
                assert shadows[1][j] in (below, above)
    assert set(shadows[0]) == {1.0}  # nearest: stalled
    moved = sum(shadows[1]) / num_elems - 1.0
    want = 2.0 ** -16 * (1.0 - beta ** steps)  # the float64 average's movement, about 6 ulps
    assert abs(moved - want) < 0.1 * want


def test_stochastic_shadows_resume_bit_exactly_and_refuse_another_rounding(rng):
    values = [1.0 + rng.uniform(0, 1e-4) for _ in range(301)]
    handles, arrays = [], []
    for _ in range(2):
        a, ptr = buffer(values)
        h = polyak.Handle([polyak.Power(gamma=6.94, rounding="stochastic")], seed=3)
        h.add("w", ptr, "f32", (301,))
        h.finalize()
        handles.append(h), arrays.append(a)
    first, second = handles
    for step in range(1, 201):
        for a in arrays:
            a[step] += 1e-6
        first.update(step)
        if step == 100:
            second.load_bytes(first.save_bytes())
        elif step > 100:
            second.update(step)
    assert second.save_bytes() == first.save_bytes()
    nearest, ptr = buffer(values)
    with polyak.Handle([polyak.Power(gamma=6.94)], seed=3) as other:
        other.add("w", ptr, "f32", (301,))
        other.finalize()
        with pytest.raises(polyak.MismatchError, match="rounding"):
            other.load_bytes(first.save_bytes())
        assert other.step == 0
