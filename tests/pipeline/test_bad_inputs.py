"""Every bad input of the commands is a clear error: exit status 2, a message naming the thing and the
fix, never a traceback; and `extract` refuses before it creates anything.

Each case runs the real `clipreel` command (its own entry point, in this process) on real files: the
session's synthetic store (clipreel-synth, TSN 8 frames x 2 views) and its video list, runs trained
on it, and run directories and stores damaged on purpose. The extract cases need only a list of real
videos (the session's three encoded clips): every setting is checked before a model, a store or Ray
is needed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clipreel.pipeline.train import TrainConfig, run_training
from clipreel.stores.features import FeatureStore
from clipreel.stores.manifest import new_manifest
from clipreel.stores.runs import WEIGHTS_FILE


@dataclass
class Inputs:
    """The real files the cases point at."""

    store: Path  # an extracted store
    videos: Path  # its video list (a CSV)
    empty_store: Path  # a store of the same videos with none extracted
    linear_run: Path  # a finished `train linear` run on the store
    mlp_run: Path  # a finished `train mlp` run on the store
    swapped_weights_run: Path  # the linear run with the mlp run's weights file
    truncated_checkpoint_run: Path  # the linear run with its checkpoint.pt cut in half
    foreign_checkpoint_run: Path  # a run directory whose checkpoint.pt is some other torch file
    out: Path  # where a command may write (nothing is there)


@pytest.fixture(scope="module")
def inputs(synth_store, tmp_path_factory) -> Inputs:
    folder = tmp_path_factory.mktemp("bad-inputs")
    store = synth_store.path

    def trained(kind: str) -> Path:
        run_dir = folder / kind
        run_training(TrainConfig(kind=kind, store=str(store), out=str(run_dir), epochs=1, val_split=None),
                     progress=False)
        return run_dir

    linear_run, mlp_run = trained("linear"), trained("mlp")
    swapped = folder / "swapped"
    shutil.copytree(linear_run, swapped)
    shutil.copy(mlp_run / WEIGHTS_FILE, swapped / WEIGHTS_FILE)
    truncated = folder / "truncated"
    shutil.copytree(linear_run, truncated)
    checkpoint = (truncated / "checkpoint.pt").read_bytes()
    (truncated / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    foreign = folder / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, foreign / "checkpoint.pt")

    extracted = FeatureStore.open(store)
    empty_store = folder / "empty.zarr"
    pending = new_manifest(extracted.manifest()[["video_id", "path", "label", "label_name", "split"]])
    FeatureStore.create(empty_store, extracted.layout, extracted.provenance, pending)
    return Inputs(store=store, videos=store.parent / "world" / "videos.csv", empty_store=empty_store,
                  linear_run=linear_run, mlp_run=mlp_run, swapped_weights_run=swapped,
                  truncated_checkpoint_run=truncated, foreign_checkpoint_run=foreign, out=folder / "new")


def _train(inputs: Inputs, *settings, head: str = "linear") -> list:
    return ["train", head, "--store", inputs.store, "--out", inputs.out, "--epochs", "2", "--no-progress", *settings]


def _finetune(inputs: Inputs, *settings, method: str = "vifi") -> list:
    return ["finetune", method, "--videos", inputs.videos, "--out", inputs.out, "--model", "clipreel-synth",
            "--epochs", "1", "--workers", "0", "--no-progress", *settings]


# extract: every setting is checked before the store is created or Ray started.
# (the settings, what the message must name)
EXTRACT_CASES = {
    "--batch-size 0": (["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    "--workers 0": (["--workers", "0"], ["--workers 0", "at least 1"]),
    "--wait -1": (["--wait", "-1"], ["--wait -1", "0 or more"]),
    "--frames 0": (["--frames", "0"], ["frames is 0", ">= 1"]),
    "--sampling": (["--sampling", "nosuch"], ["'nosuch'", "tsn, dense, uniform"]),
    "--crops 2": (["--crops", "2"], ["crops must be 1", "or 3"]),
    "--layers 99": (["--layers", "99"], ["--layers '99'", "blocks"]),
    "--norm": (["--norm", "nosuch"], ["'nosuch'", "clip"]),
    "--decoder": (["--decoder", "nosuch"], ["'nosuch'", "pyav"]),
    "--model": (["--model", "nosuch"], ["--model 'nosuch'", "clipreel-tiny"]),
}


@pytest.fixture(scope="module")
def clips_list(encoded_videos, tmp_path_factory) -> Path:
    """A CSV listing the session's three encoded clips."""
    listing = tmp_path_factory.mktemp("clips") / "clips.csv"
    listing.write_text("path,label\n" + "".join(f"{path},{label}\n" for label, path in enumerate(encoded_videos)))
    return listing


def _assert_one_clear_error(result, named: list[str]) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for words in named:
        assert words in result.output, (words, result.output)


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_a_bad_extract_setting_is_one_clear_error(clips_list, clipreel_cli, tmp_path, case):
    settings, named = EXTRACT_CASES[case]
    out = tmp_path / "new.zarr"
    result = clipreel_cli("extract", "--videos", clips_list, "--out", out, "--model", "clipreel-tiny", "--pretrained",
                          "none", "--no-progress", *settings)
    _assert_one_clear_error(result, named)
    assert not out.exists()  # refused before anything was written


# (the command, what its message must name)
CASES = {
    # train: settings, options, the store, the run directory
    "train --lr inf": (lambda i: _train(i, "--lr", "inf"), ["lr=inf", "finite"]),
    "train --lr nan": (lambda i: _train(i, "--lr", "nan"), ["lr=nan", "finite"]),
    "train --weight-decay inf": (lambda i: _train(i, "--weight-decay", "inf"), ["weight_decay=inf"]),
    "train --warmup-epochs > --epochs": (lambda i: _train(i, "--warmup-epochs", "3"),
                                         ["warmup_epochs=3", "warmup epochs <= epochs"]),
    "train --val-split": (lambda i: _train(i, "--val-split", "nosuch"),
                          ["validation split 'nosuch'", "'train'", "--val-split"]),
    "train --split": (lambda i: _train(i, "--split", "nosuch"), ["split 'nosuch'", "'train'", "--split"]),
    "train --store a CSV": (lambda i: ["train", "linear", "--store", i.videos, "--out", i.out],
                            ["videos.csv is a file, not a feature store", "--videos"]),
    "train on a store with nothing extracted": (lambda i: ["train", "linear", "--store", i.empty_store, "--out", i.out],
                                                ["nothing is extracted", "256 pending", "clipreel extract"]),
    "train --option bool": (lambda i: _train(i, "--option", "temporal_conv=maybe", head="evl"),
                            ["--option temporal_conv=maybe", "true or false"]),
    "train --option probability": (lambda i: _train(i, "--option", "cls_dropout=5", head="evl"),
                                   ["--option cls_dropout=5", "in [0, 1)"]),
    "train --option size": (lambda i: _train(i, "--option", "hidden=-5", head="mlp"),
                            ["--option hidden=-5", "whole number >= 1"]),
    "train --option int as float": (lambda i: _train(i, "--option", "hidden=2.5", head="mlp"),
                                    ["--option hidden=2.5", "whole number"]),
    "train --option unknown": (lambda i: _train(i, "--option", "nosuch=1", head="mlp"),
                               ["--option nosuch", "dropout, hidden"]),
    "train resumes a truncated checkpoint": (
        lambda i: ["train", "linear", "--store", i.store, "--out", i.truncated_checkpoint_run, "--epochs", "1",
                   "--val-split", "", "--no-progress"],
        ["checkpoint.pt: cannot read it as a checkpoint", "damaged (truncated?)", "delete", "new --out"]),
    "train resumes a foreign checkpoint": (
        lambda i: ["train", "linear", "--store", i.store, "--out", i.foreign_checkpoint_run, "--no-progress"],
        ["not a checkpoint of this clipreel", "'identity'"]),
    # eval
    "eval another head's weights": (lambda i: ["eval", i.swapped_weights_run, "--store", i.store],
                                    ["weights.safetensors holds the weights of another model", "linear",
                                     "Train the run again"]),
    "eval a store with nothing extracted": (lambda i: ["eval", i.linear_run, "--store", i.empty_store],
                                            ["nothing is extracted"]),
    "eval --store a CSV": (lambda i: ["eval", i.linear_run, "--store", i.videos], ["is a file, not a feature store"]),
    "eval --split": (lambda i: ["eval", i.linear_run, "--store", i.store, "--split", "nosuch"], ["'nosuch'"]),
    "eval --on-bad-video": (lambda i: ["eval", i.linear_run, "--videos", i.videos, "--on-bad-video", "maybe"],
                            ["--on-bad-video 'maybe'", "stop or skip"]),
    # finetune
    "finetune --lr inf": (lambda i: _finetune(i, "--lr", "inf"), ["lr=inf"]),
    "finetune --option bool": (lambda i: _finetune(i, "--option", "gradient_checkpointing=1"),
                               ["--option gradient_checkpointing=1", "true or false"]),
    "finetune --option probability": (lambda i: _finetune(i, "--option", "drop_path=1.5", method="ezclip"),
                                      ["--option drop_path=1.5", "in [0, 1)"]),
    "finetune --augment": (lambda i: _finetune(i, "--augment", "flip=maybe"), ["--augment flip=maybe", "number"]),
    "finetune --augment unknown": (lambda i: _finetune(i, "--augment", "nosuch=1"),
                                   ["--augment nosuch", "color_jitter"]),
    "finetune --on-bad-video": (lambda i: _finetune(i, "--on-bad-video", "maybe"), ["--on-bad-video 'maybe'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_clear_error(inputs, clipreel_cli, case):
    command, named = CASES[case]
    result = clipreel_cli(*command(inputs))
    _assert_one_clear_error(result, named)
    assert not inputs.out.exists()  # refused before anything was written


def test_the_stride_is_not_compared_for_samplings_that_do_not_use_it(synth_store, clipreel_cli, tmp_path):
    """The session store is TSN-sampled: a re-run with another --stride asks for the same features."""
    store = tmp_path / "copy.zarr"
    shutil.copytree(synth_store.path, store)
    settings = ["--videos", synth_store.path.parent / "world" / "videos.csv", "--out", store, "--model",
                synth_store.model, "--frames", "8", "--views", "2", "--sampling", "tsn", "--layers", "2",
                "--no-progress"]
    result = clipreel_cli("extract", *settings, "--stride", "4")
    assert result.exit_code == 0, result.output
    assert "done 256 (0 computed now" in result.output
    refused = clipreel_cli("extract", *settings, "--frames", "4")
    assert refused.exit_code == 2 and "frames: store has 8, this run asks for 4" in refused.output
