"""polyak.timm.ModelEmaV3: timm's ModelEmaV3 (timm.utils.model_ema) with the average kept by libpolyak.

    from polyak.timm import ModelEmaV3             # in place of: from timm.utils import ModelEmaV3
    model_ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
    ...; model_ema.update(model, step=num_updates)  # after each optimizer step, as timm's train.py
    validate(model_ema, loader)                      # model_ema.module holds the average
    CheckpointSaver(model, optimizer, model_ema=model_ema, ...)            # 'state_dict_ema'
    load_checkpoint(model_ema.module, path, use_ema=True)                  # --resume: read back

The constructor takes timm's arguments and the same decays follow (timm's get_decay, the first
update after update_after_step copying). The shadows are the library's, f32 (or bf16 with
dtype=torch.bfloat16, rounded stochastically), updated by one C call; `.module` is a module of
the model's architecture built on the meta device (no second deepcopy of the weights), holding
the average: for now a copy refreshed when read after an update (_average_module is the one
place that makes it). What is written into `.module` (timm's resume through load_checkpoint,
distribute_bn, a set(model)) becomes the average at the next update or read of `.module`.
Imports no timm: timm's tools take this module as they take their own.
"""
import copy

import torch

from polyak import Constant, InvalidArgError, MismatchError, UnsupportedError

__all__ = ["ModelEmaV3"]


def _training_model(model):
    """The module a DistributedDataParallel / DataParallel wrapper or torch.compile holds."""
    from .torch import _select
    while True:
        model = _select.unwrap(model)
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _module_on_meta(model, dtype=None):
    """A module of model's architecture whose params and persistent buffers are meta tensors (no
    memory, no copy of their values: the memo of the deepcopy hands meta tensors for them), tied
    tensors tied again; non-persistent buffers (recomputed constants) are copied."""
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo = {}
    for p in model.parameters():
        meta = torch.empty_like(p, device="meta", dtype=dtype if dtype and p.is_floating_point() else p.dtype)
        memo[id(p)] = torch.nn.Parameter(meta, requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) in persistent:
            memo[id(b)] = torch.empty_like(b, device="meta",
                                           dtype=dtype if dtype and b.is_floating_point() else b.dtype)
    return copy.deepcopy(model, memo)


def _materialize(module, device):
    """Gives each meta tensor of module memory on `device` (tied ones one tensor); returns them."""
    made = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    real = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = torch.nn.Parameter(real, requires_grad=t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else real
                table[name] = made[id(t)]
    return list(made.values())


def _fill_from_shadow(ema, module):
    """module's tensors <- shadow 0 of the averaged ones and the mirrors of the copied ones: the
    library writes each straight into the module's tensor where that is row-major memory on the
    EMA's device in a dtype it reads out (one pass, no scratch tensor), else through
    EMA.copy_to."""
    from .torch._tensors import _DTYPE_NAMES, _data_ptr
    targets = dict(module.named_parameters(remove_duplicate=False))
    targets.update(module.named_buffers(remove_duplicate=False))

    def direct(s, dtypes):
        t = targets.get(s.names[0])
        return t if t is not None and t.device == ema.device and t.is_contiguous() and s.perm is None and \
            tuple(t.shape) == tuple(s.shape) and t.dtype in dtypes else None
    averaged = [direct(s, _DTYPE_NAMES) for s in ema._averaged]
    copied = [direct(s, (s.dtype,)) for s in ema._copied]
    if ema._sharded() or any(t is None for t in averaged + copied):
        ema.copy_to(module)
        return
    h, stream = ema.handle, ema._stream()
    for s, t in zip(ema._averaged, averaged):
        h.get_shadow(0, s.info.index, _data_ptr(t), _DTYPE_NAMES[t.dtype], stream,
                     dst_num_bytes=t.numel() * t.element_size())
    for j, t in enumerate(copied):
        ema._read_copy(j, dst=t)


class ModelEmaV3(torch.nn.Module):
    """timm.utils.ModelEmaV3's interface over a polyak EMA of `model`.

    Arguments as timm's. dtype: None keeps the model's dtypes in `.module` over f32 shadows;
    torch.bfloat16 keeps bf16 shadows (always rounded stochastically: stochastic_rounding=False
    is refused) and a bf16 module; torch.float32 an f32 module. device: the model's own (None);
    another device is refused (the library averages where the params are). foreach is accepted
    and ignored. exclude_buffers: buffers copied, not averaged. stochastic_rounding_seed: the
    library's seed.

    update(model, step=s) applies timm's decay for step s; steps skipped since the last update
    are compensated (the decay product over them), where timm applies its decay once per call:
    the same at one call per optimizer step, as timm's train.py calls it. Without a step, timm's
    constant decay, one step per call.
    """

    def __init__(self, model, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device=None, dtype=None, stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0,
                 foreach: bool = True, exclude_buffers: bool = False):
        super().__init__()
        model = _training_model(model)
        first = next(iter(model.parameters()), None)
        if first is None:
            raise InvalidArgError("ModelEmaV3: the model has no parameters")
        if device is not None and torch.device(device) != first.device:
            raise UnsupportedError(f"ModelEmaV3(device={device!r}): polyak keeps the shadows where the params are "
                                   f"({first.device}); leave device out")
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidArgError(f"ModelEmaV3(dtype={dtype}): torch.float32, bfloat16 or float16")
        if dtype == torch.bfloat16 and not stochastic_rounding:
            raise UnsupportedError("ModelEmaV3(dtype=torch.bfloat16, stochastic_rounding=False): polyak's bf16 "
                                   "shadows always round stochastically (rounded to nearest they stall)")
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.device, self.dtype, self.foreach = device, dtype, foreach
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        # not submodules: the state dict of this module is its `.module`'s, as timm's
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_ema", None)  # made at the first update, which says which decay applies
        self._ema_step = None  # the EMA's step when `.module` was last refreshed
        self._versions = None  # `.module`'s tensors and their versions then: a write changes them
        self._modules["module"] = self._average_module(model)
        self._modules["module"].eval()

    # ---- `.module`: the only place it is made and filled -----------------------------------
    def _average_module(self, model):
        """A module of model's architecture built on the meta device, then given memory filled with
        the model's weights (the EMA's start; updates refresh it from shadow 0). Views of shadow 0
        replace this copy where they can hold the average as stored."""
        module = _module_on_meta(model, self.dtype)
        _materialize(module, next(iter(model.parameters())).device)
        with torch.no_grad():
            module.load_state_dict(model.state_dict())
        return module

    def _tensors(self):
        module = self._modules["module"]
        return list(module.parameters()) + list(module.buffers())

    def _record(self):
        self._versions = [(t, t._version, t.data_ptr()) for t in self._tensors()]

    def _written(self):
        """Whether `.module`'s tensors were written (or given new memory: .to()) since the record."""
        return self._versions is not None and any(
            t._version != v or t.data_ptr() != ptr for t, v, ptr in self._versions)

    def _refresh(self):
        """`.module` <- shadow 0 (after updates), or the EMA <- `.module` (after writes into it)."""
        ema = self._ema
        if ema is None:
            return
        if self._written():
            self._absorb(None)
        elif self._ema_step != ema.step:
            _fill_from_shadow(ema, self._modules["module"])
            self._ema_step = ema.step
            self._record()

    def _absorb(self, step):
        """Shadow 0 <- `.module`'s values, exactly; with step, the EMA's last step becomes step - 1
        (timm's resume: the next update applies the decay of `step` to what was loaded)."""
        values = self._modules["module"].state_dict()
        state = None if step is None else {"step": step - 1}
        self._ema._set_values(0, values, state)
        self._ema_step = self._ema.step
        self._record()

    @property
    def module(self):
        self._refresh()
        return self._modules["module"]

    def state_dict(self, *args, **kwargs):
        self._refresh()
        return super().state_dict(*args, **kwargs)

    @property
    def ema(self):
        """The polyak.torch.EMA underneath (None before the first update)."""
        return self._ema

    # ---- timm's interface ---------------------------------------------------------------
    def get_decay(self, step: int | None = None) -> float:
        """timm's decay for `step` (its formula)."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def _make_ema(self, stepped):
        from .torch import EMA
        options = dict(buffers="copy" if self.exclude_buffers else "average",
                       shadow_dtype=torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32,
                       seed=self.stochastic_rounding_seed)
        if stepped:
            ema = EMA.like_timm(self._model, decay=self.decay, min_decay=self.min_decay,
                                update_after_step=self.update_after_step, use_warmup=self.use_warmup,
                                warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power, **options)
        else:
            ema = EMA(self._model, schedules=[Constant(self.decay)], **options)
        object.__setattr__(self, "_ema", ema)

    @torch.no_grad()
    def update(self, model, step: int | None = None):
        """Folds `model`'s weights (the model this EMA was made with, or its DDP / compiled
        wrapper) into the average: timm's decay for `step`, one C call."""
        if _training_model(model) is not self._model:
            raise MismatchError("ModelEmaV3.update(model): this EMA averages the model it was made with (or its "
                                "DDP / torch.compile wrapper), not another")
        if self._ema is None:
            self._make_ema(step is not None)
            self._absorb(step if step is not None else 1)  # the start: `.module` (made, or loaded into)
        elif self._written():
            self._absorb(step)
        self._ema.update(step)

    @torch.no_grad()
    def set(self, model):
        """The average <- `model`'s weights (timm's set)."""
        values = _training_model(model).state_dict()
        self.module.load_state_dict(values)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise UnsupportedError("a polyak ModelEmaV3 cannot be pickled or deep-copied: it holds the library's "
                               "handle; save model_ema.module.state_dict() (timm's CheckpointSaver does)")
