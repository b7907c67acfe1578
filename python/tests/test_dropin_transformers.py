"""polyak.transformers.EMACallback in real transformers.Trainer.train runs (the installed
transformers) on a tiny GPT-2 made from a config, on the CPU. transformers has no EMA of its own:
the side-by-side reference is the callback users write today, timm's ModelEmaV3 made at
on_train_begin and updated at on_step_end, in the same Trainer. Also: evaluation with the average,
ema.safetensors beside model.safetensors in each checkpoint folder, and a resume from a folder
outside output_dir that must give what the uninterrupted run gives."""
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
timm_ema = pytest.importorskip("timm.utils")
from safetensors.torch import load_file  # noqa: E402

from polyak.transformers import EMACallback  # noqa: E402

TOLERANCE = 2e-5


class TimmEmaCallback(transformers.TrainerCallback):
    """The hand-made EMA callback: timm's ModelEmaV3, updated once per optimizer step."""

    def __init__(self, decay):
        self.decay, self.ema = decay, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = timm_ema.ModelEmaV3(model, decay=self.decay)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(model)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count, seed):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (count, 8), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    # untied: timm's ModelEmaV3 lerps a tied tensor once per state-dict name (twice a step here)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     tie_word_embeddings=False)
    return transformers.GPT2LMHeadModel(config)


def trainer_for(output_dir, callbacks, max_steps=6):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-3, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(24, 1),
                                eval_dataset=Tokens(8, 2), callbacks=callbacks)


def test_train_equals_timms_ema_and_evaluates_the_average(tmp_path):
    ours, theirs = EMACallback(decay=0.8), TimmEmaCallback(decay=0.8)
    trainer = trainer_for(tmp_path, [theirs, ours])
    trainer.train()
    average = ours.ema.model_state_dict()
    for name, value in theirs.ema.module.state_dict().items():
        if value.is_floating_point():
            assert (average[name] - value).abs().max().item() <= TOLERANCE * (value.abs().max().item() + 1e-3), name
    during = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(during) == 2
    with ours.average_parameters():
        with_average = trainer.evaluate()["eval_loss"]
    live = trainer.evaluate()["eval_loss"]
    assert during[-1] == pytest.approx(with_average, rel=1e-6)
    assert live != pytest.approx(with_average, rel=1e-6)
    # each checkpoint folder: the Trainer's model.safetensors and the EMA beside it
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "model.safetensors").is_file() and (folder / "ema.safetensors").is_file()
    saved = load_file(tmp_path / "checkpoint-6" / "ema.safetensors")
    assert torch.equal(saved["transformer.h.0.mlp.c_fc.weight"], average["transformer.h.0.mlp.c_fc.weight"])


def test_resume_from_checkpoint_gives_the_uninterrupted_run(tmp_path):
    whole = EMACallback(decay=0.8)
    trainer_for(tmp_path / "first", [whole]).train()
    resumed = EMACallback(decay=0.8)
    # another output_dir: only the Trainer's resume_from_checkpoint names the folder
    trainer_for(tmp_path / "second", [resumed]).train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-3"))
    assert resumed.ema.step == 6
    expected = whole.ema.model_state_dict()
    for name, value in resumed.ema.model_state_dict().items():
        assert torch.equal(value, expected[name]), name
    # resume_from_checkpoint=True: the last folder of output_dir
    again = EMACallback(decay=0.8)
    trainer = trainer_for(tmp_path / "first", [again], max_steps=9)
    trainer.train(resume_from_checkpoint=True)
    assert again.ema.step == 9 and os.path.isfile(tmp_path / "first" / "checkpoint-9" / "ema.safetensors")


def test_import_leaves_transformers_out():
    import subprocess
    import sys
    code = "import sys, polyak.transformers; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
