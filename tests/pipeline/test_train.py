"""Training from a real feature store: synthetic videos -> `extract` (clipreel-tiny) -> heads.

One module-scoped store serves every test: 4 classes (2 time-reversed pairs) x 30 videos, 8 frames
per clip (TSN), 2 cached views per video, extracted in this process (a Ray Data job stores the
same features: tests/pipeline/test_extract.py). Ray Train runs on the session's local Ray.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipreel.errors import ClipreelError
from clipreel.heads.clip import file_sha256, load_text_model, register_builtin_models
from clipreel.heads.registry import create_head, head_entry, list_heads, rebuild_head
from clipreel.heads.taps import Backbone, BackboneConfig
from clipreel.pipeline.data.cache_loader import CacheLoader
from clipreel.pipeline.data.decode import PyAVDecoder
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.evaluate import evaluate_store_run
from clipreel.pipeline.extract import ExtractConfig, run_extract
from clipreel.pipeline.scoring import view_averaged_probabilities
from clipreel.pipeline.train import TrainConfig, run_training
from clipreel.stores.features import FeatureStore
from clipreel.stores.runs import load_run, provenance_mismatch, save_run


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train")
    videos = make_world(folder / "world", SynthConfig(classes=4, videos_per_class=30, frames=16, size=64, seed=3))
    out = folder / "features.zarr"
    summary = run_extract(
        ExtractConfig(videos=str(videos), out=str(out), model="clipreel-tiny", pretrained="none", frames=8,
                      views=2, sampling="tsn", decoder="pyav", batch_size=8, runner="process"),
        progress=False,
    )
    assert summary.failed == 0 and summary.done == 120
    return str(out)


def _config(store_path, out, kind, **settings) -> TrainConfig:
    settings.setdefault("epochs", 2)
    return TrainConfig(kind=kind, store=store_path, out=str(out), **settings)


def _text_model(kind, provenance):
    return load_text_model(provenance) if head_entry(kind).scores_text else None


def _first_batch(store_path, kind, views="random") -> dict:
    store = FeatureStore.open(store_path)
    entry = head_entry(kind)
    rows = np.arange(6)
    loader = CacheLoader(store, rows, np.zeros(6), entry.reads, entry.blocks, 6, shuffle=False, seed=0, views=views)
    return next(iter(loader.epoch(0)))


# --------------------------------------------------------------------------- every kind end to end


@pytest.mark.parametrize("kind", list_heads())
def test_every_head_kind_trains_and_its_run_rebuilds_to_identical_logits(store_path, tmp_path, kind):
    out = tmp_path / "run"
    summary = run_training(_config(store_path, out, kind), progress=False)

    trains = head_entry(kind).trains
    assert summary.epochs == (2 if trains else 0)
    assert summary.train_videos == 72 and summary.val_videos == 24
    assert summary.val_top1 is not None and 0.0 <= summary.val_top1 <= 1.0
    for name in ("weights.safetensors", "config.json", "metrics.json", "log.csv"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").is_file() == trains
    log_lines = (out / "log.csv").read_text().splitlines()
    assert log_lines[0] == "epoch,lr,train_loss,train_acc,val_top1,val_loss,seconds"
    assert len(log_lines) == 1 + (2 if trains else 1)

    run = load_run(out)
    assert run.kind == kind
    assert len(run.classnames) == 4 and run.provenance == FeatureStore.open(store_path).provenance
    text_model = _text_model(kind, run.provenance)
    rebuilt = rebuild_head(kind, run.head_config, run.classnames, text_model)
    rebuilt.load_state_dict(run.state_dict)
    batch = _first_batch(store_path, kind)
    trained = summary.head.eval()
    with torch.no_grad():
        expected = trained(batch)
        got = rebuilt.eval()(batch)
    assert expected.shape == (6, 4)
    assert torch.equal(got, expected)

    if trains:  # the weights moved away from their seeded initialisation
        store = FeatureStore.open(store_path)
        torch.manual_seed(0)
        initial, _ = create_head(kind, store_layout=store.layout, provenance=store.provenance,
                                 classnames=run.classnames, text_model=text_model)
        changed = [name for name, value in initial.state_dict().items() if not torch.equal(value, run.state_dict[name])]
        assert changed
    else:  # nothing was trained: the same command simply makes the run again
        again = run_training(_config(store_path, out, kind), progress=False)
        assert again.val_top1 == summary.val_top1


# --------------------------------------------------------------------------- cache vs live backbone


@pytest.mark.parametrize("kind", ["evl", "linear"])
def test_logits_from_the_cache_equal_logits_from_a_live_backbone(store_path, kind):
    store = FeatureStore.open(store_path)
    provenance = store.provenance
    torch.manual_seed(1)
    head, _ = create_head(kind, store_layout=store.layout, provenance=provenance,
                          classnames=["a", "b", "c", "d"], text_model=None)
    with torch.no_grad():  # random values everywhere: EVL starts with zero offset tables otherwise
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.2)
    head.eval()

    rows, view = [3, 70], 1
    cached = store.read(rows, fields=("tokens", "embeds", "attention", "frame_indices"))
    blocks = ",".join(str(block) for block in provenance["feature_blocks"])
    backbone = Backbone(BackboneConfig(model=provenance["model"], pretrained=provenance["pretrained"], layers=blocks))
    config = PreprocessConfig.from_dict(provenance["preprocess"])
    paths = store.manifest()["path"]
    clips = torch.stack([
        preprocess(PyAVDecoder().read(paths.iloc[row], cached["frame_indices"][n, view]), config)[0]
        for n, row in enumerate(rows)
    ])  # (B, T, 3, S, S)
    with torch.no_grad():
        live = backbone.forward_clips(clips)
        live_batch = {"tokens": live.tokens, "embeds": live.embeds, "attention": live.attention}
        live_logits = head(live_batch)
        cache_logits = head({name: torch.from_numpy(cached[name][:, view])
                             for name in ("tokens", "embeds", "attention")})
    scale = live_logits.abs().max().item()
    assert scale > 0.1  # the logits are not trivially equal
    torch.testing.assert_close(cache_logits, live_logits, rtol=0.0, atol=5e-3 * scale)


# --------------------------------------------------------------------------- 8-bit stores


def _int8_copy(store_path, out) -> str:
    """The store's videos encoded into an int8 store (same manifest; provenance dtype int8)."""
    source = FeatureStore.open(store_path)
    copy = FeatureStore.create(out, replace(source.layout, dtype="int8"), {**source.provenance, "dtype": "int8"},
                               source.manifest())
    for row in np.flatnonzero(source.done_mask()):
        values = source.read([row], fields=("tokens", "embeds", "attention", "frame_indices"))
        copy.write_video(int(row), **{name: value[0] for name, value in values.items()})
    return str(out)


def test_an_int8_store_trains_like_float16_and_a_float16_run_evaluates_on_it(store_path, tmp_path):
    int8 = _int8_copy(store_path, tmp_path / "int8.zarr")
    runs = {name: run_training(_config(path, tmp_path / name, "evl"), progress=False)
            for name, path in (("float16", store_path), ("int8", int8))}
    for epoch in range(2):  # the same seed on nearly the same features: nearly the same losses
        losses = [runs[name].history[epoch]["train_loss"] for name in ("float16", "int8")]
        assert losses[1] == pytest.approx(losses[0], rel=0.02)

    report = evaluate_store_run(tmp_path / "float16", int8, "val")  # a float16 run reads an int8 store
    assert report["n"] == 24 and report["top1"] == pytest.approx(runs["float16"].val_top1, abs=1 / 24 + 1e-9)
    with pytest.raises(ClipreelError, match="dtype"):  # resuming it on the int8 store is another run
        run_training(_config(int8, tmp_path / "float16", "evl", epochs=3), progress=False)


# --------------------------------------------------------------------------- the headline claim


def _pair_accuracy(store_path, run_dir) -> float:
    """On the held-out videos: how often the right member of each time-reversed pair (classes
    2k, 2k+1) gets the higher score (multi-view mean softmax)."""
    run = load_run(run_dir)
    head = rebuild_head(run.kind, run.head_config, run.classnames, _text_model(run.kind, run.provenance))
    head.load_state_dict(run.state_dict)
    head.eval()
    store = FeatureStore.open(store_path)
    manifest = store.manifest()
    rows = np.flatnonzero((manifest["split"] != "train").to_numpy())
    entry = head_entry(run.kind)
    loader = CacheLoader(store, rows, manifest["label"].to_numpy()[rows], entry.reads, entry.blocks, 16,
                         shuffle=False, seed=0, views="all")
    right = seen = 0
    with torch.no_grad():
        for batch in loader.epoch(0):
            probabilities = view_averaged_probabilities(run.kind, head, batch)  # (B, C)
            labels = batch["labels"]
            own = probabilities.gather(1, labels[:, None])
            partner = probabilities.gather(1, (labels ^ 1)[:, None])
            right += (own > partner).sum().item()
            seen += len(labels)
    return right / seen


@pytest.mark.slow
def test_temporal_head_tells_reversed_pairs_apart_and_frame_mean_heads_cannot(store_path, tmp_path):
    accuracy = {}
    for kind, lr in (("evl", 1e-3), ("linear", 1e-2), ("mlp", 1e-2)):
        out = tmp_path / kind
        run_training(_config(store_path, out, kind, epochs=40, lr=lr), progress=False)
        accuracy[kind] = _pair_accuracy(store_path, out)
    print(f"pair accuracy on 48 held-out videos: {accuracy}")
    assert accuracy["evl"] >= 0.85
    assert accuracy["linear"] <= 0.75 and accuracy["mlp"] <= 0.75


# --------------------------------------------------------------------------- determinism and resume


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_run(run_dir).state_dict


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_same_seed_gives_bit_identical_weights(store_path, tmp_path):
    for name in ("a", "b"):
        run_training(_config(store_path, tmp_path / name, "evl"), progress=False)
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    run_training(_config(store_path, tmp_path / "c", "evl", seed=1), progress=False)
    assert not torch.equal(_weights(tmp_path / "a")["proj.2.weight"], _weights(tmp_path / "c")["proj.2.weight"])


class _Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(store_path, tmp_path):
    settings = {"epochs": 3, "accumulate": 2, "batch_size": 8, "label_smoothing": 0.1}
    straight = run_training(_config(store_path, tmp_path / "straight", "evl", **settings), progress=False)

    def interrupt_after_two(row: dict) -> None:
        if row["epoch"] == 2:
            raise _Interrupted

    out = tmp_path / "interrupted"
    with pytest.raises(_Interrupted):
        run_training(_config(store_path, out, "evl", **settings), progress=False, on_epoch_end=interrupt_after_two)
    assert (out / "checkpoint.pt").is_file() and not (out / "config.json").exists()
    with pytest.raises(ClipreelError, match="interrupted"):
        load_run(out)

    resumed = run_training(_config(store_path, out, "evl", **settings), progress=False)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs == 3
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(out))
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in straight.history]


def test_asking_for_more_epochs_continues_a_finished_run(store_path, tmp_path):
    out = tmp_path / "run"
    run_training(_config(store_path, out, "linear", epochs=2), progress=False)
    before = _weights(out)
    longer = run_training(_config(store_path, out, "linear", epochs=3), progress=False)
    assert longer.resumed_from_epoch == 2 and longer.epochs == 3
    assert [row["epoch"] for row in longer.history] == [1, 2, 3]
    assert not torch.equal(before["linear.weight"], _weights(out)["linear.weight"])
    with pytest.raises(ClipreelError, match="already trained 3 epochs"):
        run_training(_config(store_path, out, "linear", epochs=1), progress=False)


def test_a_run_dir_made_differently_is_refused(store_path, tmp_path):
    out = tmp_path / "run"
    run_training(_config(store_path, out, "linear", epochs=1), progress=False)
    with pytest.raises(ClipreelError, match="kind: the run has 'linear', this command 'mlp'"):
        run_training(_config(store_path, out, "mlp", epochs=1), progress=False)
    with pytest.raises(ClipreelError, match="seed"):
        run_training(_config(store_path, out, "linear", epochs=1, seed=5), progress=False)

    other_store = tmp_path / "other.zarr"
    shutil.copytree(store_path, other_store)
    metadata = json.loads((other_store / "zarr.json").read_text())
    metadata["attributes"]["provenance"]["pretrained"] = "another-checkpoint.pt"
    (other_store / "zarr.json").write_text(json.dumps(metadata))
    with pytest.raises(ClipreelError, match="pretrained"):
        run_training(_config(str(other_store), out, "linear", epochs=1), progress=False)

    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ClipreelError, match="choose a new --out"):
        run_training(_config(store_path, stranger, "linear", epochs=1), progress=False)


# --------------------------------------------------------------------------- Ray Train


@pytest.mark.slow
def test_ray_train_with_two_cpu_workers_writes_one_run(ray_local, store_path, tmp_path, monkeypatch):
    out = tmp_path / "ray-run"
    # Relative paths, as typed in a shell: Ray Train runs each worker in a folder of its own.
    monkeypatch.chdir(tmp_path)
    relative_store = os.path.relpath(store_path, tmp_path)
    summary = run_training(_config(relative_store, "ray-run", "evl", workers=2, batch_size=8), progress=False)
    assert summary.epochs == 2 and summary.val_top1 is not None
    run = load_run(out)
    assert run.train_config["workers"] == 2
    assert sorted(path.name for path in out.iterdir()) == [
        "checkpoint.pt", "config.json", "curves.png", "log.csv", "metrics.json", "weights.safetensors"
    ]
    head = rebuild_head("evl", run.head_config, run.classnames)
    head.load_state_dict(run.state_dict)  # plain keys: no DDP "module." prefix
    assert torch.isfinite(head.eval()(_first_batch(store_path, "evl"))).all()

    with pytest.raises(ClipreelError, match="no labelled, extracted video in split 'nosuch'"):
        run_training(_config(store_path, tmp_path / "other", "linear", workers=2, split="nosuch"), progress=False)


# --------------------------------------------------------------------------- text tower and run directories


def test_text_model_of_a_file_extracted_store_needs_that_file(tmp_path):
    register_builtin_models()
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_file(open_clip.create_model("clipreel-tiny", pretrained=None).state_dict(), str(weights))
    provenance = {"model": "clipreel-tiny", "pretrained": "tiny.safetensors", "checkpoint_sha256": file_sha256(weights)}
    with pytest.raises(ClipreelError, match="--store-checkpoint"):
        load_text_model(provenance)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_file(open_clip.create_model("clipreel-tiny", pretrained=None).state_dict(), str(other))
    with pytest.raises(ClipreelError, match="sha256"):
        load_text_model(provenance, str(other))
    text_model = load_text_model(provenance, str(weights))
    assert text_model.model_name == "clipreel-tiny"
    reloaded = load_text_model(provenance, str(weights))
    assert torch.equal(text_model.clip.token_embedding.weight, reloaded.clip.token_embedding.weight)


def test_incomplete_run_dirs_are_explained(tmp_path):
    with pytest.raises(ClipreelError, match="no such folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipreelError, match="config.json is missing"):
        load_run(tmp_path / "empty")
    head = torch.nn.Linear(2, 3)
    save_run(tmp_path / "run", kind="linear", head=head, head_config={}, classnames=["a", "b", "c"],
             provenance={"model": "m"}, store_path="s.zarr", train_config={})
    (tmp_path / "run" / "weights.safetensors").unlink()
    with pytest.raises(ClipreelError, match="weights.safetensors is missing"):
        load_run(tmp_path / "run")


def test_provenance_mismatch_ignores_views_but_not_what_features_mean():
    train = {"model": "ViT-B-16", "pretrained": "openai", "checkpoint_sha256": None, "frames": 8, "views": 1,
             "feature_blocks": [8, 9, 10, 11], "sampling": {"policy": "dense", "views": 1},
             "preprocess": {"image_size": 224, "crops": 1, "interpolation": "bilinear"}}
    evaluation = {**train, "views": 3, "sampling": {"policy": "tsn", "views": 3},
                  "preprocess": {**train["preprocess"], "crops": 3}}
    assert provenance_mismatch(train, evaluation) == []
    problems = provenance_mismatch(train, {**evaluation, "frames": 16, "feature_blocks": [11]})
    assert len(problems) == 2 and problems[0].startswith("frames")
    same_file = {**train, "pretrained": "default", "checkpoint_sha256": "abc"}
    assert provenance_mismatch(same_file, {**same_file, "pretrained": "weights.pt"}) == []
