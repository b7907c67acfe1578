"""polyak.lightning.EMA: a Lightning callback where lightning.pytorch.callbacks.WeightAveraging
(EMAWeightAveraging) is, with the average kept by libpolyak.

    from polyak.lightning import EMA                # in place of: EMAWeightAveraging(decay=0.999)
    trainer = Trainer(callbacks=[EMA(decay=0.999)])
    trainer.fit(model, loader)                      # validation runs with the averaged weights
    trainer.fit(model, loader, ckpt_path=path)      # resumes the average exactly

As EMAWeightAveraging with its defaults: one update per optimizer step (should_update(step_idx=,
epoch_idx=) as its own, update_every_n_steps, update_starting_at_step/epoch), the first update
copies, the decay applied once per update (no warm-up), buffers averaged (use_buffers=True);
the averaged weights are in the module during validation and copied into it at on_train_end;
a checkpoint's `state_dict` holds the average and `current_model_state` the live weights,
`averaging_state` the number of updates, and `polyak_ema` the EMA's exact state. A checkpoint of
Lightning's own WeightAveraging resumes too (from its average and update count). Documented
differences: integer buffers (num_batches_tracked) are copied, not run through the decay;
use_buffers=False leaves the model's own buffers in place during validation (Lightning swaps in
the averaged model's, which it never updates). `**ema_options` go to polyak.torch.EMA
(shadow_dtype, params, schedules, ...). DDP: every rank keeps a whole EMA of its replica, as
Lightning's does. The class is made when first used: `import polyak.lightning` imports no
Lightning; `EMA` subclasses lightning.pytorch's Callback (pytorch_lightning's where only that
is installed).
"""
import contextlib

__all__ = ["EMA"]  # noqa: F822 (made by __getattr__ when first used)
_made = {}


def _callback_class():
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:
        from pytorch_lightning.callbacks import Callback
    return Callback


def _make_class():
    import json

    import torch

    from polyak import Constant, InvalidArgError
    from polyak.torch.state import _split

    Callback = _callback_class()

    class EMA(Callback):
        """An EMA of the LightningModule's params and buffers, kept by polyak (see polyak.lightning)."""

        def __init__(self, decay: float = 0.999, *, update_every_n_steps: int = 1, update_starting_at_step=None,
                     update_starting_at_epoch=None, use_buffers: bool = True, **ema_options):
            if "schedules" not in ema_options:
                ema_options["schedules"] = [Constant(decay, start_step=1, count_updates=True)]
            elif decay != 0.999:
                raise InvalidArgError("give decay or schedules, not both")
            ema_options.setdefault("buffers", "average" if use_buffers else "ignore")
            self.decay = decay
            self.update_every_n_steps = update_every_n_steps
            self.update_starting_at_step = update_starting_at_step
            self.update_starting_at_epoch = update_starting_at_epoch
            self._options = ema_options
            self._ema = None
            self._fitting = False
            self._pending = None  # a checkpoint's average, loaded when the EMA is made
            self._swap = None  # the average_parameters() context of a validation
            self._latest_update_step = 0
            self._latest_update_epoch = -1

        @property
        def ema(self):
            """The polyak.torch.EMA (made when fit starts)."""
            return self._ema

        def should_update(self, step_idx=None, epoch_idx=None) -> bool:
            """EMAWeightAveraging's rule: after the optimizer steps of update_every_n_steps, from
            update_starting_at_step; at epoch ends from update_starting_at_epoch."""
            if step_idx is not None:
                started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
                if started and self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0:
                    return True
            return epoch_idx is not None and self.update_starting_at_epoch is not None and \
                epoch_idx >= self.update_starting_at_epoch

        # ---- the EMA's life -------------------------------------------------------------
        def setup(self, trainer, pl_module, stage):
            self._fitting = stage == "fit"

        def on_fit_start(self, trainer, pl_module):
            """After the strategy has placed the model: the EMA registers its tensors where they are."""
            from polyak.torch import EMA as TorchEma
            if self._ema is not None:
                self._ema.close()
            self._ema = TorchEma(pl_module, **self._options)
            if self._pending is not None:
                self._apply(self._pending)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self._latest_update_step and \
                    self.should_update(step_idx=trainer.global_step - 1):
                self._ema.update()  # one update: the schedule counts updates, as AveragedModel does
                self._latest_update_step = trainer.global_step

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch > self._latest_update_epoch and \
                    self.should_update(epoch_idx=trainer.current_epoch):
                self._ema.update()
                self._latest_update_epoch = trainer.current_epoch

        def on_train_end(self, trainer, pl_module):
            self._ema.copy_to(pl_module)

        def on_validation_epoch_start(self, trainer, pl_module):
            if self._ema is not None and self._swap is None:
                self._swap = contextlib.ExitStack()
                self._swap.enter_context(self._ema.average_parameters())

        def on_validation_epoch_end(self, trainer, pl_module):
            if self._swap is not None:
                swap, self._swap = self._swap, None
                swap.close()

        def teardown(self, trainer, pl_module, stage):
            self.on_validation_epoch_end(trainer, pl_module)

        # ---- checkpoints ------------------------------------------------------------------
        def state_dict(self):
            return {"latest_update_step": self._latest_update_step}

        def load_state_dict(self, state_dict):
            self._latest_update_step = state_dict["latest_update_step"]

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            if self._ema is None:
                return
            checkpoint["current_model_state"] = checkpoint["state_dict"]
            checkpoint["state_dict"] = self._ema.model_state_dict()
            state = self._ema.state_dict()
            header, _ = _split(state["checkpoint"])
            # AveragedModel's n_averaged: the updates one per step from step 1, the first (which copies,
            # at start_step 1) not counted by the library
            counted = json.loads(header["__metadata__"]["update_counts"])[0]
            updates = counted + 1 if self._ema.step else 0
            checkpoint["averaging_state"] = {"n_averaged": torch.tensor(updates, dtype=torch.long)}
            checkpoint["polyak_ema"] = state

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            if not self._fitting:
                return  # validate/test/predict from a checkpoint: its state_dict is the average
            if "current_model_state" in checkpoint:
                pl_module.load_state_dict(checkpoint["current_model_state"])
                if "polyak_ema" in checkpoint:
                    pending = ("state", checkpoint["polyak_ema"])
                else:  # Lightning's WeightAveraging: its average and number of updates
                    n = int(checkpoint.get("averaging_state", {}).get("n_averaged", 0))
                    pending = ("values", checkpoint["state_dict"], n)
            else:  # a checkpoint without an average: the EMA starts from its weights, as Lightning's
                pending = ("values", checkpoint["state_dict"], 0)
            self._pending = pending
            if self._ema is not None:
                self._apply(pending)

        def _apply(self, pending):
            self._pending = None
            if pending[0] == "state":
                self._ema.load_state_dict(pending[1])
                return
            _, values, n = pending
            ema = self._ema
            names = {name for s in ema._averaged + ema._copied for name in s.names}
            ema._set_values(0, {k: v for k, v in values.items() if k in names},
                            {"step": n, "update_counts": [max(n - 1, 0)] * ema.handle.num_shadows})

    EMA.__module__ = __name__
    EMA.__qualname__ = "EMA"
    return EMA


def __getattr__(name):
    if name == "EMA":
        if "EMA" not in _made:
            _made["EMA"] = _make_class()
        return _made["EMA"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
