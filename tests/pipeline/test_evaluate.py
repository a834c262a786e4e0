"""Evaluation: metrics on hand-checkable cases, multi-view aggregation, report files, and the
end-to-end `evaluate` (store runs) / `zero_shot_store` paths on a real store extracted from the
synthetic world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.pipeline.evaluate import (
    EvalConfig,
    evaluate,
    evaluate_store_run,
    select_videos,
    store_classnames,
    zero_shot_store,
)
from clipreel.pipeline.models import trained_head
from clipreel.pipeline.reports import plot_confusion, save_report
from clipreel.pipeline.scoring import compute_metrics, mean_softmax_over_views
from clipreel.pipeline.train import TrainConfig, run_training
from clipreel.stores.features import FeatureStore
from clipreel.stores.runs import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pair_accuracy(confusion) -> float:
    """How often the prediction is either class of the true time-reversed pair (2k, 2k+1): the
    appearance-level accuracy, since a frame-mean model cannot see the direction of motion."""
    counts = np.asarray(confusion)
    within_pair = sum(counts[2 * k : 2 * k + 2, 2 * k : 2 * k + 2].sum() for k in range(len(counts) // 2))
    return float(within_pair / counts.sum())


# ---------------------------------------------------------------------- metrics by hand


def test_metrics_of_a_hand_checkable_case():
    classnames = ["a", "b", "c", "d", "e", "f"]
    probabilities = np.array([
        [0.50, 0.20, 0.10, 0.08, 0.07, 0.05],  # true a, predicted a
        [0.01, 0.30, 0.25, 0.20, 0.14, 0.10],  # true a, predicted b; a is ranked last (outside the top 5)
        [0.10, 0.30, 0.40, 0.11, 0.05, 0.04],  # true b, predicted c; b is second (inside the top 5)
        [0.05, 0.60, 0.11, 0.10, 0.09, 0.05],  # true b, predicted b
        [0.05, 0.04, 0.70, 0.10, 0.06, 0.05],  # true c, predicted c
    ])
    labels = np.array([0, 0, 1, 1, 2])
    metrics = compute_metrics(probabilities, labels, classnames)

    assert metrics["n"] == 5
    assert metrics["top1"] == pytest.approx(3 / 5)
    assert metrics["top5"] == pytest.approx(4 / 5)
    assert metrics["top5_k"] == 5
    # a: 1/2, b: 1/2, c: 1/1; d, e, f have no videos and do not count
    assert metrics["mean_class_acc"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert metrics["per_class"]["a"] == {"acc": 0.5, "n": 2}
    assert metrics["per_class"]["c"] == {"acc": 1.0, "n": 1}
    assert metrics["per_class"]["f"] == {"acc": None, "n": 0}
    expected = np.zeros((6, 6), dtype=int)
    expected[0, 0] = expected[0, 1] = expected[1, 2] = expected[1, 1] = expected[2, 2] = 1
    assert metrics["confusion"] == expected.tolist()
    json.dumps(metrics, allow_nan=False)  # plain JSON


def test_top5_is_top_k_with_k_at_most_the_class_count():
    probabilities = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    metrics = compute_metrics(probabilities, np.array([2, 0]), ["x", "y", "z"])
    assert metrics["top5_k"] == 3
    assert metrics["top5"] == 1.0  # with 3 classes every label is in the "top 5"
    assert metrics["top1"] == 0.5


def test_unknown_labels_and_mismatched_shapes_are_refused():
    probabilities = np.full((2, 3), 1 / 3)
    with pytest.raises(ClipreelError, match="label -1"):
        compute_metrics(probabilities, np.array([0, -1]), ["x", "y", "z"])
    with pytest.raises(ClipreelError, match="outside the 3 classes"):
        compute_metrics(probabilities, np.array([0, 3]), ["x", "y", "z"])
    with pytest.raises(ClipreelError, match=r"expected \(N, 2\)"):
        compute_metrics(probabilities, np.array([0, 1]), ["x", "y"])
    with pytest.raises(ClipreelError, match="no videos"):
        compute_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), ["x", "y", "z"])


def test_mean_of_softmax_over_views_can_overrule_the_mean_of_logits():
    # One view is very sure of class 0, two views mildly prefer class 1. Averaging logits follows
    # the loud view; averaging probabilities (softmax saturates at 1) follows the majority.
    logits = torch.tensor([[[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])  # (B=1, V=3, K=2)
    probabilities = mean_softmax_over_views(logits)  # (1, 2)
    assert probabilities.shape == (1, 2)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(1))
    expected = (torch.softmax(logits[0, 0], 0) + 2 * torch.softmax(logits[0, 1], 0)) / 3
    torch.testing.assert_close(probabilities[0], expected)
    assert probabilities.argmax(dim=1).item() == 1
    assert logits.mean(dim=1).argmax(dim=1).item() == 0


def test_one_view_is_plain_softmax():
    logits = torch.randn(4, 1, 7)
    torch.testing.assert_close(mean_softmax_over_views(logits), torch.softmax(logits[:, 0], dim=-1))


# ---------------------------------------------------------------------- report files


def test_report_and_confusion_png_are_written(tmp_path):
    classnames = ["red circle moving left", "red circle moving right", "green square moving up"]
    metrics = compute_metrics(np.eye(3)[[0, 1, 1, 2]], np.array([0, 1, 0, 2]), classnames)
    report_path = save_report({"split": "test", **metrics}, tmp_path / "out" / "eval-test.json")
    assert json.loads(report_path.read_text())["top1"] == pytest.approx(0.75)
    png = plot_confusion(metrics["confusion"], classnames, tmp_path / "out" / "eval-test.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_confusion_png_for_many_classes_and_a_mismatched_matrix(tmp_path):
    classnames = [f"class {i}" for i in range(60)]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 60, size=300)
    metrics = compute_metrics(rng.random((300, 60)), labels, classnames)
    png = plot_confusion(metrics["confusion"], classnames, tmp_path / "many.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ClipreelError, match="expected"):
        plot_confusion(metrics["confusion"], classnames[:10], tmp_path / "bad.png")


# ---------------------------------------------------------------------- on a real store


@pytest.fixture(scope="module")
def store(synth_store):
    return synth_store


@pytest.fixture(scope="module")
def linear_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "linear"
    run_training(TrainConfig(kind="linear", store=str(store.path), out=str(run_dir), epochs=2, val_split=None),
                 progress=False)
    return run_dir


def test_evaluate_run_writes_the_report_and_scores_by_mean_softmax_over_views(store, linear_run):
    report, path = evaluate(EvalConfig(run=str(linear_run), store=str(store.path), split="test"))
    assert path == linear_run / "eval-test.json"

    assert (linear_run / "eval-test.json").is_file()
    assert (linear_run / "eval-test.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((linear_run / "eval-test.json").read_text()) == report
    for key in ("top1", "top5", "mean_class_acc", "n", "per_class", "confusion", "classnames", "views", "split"):
        assert key in report, key
    manifest = FeatureStore.open(store.path).manifest()
    test_rows = manifest.index[manifest["split"] == "test"].to_numpy()
    assert report["n"] == len(test_rows) == 2 * store.classes
    assert report["views"] == 2
    assert np.asarray(report["confusion"]).sum() == report["n"]

    # The same numbers, computed independently: each view through the head, softmax, mean over views.
    features = FeatureStore.open(store.path).read(test_rows, fields=("embeds",))["embeds"]  # (N, V, T, E)
    head = trained_head(load_run(linear_run))
    with torch.no_grad():
        per_view = torch.stack([head({"embeds": torch.from_numpy(features[:, view])}) for view in range(2)],
                               dim=1)  # (N, V, K)
    predicted = torch.softmax(per_view, dim=-1).mean(dim=1).argmax(dim=1).numpy()
    labels = manifest.loc[test_rows, "label"].to_numpy()
    assert report["top1"] == pytest.approx(float((predicted == labels).mean()))


def test_evaluate_run_of_an_evl_head(store, tmp_path):
    run_dir = tmp_path / "evl"
    run_training(TrainConfig(kind="evl", store=str(store.path), out=str(run_dir), epochs=1, val_split=None),
                 progress=False)
    report_path = tmp_path / "reports" / "evl-val.json"
    report = evaluate_store_run(run_dir, store.path, "val", report_path)
    assert report["kind"] == "evl" and report["n"] == 2 * store.classes
    assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert report_path.is_file() and report_path.with_suffix(".png").is_file()


def _store_with_other_settings(store_path: Path, out: Path, **changes) -> Path:
    """A store of the same videos whose provenance differs in `changes`: its own root metadata,
    the original's arrays and manifest (linked and copied, so nothing is re-extracted)."""
    out.mkdir()
    metadata = json.loads((store_path / "zarr.json").read_text())
    metadata["attributes"]["provenance"].update(changes)
    (out / "zarr.json").write_text(json.dumps(metadata))
    for name in ("tokens", "embeds", "attention", "frame_indices", "done"):
        (out / name).symlink_to(store_path / name, target_is_directory=True)
    (out / "manifest.parquet").write_bytes((store_path / "manifest.parquet").read_bytes())
    return out


def test_a_store_with_other_feature_settings_is_refused(store, linear_run, tmp_path):
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    other = _store_with_other_settings(store.path, tmp_path / "imagenet.zarr", **imagenet)
    with pytest.raises(ClipreelError, match="mean: store has") as refused:
        evaluate_store_run(linear_run, other, "test")
    assert "std:" in str(refused.value)
    # Views and sampling may differ between the training and the evaluation store.
    resampled = _store_with_other_settings(store.path, tmp_path / "views.zarr", views=1, temporal_views=1)
    assert evaluate_store_run(linear_run, resampled, "test")["n"] > 0


def test_unlabelled_videos_and_unknown_splits_are_refused(store, linear_run, tmp_path):
    with pytest.raises(ClipreelError, match="no video in split 'holdout'"):
        evaluate_store_run(linear_run, store.path, "holdout")
    unlabelled = _store_with_other_settings(store.path, tmp_path / "unlabelled.zarr")
    opened = FeatureStore.open(unlabelled, mode="r+")
    manifest = opened.manifest()
    manifest.loc[manifest["split"] == "test", ["label", "label_name"]] = [-1, ""]
    opened.write_manifest(manifest)
    with pytest.raises(ClipreelError, match="no label"):
        evaluate_store_run(linear_run, unlabelled, "test")


def _relabelled(store_path: Path, out: Path, relabel) -> Path:
    """A store of the same features whose manifest relabel(manifest) changes (its label ids and names)."""
    relabelled = _store_with_other_settings(store_path, out)
    opened = FeatureStore.open(relabelled, mode="r+")
    manifest = opened.manifest()
    relabel(manifest)
    opened.write_manifest(manifest)
    return relabelled


def test_a_store_whose_labels_name_other_classes_is_refused_naming_the_first(store, linear_run, tmp_path,
                                                                                clipreel_cli):
    run_names = load_run(linear_run).classnames

    def rename_two_classes(manifest):
        for label, name in ((0, "purple hexagon"), (5, "grey star")):
            manifest.loc[manifest["label"] == label, "label_name"] = name

    renamed = _relabelled(store.path, tmp_path / "renamed.zarr", rename_two_classes)
    result = clipreel_cli("eval", linear_run, "--store", renamed, "--split", "test")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"its label 0 is 'purple hexagon', the run's label 0 is {run_names[0]!r}" in result.output
    assert "(2 such label(s))" in result.output and "--classes" in result.output


def test_a_store_that_numbers_the_run_s_classes_otherwise_is_matched_by_name(store, linear_run, tmp_path):
    same = evaluate_store_run(linear_run, store.path, "test")
    assert same["classes_matched_by_name"] is False

    def swap_labels_0_and_1(manifest):
        first, second = manifest["label"] == 0, manifest["label"] == 1
        manifest.loc[first, "label"], manifest.loc[second, "label"] = 1, 0

    swapped = _relabelled(store.path, tmp_path / "swapped.zarr", swap_labels_0_and_1)
    names = store_classnames(FeatureStore.open(swapped))
    run_names = load_run(linear_run).classnames
    assert names[:2] == run_names[1::-1] and names[2:] == run_names[2:]
    report = evaluate_store_run(linear_run, swapped, "test")
    assert report["classes_matched_by_name"] is True
    assert report["classnames"] == run_names
    for key in ("top1", "top5", "per_class", "confusion"):
        assert report[key] == same[key], key


def test_zero_shot_recognises_appearances_well_above_chance(store, tmp_path):
    report = zero_shot_store(store.path, "test", report_path=tmp_path / "zs.json")
    chance = 2 / store.classes  # either class of the right pair, among 16 pairs
    assert report["n"] == 2 * store.classes
    assert pair_accuracy(report["confusion"]) >= 6 * chance, report["confusion"]
    assert (tmp_path / "zs.json").is_file() and (tmp_path / "zs.png").is_file()
    literal = zero_shot_store(store.path, "test", template="a video of a {}.")
    assert pair_accuracy(literal["confusion"]) >= 6 * chance


def test_zero_shot_classes_file_restricts_or_renames_the_class_list(store, tmp_path):
    opened = FeatureStore.open(store.path)
    names = store_classnames(opened)
    subset = names[4:8]  # two whole pairs
    restrict = tmp_path / "subset.txt"
    restrict.write_text("\n".join(subset) + "\n")
    report = zero_shot_store(store.path, "test", classes_file=restrict)
    assert report["classnames"] == subset
    assert report["n"] == 2 * len(subset)
    assert report["left_out_videos"] == 2 * (store.classes - len(subset))
    assert pair_accuracy(report["confusion"]) >= 0.75  # 2 appearances: chance is 0.5

    renamed = [f"class number {index}" for index in range(len(names))]
    rename = tmp_path / "renamed.txt"
    rename.write_text("\n".join(renamed) + "\n")
    report = zero_shot_store(store.path, "test", classes_file=rename, template="none")
    assert report["classnames"] == renamed and report["n"] == 2 * store.classes

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("purple moon\n")
    with pytest.raises(ClipreelError, match="purple moon"):
        zero_shot_store(store.path, "test", classes_file=wrong)
    with pytest.raises(ClipreelError, match="one '{}'"):
        zero_shot_store(store.path, "test", template="no slot here")


def test_select_videos_leaves_out_or_refuses_other_classes(store):
    opened = FeatureStore.open(store.path)
    names = store_classnames(opened)
    kept = select_videos(opened, "test", names[:3], others="leave out")
    assert len(kept.rows) == 6 and kept.left_out == 2 * (store.classes - 3)
    assert sorted(set(kept.targets.tolist())) == [0, 1, 2]
    with pytest.raises(ClipreelError, match=names[3]):
        select_videos(opened, "test", names[:3], others="refuse")
