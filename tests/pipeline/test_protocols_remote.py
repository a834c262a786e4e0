"""The few-shot protocol from a store on S3 (moto's server on 127.0.0.1) gives what it gives from
the same store on disk: its protocol stores link to the remote arrays."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.pipeline.data.synth.world import SynthConfig, make_world
from clipreel.pipeline.extract import ExtractConfig, run_extract
from clipreel.stores.copy import copy_store


def test_fewshot_from_an_s3_store_equals_fewshot_from_the_local_store(s3_endpoint, tmp_path):
    # A small store of its own (8 classes x 8 videos: 4 train, 2 val, 2 test each), so that copying
    # it to S3 takes a second.
    videos = make_world(tmp_path / "world", SynthConfig(classes=8, videos_per_class=8, frames=16, size=64, seed=1))
    local = tmp_path / "features.zarr"
    run_extract(ExtractConfig(videos=str(videos), out=str(local), model="clipreel-synth", frames=4, layers="1",
                              runner="process"), progress=False)
    url = f"{s3_endpoint}/synth.zarr"
    assert copy_store(local, url).problems == []
    results = {}
    for name, store in (("local", str(local)), ("s3", url)):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["fewshot", "linear", "--store", store, "--out", str(out), "--shots", "2",
                                          "--seeds", "1", "--epochs", "2"])
        assert result.exit_code == 0, result.output
        results[name] = json.loads((out / "few_shot.json").read_text())
    assert (tmp_path / "s3" / "stores").is_dir()
    linked = [path for path in (tmp_path / "s3" / "stores").iterdir()]
    assert linked and all((path / "linked_arrays.json").is_file() for path in linked)
    def scores(report: dict) -> list:
        return [(shots["shots"], [(run["seed"], run["top1"]) for run in shots["runs"]]) for shots in report["by_shots"]]

    assert scores(results["s3"]) == scores(results["local"])
