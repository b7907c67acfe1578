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

import polyak  # noqa: E402
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


def trainer_for(output_dir, callbacks, max_steps=6, eval_dataset=None, **options):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-3, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        **options)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(24, 1),
                                eval_dataset=Tokens(8, 2) if eval_dataset is None else eval_dataset,
                                callbacks=callbacks)


class Probe(transformers.TrainerCallback):
    """After the EMA callback: whether each evaluation batch ran on the average, and a forward of the
    model in eval mode at on_evaluate (a callback that samples from the model)."""

    def __init__(self, ours):
        self.ours, self.seen, self.average = ours, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.average = self.ours.ema.model_state_dict()["lm_head.weight"]

    def on_step_end(self, args, state, control, **kwargs):
        # model.state_dict() (here the EMA's read of the model) swaps the live weights back until the
        # model's next forward in eval mode
        self.average = self.ours.ema.model_state_dict()["lm_head.weight"]

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.seen.append((state.global_step, torch.equal(model.lm_head.weight, self.average)))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))


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


def test_every_evaluation_sees_the_average_and_checkpoints_the_live_weights(tmp_path):
    """eval_on_start, each dataset of a dict eval_dataset, evaluations called by callbacks: all run on
    the average (two datasets each batch); the grad mode and training go on as without the callback;
    model.safetensors holds the live weights even when a callback's forward follows on_evaluate."""
    ours = EMACallback(decay=0.8)
    probe = Probe(ours)
    data = Tokens(8, 2)
    trainer = trainer_for(tmp_path / "ours", [ours, probe], eval_dataset={"a": data, "b": data},
                          eval_on_start=True)
    trainer.train()
    assert torch.is_grad_enabled()
    # eval_on_start, then steps 3 and 6: two datasets of two batches each
    assert [step for step, _ in probe.seen] == [0] * 4 + [3] * 4 + [6] * 4
    assert all(on_average for _, on_average in probe.seen), probe.seen
    assert ours.ema.step == 6
    losses = [entry for entry in trainer.state.log_history if "eval_a_loss" in entry or "eval_b_loss" in entry]
    by_step = {}
    for entry in losses:
        by_step.setdefault(entry["step"], []).extend(v for k, v in entry.items() if k.endswith("_loss"))
    assert all(len(v) == 2 and v[0] == v[1] for v in by_step.values()), by_step  # both datasets: the average
    # the live weights at step 3 and 6, as a run without the EMA saves them
    plain = trainer_for(tmp_path / "plain", [], eval_dataset={"a": data, "b": data}, eval_on_start=True)
    plain.train()
    for step in (3, 6):
        saved = load_file(tmp_path / "ours" / f"checkpoint-{step}" / "model.safetensors")
        expected = load_file(tmp_path / "plain" / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.equal(saved[k], expected[k]) for k in expected), step


def test_resume_folder_named_guessed_or_refused(tmp_path):
    """Outside a Trainer's train() (no training loop to read): the folder named by resume_from or
    load(), else output_dir/checkpoint-<global_step> guessed with a warning; an EMA of another step
    than the Trainer's is refused."""
    trainer_for(tmp_path, [EMACallback(decay=0.8)]).train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = transformers.TrainerState(global_step=3)
    control = transformers.TrainerControl()
    guessed = EMACallback(decay=0.8)
    with pytest.warns(UserWarning, match="guessed .*checkpoint-3"):
        guessed.on_train_begin(args, state, control, model=tiny_gpt2())
    assert guessed.ema.step == 3
    named = EMACallback(decay=0.8, resume_from=tmp_path / "checkpoint-3")
    named.on_train_begin(args, state, control, model=tiny_gpt2())
    assert named.ema.step == 3
    wrong = EMACallback(decay=0.8)
    wrong.load(tmp_path / "checkpoint-6" / "ema.safetensors")
    with pytest.raises(polyak.MismatchError, match="step 6.*step 3"):
        wrong.on_train_begin(args, state, control, model=tiny_gpt2())
    with pytest.raises(FileNotFoundError):
        EMACallback(resume_from=tmp_path / "nowhere").on_train_begin(args, state, control, model=tiny_gpt2())


def test_import_leaves_transformers_out():
    import subprocess
    import sys
    code = "import sys, polyak.transformers; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
