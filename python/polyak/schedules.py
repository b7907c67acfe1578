"""Decay schedules (one per shadow) and the helpers that convert between decays, horizons and EDM2's
sigma_rel, as the library computes them."""
import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import _lib
from ._args import ROUNDINGS, _c_double, _c_int64
from ._lib import lib as _c
from .errors import InvalidArgError, _raise


def _finite_or_raise(value, what):
    if math.isnan(value):
        raise InvalidArgError(f"{what} is outside its domain")
    return value


def half_life_from_beta(beta):
    """Steps for an EMA with decay beta to halve a weight: ln 2 / ln(1/beta)."""
    return _finite_or_raise(_c.polyak_half_life_from_beta(_c_double(beta, "beta")), f"beta {beta!r}")


def beta_from_half_life(half_life_steps):
    return _finite_or_raise(_c.polyak_beta_from_half_life(_c_double(half_life_steps, "half_life_steps")),
                            f"half-life {half_life_steps!r}")


def half_life_steps(half_life, total_steps=None):
    """A half-life in steps (a float, not rounded): a number of steps; Composer's time string in
    batches, "1000ba" (its EMA's half_life, one optimizer step a batch); or a fraction of the
    training, "0.05dur" of `total_steps` (Composer's unit for a fraction of the run).
    beta_from_half_life turns it into the decay whose h-th power is exactly 1/2."""
    if isinstance(half_life, str):
        text = half_life.strip()
        unit = next((u for u in ("ba", "dur") if text.endswith(u)), None)
        try:
            value = float(text[:-len(unit)]) if unit else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise InvalidArgError(f"half_life {half_life!r}: a number of steps, '<steps>ba' or '<fraction>dur'")
        if unit == "dur":
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise InvalidArgError(f"half_life {half_life!r} is a fraction of training: give total_steps, the "
                                      "number of optimizer steps the training takes")
            if not 0 < value <= 1:
                raise InvalidArgError(f"half_life {half_life!r}: a fraction in (0, 1]")
            value *= total_steps
        half_life = value
    half_life = _c_double(half_life, "half_life")
    if not half_life > 0 or not math.isfinite(half_life):
        raise InvalidArgError(f"half_life {half_life!r}: a positive, finite number of steps")
    return half_life


def window_from_beta(beta):
    """The effective averaging window 1/(1 - beta), in steps."""
    return _finite_or_raise(_c.polyak_window_from_beta(_c_double(beta, "beta")), f"beta {beta!r}")


def beta_from_window(window_steps):
    value = _c.polyak_beta_from_window(_c_double(window_steps, "window_steps"))
    return _finite_or_raise(value, f"window {window_steps!r}")


def beta_from_horizon(horizon_steps):
    """The rule-of-thumb decay for averaging over about T steps: 1 - 2/sqrt(T)."""
    return _finite_or_raise(_c.polyak_beta_from_horizon(_c_double(horizon_steps, "horizon_steps")),
                            f"horizon {horizon_steps!r}")


def sigma_rel_from_gamma(gamma):
    """EDM2's relative width of a power-function EMA profile with exponent gamma."""
    return _finite_or_raise(_c.polyak_sigma_rel_from_gamma(_c_double(gamma, "gamma")), f"gamma {gamma!r}")


def gamma_from_sigma_rel(sigma_rel):
    value = _c.polyak_gamma_from_sigma_rel(_c_double(sigma_rel, "sigma_rel"))
    return _finite_or_raise(value, f"sigma_rel {sigma_rel!r}")


def posthoc_coefficients(snapshot_steps: Sequence[int], snapshot_sigma_rels: Sequence[float], step: int,
                         sigma_rel: float):
    """EDM2 post-hoc synthesis: the weight of each snapshot (taken at snapshot_steps[i] from a Power
    shadow of snapshot_sigma_rels[i]) for the average of `sigma_rel` read at `step`."""
    for what, values in (("snapshot_steps", snapshot_steps), ("snapshot_sigma_rels", snapshot_sigma_rels)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise InvalidArgError(f"{what} = {values!r} is not a sequence")
    count = len(snapshot_steps)
    if count != len(snapshot_sigma_rels):
        raise InvalidArgError(f"{count} snapshot steps but {len(snapshot_sigma_rels)} sigma_rels")
    steps = (ctypes.c_int64 * max(count, 1))(*(_c_int64(s, f"snapshot_steps[{i}]")
                                                for i, s in enumerate(snapshot_steps)))
    sigmas = (ctypes.c_double * max(count, 1))(*(_c_double(s, f"snapshot_sigma_rels[{i}]")
                                                 for i, s in enumerate(snapshot_sigma_rels)))
    out = (ctypes.c_double * max(count, 1))()
    status = _c.polyak_posthoc_coefficients(count, steps, sigmas, _c_int64(step, "step"),
                                            _c_double(sigma_rel, "sigma_rel"), out)
    if status:
        _raise(status, "polyak_posthoc_coefficients: bad snapshots (count outside 1..1024, a step below 1, a "
                       "sigma_rel outside (0, 0.30028]) or two snapshots with the same profile")
    return list(out)[:count]


# ---- schedules -------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """One shadow's decay. start_step: up to it the shadow copies the params (beta = 0);
    count_updates: t counts updates after start_step instead of steps (no gap compensation);
    rounding: how an f32 shadow rounds each update, "nearest" (the default) or "stochastic"
    (computed in double, rounded up or down at random so increments under half an ulp still
    count: long horizons, beta >= 0.9999 or Power past ~10^5 steps; docs/stochastic-rounding.md).
    bf16 shadows always round stochastically."""
    start_step: int = field(default=0, kw_only=True)
    count_updates: bool = field(default=False, kw_only=True)
    rounding: str = field(default="nearest", kw_only=True)

    _kind = _lib.SCHEDULE_CONSTANT

    def _c_fields(self):
        return {}

    def _c(self):
        s = _lib.config_defaults(_c).shadows[0].schedule
        s.kind = self._kind
        what = type(self).__name__
        for name, value in self._c_fields().items():  # int64_t ramp_steps, the rest double
            convert = _c_int64 if name == "ramp_steps" else _c_double
            setattr(s, name, convert(value, f"{what}: {name}"))
        s.start_step = _c_int64(self.start_step, f"{what}: start_step")
        return s

    def _apply(self, cfg, k):
        """Writes this schedule into shadow k of a polyak_config."""
        shadow = cfg.shadows[k]
        shadow.schedule = self._c()
        shadow.count_updates = int(bool(self.count_updates))
        shadow.rounding = ROUNDINGS[self.rounding]

    def __post_init__(self):
        if not isinstance(self.rounding, str) or self.rounding not in ROUNDINGS:
            raise InvalidArgError(f"rounding={self.rounding!r}: one of {sorted(ROUNDINGS)}")
        cfg = _lib.config_defaults(_c)
        self._apply(cfg, 0)
        _check_config(cfg)

    def beta_at(self, step):
        """beta(step), as the library computes it (double precision)."""
        return _c.polyak_beta_at(ctypes.byref(self._c()), _c_int64(step, "step"))

    def beta_product(self, last_step, step):
        """The decay an update at `step` applies after one at `last_step`."""
        value = _c.polyak_beta_product(ctypes.byref(self._c()), _c_int64(last_step, "last_step"),
                                       _c_int64(step, "step"))
        return _finite_or_raise(value, f"the steps ({last_step}, {step}]")


@dataclass(frozen=True)
class Constant(Schedule):
    """beta."""
    beta: float = 0.999

    def _c_fields(self):
        return {"beta": self.beta}


@dataclass(frozen=True)
class TF(Schedule):
    """min(beta, (1+t)/(10+t)): TensorFlow's num_updates rule."""
    beta: float = 0.9999
    _kind = _lib.SCHEDULE_TF

    def _c_fields(self):
        return {"beta": self.beta}


@dataclass(frozen=True)
class Warmup(Schedule):
    """t == 0 ? 0 : clamp(1 - (1 + t/inv_gamma)^-power, beta_min, beta): timm, diffusers, ema-pytorch."""
    beta: float = 0.9999
    beta_min: float = 0.0
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    _kind = _lib.SCHEDULE_WARMUP

    def _c_fields(self):
        return {"beta": self.beta, "beta_min": self.beta_min, "inv_gamma": self.inv_gamma, "power": self.power}


@dataclass(frozen=True)
class Linear(Schedule):
    """min(beta, beta_min + (t/ramp_steps)(beta - beta_min))."""
    beta: float = 0.999
    beta_min: float = 0.0
    ramp_steps: int = 1000
    _kind = _lib.SCHEDULE_LINEAR

    def _c_fields(self):
        return {"beta": self.beta, "beta_min": self.beta_min, "ramp_steps": self.ramp_steps}


@dataclass(frozen=True)
class Cosine(Linear):
    """From beta_min up to beta over ramp_steps along a half cosine."""
    _kind = _lib.SCHEDULE_COSINE


@dataclass(frozen=True)
class Equal(Schedule):
    """t/(t+1): the running mean of all updates (Polyak averaging, SWA)."""
    _kind = _lib.SCHEDULE_EQUAL


@dataclass(frozen=True)
class Power(Schedule):
    """(t/(t+1))^(gamma+1): EDM2's power-function EMA. Give gamma or sigma_rel."""
    gamma: float | None = None
    sigma_rel: float | None = None
    _kind = _lib.SCHEDULE_POWER

    def __post_init__(self):
        if (self.gamma is None) == (self.sigma_rel is None):
            raise InvalidArgError("Power: give exactly one of gamma and sigma_rel")
        if self.gamma is None:
            object.__setattr__(self, "gamma", gamma_from_sigma_rel(self.sigma_rel))
        else:
            object.__setattr__(self, "sigma_rel", sigma_rel_from_gamma(self.gamma))
        super().__post_init__()

    def _c_fields(self):
        return {"gamma": self.gamma}


@dataclass(frozen=True)
class GradNorm(Schedule):
    """beta = 1 - c / sqrt(1 + g^2) from a gradient norm g the trainer writes on the device."""
    c: float = 0.1

    def _apply(self, cfg, k):
        super()._apply(cfg, k)
        cfg.shadows[k].grad_norm_c = _c_double(self.c, "GradNorm: c")


@dataclass(frozen=True)
class Layerwise(Schedule):
    """LAWA: tensor l decays by beta0 * exp(-|g_l| / sum_j |g_j|) from the step's gradients."""
    beta0: float = 0.999

    def _apply(self, cfg, k):
        super()._apply(cfg, k)
        cfg.shadows[k].layerwise_beta0 = _c_double(self.beta0, "Layerwise: beta0")


@dataclass(frozen=True)
class Lookahead(Schedule):
    """Lookahead's slow weights: every `every` steps slow += alpha (params - slow), then
    params <- slow. Only as the last schedule of a handle."""
    alpha: float = 0.5
    every: int = 5

    def _c_fields(self):
        return {"beta": 1.0 - _c_double(self.alpha, "Lookahead: alpha")}

    def _apply(self, cfg, k):
        super()._apply(cfg, k)
        cfg.lookahead_every = _c_int64(self.every, "Lookahead: every")


def _check_config(cfg):
    message = ctypes.create_string_buffer(512)
    status = _c.polyak_check_config(ctypes.byref(cfg), message, len(message))
    if status:
        from .library import _with_load_notes  # why no CUDA library was loaded, if none was
        _raise(status, _with_load_notes(cfg.backend, message.value.decode("utf-8", "replace")))
