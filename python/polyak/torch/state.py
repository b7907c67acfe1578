"""The EMA's state: the library's checkpoint as bytes, as files, and as tensors (FSDP2's DTensors).

Checkpoints hold every tensor in its logical, row-major order: the library registers a
channels_last (or otherwise permuted) tensor in its memory order, so the entries of those
tensors are permuted on the way out (state_dict, save) and back on the way in (load_state_dict,
load), and the checksum is recomputed (polyak_checkpoint_reseal). A checkpoint of a
channels_last model thus loads into an EMA of a contiguous one and the other way round."""
import json
from collections import namedtuple

import torch

import polyak
from polyak import FormatError, MismatchError, UnsupportedError, _lib
from polyak.errors import _check

from ._tensors import _COPY_DTYPE_NAMES, _DTYPE_NAMES, _data_ptr, _is_dtensor, _local

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
_ENTRY_DTYPES = {name.upper(): dtype for dtype, name in _COPY_DTYPE_NAMES.items()}
_AVERAGED_DTYPES = {name.upper() for name in _DTYPE_NAMES.values()}


def _checkpoint_of(handle):
    """The handle's checkpoint (polyak_save_to_memory) as a uint8 CPU tensor."""
    out = torch.empty(handle.save_size(), dtype=torch.uint8)
    return out[:handle.save_to_memory(_data_ptr(out), dst_num_bytes=out.numel())]


def _split(checkpoint):
    """(header, data) of a checkpoint: the safetensors container only (an 8-byte length, then the
    JSON header, then the data, which stays the library's)."""
    header_bytes = int.from_bytes(checkpoint[:8].numpy().tobytes(), "little")
    return json.loads(checkpoint[8:8 + header_bytes].numpy().tobytes()), checkpoint[8 + header_bytes:]


def _join(header, data):
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # as jansson writes it
    text += b" " * (-len(text) % 8)
    head = torch.frombuffer(bytearray(len(text).to_bytes(8, "little") + text), dtype=torch.uint8)
    return torch.cat([head, data])


def _entry(header, data, name, dtype):
    """The tensor saved under `name`, as `dtype`: a copy of its bytes."""
    begin, end = header[name]["data_offsets"]
    return data[begin:end].clone().view(dtype).reshape(header[name]["shape"])


def _saved_name(shadow, name):
    return name if shadow == 0 else f"polyak.shadow.{shadow}.{name}"


def _tensor_name(entry):
    """The tensor an entry belongs to."""
    if entry.startswith("polyak.shadow."):
        return entry.split(".", 3)[3]
    return entry


def _sealed(header, data):
    checkpoint = _join(header, data)
    _check(_lib.lib.polyak_checkpoint_reseal(_data_ptr(checkpoint), checkpoint.numel()), None,
           "polyak_checkpoint_reseal")
    return checkpoint


class _State:
    """EMA's checkpoints and state dicts (a part of polyak.torch.EMA)."""

    # ---- checkpoints ---------------------------------------------------------------------
    # The state is the library's checkpoint: its bytes (polyak_save_to_memory), loaded as they are
    # (polyak_load_from_memory), which checks everything before it changes anything. Only
    # DTensor params (FSDP2) keep it as tensors, which torch.distributed.checkpoint reshards; the
    # library then writes the checkpoint from them again (_assembled).
    def save(self, path):
        """The library's safetensors checkpoint, written crash-safely: shadow 0 of every averaged
        tensor under its name (safetensors' load_file gives a model its averaged weights), the
        other shadows and the whole state, every tensor row-major. Sharded EMAs gather the
        shadows and rank 0 writes the checkpoint of the whole model (every rank calls)."""
        self._check_open()
        if not self._sharded() and not self._permuted():
            self._handle.save(path)
            return
        checkpoint = self._logical(self._memory_checkpoint(rank0_only=True))
        if checkpoint is not None:
            self._save_checkpoint(path, checkpoint)

    def load(self, path, strict: bool = True):
        """Loads a checkpoint file that save() (or polyak.Handle.save) wrote, as load_state_dict does."""
        self._check_live()
        with open(path, "rb") as f:
            data = bytearray(f.read())
        return self.load_state_dict({"checkpoint": torch.frombuffer(data, dtype=torch.uint8)}, strict=strict)

    def state_dict(self):
        """The whole state, exact: {"checkpoint": the library's checkpoint (the bytes save() writes:
        every shadow, the copied buffers, the step state) as a uint8 CPU tensor}. load_state_dict
        restores it, and continuing gives the bits an uninterrupted run gives. Sharded EMAs gather
        (collective) and give the checkpoint of the whole model, which unsharded EMAs load too.
        With DTensor params (FSDP2) the shadows stay tensors so that torch.distributed.checkpoint
        can reshard them: {"metadata": the checkpoint's metadata (strings), "shadows": [one
        {name: DTensor} per shadow, the shadows' exact bits in the shadow dtype], "copies":
        {name: tensor} of the copied buffers}."""
        self._check_open()
        if self._dtensor_params():
            return self._parts()
        return {"checkpoint": self._logical(self._memory_checkpoint())}

    def _memory_checkpoint(self, rank0_only=False):
        """The checkpoint as the library writes it: permuted tensors in their memory order.
        Sharded: the checkpoint of the whole model (collective); None on ranks but 0 with rank0_only."""
        return self._whole_checkpoint(rank0_only) if self._sharded() else _checkpoint_of(self._handle)

    def _permuted(self):
        return [s for s in self._averaged + self._copied if s.perm is not None]

    def _entries(self, s):
        """(entry name, dtype name) of each saved entry of registered tensor s."""
        if s in self._copied:
            return [(s.name, s.info.dtype.upper())]
        return [(_saved_name(k, s.name), self._handle.shadow_dtype.upper()) for k in range(self._handle.num_shadows)]

    def _reorder(self, header, data, to_logical):
        """The permuted tensors' entries moved between memory order and logical order, in place in
        header and data; returns whether any moved. An entry of another shape is left as it is
        (the library then names it)."""
        moved = False
        for s in self._permuted():
            shape_from, shape_to = (s.shape, s.logical_shape) if to_logical else (s.logical_shape, s.shape)
            for entry, dtype in self._entries(s):
                info = header.get(entry)
                if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != list(shape_from):
                    continue
                begin, end = info["data_offsets"]
                value = data[begin:end].clone().view(_ENTRY_DTYPES[dtype]).reshape(shape_from)
                value = s.to_logical(value) if to_logical else s.to_memory(value)
                data[begin:end] = value.reshape(-1).view(torch.uint8)
                info["shape"] = list(shape_to)
                moved = True
        return moved

    def _logical(self, checkpoint):
        """A checkpoint of the library's (memory order) with every tensor row-major."""
        if checkpoint is None or not self._permuted():
            return checkpoint
        header, data = _split(checkpoint)
        data = data.clone()
        return _sealed(header, data) if self._reorder(header, data, to_logical=True) else checkpoint

    def _save_checkpoint(self, path, checkpoint):
        """Writes checkpoint bytes to path crash-safely, through a scratch handle of this
        configuration with the checkpoint's shapes (logical ones) that loads it and saves it."""
        h = self._handle
        header, _ = _split(checkpoint)
        with polyak.Handle(self.schedules, shadow_dtype=h.shadow_dtype, zero_init=bool(h.config.zero_init),
                           skip_nonfinite=bool(h.config.skip_nonfinite), seed=h.config.seed,
                           cpu_threads=h.config.cpu_threads) as scratch:
            held = []  # read by finalize only: a load writes the shadows
            for s in self._averaged + self._copied:
                held.append(torch.zeros(s.logical_shape, dtype=s.dtype))
                add = scratch.add_copy if s in self._copied else scratch.add
                add(s.name, _data_ptr(held[-1]), s.info.dtype, header[s.name]["shape"])
            scratch.finalize()
            scratch.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())
            scratch.save(path)

    def _dtensor_params(self):
        return bool(self._averaged) and _is_dtensor(self._averaged[0].tensor)

    def _parts(self):
        """The checkpoint's metadata and shadows as tensors (DTensors with the params' placements)."""
        header, data = _split(_checkpoint_of(self._handle))
        metadata = dict(header["__metadata__"])
        metadata.pop("checksum")
        if torch.distributed.is_initialized():
            total = torch.tensor([int(metadata["nonfinite_count"])], dtype=torch.int64)
            torch.distributed.all_reduce(total)  # the ranks' counts, summed, so they agree
            metadata["nonfinite_count"] = str(int(total))
        shadows = []
        for k in range(self._handle.num_shadows):
            shadows.append({s.name: self._as_model_tensor(s, _entry(header, data, _saved_name(k, s.name),
                                                                    self.shadow_dtype).to(self.device))
                            for s in self._averaged})
        copies = {s.name: _entry(header, data, s.name, s.dtype).to(self.device) for s in self._copied}
        return {"metadata": metadata, "shadows": shadows, "copies": copies}

    def _whole_checkpoint(self, rank0_only=False):
        """Sharded: the checkpoint of an unsharded EMA in this one's state, permuted tensors in
        memory order (collective: the shadows are gathered on every rank); None on ranks but 0
        with rank0_only."""
        import torch.distributed as dist
        h = self._handle
        count = torch.tensor([h.nonfinite_count()], dtype=torch.int64)
        dist.all_reduce(count, group=self._group)  # files hold the ranks' sum
        shadows = [[t.cpu() for t in self._gathered(k)] for k in range(h.num_shadows)]
        if rank0_only and dist.get_rank(self._group) != 0:
            return None
        copies = [self._read_copy(j).cpu() for j in range(len(self._copied))]  # whole on every rank

        def step_state(metadata):  # the scratch handle's configuration is this one's, its params f32
            return dict(metadata, step=str(h.step), nonfinite_count=str(int(count)),
                        beta_products=json.dumps([h.beta_product(k) for k in range(h.num_shadows)]),
                        param_dtypes=self._param_dtypes_text())
        return self._assembled(shadows, copies, step_state)

    def _assembled(self, shadows, copies, metadata_of):
        """The library's checkpoint of an unsharded handle like this one whose shadow k of averaged
        tensor i holds shadows[k][i] exactly and whose copied buffer j holds copies[j], with
        metadata_of(its metadata) as the metadata, the checksum then recomputed over the whole (the
        library's polyak_checkpoint_reseal). A scratch handle of this configuration on the CPU
        takes the shadows by hard updates (shadow <- param, exact) and writes the checkpoint."""
        h = self._handle
        params = [torch.zeros(s.shape, dtype=self.shadow_dtype) for s in self._averaged]
        copies = [value.cpu().contiguous() for value in copies]
        with polyak.Handle(self.schedules, shadow_dtype=h.shadow_dtype, zero_init=bool(h.config.zero_init),
                           skip_nonfinite=bool(h.config.skip_nonfinite), seed=h.config.seed,
                           cpu_threads=h.config.cpu_threads) as scratch:
            for s, param in zip(self._averaged, params):
                scratch.add(s.name, _data_ptr(param), h.shadow_dtype, s.shape)
            for s, value in zip(self._copied, copies):
                scratch.add_copy(s.name, _data_ptr(value), _COPY_DTYPE_NAMES[s.dtype], s.shape)
            scratch.finalize()
            for k, values in enumerate(shadows):
                with torch.no_grad():
                    for param, value in zip(params, values):
                        param.copy_(value)
                scratch.hard_update(k)
            header, data = _split(_checkpoint_of(scratch))
            written = header["__metadata__"]
            header["__metadata__"] = dict(metadata_of(written), checksum=written["checksum"])
            return _sealed(header, data)

    def _param_dtypes_text(self):
        """The "param_dtypes" metadata the library writes for this EMA's handle: every registered
        tensor's dtype by its safetensors name, in registration order."""
        h = self._handle
        infos = (h.tensor_info(i) for i in range(h.num_tensors))
        return json.dumps({info.name: info.dtype.upper() for info in infos}, separators=(",", ":"),
                          ensure_ascii=False)

    def load_state_dict(self, state, strict: bool = True):
        """Restores a state_dict() of an EMA with the same schedules, shadow dtype, seed and modes.
        Everything is checked first (the library checks the state as it checks a checkpoint
        file): a mismatch raises polyak.MismatchError or FormatError and changes nothing.

        The state may come from an EMA of the same model in another memory format
        (channels_last or not) or with other param dtypes (f32 params then, bf16 now): the
        averages carry on (an uninterrupted run with the new params' dtypes would have given
        other bits). With strict=False, a tensor of this EMA that the state lacks, or has in
        another shape or kind, keeps its shadows (a new head starts at its params), and the
        state's tensors that this EMA lacks are left out; the step state is the state's.
        Returns (missing_keys, unexpected_keys): the tensor names so treated."""
        self._check_live()
        if not isinstance(state, dict) or "checkpoint" not in state and not {"metadata", "shadows"} <= set(state):
            raise FormatError("a polyak EMA state has 'checkpoint' (or 'metadata' and 'shadows')")
        if "checkpoint" in state:
            checkpoint = state["checkpoint"]
            if not isinstance(checkpoint, torch.Tensor) or checkpoint.dtype != torch.uint8 or checkpoint.dim() != 1:
                raise FormatError("the state's 'checkpoint' is not the uint8 tensor of a polyak checkpoint")
            checkpoint = checkpoint.detach().cpu().contiguous()
        else:
            checkpoint = self._assembled_state(state)
        if not strict and self._handle.config.zero_init:
            raise UnsupportedError("load_state_dict(strict=False) with zero_init: a tensor that keeps its shadows "
                                   "would be debiased with the state's step")
        checkpoint, incompatible = self._fitted(checkpoint, strict)
        self._handle.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())
        self._last_step = 0  # update() goes on from the loaded step
        return incompatible

    def _fitted(self, checkpoint, strict):
        """The checkpoint as this EMA's handle loads it: permuted tensors in their memory order,
        the averaged tensors' param dtypes this EMA's, and with strict=False this EMA's own
        entries where the checkpoint has none that fit. The library checks all the rest."""
        try:
            header, data = _split(checkpoint)
            metadata = header["__metadata__"]
            assert isinstance(metadata, dict)
        except Exception:  # not a checkpoint: the library says what is wrong with it
            if not strict:
                raise FormatError("the state's checkpoint has no safetensors header") from None
            return checkpoint, IncompatibleKeys([], [])
        if self._permuted():
            data = data.clone()  # the state's own tensor stays as it is
        edited = self._reorder(header, data, to_logical=False)
        edited |= self._own_param_dtypes(metadata)
        incompatible = IncompatibleKeys([], [])
        if not strict:
            header, data, incompatible = self._merged(header, data)
            edited = True
        return (_sealed(header, data) if edited else checkpoint), incompatible

    def _own_param_dtypes(self, metadata):
        """Gives the checkpoint's averaged tensors the param dtypes this EMA's have (f32 params
        saved, bf16 params now, say): the shadows do not depend on them."""
        text = metadata.get("param_dtypes")
        try:
            saved = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            return False
        mine = {s.name: s.info.dtype.upper() for s in self._averaged}
        changed = False
        for name, dtype in saved.items():
            if name in mine and dtype != mine[name] and dtype in _AVERAGED_DTYPES:
                saved[name] = mine[name]
                changed = True
        if changed:
            metadata["param_dtypes"] = json.dumps(saved, separators=(",", ":"), ensure_ascii=False)
        return changed

    def _merged(self, header, data):
        """strict=False: this EMA's own checkpoint, each entry taken from (header, data) where an
        entry of that name, dtype and shape is there, and the step state and settings from
        (header, data)'s metadata."""
        own_header, own_data = _split(self._memory_checkpoint())
        own_data = own_data.clone()
        kept = set()
        for entry, info in own_header.items():
            theirs = header.get(entry)
            if entry == "__metadata__" or not isinstance(theirs, dict):
                kept.add(_tensor_name(entry))
                continue
            if theirs.get("dtype") != info["dtype"] or theirs.get("shape") != info["shape"]:
                kept.add(_tensor_name(entry))
                continue
            begin, end = info["data_offsets"]
            first, last = theirs["data_offsets"]
            own_data[begin:end] = data[first:last]
        mine = {s.name for s in self._averaged + self._copied}
        missing = [s.name for s in self._averaged + self._copied if s.name in kept]
        unexpected = sorted({_tensor_name(e) for e in header if e != "__metadata__"} - mine)
        metadata = dict(header["__metadata__"])
        for key in ("param_dtypes", "copies"):  # what this EMA registers: its own
            metadata.pop(key, None)
            if key in own_header["__metadata__"]:
                metadata[key] = own_header["__metadata__"][key]
        own_header["__metadata__"] = metadata
        return own_header, own_data, IncompatibleKeys(missing, unexpected)

    def _set_values(self, shadow, values, step_state=None):
        """Shadow `shadow` of the averaged tensors named in `values` ({name: logical tensor}) and
        the mirrors of the copied ones set to those values exactly, through the checkpoint (every
        other shadow as it is). step_state: {"step": n, "update_counts": [c_k]} replaces those
        entries of the step state (the drop-ins' resumes); the rest stays as it is."""
        by_name = {name: s for s in self._averaged + self._copied for name in s.names}
        header, data = _split(self._memory_checkpoint())
        data = data.clone()
        for key, value in (step_state or {}).items():
            header["__metadata__"][key] = json.dumps(value) if isinstance(value, list) else str(int(value))
        for name, value in values.items():
            s = by_name[name]
            entry, dtype = (s.name, s.dtype) if s in self._copied else (_saved_name(shadow, s.name), self.shadow_dtype)
            begin, end = header[entry]["data_offsets"]
            data[begin:end] = s.to_memory(value.detach().to("cpu", dtype)).reshape(-1).view(torch.uint8)
        checkpoint = _sealed(header, data)
        self._handle.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())
        if step_state:
            self._last_step = 0  # update() goes on from the step set

    def _assembled_state(self, state):
        """The checkpoint of a state as tensors ("metadata", "shadows", "copies"), checked against
        this EMA's tensors (the library checks the rest)."""
        h = self._handle
        shadows, metadata = state["shadows"], state["metadata"]
        if len(shadows) != h.num_shadows:
            raise MismatchError(f"the state has {len(shadows)} shadows, this EMA {h.num_shadows}")
        tensors = []
        for k, values in enumerate(shadows):
            extra = set(values) - {s.name for s in self._averaged}
            if extra:
                raise MismatchError(f"the state's shadow {k} has {sorted(extra)[0]!r}, which this EMA does "
                                    "not average")
            tensors.append([])
            for s in self._averaged:
                if s.name not in values:
                    raise MismatchError(f"the state's shadow {k} lacks {s.name!r}")
                value = values[s.name]
                if self._sharded() and _is_dtensor(value):
                    value = value.full_tensor()
                value = _local(value).detach()
                if value.shape != s.shape or value.dtype != self.shadow_dtype:
                    raise MismatchError(f"the state's {s.name!r} (shadow {k}) is {tuple(value.shape)} "
                                        f"{value.dtype}; this EMA keeps {tuple(s.shape)} {self.shadow_dtype}")
                tensors[k].append(value.cpu())
        given = state.get("copies", {})
        extra = set(given) - {s.name for s in self._copied}
        if extra:
            raise MismatchError(f"the state copies {sorted(extra)[0]!r}, which this EMA does not copy")
        copies = []
        for s in self._copied:
            value = given.get(s.name)
            if value is None or value.shape != s.shape or value.dtype != s.dtype:
                raise MismatchError(f"the state lacks the copied buffer {s.name!r} ({tuple(s.shape)} {s.dtype})")
            copies.append(value.detach())
        metadata = {str(key): str(value) for key, value in metadata.items()}
        if self._dtensor_params() and torch.distributed.get_rank():
            metadata["nonfinite_count"] = "0"  # rank 0 carries the total
        return self._assembled(tensors, copies, lambda _: metadata)
