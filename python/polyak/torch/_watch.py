"""Noticing that the model changed after the EMA registered it.

Two ways in. torch calls global hooks on every registration of a submodule, param or buffer:
a registered tensor replaced in its module (load_state_dict(assign=True), a setattr), a
submodule replaced that held registered tensors (timm's reset_classifier, `model.fc = ...`,
parametrizations), a param or a submodule with params added. And before each call that reads or
writes the params, every registered tensor's data pointer, strides and size in bytes are compared
with those at registration (model.to(), .half(), memory_format=torch.channels_last, a .data
assignment, an optimizer that swaps storage). A new dtype or shape moves the memory or changes
the size or the strides, all but a .view() of the same memory as another dtype of the same size,
which the check does not see; it costs about 0.2 us per tensor (docs/pytorch.md)."""
import operator
import weakref
from itertools import chain

import torch
from torch.nn.modules import module as torch_module

from ._tensors import _data_ptr

_stride = torch.Tensor.stride
_nbytes = operator.attrgetter("nbytes")


def _fingerprint(tensors):
    return tuple(map(_data_ptr, tensors)), tuple(map(_stride, tensors)), tuple(map(_nbytes, tensors))


def stale_message(what):
    return (f"the model changed after the EMA registered it: {what}. The EMA would go on averaging tensors that "
            "are no longer the model's, so updates and calls that read or write the params are refused (the "
            "shadows are untouched: state_dict() and model_state_dict() still read them). To keep the "
            "averages, make an EMA of the model as it is now and load this one's state into it: "
            "new = EMA(model, <the same settings>); new.load_state_dict(ema.state_dict()) (the params' dtypes "
            "may have changed, f32 to bf16 say; strict=False where tensors were added, removed or reshaped: it "
            "keeps the averages of those whose names and shapes are unchanged); then ema.close()")


class Watch:
    """The model's tensors as the EMA registered them; `changed()` says what changed, if anything.
    The hooks report to `on_change(text)` (the EMA's, through a weak reference)."""

    def __init__(self, model, sources, on_change):
        self.tensors = [s.target for s in sources]
        self.names = [s.name for s in sources]
        self.registered = _fingerprint(self.tensors)
        self.layouts = [(t.dtype, t.shape) for t in self.tensors]
        self.paths = {}
        for path, module in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(module), path)
        self.modules = list(model.modules())  # held: their ids stay theirs
        self.slots = {(id(module), attr): s.name for s in sources for module, attr in s.slots}
        self.held = {}  # id(module) -> [(attribute, name, tensor)] of the registered tensors it holds
        for s in sources:
            for module, attr in s.slots:
                self.held.setdefault(id(module), []).append((attr, s.name, s.tensor))
        self.tensor_names = {id(s.tensor): s.name for s in sources}
        self.hooks = []
        report = weakref.WeakMethod(on_change) if hasattr(on_change, "__self__") else (lambda: on_change)

        def tell(text):
            callback = report()
            if callback is not None:
                callback(text)

        def full(module, name):
            path = self.paths[id(module)]
            return f"{path}.{name}" if path else name

        def check_held(module):
            """A registration on a module that no longer holds one of its registered tensors (a
            del, then a parametrization's registrations, say)."""
            for attr, name, tensor in self.held.get(id(module), ()):
                if module._parameters.get(attr) is not tensor and module._buffers.get(attr) is not tensor:
                    tell(f"{name!r} is no longer in its module")

        def tensor_hook(kind, table):
            def hook(module, name, value):
                if id(module) not in self.paths:
                    return
                check_held(module)
                old = getattr(module, table).get(name)
                if old is value:
                    return
                if (id(module), name) in self.slots:
                    tell(f"{self.slots[(id(module), name)]!r} was replaced in its module")
                elif kind == "param" and value is not None and old is None:
                    tell(f"a param {full(module, name)!r} was added, which the EMA does not have")
            return hook

        def module_hook(module, name, value):
            if id(module) not in self.paths:
                return
            check_held(module)
            old = module._modules.get(name)
            if old is value:
                return
            lost = [self.tensor_names[id(t)] for t in chain(old.parameters(), old.buffers())
                    if id(t) in self.tensor_names] if old is not None else []
            if lost:
                more = f" (and {len(lost) - 1} more)" if lost[1:] else ""
                tell(f"submodule {full(module, name)!r} was replaced: {lost[0]!r}{more} is no longer the model's")
            elif value is not None and next(value.parameters(), None) is not None:
                tell(f"a submodule {full(module, name)!r} with params was added, which the EMA does not have")

        self.hooks = [torch_module.register_module_parameter_registration_hook(tensor_hook("param", "_parameters")),
                      torch_module.register_module_buffer_registration_hook(tensor_hook("buffer", "_buffers")),
                      torch_module.register_module_module_registration_hook(module_hook)]

    def changed(self):
        """What changed in the registered tensors since registration, or None."""
        now = _fingerprint(self.tensors)
        if now == self.registered:
            return None
        for i, (name, tensor) in enumerate(zip(self.names, self.tensors)):
            if all(now[j][i] == self.registered[j][i] for j in range(3)):
                continue
            stride, dtype, shape = now[1][i], tensor.dtype, tensor.shape
            stride0, (dtype0, shape0) = self.registered[1][i], self.layouts[i]
            if dtype != dtype0:
                return f"{name!r} is {dtype} now, {dtype0} when registered"
            if shape != shape0:
                return f"{name!r} has shape {tuple(shape)} now, {tuple(shape0)} when registered"
            if stride != stride0:
                return f"{name!r} has strides {stride} now, {stride0} when registered (a memory format change?)"
            return f"{name!r} was re-allocated (model.to(), load_state_dict(assign=True), a .data assignment?)"
        return None

    def close(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
