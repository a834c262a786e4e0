"""The few-shot protocol from a store on S3 (moto's server on 127.0.0.1) gives what it gives from
the same store on disk: its protocol stores link to the remote arrays."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clipreel.cli import app
from clipreel.stores.copy import copy_store


def test_fewshot_from_an_s3_store_equals_fewshot_from_the_local_store(synth_store, s3_endpoint, tmp_path):
    url = f"{s3_endpoint}/synth.zarr"
    assert copy_store(synth_store.path, url).problems == []
    results = {}
    for name, store in (("local", str(synth_store.path)), ("s3", url)):
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
