"""The synthetic world: real encoded videos, consistent lists, determinism, twins that differ only in frame order."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import av
import numpy as np
import pytest

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.data.synth.world import (
    COLOURS,
    DEFAULT_MOTIONS,
    MAX_CLASSES,
    MOTION_PAIRS,
    SynthConfig,
    make_world,
    render_clip,
    split_of,
    synth_class,
)
from clipreel.stores.manifest import read_label_map

SMALL = SynthConfig(classes=4, videos_per_class=3, frames=8, size=64, seed=3)


def _decode(path: Path) -> np.ndarray:
    """All frames of a video file as (T, H, W, 3) uint8, decoded with PyAV."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _block_distance(decoded: np.ndarray, rendered: np.ndarray, block: int = 4) -> float:
    """Mean absolute difference of block-averaged pixels: codecs smooth away the faint per-pixel noise."""
    frames, height, width, channels = decoded.shape
    shape = (frames, height // block, block, width // block, block, channels)
    decoded_blocks = decoded.astype(float).reshape(shape).mean(axis=(2, 4))
    rendered_blocks = rendered.astype(float).reshape(shape).mean(axis=(2, 4))
    return float(np.abs(decoded_blocks - rendered_blocks).mean())


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, SMALL)
    return out


def test_videos_decode_to_the_configured_frames_and_size(small_world):
    videos = sorted((small_world / "videos").rglob("*.mp4"))
    assert len(videos) == SMALL.classes * SMALL.videos_per_class
    for video in videos:
        assert _decode(video).shape == (SMALL.frames, SMALL.size, SMALL.size, 3)


def test_encoded_frames_match_the_rendered_clip(small_world):
    spec = synth_class(1)
    decoded = _decode(small_world / "videos" / spec.slug / f"{spec.slug}_002.mp4")
    distance = _block_distance(decoded, render_clip(1, (SMALL.seed, 1, 2), SMALL))
    other_video = _block_distance(decoded, render_clip(1, (SMALL.seed, 1, 1), SMALL))
    assert distance < 3.5 and distance < other_video / 4


def test_lists_labels_and_captions_agree(small_world):
    names = read_label_map(small_world / "labels.txt")
    assert names == [synth_class(c).name for c in range(SMALL.classes)]
    manifest = read_sources(small_world / "videos.csv", label_map=small_world / "labels.txt")
    assert len(manifest) == SMALL.classes * SMALL.videos_per_class
    assert (manifest["label_name"] == [names[label] for label in manifest["label"]]).all()
    assert all(Path(path).is_file() for path in manifest["path"])
    for label in range(SMALL.classes):
        splits = manifest.loc[manifest["label"] == label, "split"].tolist()
        assert splits == ["train", "val", "test"]  # 3 videos: one in each split

    captions = _read_csv(small_world / "captions.csv")
    videos = _read_csv(small_world / "videos.csv")
    assert [row["path"] for row in captions] == [row["path"] for row in videos]
    for caption, video in zip(captions, videos):
        spec = synth_class(int(video["label"]))
        assert caption["caption"] == f"a {spec.colour} {spec.shape}"  # appearance only
        assert video["label_name"].startswith(caption["caption"][2:])


def test_same_seed_same_bytes_other_seed_other_bytes(small_world, tmp_path):
    make_world(tmp_path / "again", SMALL)
    assert _file_digests(tmp_path / "again") == _file_digests(small_world)

    other = SynthConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1})
    make_world(tmp_path / "other", other)
    first, second = _file_digests(small_world), _file_digests(tmp_path / "other")
    videos = [name for name in first if name.startswith("videos/")]
    assert all(first[name] != second[name] for name in videos)
    assert first["labels.txt"] == second["labels.txt"]


@pytest.mark.parametrize("pair", range(len(MOTION_PAIRS)))
def test_twin_classes_differ_only_in_frame_order(pair):
    cfg = SynthConfig(classes=8, frames=12, size=64)
    forward = render_clip(2 * pair, 1234, cfg)
    backward = render_clip(2 * pair + 1, 1234, cfg)
    np.testing.assert_array_equal(backward, forward[::-1])
    # not vacuous: the clip moves, so reversing it changes it, while frame averages stay equal
    assert not np.array_equal(backward, forward)
    np.testing.assert_array_equal(backward.mean(axis=0), forward.mean(axis=0))
    assert synth_class(2 * pair).caption == synth_class(2 * pair + 1).caption
    assert synth_class(2 * pair).name != synth_class(2 * pair + 1).name


def _object_mask(clip: np.ndarray, colour: str) -> np.ndarray:
    """(T, H, W) pixels whose colour is near the object's colour (the background is a mild grey)."""
    target = np.array(COLOURS[colour]) * 255
    return np.abs(clip.astype(float) - target).max(axis=-1) < 60


def test_motions_go_the_way_their_names_say():
    cfg = SynthConfig(classes=6, frames=10, size=96)
    for class_id, axis, sign in [(0, 1, -1), (1, 1, +1), (2, 0, -1), (3, 0, +1)]:  # left, right, up, down
        spec = synth_class(class_id)
        mask = _object_mask(render_clip(class_id, 7, cfg), spec.colour)
        first, last = (np.argwhere(mask[t]).mean(axis=0) for t in (0, -1))  # (row, column) centroids
        assert sign * (last[axis] - first[axis]) > 0.3 * cfg.size, spec.name  # travel is 35-55% of the size
        assert abs(last[1 - axis] - first[1 - axis]) < 2, spec.name
    growing, shrinking = (_object_mask(render_clip(c, 7, cfg), synth_class(c).colour).sum(axis=(1, 2)) for c in (4, 5))
    assert synth_class(4).motion == "growing" and growing[-1] > 2 * growing[0]
    assert shrinking[0] > 2 * shrinking[-1]


def test_rotation_turns_the_way_its_name_says():
    """The arrow's long axis (from second moments; y points down) turns clockwise on screen for class 14."""
    cfg = SynthConfig(classes=16, frames=8, size=96)
    assert synth_class(14).name == "white arrow rotating clockwise"
    for class_id, sign in [(14, +1), (15, -1)]:
        mask = _object_mask(render_clip(class_id, 11, cfg), "white")
        orientations = []
        for frame in mask:
            rows, cols = np.nonzero(frame)
            rows, cols = rows - rows.mean(), cols - cols.mean()
            orientations.append(0.5 * np.arctan2(2 * (rows * cols).mean(), (cols**2).mean() - (rows**2).mean()))
        turns = np.diff(np.unwrap(np.array(orientations), period=np.pi))
        assert (sign * turns > 0.03).all(), (synth_class(class_id).name, turns)


def test_a_colour_change_fades_into_the_partner_colour_and_its_twin_back():
    cfg = SynthConfig(classes=4, frames=10, size=96, motions=("colour",))
    names = [synth_class(c, cfg.motions).name for c in range(4)]
    assert names == ["red circle turning blue", "blue circle turning red",
                     "green square turning yellow", "yellow square turning green"]
    forward, backward = render_clip(0, 7, cfg), render_clip(1, 7, cfg)
    np.testing.assert_array_equal(backward, forward[::-1])  # twins differ only in frame order
    red, blue = (_object_mask(forward, colour).sum(axis=(1, 2)) for colour in ("red", "blue"))
    assert red[0] > 100 and blue[0] == 0 and red[-1] == 0 and blue[-1] > 100  # red at the start, blue at the end
    centroids = [np.argwhere(_object_mask(forward, colour)[t]).mean(axis=0) for colour, t in (("red", 0), ("blue", -1))]
    assert np.abs(centroids[0] - centroids[1]).max() < 1  # the shape stays where it is
    assert synth_class(0, cfg.motions).caption == synth_class(1, cfg.motions).caption == "a red and blue circle"


def test_motions_are_checked():
    with pytest.raises(ClipreelError, match="choose one or more of"):
        SynthConfig(motions=("sideways",))
    with pytest.raises(ClipreelError, match="circle"):
        SynthConfig(classes=4, motions=("rotation",))  # pair 0 is a circle, whose turning is invisible
    assert SynthConfig().motions == DEFAULT_MOTIONS  # the default world: moves, growth and rotation only


def test_every_pair_has_its_own_appearance():
    specs = [synth_class(c) for c in range(MAX_CLASSES)]
    assert len({spec.name for spec in specs}) == MAX_CLASSES
    pairs = [(spec.shape, spec.colour) for spec in specs[::2]]
    assert len(set(pairs)) == len(pairs)
    first_eight = pairs[:8]  # the default world: every pair differs in shape and in colour
    assert len({shape for shape, _ in first_eight}) == len({colour for _, colour in first_eight}) == 8
    assert all(spec.shape != "circle" for spec in specs if spec.motion.startswith("rotating"))


@pytest.mark.parametrize("codec, suffix", [("vp9", ".webm"), ("mjpeg", ".avi")])
def test_other_codecs_write_decodable_videos(tmp_path, codec, suffix):
    cfg = SynthConfig(classes=2, videos_per_class=1, frames=6, size=48, codec=codec, seed=5)
    videos_csv = make_world(tmp_path / "a", cfg)
    rows = _read_csv(videos_csv)
    assert [Path(row["path"]).suffix for row in rows] == [suffix, suffix]
    for class_id, row in enumerate(rows):
        decoded = _decode(tmp_path / "a" / row["path"])
        rendered = render_clip(class_id, (cfg.seed, class_id, 0), cfg)
        assert decoded.shape == rendered.shape
        assert _block_distance(decoded, rendered) < 3.5
    # the same seed decodes to the same pixels (WebM headers hold a random id: see the report on bytes)
    make_world(tmp_path / "b", cfg)
    for row in rows:
        np.testing.assert_array_equal(_decode(tmp_path / "a" / row["path"]), _decode(tmp_path / "b" / row["path"]))


def test_splits_are_about_60_20_20_by_index():
    assert [split_of(i, 10) for i in range(10)] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    for count in range(3, 30):
        splits = [split_of(i, count) for i in range(count)]
        assert {"train", "val", "test"} <= set(splits)
        assert splits == sorted(splits, key=["train", "val", "test"].index)
    assert [split_of(i, 1) for i in range(1)] == ["train"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": 1}, "classes = 1"),
        ({"classes": MAX_CLASSES + 1}, f"choose 2..{MAX_CLASSES}"),
        ({"size": 63}, "even"),
        ({"size": 16}, ">= 32"),
        ({"frames": 3}, "at least 4"),
        ({"codec": "theora"}, "codec 'theora' is unknown"),
        ({"videos_per_class": 0}, "at least 1"),
        ({"seed": -1}, "seed >= 0"),
    ],
)
def test_bad_configs_are_refused_clearly(change, message):
    with pytest.raises(ClipreelError, match=message):
        SynthConfig(**change)


def test_cli_synth_takes_the_motions(tmp_path):
    import inspect

    from typer.testing import CliRunner

    from clipreel.cli import app, synth

    assert inspect.signature(synth).parameters["motions"].default.default == ",".join(DEFAULT_MOTIONS)
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "w"), "--classes", "2", "--videos-per-class", "1",
                                      "--frames", "4", "--size", "32", "--motions", "colour"])
    assert result.exit_code == 0, result.output
    assert read_label_map(tmp_path / "w" / "labels.txt") == ["red circle turning blue", "blue circle turning red"]
