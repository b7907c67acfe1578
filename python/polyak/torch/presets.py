"""Other libraries' EMA defaults as polyak schedules, mapped exactly, and what each does with
buffers and frozen params."""
import polyak
from polyak import Constant, UnsupportedError, Warmup
from polyak._args import _c_int64


class _Presets:
    """EMA.like_timm, like_averaged_model, like_ema_pytorch, like_diffusers (a part of polyak.torch.EMA)."""

    @classmethod
    def like_timm(cls, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                  warmup_gamma=1.0, warmup_power=2 / 3, **options):
        """timm's ModelEmaV3(model, ...) called as update(model, step=step) at every step: floating
        buffers averaged like params, the others (num_batches_tracked) copied."""
        update_after_step = _c_int64(update_after_step, "update_after_step")
        if use_warmup:
            schedule = Warmup(beta=decay, beta_min=min_decay, inv_gamma=warmup_gamma, power=warmup_power,
                              start_step=update_after_step)
        else:
            schedule = Constant(decay, start_step=update_after_step + 1)
        return cls(model, schedules=[schedule], **options)

    @classmethod
    def like_averaged_model(cls, model, decay=None, use_buffers=False, **options):
        """torch.optim.swa_utils.AveragedModel updated at every step: with
        multi_avg_fn=get_ema_multi_avg_fn(decay) an EMA, without it (decay None) the running mean
        (SWA). For SWA's mean of snapshots taken at irregular steps, call update only at those.
        Buffers as AveragedModel's use_buffers: False (its default) copies them at every update,
        True averages the floating ones with the params (it averages integer buffers too, in
        integer arithmetic; polyak copies those)."""
        if decay is None:
            schedule = polyak.Equal(count_updates=True)
        else:
            schedule = Constant(decay, start_step=1)
        buffers = options.pop("buffers", "average" if use_buffers else "copy")
        return cls(model, schedules=[schedule], buffers=buffers, **options)

    @classmethod
    def like_ema_pytorch(cls, model, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0,
                         power=2 / 3, min_value=0.0, **options):
        """ema-pytorch's EMA(model, ...) with update() after every optimizer step: updates at steps
        1, 1 + update_every, ... copying the params up to update_after_step, then its warm-up decay
        of the step count applied once per update (no compensation of the steps between).
        Floating buffers are averaged like params; ema-pytorch never updates the others
        (num_batches_tracked keeps the value it had when the EMA was made), and neither does this."""
        update_after_step = _c_int64(update_after_step, "update_after_step")
        if _c_int64(update_every, "update_every") < 1:
            raise polyak.InvalidArgError(f"update_every = {update_every}: at least 1")
        if update_after_step % update_every:
            raise UnsupportedError("like_ema_pytorch needs update_after_step a multiple of update_every "
                                   "(its decay then has the Warmup form in the count of updates)")
        schedule = Warmup(beta=beta, beta_min=min_value, inv_gamma=inv_gamma / update_every, power=power,
                          start_step=update_after_step, count_updates=True)
        options.setdefault("buffers", "average")
        options.setdefault("_int_buffers", "initial")
        ema = cls(model, schedules=[schedule], **options)
        ema._only_steps = (update_every, 1 % update_every)
        return ema

    @classmethod
    def like_diffusers(cls, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                       inv_gamma=1.0, power=2 / 3, **options):
        """diffusers' EMAModel(model.parameters(), ...) with step() after every optimizer step: it
        averages the params that require grad and copies the frozen ones (params="trainable",
        other_params="copy"), and leaves buffers to the model (buffers="ignore": model_state_dict()
        gives the model's own)."""
        update_after_step = _c_int64(update_after_step, "update_after_step")
        if use_ema_warmup:
            schedule = Warmup(beta=decay, beta_min=min_decay, inv_gamma=inv_gamma, power=power,
                              start_step=update_after_step)
        else:  # TF's rule from t = 1 on: its first update after update_after_step copies
            if min_decay:
                raise UnsupportedError("like_diffusers: min_decay with the default (TF) rule")
            schedule = polyak.TF(decay, start_step=update_after_step)
        for key, value in (("params", "trainable"), ("other_params", "copy"), ("buffers", "ignore")):
            options.setdefault(key, value)
        ema = cls(model, schedules=[schedule], **options)
        if not use_ema_warmup:
            ema._copy_at_step = update_after_step + 1
        return ema
