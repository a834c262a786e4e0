"""Training never ends "successfully" with broken weights: non-finite settings are refused, a
non-finite loss or gradient stops the run naming its epoch and step (the last good checkpoint
kept), no run directory gets NaN weights, and eval and resume refuse weights that are not finite.

The cache-head cases run the real `clipreel` command on the session's synthetic store (or a copy
of it damaged on purpose); the kit's gradient check runs real autograd; the raw-frame trainer
diverges on a small synthetic world.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.registry import Recipe, head_entry
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.train import TrainConfig, run_training
from clipreel.pipeline.training.loop import train_epoch
from clipreel.pipeline.training.optim import adamw_with_schedule
from clipreel.stores.features import FeatureStore
from clipreel.stores.runs import WEIGHTS_FILE

BATCH = 16


def _train_command(store, out, *settings) -> list:
    return ["train", "linear", "--store", store, "--out", out, "--batch-size", str(BATCH), "--val-split", "",
            "--no-progress", *settings]


def test_a_learning_rate_of_inf_is_refused_before_anything_is_written(synth_store, clipreel_cli, tmp_path):
    result = clipreel_cli(*_train_command(synth_store.path, tmp_path / "run", "--lr", "inf", "--epochs", "2"))
    assert result.exit_code == 2, result.output
    assert "lr=inf" in result.output and "every number finite" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def _row_first_read_in_epoch_2(store: FeatureStore) -> tuple[int, int, int]:
    """A training video whose cached view 0 is read in epoch 1 and view 1 in epoch 2, as the trainer's
    loader plans them -> (its store row, its batch in epoch 2, the batches per epoch)."""
    manifest, done = store.manifest(), store.done_mask()
    rows = np.flatnonzero((manifest["split"] == "train").to_numpy() & (manifest["label"] >= 0).to_numpy() & done)
    entry = head_entry("linear")
    loader = CacheLoader(store, rows, manifest["label"].to_numpy()[rows], entry.reads, entry.blocks, BATCH,
                         shuffle=True, seed=0, views="random")
    first, second = loader.epoch_plan(0), loader.epoch_plan(1)
    view_in_first = {int(position): int(view) for positions, views in first for position, view in zip(positions, views)}
    for batch, (positions, views) in enumerate(second):
        for position, view in zip(positions, views):
            if view == 1 and view_in_first[int(position)] == 0:
                return int(rows[position]), batch, len(second)
    raise AssertionError("no training video reads view 0 and then view 1")


def test_a_nan_loss_stops_training_at_its_epoch_and_step_keeping_the_last_good_checkpoint(synth_store, clipreel_cli,
                                                                                          tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(synth_store.path, damaged)
    store = FeatureStore.open(damaged, mode="r+")
    row, batch, batches = _row_first_read_in_epoch_2(store)
    store.array("embeds")[row, 1] = np.nan  # one cached view of one video (`clipreel verify` reports it)

    run_dir = tmp_path / "run"
    result = clipreel_cli(*_train_command(damaged, run_dir, "--epochs", "3"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"training stopped at epoch 2, step {batch + 1} of {batches}: the loss is nan" in result.output
    assert "keeps the checkpoint of epoch 1, the last good one" in result.output

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert not (run_dir / WEIGHTS_FILE).exists() and not (run_dir / "config.json").exists()


def test_non_finite_gradients_stop_the_step_before_the_weights_change():
    """sqrt at 0: a finite loss (0) whose gradient is inf."""

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([0.0, 1.0]))

    model = Root()
    optimizer, scheduler = adamw_with_schedule([{"params": list(model.parameters()), "lr": 0.1}],
                                               Recipe(lr=0.1, weight_decay=0.0, warmup_epochs=0), 2, 1, None)

    def step(batch, index):
        loss = model.weight.sqrt().sum()
        return loss, torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)

    with pytest.raises(ClipreelError, match=r"epoch 1, step 1 of 2: the gradients are not finite \(total norm inf\)"):
        train_epoch(model, [None, None], 2, step, seed=0, epoch=0, rank=0, accumulate=1, optimizer=optimizer,
                    scheduler=scheduler, device=torch.device("cpu"), on_batch=lambda loss: None)
    assert torch.equal(model.weight.detach(), torch.tensor([0.0, 1.0]))


@pytest.fixture(scope="module")
def linear_run(synth_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nonfinite") / "linear"
    run_training(TrainConfig(kind="linear", store=str(synth_store.path), out=str(run_dir), epochs=1,
                             batch_size=BATCH, val_split=None), progress=False)
    return run_dir


def test_eval_refuses_weights_that_are_not_finite_naming_the_tensor(synth_store, linear_run, clipreel_cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(linear_run, run_dir)
    weights = load_file(run_dir / WEIGHTS_FILE)
    weights["linear.weight"][3, :5] = float("inf")
    save_file(weights, run_dir / WEIGHTS_FILE)

    result = clipreel_cli("eval", run_dir, "--store", synth_store.path, "--split", "test")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "linear.weight: 5 of" in result.output and "not finite" in result.output
    assert not (run_dir / "eval-test.json").exists()


def test_resuming_refuses_a_checkpoint_whose_weights_are_not_finite(synth_store, linear_run, clipreel_cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(linear_run, run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint["model"]["linear.bias"][0] = float("nan")
    torch.save(checkpoint, run_dir / "checkpoint.pt")

    result = clipreel_cli(*_train_command(synth_store.path, run_dir, "--epochs", "2"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "linear.bias: 1 of" in result.output and "not finite" in result.output


def test_the_raw_frame_trainer_stops_when_it_diverges(clipreel_cli, tmp_path):
    videos = make_world(tmp_path / "world", SynthConfig(classes=2, videos_per_class=6, frames=8, size=32))
    run_dir = tmp_path / "run"
    result = clipreel_cli("finetune", "vifi", "--videos", videos, "--out", run_dir, "--model", "clipreel-synth",
                          "--frames", "2", "--epochs", "3", "--batch-size", "2", "--workers", "0", "--lr", "1e30",
                          "--option", "variant=image", "--no-progress")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "training stopped" in result.output and "Lower the learning rate (--lr)" in result.output
    assert not (run_dir / WEIGHTS_FILE).exists()
