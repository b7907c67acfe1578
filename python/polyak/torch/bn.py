"""polyak.torch.update_bn: BatchNorm statistics recomputed with the averaged weights and kept in
the EMA, as torch.optim.swa_utils.update_bn does for an AveragedModel."""
import torch

from polyak import InvalidArgError, StateError, UnsupportedError

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def update_bn(loader, ema, shadow: int = 0, device=None):
    """torch.optim.swa_utils.update_bn(loader, model, device) run on the EMA's model while its
    params hold shadow `shadow` (inside ema.average_parameters(shadow)), and its results left in
    the EMA: every BatchNorm layer's running_mean and running_var become shadow `shadow`'s
    averages of them (a copied buffer's mirror, with buffers="copy") and num_batches_tracked's
    mirror the number of batches, so model_state_dict(shadow), average_parameters(shadow), save
    and state_dict give the recomputed statistics. The model's own buffers and modes are as they
    were. Sharded EMAs run it on every rank (collective) and keep rank 0's statistics. Later
    updates average the model's statistics into these, as any update does: call it after the
    last update (SWA's recipe) or before each evaluation."""
    from torch.optim.swa_utils import update_bn as torch_update_bn
    if not hasattr(ema, "_averages"):
        raise InvalidArgError(f"update_bn needs a polyak.torch.EMA, got {type(ema).__name__}")
    model = ema._model
    names = [f"{prefix}.{attr}" if prefix else attr for prefix, module in model.named_modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
             for attr in _STATISTICS if module._buffers.get(attr) is not None]
    if not names:
        return
    registered = {name for s in ema._averaged + ema._copied for name in s.names}
    missing = [name for name in names if name not in registered]
    if missing:
        raise StateError(f"update_bn: the EMA keeps no {missing[0]!r} (made with buffers='ignore'?), so it has "
                         "nowhere to keep the statistics")
    if ema.handle.config.zero_init:
        raise UnsupportedError("update_bn with zero_init: the statistics would be debiased as averages")
    with ema.average_parameters(shadow):
        torch_update_bn(loader, model, device)
        values = {name: model.get_buffer(name).detach().clone() for name in names}
    if ema._sharded():
        import torch.distributed as dist
        source = dist.get_global_rank(ema._group, 0) if ema._group is not None else 0
        for value in values.values():
            dist.broadcast(value, src=source, group=ema._group)
    ema._set_values(shadow, values)
