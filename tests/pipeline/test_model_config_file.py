"""A model defined by an open_clip config file (--model NAME.json) through extract and finetune;
the store and the run are reopened, in new processes, after the file is gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runs import run_in_new_process, run_in_this_process

from clipreel.heads.clip import MODEL_CONFIG_DIR
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.stores.features import FeatureStore


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"), SynthConfig(classes=2, videos_per_class=4, frames=8, size=32, seed=3))


def write_config(folder: Path) -> tuple[Path, dict]:
    """clipreel-tiny's config with 3 image blocks, as a user's file."""
    config = json.loads((MODEL_CONFIG_DIR / "clipreel-tiny.json").read_text())
    config["vision_cfg"]["layers"] = 3
    path = folder / "configs" / "MyViT.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))
    return path, config


@pytest.mark.slow
def test_a_store_extracted_with_a_config_file_reopens_without_it(world, tmp_path):
    config_path, config = write_config(tmp_path)
    store_path = tmp_path / "features.zarr"
    code = run_in_this_process("extract", "--videos", world, "--out", store_path, "--model", config_path,
                               "--pretrained", "none", "--frames", "2", "--layers", "2", "--no-progress")
    assert code == 0
    provenance = FeatureStore.open(store_path).provenance
    assert provenance["model"].startswith("MyViT-") and provenance["model_config"] == config
    assert provenance["num_blocks"] == 3
    config_path.unlink()

    result = run_in_new_process("zeroshot", "--store", store_path, "--split", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top-1" in result.stdout


@pytest.mark.slow
def test_a_finetune_run_with_a_config_file_reopens_without_it(world, tmp_path):
    config_path, config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    code = run_in_this_process("finetune", "vifi", "--videos", world, "--out", run_dir, "--model", config_path,
                               "--pretrained", "none", "--epochs", "1", "--batch-size", "4", "--frames", "2",
                               "--workers", "0", "--no-progress")
    assert code == 0
    head_config = json.loads((run_dir / "config.json").read_text())["head"]
    assert head_config["model"].startswith("MyViT-") and head_config["model_config"] == config
    config_path.unlink()

    result = run_in_new_process("eval", run_dir, "--videos", world, "--split", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top-1" in result.stdout
