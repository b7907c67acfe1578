"""polyak's Python layer without PyTorch: schedules, helpers, Handle, errors."""
import array
import ctypes
import math
import os
import subprocess
import sys

import pytest

import polyak
from conftest import close, warmup_beta


def buffer(values, typecode="f"):
    """A host array and its address."""
    a = array.array(typecode, values)
    return a, a.buffer_info()[0]


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
            for k, s in enumerate(schedules):
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
                out, ptr = buffer([0.0] * n)
                h.get_shadow(k, i, ptr)
                assert max(abs(o - r) for o, r in zip(out, shadows[k][i])) < 2e-6


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
    h.get_shadow(0, 0, before[1])
    a[0] = 100.0
    with pytest.raises(polyak.InvalidArgError, match="step"):
        h.update(2)  # backwards
    with pytest.raises(polyak.InvalidArgError):
        h.get_shadow(1, 0, out[1])  # no shadow 1
    with pytest.raises(polyak.InvalidArgError):
        h.get_shadow(0, 0, out[1], dst_dtype="f64")
    with pytest.raises(polyak.FileIOError):
        h.load("/nonexistent/dir/ema.safetensors")
    h.get_shadow(0, 0, out[1])
    assert list(out[0]) == list(before[0]) and h.step == 3
    h.close()
    h.close()  # idempotent
    with pytest.raises(polyak.StateError, match="closed"):
        h.update(4)


def test_posthoc_coefficients_reproduce_a_tracked_profile():
    # a snapshot of sigma_rel 0.07 at step 1000 is itself the best combination for 0.07 at 1000
    coefficients = polyak.posthoc_coefficients([1000, 1000], [0.05, 0.07], 1000, 0.07)
    assert coefficients == pytest.approx([0.0, 1.0], abs=1e-9)
    with pytest.raises(polyak.InvalidArgError):
        polyak.posthoc_coefficients([1000, 1000], [0.05, 0.05], 1000, 0.07)


def test_config_mirror_has_the_c_layout():
    from polyak import _lib
    cfg = _lib.config_defaults(_lib.lib)
    assert cfg.struct_size == ctypes.sizeof(_lib.Config) and cfg.num_shadows == 1
    assert cfg.world_size == 1 and cfg.schedules[7].beta == 0.999 and cfg.skip_nonfinite == 1


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
        for h, (_, ptr) in zip(handles, outs):
            h.get_shadow(k, 0, ptr)
        assert list(outs[0][0]) == list(outs[1][0])
    with pytest.raises(polyak.StateError):
        graphed.graph_update()  # nothing reserved
