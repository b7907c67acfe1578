"""polyak.transformers.EMACallback: an EMA for the Hugging Face transformers.Trainer (which has none),
kept by libpolyak.

    from polyak.transformers import EMACallback
    trainer = Trainer(model, args, ..., callbacks=[EMACallback(decay=0.999)])
    trainer.train()                                  # or train(resume_from_checkpoint=...): the EMA resumes
    with trainer.callback_handler.callbacks[-1].average_parameters():
        trainer.evaluate()                           # the Trainer's own evaluations use the average already

The EMA (polyak.torch.EMA(model, decay, warmup, **ema_options)) is made at on_train_begin and
updated at every optimizer step with the Trainer's global_step (steps skipped are compensated).
Evaluations the Trainer runs during train() see the averaged weights (eval_with_ema=True): they
are swapped in when the Trainer decides to evaluate (on_step_end / on_epoch_end with
control.should_evaluate) and back at on_evaluate, before the checkpoint is saved. Each checkpoint
folder gets `ema.safetensors` (polyak's checkpoint: safetensors.torch.load_file gives the averaged
weights under the model's names, and the EMA's exact state) beside the Trainer's
model.safetensors, written by the main process. On a resume the callback finds the folder the
Trainer resumes from (the callback is not told: it reads resume_from_checkpoint off the Trainer's
training loop, else output_dir/checkpoint-<global_step>) and loads its ema.safetensors;
a resume from a folder without one starts the EMA from the resumed weights, with a warning.
copy_to_model_at_end=True writes the average into the model when training ends (so that
trainer.save_model() saves it). The class is made when first used: `import
polyak.transformers` imports no transformers.
"""
import contextlib
import os
import sys
import warnings

__all__ = ["EMACallback"]  # noqa: F822 (made by __getattr__ when first used)
_made = {}
EMA_FILE = "ema.safetensors"


def _resume_folder(args, state):
    """The checkpoint folder the Trainer resumes from: its training loop's resume_from_checkpoint,
    else output_dir/checkpoint-<global_step>; None when it starts afresh."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and "resume_from_checkpoint" in frame.f_locals:
            folder = frame.f_locals["resume_from_checkpoint"]
            return None if folder is None else str(folder)
        frame = frame.f_back
    if state.global_step > 0:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    return None


def _make_class():
    from transformers import TrainerCallback

    class EMACallback(TrainerCallback):
        """An EMA of the Trainer's model, kept by polyak (see polyak.transformers)."""

        def __init__(self, decay: float = 0.9999, warmup: bool = False, *, eval_with_ema: bool = True,
                     copy_to_model_at_end: bool = False, **ema_options):
            self.decay, self.warmup = decay, warmup
            self.eval_with_ema = eval_with_ema
            self.copy_to_model_at_end = copy_to_model_at_end
            self._options = ema_options
            self._ema = None
            self._swap = None

        @property
        def ema(self):
            """The polyak.torch.EMA (made at on_train_begin)."""
            return self._ema

        def average_parameters(self):
            """The model's params hold the average inside (polyak.torch.EMA.average_parameters)."""
            return self._ema.average_parameters()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from polyak.torch import EMA
            if self._ema is not None:
                self._ema.close()
            options = dict(self._options)
            if "schedules" not in options:
                options.update(decay=self.decay, warmup=self.warmup)
            self._ema = EMA(model, **options)
            folder = _resume_folder(args, state)
            if folder is None:
                return
            path = os.path.join(folder, EMA_FILE)
            if os.path.isfile(path):
                self._ema.load(path)
            else:
                warnings.warn(f"EMACallback: resuming from {folder}, which has no {EMA_FILE}: the EMA starts from "
                              "the resumed weights", stacklevel=2)

        def on_step_end(self, args, state, control, **kwargs):
            self._end_swap()
            self._ema.update(state.global_step)
            if control.should_evaluate:
                self._start_swap()

        def on_epoch_end(self, args, state, control, **kwargs):
            if control.should_evaluate:
                self._start_swap()

        def on_evaluate(self, args, state, control, **kwargs):
            self._end_swap()

        def on_save(self, args, state, control, **kwargs):
            self._end_swap()
            if state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(folder):
                    self._ema.save(os.path.join(folder, EMA_FILE))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._end_swap()
            if self.copy_to_model_at_end:
                self._ema.copy_to(model)

        def _start_swap(self):
            if self.eval_with_ema and self._swap is None:
                self._swap = contextlib.ExitStack()
                self._swap.enter_context(self._ema.average_parameters())

        def _end_swap(self):
            if self._swap is not None:
                swap, self._swap = self._swap, None
                swap.close()

    EMACallback.__module__ = __name__
    EMACallback.__qualname__ = "EMACallback"
    return EMACallback


def __getattr__(name):
    if name == "EMACallback":
        if name not in _made:
            _made[name] = _make_class()
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
