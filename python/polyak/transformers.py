"""polyak.transformers.EMACallback: an EMA for the Hugging Face transformers.Trainer (which has none),
kept by libpolyak.

    from polyak.transformers import EMACallback
    trainer = Trainer(model, args, ..., callbacks=[EMACallback(decay=0.999)])
    trainer.train()                                  # or train(resume_from_checkpoint=...): the EMA resumes
    with trainer.callback_handler.callbacks[-1].average_parameters():
        trainer.evaluate()                           # the Trainer's own evaluations use the average already

The EMA (polyak.torch.EMA(model, decay, warmup, **ema_options)) is made at on_train_begin and
updated at every optimizer step with the Trainer's global_step (steps skipped are compensated).
Evaluations and predictions during train() see the averaged weights (eval_with_ema=True): every
one of them, eval_on_start, each dataset of a dict eval_dataset and an evaluate() another
callback runs included. The average is swapped in when the Trainer decides to evaluate
(on_step_end / on_epoch_end with control.should_evaluate) and at the first forward of the model
in eval mode (a forward pre-hook on the model, for the evaluations no callback event precedes),
and swapped out at on_evaluate and on_predict, at the next on_step_begin / on_pre_optimizer_step,
and when the model's state_dict() is taken (so the Trainer's model.safetensors always holds the
live weights). A swap changes neither the grad mode nor the modules' train/eval modes. After
train(), trainer.evaluate() sees the live weights: `with callback.average_parameters():` for the
average. load_best_model_at_end: the best checkpoint is judged on the EMA's metrics, but the
Trainer loads that checkpoint's live weights (model.safetensors); its ema.safetensors holds the
average.

Each checkpoint folder gets `ema.safetensors` (polyak's checkpoint: safetensors.torch.load_file
gives the averaged weights under the model's names, and the EMA's exact state) beside the
Trainer's model.safetensors, written by the main process into the Trainer's run folder. On a
resume the EMA is loaded from the folder the Trainer resumes from: EMACallback(resume_from=folder)
or callback.load(folder) names it; else the callback reads resume_from_checkpoint off the
Trainer's training loop (the frame of transformers.Trainer._inner_training_loop; callbacks are not
told), else it guesses output_dir/checkpoint-<global_step>, with a warning. The EMA loaded must be
at the Trainer's global_step (polyak.MismatchError otherwise). A resume from a folder without
ema.safetensors starts the EMA from the resumed weights, with a warning. copy_to_model_at_end=True
writes the average into the model when training ends (so that trainer.save_model() saves it).
The class is made when first used: `import polyak.transformers` imports no transformers.
"""
import contextlib
import os
import sys
import warnings

__all__ = ["EMACallback"]  # noqa: F822 (made by __getattr__ when first used)
_made = {}
EMA_FILE = "ema.safetensors"


def _training_loop():
    """The Trainer running train() and the locals of its _inner_training_loop (None, None outside one)."""
    from transformers import Trainer
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), Trainer):
            return frame.f_locals["self"], frame.f_locals
        frame = frame.f_back
    return None, None


def _ema_file(folder):
    folder = str(folder)
    return folder if folder.endswith(".safetensors") else os.path.join(folder, EMA_FILE)


def _make_class():
    from transformers import TrainerCallback

    class EMACallback(TrainerCallback):
        """An EMA of the Trainer's model, kept by polyak (see polyak.transformers)."""

        def __init__(self, decay: float = 0.9999, warmup: bool = False, *, eval_with_ema: bool = True,
                     copy_to_model_at_end: bool = False, resume_from=None, **ema_options):
            self.decay, self.warmup = decay, warmup
            self.eval_with_ema = eval_with_ema
            self.copy_to_model_at_end = copy_to_model_at_end
            self.resume_from = resume_from
            self._options = ema_options
            self._ema = None
            self._swap = None
            self._hooks = []
            self._model = None
            self._run_dir = None  # the Trainer's run folder, where its checkpoint folders go

        @property
        def ema(self):
            """The polyak.torch.EMA (made at on_train_begin)."""
            return self._ema

        def average_parameters(self):
            """The model's params hold the average inside (polyak.torch.EMA.average_parameters)."""
            return self._ema.average_parameters()

        def load(self, folder):
            """The EMA of a checkpoint folder (its ema.safetensors, or that file's path): loaded now
            when the EMA is made, else at on_train_begin in place of the folder the Trainer resumes from."""
            if self._ema is None:
                self.resume_from = folder
            else:
                self._ema.load(_ema_file(folder))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from polyak.torch import EMA
            self._close()
            options = dict(self._options)
            if "schedules" not in options:
                options.update(decay=self.decay, warmup=self.warmup)
            self._ema, self._model = EMA(model, **options), model
            trainer, loop = _training_loop()
            self._run_dir = trainer._get_output_dir(trial=loop.get("trial")) if trainer is not None else None
            if self.eval_with_ema:
                self._hooks = [model.register_forward_pre_hook(self._on_forward),
                               model.register_state_dict_pre_hook(lambda *_: self._end_swap())]
            folder, resume_from = self.resume_from, self.resume_from
            if folder is None and loop is not None:
                folder = loop.get("resume_from_checkpoint")
            elif folder is None and state.global_step > 0:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                warnings.warn(f"EMACallback: the Trainer's resume folder was not found (not in a "
                              f"transformers.Trainer's train()): guessed {folder}; name it with "
                              "EMACallback(resume_from=...) or callback.load(folder)", stacklevel=2)
            if folder is None:
                return
            path = _ema_file(folder)
            if os.path.isfile(path):
                self._ema.load(path)
                if self._ema.step != state.global_step:
                    from polyak import MismatchError
                    step = self._ema.step
                    self._close()
                    raise MismatchError(f"EMACallback: {path} holds the EMA at step {step}, the Trainer is at step "
                                        f"{state.global_step}: not the checkpoint the Trainer resumes from")
            elif resume_from is not None:
                raise FileNotFoundError(f"EMACallback(resume_from={resume_from!r}): no {path}")
            else:
                warnings.warn(f"EMACallback: resuming from {folder}, which has no {EMA_FILE}: the EMA starts from "
                              "the resumed weights", stacklevel=2)

        def on_step_begin(self, args, state, control, **kwargs):
            self._end_swap()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._end_swap()

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

        def on_predict(self, args, state, control, metrics=None, **kwargs):
            self._end_swap()

        def on_save(self, args, state, control, **kwargs):
            self._end_swap()
            if state.is_world_process_zero:
                run_dir = self._run_dir if self._run_dir is not None else args.output_dir
                folder = os.path.join(run_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(folder):
                    self._ema.save(os.path.join(folder, EMA_FILE))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._end_swap()
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            if self.copy_to_model_at_end:
                self._ema.copy_to(model)

        def _on_forward(self, module, args):
            """A forward of the model in eval mode (an evaluation's, a prediction's) swaps the average in."""
            if module is self._model and not module.training:
                self._start_swap()

        def _start_swap(self):
            if self.eval_with_ema and self._swap is None:
                swap = contextlib.ExitStack()
                self._kept(lambda: swap.enter_context(self._ema.average_parameters()))
                self._swap = swap

        def _end_swap(self):
            if self._swap is not None:
                swap, self._swap = self._swap, None
                self._kept(swap.close)

        def _kept(self, call):
            """call(), leaving the grad mode and the modules' train/eval modes as they were."""
            import torch
            enabled, modes = torch.is_grad_enabled(), [(m, m.training) for m in self._model.modules()]
            try:
                return call()
            finally:
                torch.set_grad_enabled(enabled)
                for module, training in modes:
                    module.training = training

        def _close(self):
            self._end_swap()
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            if self._ema is not None:
                self._ema.close()
                self._ema = None

    EMACallback.__module__ = __name__
    EMACallback.__qualname__ = "EMACallback"
    return EMACallback


def __getattr__(name):
    if name == "EMACallback":
        if name not in _made:
            _made[name] = _make_class()
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
