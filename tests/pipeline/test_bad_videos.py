"""Fine-tuning and raw-video evaluation skip videos that cannot be decoded, as extraction does:
`--on-bad-video skip` leaves each out of its batch (the other videos keep their batches, in every
loader), records it with its error (skipped.csv in the run, skipped_videos in an eval report) and
goes on; `stop`, the default, names the row.

A small synthetic world (4 classes, real H.264 files) with one train, one val and one test video
overwritten by junk, and one listed train file that does not exist; the built-in synthetic CLIP.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.augment import AugmentConfig
from clipreel.pipeline.data.frame_loaders import FrameLoading, epoch_order, frame_loader
from clipreel.pipeline.data.raw_frames import RawFrameDataset
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import SynthConfig, make_world

FRAMES = 4
BATCH = 4


@dataclass
class DamagedWorld:
    videos: Path  # the list
    broken: dict[str, str]  # split -> the path (as listed) of its junk video
    missing: str  # the listed path of a train video that does not exist


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> DamagedWorld:
    folder = tmp_path_factory.mktemp("damaged-world")
    videos = make_world(folder, SynthConfig(classes=4, videos_per_class=8, frames=16, size=64, seed=5))
    with open(videos, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    broken = {}
    for split in ("train", "val", "test"):
        path = next(row["path"] for row in rows if row["split"] == split)
        (videos.parent / path).write_bytes(b"not a video at all" * 100)
        broken[split] = path
    missing = "videos/nowhere/gone.mp4"
    rows.append({**rows[0], "path": missing})
    with open(videos, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return DamagedWorld(videos=videos, broken=broken, missing=missing)


def _train_rows(world: DamagedWorld) -> pd.DataFrame:
    manifest = read_sources(world.videos, skip_missing=True)
    return manifest[(manifest["split"] == "train") & (manifest["status"] != "failed")]


@pytest.mark.parametrize("loading", [
    FrameLoading(decoder="pyav", loader="workers", device="cpu", workers=0),
    FrameLoading(decoder="pyav", loader="workers", device="cpu", workers=2),
    FrameLoading(decoder="pyav", loader="ray", device="cpu", workers=2),
    FrameLoading(decoder="pyav", loader="device", device="cpu"),
], ids=["in-process", "worker-processes", "ray", "device-thread"])
def test_a_bad_video_leaves_its_batch_and_the_others_keep_theirs(world, ray_local, loading):
    rows = _train_rows(world)
    broken_row = int(rows.index[rows["path"].str.endswith(world.broken["train"])][0])
    sampling, augment = SamplingConfig(frames=FRAMES), AugmentConfig(image_size=32)
    dataset = RawFrameDataset(rows, sampling, augment, train=True, seed=0, decoder="pyav", device="cpu",
                              on_bad_video="skip")
    loader = frame_loader(dataset, BATCH, loading, shuffle=True, seed=3)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader)
        order = [int(rows.index[index]) for index in epoch_order(len(rows), True, 3, epoch)]
        assert len(batches) == len(loader)
        for start, batch in zip(range(0, len(order), BATCH), batches):
            planned = [row for row in order[start : start + BATCH] if row != broken_row]
            assert batch["row"].tolist() == planned
            good = [dataset[(epoch, rows.index.get_loc(row))] for row in planned]
            assert torch.equal(batch["frames"], torch.stack([item["frames"] for item in good]))
    assert list(loader.skipped) == [broken_row]
    assert f"row {broken_row}" in loader.skipped[broken_row] and world.broken["train"] in loader.skipped[broken_row]

    stopping = RawFrameDataset(rows, sampling, augment, train=True, seed=0, decoder="pyav", device="cpu")
    with pytest.raises(ClipreelError, match=f"row {broken_row} "):
        list(frame_loader(stopping, BATCH, loading, shuffle=True, seed=3))


def _finetune(videos: Path, out: Path, *settings) -> list:
    return ["finetune", "vifi", "--videos", videos, "--out", out, "--model", "clipreel-synth", "--frames",
            str(FRAMES), "--epochs", "2", "--batch-size", str(BATCH), "--workers", "0", "--option", "variant=image",
            "--no-progress", *settings]


def test_finetune_stops_at_a_bad_video_by_default_naming_its_row(world, clipreel_cli, tmp_path):
    result = clipreel_cli(*_finetune(world.videos, tmp_path / "run"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "gone.mp4" in result.output  # the list is refused first: one of its files does not exist

    complete = world.videos.parent / "complete.csv"  # the paths it lists are relative to its folder
    listed = pd.read_csv(world.videos)
    listed[listed["path"] != world.missing].to_csv(complete, index=False)
    stopped = clipreel_cli(*_finetune(complete, tmp_path / "run"))
    assert stopped.exit_code == 2 and "Traceback" not in stopped.output
    assert "row " in stopped.output and world.broken["train"] in stopped.output


def test_finetune_skips_bad_videos_lists_them_and_eval_skips_too(world, clipreel_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = clipreel_cli(*_finetune(world.videos, run_dir, "--on-bad-video", "skip"))
    assert result.exit_code == 0, result.output
    assert f"skipped 3 video(s) that cannot be decoded: {run_dir / 'skipped.csv'}" in result.output

    skipped = pd.read_csv(run_dir / "skipped.csv")
    assert list(skipped.columns) == ["video_id", "path", "split", "error"]
    skipped.index = [Path(path).relative_to(world.videos.parent).as_posix() for path in skipped["path"]]
    assert sorted(skipped.index) == sorted([world.broken["train"], world.broken["val"], world.missing])
    assert skipped.loc[world.broken["val"], "split"] == "val"
    assert world.broken["train"] in skipped.loc[world.broken["train"], "error"]
    assert "missing" in skipped.loc[world.missing, "error"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["skipped_videos"] == 3 and metrics["epochs"] == 2 and metrics["val_top1"] is not None

    report = tmp_path / "eval.json"
    scored = clipreel_cli("eval", run_dir, "--videos", world.videos, "--split", "test", "--workers", "0",
                          "--report", report, "--on-bad-video", "skip")
    assert scored.exit_code == 0, scored.output
    assert "skipped 1 video(s)" in scored.output
    scores = json.loads(report.read_text())
    tests = read_sources(world.videos, skip_missing=True)
    assert scores["n"] == int((tests["split"] == "test").sum()) - 1
    assert [video["path"] for video in scores["skipped_videos"]] == [str(world.videos.parent / world.broken["test"])]
