"""What an EMA registers: the model (the original of a torch.compile'd one), its params chosen by
name, glob, predicate, requires_grad or PEFT's adapter layers, and its persistent buffers, each
tensor once under every name it has (tied weights)."""
import fnmatch
import sys

import torch

from polyak import InvalidArgError, UnsupportedError

from ._tensors import _COPY_DTYPE_NAMES, _DTYPE_NAMES, _is_dtensor, _Source

PARAM_CHOICES = ("all", "trainable", "adapters")


def unwrap(model):
    """The module a torch.compile'd one wraps (its state dict has no "_orig_mod." prefix)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def adapter_params(model):
    """The params of PEFT's adapter layers (LoRA's lora_A/lora_B/lora_embedding_*/DoRA's
    magnitudes, IA3's vectors, ..., and modules_to_save): every module PEFT makes lists the
    attributes holding its adapters' weights in `adapter_layer_names`."""
    found = {}
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", None)
        if not isinstance(names, tuple):
            continue
        for layer in names:
            holder = module._modules.get(layer)
            if holder is not None:
                found.update((id(p), p) for p in holder.parameters())
    return found


def _chooser(params, model, what="params"):
    """name, param -> whether the param is chosen."""
    if params is None or params == "all":
        return lambda name, p: True
    if params == "trainable":
        return lambda name, p: p.requires_grad
    if params == "adapters":
        adapters = adapter_params(model)
        if not adapters:
            raise InvalidArgError(f"{what}='adapters': the model has no PEFT adapter layers (no module lists "
                                  "adapter_layer_names)")
        return lambda name, p: id(p) in adapters
    if callable(params):
        return lambda name, p: bool(params(name, p))
    globs = [params] if isinstance(params, str) else params
    if not isinstance(globs, (list, tuple)) or not globs or not all(isinstance(g, str) for g in globs):
        raise InvalidArgError(f"{what}={params!r}: one of {PARAM_CHOICES}, a glob of param names, a list of "
                              "them, or a predicate f(name, param) -> bool")
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            raise InvalidArgError(f"{what}: {glob!r} matches no param of the model")
    return lambda name, p: any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def _no_param(name, p):
    return False


def _grouped(named):
    """[(tensor, [its names])] in the order of first appearance: a tied tensor once."""
    groups = {}
    for name, t in named:
        groups.setdefault(id(t), (t, []))[1].append(name)
    return list(groups.values())


def _slot(model, name):
    prefix, _, attr = name.rpartition(".")
    return model.get_submodule(prefix), attr


def _source(model, names, kind, tensor, local=None):
    slots = [_slot(model, name) for name in names]
    try:
        return _Source(names, slots, kind, tensor, local)
    except ValueError as e:
        raise InvalidArgError(f"{kind} {names[0]!r} is not dense ({e}): polyak averages tensors whose elements "
                              "fill their memory once each (contiguous, channels_last, any order of the "
                              "dimensions)") from None


def collect(model, params, other_params, buffers, int_buffers):
    """(averaged, copied) sources. other_params: what becomes of the params not chosen: "ignore",
    "copy", or which of them are copied (a glob, globs or a predicate, as params; the rest ignored).
    buffers: "average" (floating ones; the others copied, or with int_buffers "initial" kept at
    their value now), "copy" or "ignore"; non-persistent buffers are never registered (they are
    no part of the model's state dict: the model recomputes them)."""
    choose = _chooser(params, model)
    if other_params in ("ignore", "copy"):
        copy = _chooser("all" if other_params == "copy" else _no_param, model)
    elif other_params in PARAM_CHOICES:
        raise InvalidArgError(f"other_params={other_params!r}: 'ignore', 'copy', or which params to copy (globs "
                              "or a predicate)")
    else:
        copy = _chooser(other_params, model, "other_params")
    averaged, copied = [], []
    for p, names in _grouped(model.named_parameters(remove_duplicate=False)):
        if any(choose(name, p) for name in names):
            averaged.append(_source(model, names, "param", p))
        elif any(copy(name, p) for name in names):
            copied.append(_source(model, names, "param", p))
    if buffers == "ignore":
        return averaged, copied
    for b, names in _grouped(model.named_buffers(remove_duplicate=False)):
        slots = [_slot(model, name) for name in names]
        if all(attr in module._non_persistent_buffers_set for module, attr in slots):
            continue
        if buffers == "average" and b.dtype in _DTYPE_NAMES:
            averaged.append(_source(model, names, "buffer", b))
        elif buffers == "average" and int_buffers == "initial":
            copied.append(_source(model, names, "initial", b, local=b.detach().clone()))
        else:
            copied.append(_source(model, names, "buffer", b))
    return averaged, copied


def check(averaged, copied):
    """The tensors' dtypes and layouts as the library takes them; returns their one device."""
    devices = {s.local.device for s in averaged + copied}
    if len(devices) > 1:
        raise InvalidArgError(f"the model's tensors are on several devices ({sorted(map(str, devices))}): "
                              "one EMA averages the tensors of one device")
    device = devices.pop() if devices else torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"tensors on {device}: polyak runs on the CPU and CUDA devices")
    for s in averaged:
        if s.local.dtype not in _DTYPE_NAMES:
            raise UnsupportedError(f"{s.kind} {s.name!r} is {s.local.dtype}: polyak averages float32, "
                                   "bfloat16 and float16 tensors (params='...' or other_params='copy' leave "
                                   "it out or copy it)")
    for s in copied:
        if s.local.dtype not in _COPY_DTYPE_NAMES:
            raise UnsupportedError(f"{s.kind} {s.name!r} is {s.local.dtype}, which polyak does not copy "
                                   "(buffers='ignore' leaves buffers out)")
    for s in averaged + copied:
        if s.perm is not None and _is_dtensor(s.tensor):
            raise UnsupportedError(f"{s.kind} {s.name!r}: a DTensor whose local shard is not row-major")
    return device
