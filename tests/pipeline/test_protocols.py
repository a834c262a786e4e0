"""The few-shot and base-to-novel protocols end to end on a real store of the synthetic world,
and prompt learning against its own zero-shot starting point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.heads.clip import load_text_model
from clipreel.heads.registry import create_head
from clipreel.pipeline.evaluate import (
    evaluate_store_run,
    score_store,
    select_videos,
    store_classnames,
)
from clipreel.pipeline.protocols import (
    SHOTS_SPLIT,
    base_to_novel,
    draw_shots,
    few_shot,
    harmonic_mean,
    protocol_store,
)
from clipreel.stores.features import FeatureStore
from clipreel.stores.runs import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(synth_store):
    return synth_store


# ---------------------------------------------------------------------- drawing shots, protocol stores


def test_shots_are_drawn_per_class_seeded_and_without_replacement(store):
    opened = FeatureStore.open(store.path)
    manifest, done, names = opened.manifest(), opened.done_mask(), store_classnames(opened)
    class_ids = list(range(len(names)))
    rows = draw_shots(manifest, done, "train", names, class_ids, shots=2, seed=1)
    assert len(rows) == len(set(rows.tolist())) == 2 * len(names)
    assert (manifest.loc[rows, "split"] == "train").all()
    assert (manifest.loc[rows, "label"].value_counts() == 2).all()
    assert np.array_equal(rows, draw_shots(manifest, done, "train", names, class_ids, shots=2, seed=1))
    assert not np.array_equal(rows, draw_shots(manifest, done, "train", names, class_ids, shots=2, seed=2))

    with pytest.raises(ClipreelError, match=f"{names[0]!r} \\(label 0\\) has 4"):  # 4 training videos per class
        draw_shots(manifest, done, "train", names, class_ids, shots=5, seed=1)
    everything = draw_shots(manifest, done, "train", names, class_ids, shots=5, seed=1, allow_fewer=True)
    assert len(everything) == 4 * len(names)


def test_a_protocol_store_shares_the_features_and_has_its_own_manifest(store, tmp_path):
    opened = FeatureStore.open(store.path)
    original_manifest = opened.manifest()
    names = store_classnames(opened)
    chosen = draw_shots(original_manifest, opened.done_mask(), "train", names, [4, 5], shots=2, seed=1)
    path = protocol_store(opened, tmp_path / "p.zarr", chosen, [4, 5], ["four", "five"])

    shots_store = FeatureStore.open(path)
    assert shots_store.provenance == opened.provenance
    shared = shots_store.read(chosen, ("embeds",))["embeds"]
    np.testing.assert_array_equal(shared, opened.read(chosen, ("embeds",))["embeds"])
    manifest = shots_store.manifest()
    assert sorted(manifest.index[manifest["split"] == SHOTS_SPLIT]) == sorted(chosen.tolist())
    assert set(manifest.loc[chosen, "label"]) == {0, 1}
    assert set(manifest["label_name"]) == {"four", "five", ""}
    assert (manifest.loc[~original_manifest["label"].isin([4, 5]), "label"] == -1).all()
    assert opened.manifest().equals(original_manifest)  # the original store is untouched


# ---------------------------------------------------------------------- few-shot


def test_few_shot_end_to_end(store, tmp_path):
    out = tmp_path / "fewshot"
    report = few_shot("linear", store.path, out, shots=(1, 2), seeds=(1,), epochs=1)

    assert [row["shots"] for row in report["by_shots"]] == [1, 2]
    for row in report["by_shots"]:
        (run,) = row["runs"]
        assert run["train_videos"] == row["shots"] * store.classes
        assert run["test_videos"] == 2 * store.classes
        assert row["top1_mean"] == run["top1"] and row["top1_std"] == 0.0
        assert 0.0 <= run["top1"] <= run["top5"] <= 1.0
        assert (Path(run["run"]) / "eval-test.json").is_file()
        assert load_run(run["run"]).train_config["split"] == SHOTS_SPLIT
    assert json.loads((out / "few_shot.json").read_text()) == report
    assert (out / "few_shot.png").read_bytes()[:8] == PNG_SIGNATURE

    # Re-running the same command finds the finished runs and gives the same numbers.
    assert few_shot("linear", store.path, out, shots=(1, 2), seeds=(1,), epochs=1) == report


def test_few_shot_refuses_classes_with_too_few_videos(store, tmp_path):
    with pytest.raises(ClipreelError, match="fewer than 16 extracted videos"):
        few_shot("linear", store.path, tmp_path / "fs", shots=(1, 16), seeds=(1,), epochs=1)
    assert not (tmp_path / "fs" / "runs").exists()  # refused before any training


# ---------------------------------------------------------------------- base-to-novel


def test_base_to_novel_end_to_end(store, tmp_path):
    out = tmp_path / "b2n"
    report = base_to_novel("text-prompt", store.path, out, shots=2, seeds=(1,), epochs=1, options={"n_ctx": 4})

    names = store_classnames(FeatureStore.open(store.path))
    half = store.classes // 2
    assert report["base_classes"] == names[:half] and report["novel_classes"] == names[half:]
    (run,) = report["runs"]
    assert run["train_videos"] == 2 * half
    assert run["base_test_videos"] == run["novel_test_videos"] == 2 * half
    assert report["base"] == run["base_top1"] and report["novel"] == run["novel_top1"]
    assert report["hm"] == pytest.approx(harmonic_mean(report["base"], report["novel"]))
    assert load_run(run["run"]).classnames == names[:half]  # trained on the base classes only
    for part in ("base", "novel"):
        assert (Path(run["run"]) / f"eval-{part}-test.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((out / "base_to_novel.json").read_text()) == report

    # The base-only head cannot be evaluated closed-set on the novel classes.
    with pytest.raises(ClipreelError, match="does not know"):
        evaluate_store_run(run["run"], store.path, "test")


def test_base_to_novel_takes_base_classes_by_name_or_id(store, tmp_path):
    names = store_classnames(FeatureStore.open(store.path))
    report = base_to_novel("zeroshot", store.path, tmp_path / "b2n", shots=1, seeds=(1,), epochs=1,
                           base_classes=[names[3], 0, "7"])
    assert report["base_classes"] == [names[0], names[3], names[7]]
    assert len(report["novel_classes"]) == store.classes - 3


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_base_to_novel_needs_a_text_kind(store, tmp_path):
    with pytest.raises(ClipreelError, match="only the text kinds"):
        base_to_novel("linear", store.path, tmp_path / "b2n", shots=2, seeds=(1,), epochs=1)


# ---------------------------------------------------------------------- the prompt-learning claim


def test_prompt_learning_beats_its_own_zero_shot_starting_point(store, tmp_path):
    """ViFi-CLIP / CoOp: learned text prompts beat the prompts they start from. Few-shot (4 videos
    per class) on the synthetic world with clipreel-synth, 3 seeds; each run's prompts start as
    the untrained head of its seed (random context, n_ctx 16) and train with ViFi-CLIP's
    prompting learning rate (4e-2, its base-to-novel configs). The frame-mean video embedding cannot see
    motion, so top-1 is bounded near 50% (one class of each time-reversed pair): the prompts can
    only improve how the appearances are named."""
    seeds = (1, 2, 3)
    opened = FeatureStore.open(store.path)
    names = store_classnames(opened)
    test_videos = select_videos(opened, "test", names)
    text_model = load_text_model(opened.provenance)
    before = []
    for seed in seeds:
        torch.manual_seed(seed)  # as run_training does, after loading the text tower, before building the head
        start, _ = create_head("text-prompt", store_layout=opened.layout, provenance=opened.provenance,
                               classnames=names, options={}, text_model=text_model)
        before.append(score_store(opened, test_videos, "text-prompt", start)["top1"])

    report = few_shot("text-prompt", store.path, tmp_path / "fs", shots=(4,), seeds=seeds, epochs=20, lr=4e-2)
    after = [run["top1"] for run in report["by_shots"][0]["runs"]]
    assert np.mean(after) > np.mean(before), (before, after)
    assert sum(a > b for a, b in zip(after, before)) >= 2, (before, after)
