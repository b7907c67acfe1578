"""polyak.diffusers.EMAModel: diffusers' EMAModel (diffusers.training_utils) with the average kept by libpolyak.

    from polyak.diffusers import EMAModel           # in place of: from diffusers.training_utils import EMAModel
    ema_unet = EMAModel(ema_unet.parameters(), model_cls=UNet2DConditionModel, model_config=ema_unet.config)
    ...; ema_unet.step(unet.parameters())          # after each optimizer step, as diffusers' scripts
    ema_unet.store(unet.parameters()); ema_unet.copy_to(unet.parameters()); ...; ema_unet.restore(unet.parameters())
    ema_unet.save_pretrained(path); EMAModel.from_pretrained(path, model_cls=UNet2DConditionModel)

Its rules as diffusers has them: the first step() (after update_after_step) copies; without
warmup the decay is (1+s)/(10+s) capped by `decay` (and floored by `min_decay`, which maps only
where the floor never binds: min_decay <= min(2/11, decay), else refused); with use_ema_warmup
diffusers' warm-up; the params that do not require grad are copied; restore() without store()
raises; a module argument turns warm-up on; save_pretrained keeps the EMA settings in the
model's config. The params averaged are those given to the first step() (diffusers' training
scripts build the EMA from a copy of the model and step it with the trained one); the
construction's params only give the average until then, and which params are frozen is read
then. The shadows are the library's f32 ones, updated by one C call on the params' device.
`shadow_params` is a list of tensors refreshed from the average when read (for now a copy; it
stays the same list, as diffusers' own). Imports no diffusers until save_pretrained needs it.
"""
import warnings

import torch

from polyak import PolyakError, UnsupportedError

__all__ = ["EMAModel"]

_TF_FLOOR = 2 / 11  # the smallest decay of diffusers' default rule after its first (copying) step


class EMAModel:
    """diffusers.training_utils.EMAModel's interface over a polyak EMA (polyak.torch.EMA.like_diffusers)."""

    def __init__(self, parameters, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3, foreach: bool = False,
                 model_cls=None, model_config=None, **kwargs):
        if isinstance(parameters, torch.nn.Module):
            warnings.warn("Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated (diffusers): pass "
                          "its parameters; use_ema_warmup is set to True", FutureWarning, stacklevel=2)
            parameters = parameters.parameters()
            use_ema_warmup = True
        if kwargs.get("max_value") is not None:
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            min_decay = kwargs["min_value"]
        self._start = [p.detach().clone() for p in parameters]  # the average until the first step
        self._ema = None
        self._params = None  # the params the EMA averages (the first step's)
        self._view = None  # the list shadow_params hands out
        self._view_step = None
        self._pending = None  # an exact polyak state to load when the EMA is made
        self.temp_stored_params = None
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.optimization_step = 0
        self.cur_decay_value = None
        self.foreach = foreach
        self.model_cls, self.model_config = model_cls, model_config
        self._check_settings()
        if kwargs.get("device") is not None:
            self.to(device=kwargs["device"])

    # ---- the mapping -------------------------------------------------------------------
    def _settings(self):
        return (self.decay, self.min_decay, self.update_after_step, self.use_ema_warmup, self.inv_gamma, self.power)

    def _check_settings(self):
        if not self.use_ema_warmup and self.min_decay > min(_TF_FLOOR, self.decay):
            raise UnsupportedError(f"EMAModel(min_decay={self.min_decay}) without use_ema_warmup: polyak's TF schedule "
                                   f"has no floor, so min_decay maps only up to min(2/11, decay); use_ema_warmup=True "
                                   "maps any min_decay")

    def get_decay(self, optimization_step: int) -> float:
        """diffusers' decay for an optimization step (its formula)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    def _make(self, params):
        """The EMA of `params`, holding self._start at step optimization_step - 1 (or the pending state)."""
        from .torch import EMA
        if len(params) != len(self._start):
            raise UnsupportedError(f"EMAModel.step: {len(params)} parameters, the EMA was made with {len(self._start)}")
        self._check_settings()
        holder = torch.nn.ParameterList(params)
        min_decay = self.min_decay if self.use_ema_warmup else 0.0  # below the floor of TF: no effect
        ema = EMA.like_diffusers(holder, decay=self.decay, min_decay=min_decay,
                                 update_after_step=self.update_after_step, use_ema_warmup=self.use_ema_warmup,
                                 inv_gamma=self.inv_gamma, power=self.power)
        self._ema, self._params, self._made_with = ema, params, self._settings()
        pending, self._pending = self._pending, None
        if pending is not None and int(pending.get("optimization_step", -1)) == self.optimization_step - 1:
            try:
                ema.load_state_dict(pending["state"])
                return
            except PolyakError:  # other settings or params: the shadows as values, below
                pass
        ema._set_values(0, {str(i): value for i, value in enumerate(self._start)},
                        {"step": self.optimization_step - 1})

    def _drop(self):
        """Back to values: self._start <- the average, the EMA closed (made again at the next step)."""
        if self._ema is not None:
            self._start = [value.clone() for value in self._averages()]
            self._ema.close()
            self._ema = self._params = None
            self._view = None

    def _averages(self):
        """The average of each param, in order (the params' dtypes)."""
        if self._ema is None:
            return self._start
        values = self._ema._averages(0)
        return [values[str(i)] for i in range(len(self._params))]

    # ---- diffusers' interface ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, parameters):
        if isinstance(parameters, torch.nn.Module):
            warnings.warn("Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is deprecated (diffusers): "
                          "pass its parameters", FutureWarning, stacklevel=2)
            parameters = parameters.parameters()
        params = list(parameters)
        if self._ema is not None and (self._settings() != self._made_with or len(params) != len(self._params) or
                                      any(p is not q for p, q in zip(params, self._params))):
            if self._settings() == self._made_with:
                raise UnsupportedError("EMAModel.step: other parameters than at the first step (polyak averages the "
                                       "params it registered)")
            self._drop()  # settings changed (load_state_dict): made again with them
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)
        if self._ema is None:
            self._make(params)
        self._ema.update(self.optimization_step)

    @property
    def shadow_params(self):
        """The average of each param: one list of tensors, refreshed when read after a step."""
        if self._ema is None:
            return self._start
        if self._view is None:
            self._view = [value.clone() for value in self._averages()]
            self._view_step = self._ema.step
        elif self._view_step != self._ema.step:
            with torch.no_grad():
                for view, value in zip(self._view, self._averages()):
                    view.copy_(value)
            self._view_step = self._ema.step
        return self._view

    @shadow_params.setter
    def shadow_params(self, values):
        values = list(values)
        if self._ema is None:
            self._start = values
            return
        self._ema._set_values(0, {str(i): value for i, value in enumerate(values)})
        self._view = None

    def copy_to(self, parameters) -> None:
        """Writes the average into `parameters`."""
        with torch.no_grad():
            for value, param in zip(self._averages(), parameters):
                param.data.copy_(value.to(param.device))

    def store(self, parameters) -> None:
        """Saves the parameters (on the CPU, as diffusers) for restore()."""
        self.temp_stored_params = [param.detach().cpu().clone() for param in parameters]

    def restore(self, parameters) -> None:
        """Puts back what store() saved; raises RuntimeError without a store()."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        with torch.no_grad():
            for stored, param in zip(self.temp_stored_params, parameters):
                param.data.copy_(stored.data)
        self.temp_stored_params = None

    def to(self, device=None, dtype=None, non_blocking=False) -> None:
        """Before the first step, moves the starting values (diffusers' to); after it the shadows stay
        where the params are, in f32: another device or a dtype is refused."""
        if self._ema is None:
            self._start = [p.to(device=device, dtype=dtype, non_blocking=non_blocking) if p.is_floating_point()
                           else p.to(device=device, non_blocking=non_blocking) for p in self._start]
            return
        if dtype is not None or (device is not None and torch.device(device) != self._ema.device):
            raise UnsupportedError(f"EMAModel.to(device={device}, dtype={dtype}): polyak keeps f32 shadows where the "
                                   f"params are ({self._ema.device}); offloading them (offload_ema) is not mapped")

    def pin_memory(self) -> None:
        raise UnsupportedError("EMAModel.pin_memory (offload_ema): polyak keeps the shadows where the params are")

    def state_dict(self) -> dict:
        """diffusers' state (its keys; shadow_params the average), and under "polyak" the EMA's exact state."""
        state = {"decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
                 "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
                 "inv_gamma": self.inv_gamma, "power": self.power, "shadow_params": self.shadow_params}
        if self._ema is not None:
            state["polyak"] = {"optimization_step": self.optimization_step, "state": self._ema.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """diffusers' checks and keys; a state of this class continues exactly, one of diffusers'
        from its shadow_params and optimization_step."""
        state = dict(state_dict)
        checks = (("decay", float, "Decay must be between 0 and 1"), ("min_decay", float, "Invalid min_decay"),
                  ("optimization_step", int, "Invalid optimization_step"),
                  ("update_after_step", int, "Invalid update_after_step"),
                  ("use_ema_warmup", bool, "Invalid use_ema_warmup"), ("inv_gamma", (float, int), "Invalid inv_gamma"),
                  ("power", (float, int), "Invalid power"))
        values = {}
        for key, kind, message in checks:
            value = state.get(key, getattr(self, key))
            if key == "decay" and not 0.0 <= value <= 1.0 or key != "decay" and not isinstance(value, kind):
                raise ValueError(message)
            values[key] = value
        shadow_params = state.get("shadow_params")
        if shadow_params is not None and (not isinstance(shadow_params, list) or
                                          not all(isinstance(p, torch.Tensor) for p in shadow_params)):
            raise ValueError("shadow_params must be a list of Tensors")
        self._drop()
        for key, value in values.items():
            setattr(self, key, value)
        if shadow_params is not None:
            self._start = [p.detach().clone() for p in shadow_params]
        self._pending = state.get("polyak")

    def save_pretrained(self, path):
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state = self.state_dict()
        state.pop("shadow_params", None)
        state.pop("polyak", None)
        model.register_to_config(**state)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach=False) -> "EMAModel":
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model
