"""polyak.lightning.EMA side by side with Lightning's EMAWeightAveraging (the installed lightning)
in real Trainer.fit runs on a tiny LightningModule (BatchNorm included), on the CPU: the weights
after fit (both copy the average into the module at on_train_end), the validation losses (both
validate with the average), the checkpoints' layout, and a resume from a checkpoint that must
give what an uninterrupted run gives."""
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import EMAWeightAveraging  # noqa: E402

from polyak.lightning import EMA  # noqa: E402

TOLERANCE = 2e-5
BATCHES = 4  # per epoch


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 1))
        self.val_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_losses.append(torch.nn.functional.mse_loss(self.net(x), y).item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 4, 5, generator=gen)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    return torch.utils.data.DataLoader(data, batch_size=4)


def fit(callback, max_steps, ckpt_path=None, save_dir=None, **options):
    """Trainer.fit on the CPU, minimal logging; save_dir: ModelCheckpoint saves there every 4 steps."""
    model = Tiny()
    saver = [pl.callbacks.ModelCheckpoint(dirpath=save_dir, every_n_train_steps=4, save_top_k=-1)] if save_dir else []
    options.setdefault("devices", 1)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback] + saver, accelerator="cpu", **options,
                         logger=False, enable_checkpointing=bool(save_dir), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                         val_check_interval=2)
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model


def assert_close_states(ours, theirs):
    for name, value in theirs.items():
        if value.is_floating_point():
            assert (ours[name] - value).abs().max().item() <= TOLERANCE * (value.abs().max().item() + 1e-3), name


def test_fit_equals_lightnings_ema_weight_averaging():
    theirs = fit(EMAWeightAveraging(decay=0.8), 8)
    ours = fit(EMA(decay=0.8), 8)
    assert_close_states(ours.state_dict(), theirs.state_dict())
    assert len(ours.val_losses) == len(theirs.val_losses) == 4
    assert ours.val_losses == pytest.approx(theirs.val_losses, rel=1e-5)
    # integer buffers: polyak copies them (Lightning runs them through the decay)
    assert int(ours.net[1].num_batches_tracked) == 8


def test_update_every_n_steps_as_lightning():
    theirs = fit(EMAWeightAveraging(decay=0.7, update_every_n_steps=3, update_starting_at_step=1), 8)
    ours = fit(EMA(decay=0.7, update_every_n_steps=3, update_starting_at_step=1), 8)
    assert_close_states(ours.state_dict(), theirs.state_dict())


def test_resume_gives_the_uninterrupted_run(tmp_path):
    whole = fit(EMA(decay=0.8), 8, save_dir=tmp_path / "ours")
    path = tmp_path / "ours" / "epoch=0-step=4.ckpt"
    resumed = fit(EMA(decay=0.8), 8, ckpt_path=path)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    checkpoint = torch.load(path, weights_only=False)
    assert {"state_dict", "current_model_state", "averaging_state", "polyak_ema"} <= set(checkpoint)
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 4
    # Lightning's own over the same cycle, and ours resumed from Lightning's checkpoint
    fit(EMAWeightAveraging(decay=0.8), 4, save_dir=tmp_path / "theirs")
    path = tmp_path / "theirs" / "epoch=0-step=4.ckpt"
    theirs = fit(EMAWeightAveraging(decay=0.8), 8, ckpt_path=path)
    assert_close_states(resumed.state_dict(), theirs.state_dict())
    from_theirs = fit(EMA(decay=0.8), 8, ckpt_path=path)
    assert_close_states(from_theirs.state_dict(), theirs.state_dict())


def test_ddp_equals_lightnings():
    """Two CPU processes (gloo; ddp_fork, since Lightning's own callback cannot be pickled for
    ddp_spawn): every rank keeps a whole EMA of its replica; rank 0's model comes back."""
    theirs = fit(EMAWeightAveraging(decay=0.8), 4, strategy="ddp_fork", devices=2)
    ours = fit(EMA(decay=0.8), 4, strategy="ddp_fork", devices=2)
    assert_close_states(ours.state_dict(), theirs.state_dict())
    assert not torch.equal(ours.net[0].weight, Tiny().net[0].weight)  # trained: the processes' result came back


def test_checkpoint_holds_the_average_and_the_live_weights(tmp_path):
    callback = EMA(decay=0.5)
    model = Tiny()
    trainer = pl.Trainer(max_steps=3, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(model, loader())
    average = callback.ema.model_state_dict()
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    for name, value in average.items():
        assert torch.equal(checkpoint["state_dict"][name], value)
    # fit ended: the module holds the average (on_train_end), and so does the checkpoint's live state
    assert torch.equal(checkpoint["current_model_state"]["net.0.weight"], model.net[0].weight)


def test_import_leaves_lightning_out():
    import subprocess
    import sys
    code = ("import sys, polyak.lightning; assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
