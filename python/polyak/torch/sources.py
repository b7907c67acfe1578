"""What adaptive shadows read besides the params: LAWA's gradients and the grad norm, kept current
for every update and alive until the stream of each update that reads them is past it."""
import ctypes
from collections.abc import Sequence

import torch

from polyak import InvalidArgError, Layerwise, StateError

from ._tensors import _data_ptr, _is_dtensor, _local


class _Sources:
    """EMA's gradient table (Layerwise shadows) and grad norm (GradNorm shadows).

    Gradients: an EMA with Layerwise shadows follows each averaged param's .grad: every update
    first gives the library the addresses of the .grad tensors of that moment, since
    zero_grad(set_to_none=True), PyTorch's default, makes new ones every step. An unchanged table
    is not passed again (no C call); a changed one is checked and set, which waits for the device.
    The EMA keeps no reference to followed gradients after the update (one would make the caching
    allocator hand out new addresses every step); on CUDA each is marked in use by the update's
    stream (Tensor.record_stream), so freeing it cannot give its memory to another stream before
    the update has read it. A param whose .grad is None counts as a zero gradient (a frozen
    param, or one the step did not use: its beta is beta0); if every .grad is None the update
    refuses. set_grads(list) reads those tensors instead, held until set again.

    Grad norm: the tensor given to set_grad_norm is held until replaced, and marked in use by the
    stream of every update that reads it, so a replaced one outlives the queued updates that read it.
    """

    def _init_sources(self, schedules):
        self._layerwise = any(isinstance(s, Layerwise) for s in schedules)
        self._follow_grads = self._layerwise
        self._grads = None  # set_grads(list): the tensors held; None while following .grad
        self._grad_ptrs = None  # the table the library holds, as a tuple (None: none set)
        self._zeros = None  # uint8 zeros standing in for missing gradients
        self._zeros_old = None  # the zeros replaced, until the library holds the new table
        self._grad_owners = [s.tensor for s in self._averaged]  # whose .grad is followed
        self._dtensor_grads = any(map(_is_dtensor, self._grad_owners))
        self._grad_norm = None  # the tensor set_grad_norm holds
        self._grad_norm_streams = set()  # the streams it is marked in use by
        self._reads_sources = self._follow_grads

    # ---- gradients ----------------------------------------------------------------------
    def set_grads(self, grads: Sequence[torch.Tensor] | None = None):
        """Where Layerwise shadows read the gradients at every update. Without an argument, each
        averaged param's .grad as it is at each update (an EMA with Layerwise shadows does this
        from the start; a .grad that is None counts as zeros); with a list (one tensor per
        averaged param, like it), those tensors, held until set again. Set now if there is a
        gradient to set; a changed table waits for the device and is refused while steps are
        reserved or a CUDA graph is being captured."""
        if grads is None:
            if not self._layerwise:
                raise StateError("set_grads: no shadow is layer-wise (polyak.Layerwise)")
            previous = self._follow_grads, self._grads
            self._follow_grads, self._grads = True, None
            try:
                if any(t.grad is not None for t in self._grad_owners):
                    self._refresh_grads()
            except BaseException:
                self._follow_grads, self._grads = previous  # as it was
                raise
            self._reads_sources = True
            return
        grads = list(grads)
        if len(grads) != len(self._averaged):
            raise InvalidArgError(f"{len(grads)} gradients for {len(self._averaged)} tensors")
        grads = [_local(g) if isinstance(g, torch.Tensor) else g for g in grads]
        for s, g in zip(self._averaged, grads):
            self._check_grad(s, g)
        self._set_grad_table(tuple(_data_ptr(g) for g in grads))
        self._follow_grads, self._grads = False, grads
        self._reads_sources = True

    def _check_grad(self, s, g):
        if not isinstance(g, torch.Tensor) or g.layout != torch.strided or g.shape != s.local.shape \
                or g.dtype != s.local.dtype or not g.is_contiguous() or g.device != self.device:
            raise InvalidArgError(f"the gradient of {s.name!r} is missing or not like the param (a dense, "
                                  "contiguous tensor of its shape and dtype on its device)")

    def _current_grads(self):
        """The gradients an update reads now: (table, tensors), missing ones as zeros."""
        if not self._follow_grads:
            return tuple(map(_data_ptr, self._grads)), self._grads
        grads = [t.grad for t in self._grad_owners]
        if self._dtensor_grads:
            grads = [None if g is None else _local(g) for g in grads]
        try:
            return tuple(map(_data_ptr, grads)), grads
        except TypeError:  # data_ptr of None: some param has no gradient
            pass
        missing = [s for s, g in zip(self._averaged, grads) if g is None]
        if len(missing) == len(grads):
            raise StateError("Layerwise shadows read the gradients at each update, and every param's .grad is "
                             "None: update after backward() and before zero_grad(), or give them with set_grads(list)")
        zeros = self._zeros_ptr(max(s.local.numel() * s.local.element_size() for s in missing))
        return tuple(zeros if g is None else _data_ptr(g) for g in grads), grads

    def _zeros_ptr(self, num_bytes):
        if self._zeros is None or self._zeros.numel() < num_bytes:
            # the one replaced stays referenced by the table until _set_grad_table has replaced it
            self._zeros_old, self._zeros = self._zeros, torch.zeros(num_bytes, dtype=torch.uint8, device=self.device)
        return _data_ptr(self._zeros)

    def _refresh_grads(self):
        """Gives the library the current table if it changed; returns the tensors it reads."""
        ptrs, grads = self._current_grads()
        if ptrs != self._grad_ptrs:
            if self._follow_grads:  # torch's .grad has the param's shape, dtype and device: the rest
                old = self._grad_ptrs or (None,) * len(ptrs)
                for s, g, ptr, was in zip(self._averaged, grads, ptrs, old):
                    if g is not None and ptr != was and (g.layout != torch.strided or not g.is_contiguous()):
                        strides = f", strides {g.stride()}" if g.layout == torch.strided else ""
                        raise InvalidArgError(f"the gradient of {s.name!r} is not a dense, contiguous tensor "
                                              f"({g.layout}{strides})")
            self._set_grad_table(ptrs)
        return grads

    def _set_grad_table(self, ptrs):
        if self._cuda and torch.cuda.is_current_stream_capturing():
            raise StateError("the gradients moved (or were set) during a CUDA graph capture: a changed table waits "
                             "for the device. Keep them in place for graphs (zero_grad(set_to_none=False)) and set "
                             "them before graph_reserve")
        # one pointer per registered tensor: the averaged ones, then NULL for the copied buffers (the
        # addresses are torch's: straight to the C call, past Handle.set_grads's checks of each)
        h = self.handle
        h._call("polyak_set_grads", (ctypes.c_void_p * (len(ptrs) + len(self._copied)))(*ptrs))
        self._grad_ptrs = ptrs
        self._zeros_old = None

    # ---- the grad norm -------------------------------------------------------------------
    def set_grad_norm(self, grad_norm: torch.Tensor):
        """GradNorm shadows read this one-element float32 tensor (the EMA's device) at every update:
        write each step's norm into it, or give each step's tensor here (clip_grad_norm_'s result).
        Refused while steps are reserved or a CUDA graph is being captured."""
        if not isinstance(grad_norm, torch.Tensor) or grad_norm.dtype != torch.float32 or grad_norm.numel() != 1 \
                or grad_norm.device != self.device:
            raise InvalidArgError("grad_norm: one float32 element on the EMA's device")
        if self._cuda and torch.cuda.is_current_stream_capturing():
            raise StateError("set_grad_norm during a CUDA graph capture: set the tensor before capturing")
        self.handle.set_grad_norm(_data_ptr(grad_norm))
        # the tensor replaced: marked in use by the streams of the updates that read it, so the
        # caching allocator keeps it until they are past them
        self._grad_norm, self._grad_norm_streams = grad_norm, set()
        self._reads_sources = True

    # ---- around an update -------------------------------------------------------------------
    def _before_update(self):
        """The gradients the update reads (None without Layerwise shadows), their table set."""
        return self._refresh_grads() if self._grads is not None or self._follow_grads else None

    def _after_update(self, stream, grads):
        """On CUDA, marks what the update just enqueued reads as in use by its stream."""
        if not self._cuda:
            return
        current = None
        if self._grad_norm is not None and stream not in self._grad_norm_streams:
            current = torch.cuda.current_stream(self._device_index)
            self._grad_norm.record_stream(current)
            self._grad_norm_streams.add(stream)
        if grads is not None and self._follow_grads:
            current = current or torch.cuda.current_stream(self._device_index)
            for g in grads:
                if g is not None:
                    g.record_stream(current)

    def _check_graph_sources(self):
        """graph_update: the gradients the graph will read must be the table set (a changed one is
        refused during a capture)."""
        if self._grads is not None or self._follow_grads:
            if self._current_grads()[0] != self._grad_ptrs:
                raise StateError("the gradients moved since the table was set: a captured update would read the "
                                 "old ones. Keep them in place for graphs (zero_grad(set_to_none=False)) and set "
                                 "them before graph_reserve")
