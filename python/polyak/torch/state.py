"""The EMA's state: the library's checkpoint as bytes, as files, and as tensors (FSDP2's DTensors)."""
import json

import torch

import polyak
from polyak import FormatError, MismatchError, _lib
from polyak.errors import _check

from ._tensors import _COPY_DTYPE_NAMES, _data_ptr, _is_dtensor, _local


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
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = torch.frombuffer(bytearray(len(text).to_bytes(8, "little") + text), dtype=torch.uint8)
    return torch.cat([head, data])


def _entry(header, data, name, dtype):
    """The tensor saved under `name`, as `dtype`: a copy of its bytes."""
    begin, end = header[name]["data_offsets"]
    return data[begin:end].clone().view(dtype).reshape(header[name]["shape"])


def _saved_name(shadow, name):
    return name if shadow == 0 else f"polyak.shadow.{shadow}.{name}"


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
        other shadows and the whole state. Sharded EMAs gather the shadows and rank 0 writes the
        checkpoint of the whole model (every rank calls)."""
        self._check_open()
        if not self._sharded():
            self._handle.save(path)
            return
        self._whole_checkpoint(path)

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
        return {"checkpoint": self._whole_checkpoint() if self._sharded() else _checkpoint_of(self._handle)}

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

    def _whole_checkpoint(self, path=None):
        """Sharded: the checkpoint of an unsharded EMA in this one's state (collective: the
        shadows are gathered on every rank), or with `path` rank 0 saves it there."""
        import torch.distributed as dist
        h = self._handle
        count = torch.tensor([h.nonfinite_count()], dtype=torch.int64)
        dist.all_reduce(count, group=self._group)  # files hold the ranks' sum
        shadows = [[t.cpu() for t in self._gathered(k)] for k in range(h.num_shadows)]
        if path is not None and dist.get_rank(self._group) != 0:
            return None
        copies = [self._read_copy(j).cpu() for j in range(len(self._copied))]  # whole on every rank

        def step_state(metadata):  # the scratch handle's configuration is this one's, its params f32
            return dict(metadata, step=str(h.step), nonfinite_count=str(int(count)),
                        beta_products=json.dumps([h.beta_product(k) for k in range(h.num_shadows)]),
                        param_dtypes=self._param_dtypes_text())
        return self._assembled(shadows, copies, step_state, path)

    def _assembled(self, shadows, copies, metadata_of, path=None):
        """The library's checkpoint of an unsharded handle like this one whose shadow k of averaged
        tensor i holds shadows[k][i] exactly and whose copied buffer j holds copies[j], with
        metadata_of(its metadata) as the metadata, the checksum then recomputed over the whole (the
        library's polyak_checkpoint_reseal). A scratch handle of this configuration on the CPU
        takes the shadows by hard updates (shadow <- param, exact) and writes the checkpoint; with
        `path` it loads the result and saves it there, crash-safely."""
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
            checkpoint = _join(header, data)
            _check(_lib.lib.polyak_checkpoint_reseal(_data_ptr(checkpoint), checkpoint.numel()), None,
                   "polyak_checkpoint_reseal")
            if path is not None:
                scratch.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())
                scratch.save(path)
        return checkpoint

    def _param_dtypes_text(self):
        """The "param_dtypes" metadata the library writes for this EMA's handle: every registered
        tensor's dtype by its safetensors name, in registration order."""
        h = self._handle
        infos = (h.tensor_info(i) for i in range(h.num_tensors))
        return json.dumps({info.name: info.dtype.upper() for info in infos}, separators=(",", ":"),
                          ensure_ascii=False)

    def load_state_dict(self, state):
        """Restores a state_dict() of an EMA over the same tensors with the same schedules, shadow
        dtype, seed and modes. Everything is checked first (the library checks the state as it
        checks a checkpoint file): a mismatch raises polyak.MismatchError or FormatError and
        changes nothing."""
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
        self._handle.load_bytes(_data_ptr(checkpoint), src_num_bytes=checkpoint.numel())
        self._last_step = 0  # update() goes on from the loaded step

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
