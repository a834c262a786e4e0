"""Extraction on a real two-node Ray cluster (`ray start --head` + `ray start --address`, started
here on loopback) into a real S3 endpoint (moto's server), and training straight from it.

Every clipreel command reaches S3 only through --storage-option: neither the nodes nor the commands
have AWS variables, so the actors on the second node reach the store with what the driver hands
them. The commands that join the cluster (--address) run as a user would run them, each in a
process of its own; the others (info, verify, copy, train and eval on one machine) run in this
process, without AWS variables, and fsspec's settings are put back after each test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from cli_runs import checkout_environment, clipreel_command, run_in_new_process
from raynodes import node_environment, start_two_node_cluster
from sessions import session_pids

from clipreel.pipeline.data.synth.world import SynthConfig, make_world

pytestmark = pytest.mark.slow

SECRET = f"secret-{uuid.uuid4().hex[:10]}"  # moto accepts any credentials; this one must never be written
VIDEOS = 40
EXTRACT_OPTIONS = ["--model", "clipreel-tiny", "--pretrained", "none", "--frames", "4", "--batch-size", "1",
                   "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    """A bucket on the moto endpoint, the filesystem to inspect it, and the --storage-option items."""
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (the test extra has it)")
    filesystem = s3fs.S3FileSystem(endpoint_url=moto_endpoint, key="test", secret=SECRET)
    bucket = f"clipreel-cluster-{uuid.uuid4().hex[:8]}"
    filesystem.mkdir(bucket)
    options = [f"--storage-option=endpoint_url={moto_endpoint}", "--storage-option=key=test",
               f"--storage-option=secret={SECRET}"]
    return {"filesystem": filesystem, "bucket": bucket, "options": options}


@pytest.fixture(autouse=True)
def no_storage_variables(monkeypatch, storage_settings_restored):
    """The commands run in this process see no storage variables, as the nodes see none."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "FSSPEC_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    cluster = start_two_node_cluster(root / "nodes", hide=root / "hidden")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    return make_world(folder, SynthConfig(classes=4, videos_per_class=VIDEOS // 4, frames=16, size=64, seed=2))


# Ray Data starts work as soon as one actor is up; an actor on the other node, still importing
# torch, would find none left in so small a job. Waiting for the whole pool gives both nodes work.
DRIVER_ENVIRONMENT = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}


def driver_environment() -> dict[str, str]:
    return checkout_environment(node_environment() | DRIVER_ENVIRONMENT)


def clipreel(*args: str) -> subprocess.CompletedProcess:
    """`clipreel ARGS...` in a process of its own, as a driver joining the cluster."""
    return run_in_new_process(*args, environment=driver_environment())


def start_clipreel(*args: str) -> subprocess.Popen:
    return subprocess.Popen(clipreel_command(*args), env=driver_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def done_objects(s3, prefix: str) -> dict[str, str]:
    """{done chunk key: its LastModified} in the store at s3://bucket/prefix."""
    filesystem = s3["filesystem"]
    path = f"{s3['bucket']}/{prefix}/done/c"
    filesystem.invalidate_cache(path)
    try:
        found = filesystem.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {name: str(info["LastModified"]) for name, info in found.items() if info["type"] == "file"}


def info(clipreel_cli, url: str, s3) -> dict:
    result = clipreel_cli("info", url, "--json", *s3["options"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def actor_pids(session: int) -> list[int]:
    """The extraction actors' processes among a node's processes."""
    pids = []
    for pid in session_pids(session):
        try:
            if b"ExtractActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def extracted(cluster, world, s3):
    """The world extracted into S3 on both nodes, one actor of the second node SIGKILLed mid-job."""
    url = f"s3://{s3['bucket']}/two-nodes.zarr"
    job = start_clipreel("extract", "--videos", str(world), "--out", url, "--address", cluster.address,
                         *EXTRACT_OPTIONS, *s3["options"])
    killed = None
    deadline = time.monotonic() + 400
    while killed is None and job.poll() is None and time.monotonic() < deadline:
        victims = actor_pids(cluster.sessions[1])
        # Half the videos stored: by then the second node's actor has stored some of its own (the
        # test shows that both nodes wrote), and half the job is left for its replacement.
        if victims and len(done_objects(s3, "two-nodes.zarr")) >= VIDEOS // 2:
            killed = victims[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    output, _ = job.communicate(timeout=600)
    return {"url": url, "killed": killed, "returncode": job.returncode, "output": output}


def test_actors_on_both_nodes_write_into_s3_and_a_killed_actor_is_replaced(extracted, cluster, s3, clipreel_cli):
    assert extracted["returncode"] == 0, extracted["output"]
    assert extracted["killed"] is not None, "no actor of the second node to kill before the job ended"
    assert f"done     {VIDEOS} ({VIDEOS} computed now, by a Ray job)" in extracted["output"]

    summary = info(clipreel_cli, extracted["url"], s3)
    assert summary["done"] == VIDEOS and summary["pending"] == 0 and summary["failed"] == 0
    (run,) = summary["extract_runs"]
    writers = run["writers"]  # Ray node id -> host, pids, videos: as each actor asked Ray where it runs
    assert set(writers) == {cluster.head_node, cluster.second_node}, (writers, cluster)
    assert all(writer["videos"] > 0 for writer in writers.values())
    assert sum(writer["videos"] for writer in writers.values()) == VIDEOS  # every video stored once

    verified = clipreel_cli("verify", extracted["url"], *s3["options"])
    assert verified.exit_code == 0, verified.output

    # The storage options never reach the store, and the driver's output does not show them.
    assert SECRET not in extracted["output"]
    filesystem = s3["filesystem"]
    filesystem.invalidate_cache()
    records = [path for path in filesystem.find(f"{s3['bucket']}/two-nodes.zarr") if path.endswith((".json", ".parquet"))]
    assert any("/extract_log/" in path for path in records) and any("/writer_lease/" in path for path in records)
    for path in records:  # every object but the arrays' binary chunks
        assert SECRET.encode() not in filesystem.cat_file(path), path


def test_sigkill_of_the_driver_mid_extraction_into_s3_then_rerun_finishes_every_video_once(cluster, world, s3,
                                                                                            clipreel_cli):
    prefix = "driver-killed.zarr"
    url = f"s3://{s3['bucket']}/{prefix}"
    command = ["extract", "--videos", str(world), "--out", url, "--address", cluster.address, *EXTRACT_OPTIONS,
               *s3["options"]]
    job = start_clipreel(*command)
    deadline = time.monotonic() + 400
    while len(done_objects(s3, prefix)) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.poll() is None, "the job finished before it could be killed; make it longer"
    os.kill(job.pid, signal.SIGKILL)  # the driver alone: the cluster ends its actors
    job.communicate()
    # A video in flight in an actor may still land until the cluster has ended the actors; then
    # nothing moves.
    deadline = time.monotonic() + 120
    while any(actor_pids(session) for session in cluster.sessions) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(actor_pids(session) for session in cluster.sessions), "the cluster kept the job's actors"
    before = done_objects(s3, prefix)
    assert 3 <= len(before) < VIDEOS

    rerun = clipreel(*command)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"done     {VIDEOS} ({VIDEOS - len(before)} computed now, by a Ray job)" in rerun.stdout
    after = done_objects(s3, prefix)
    assert len(after) == VIDEOS
    assert all(after[name] == modified for name, modified in before.items())  # nothing done was redone

    summary = info(clipreel_cli, url, s3)
    assert summary["done"] == VIDEOS and (summary["pending"], summary["failed"]) == (0, 0)
    rerun_record = max(summary["extract_runs"], key=lambda run: run["record"])
    assert sum(writer["videos"] for writer in rerun_record["writers"].values()) == VIDEOS - len(before)
    verified = clipreel_cli("verify", url, *s3["options"])
    assert verified.exit_code == 0, verified.output


_NODES_NOT_SEEING = """
import json, sys, ray
from pathlib import Path
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
from clipreel.pipeline.extract_nodes import nodes_not_seeing
print(json.dumps([[answer["node"] for answer in nodes_not_seeing(Path(folder))] for folder in sys.argv[2:]]))
"""


def test_a_local_out_is_checked_on_every_node_and_refused_where_one_cannot_see_it(cluster, world, tmp_path):
    if cluster.hidden_from_second is None:
        pytest.skip("this machine allows no mount namespace, so no node can be kept from seeing a folder")
    hidden_store = cluster.hidden_from_second / "feats.zarr"
    refused = clipreel("extract", "--videos", str(world), "--out", str(hidden_store), "--address", cluster.address,
                       *EXTRACT_OPTIONS)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"--out {hidden_store} is a local path, and 1 node(s) of the Ray cluster cannot see it" in message
    assert f"node {cluster.second_node[:12]}" in message and "Give an object-store URL" in message
    assert not hidden_store.exists()  # refused before anything was written
    assert not any(path.name.startswith(".clipreel-node-check") for path in cluster.hidden_from_second.iterdir())

    asked = subprocess.run([sys.executable, "-c", _NODES_NOT_SEEING, cluster.address, str(tmp_path / "f.zarr"),
                            str(hidden_store)], env=checkout_environment(node_environment()), capture_output=True,
                           text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    seen_everywhere, hidden = json.loads(asked.stdout.strip().splitlines()[-1])
    assert seen_everywhere == [] and hidden == [cluster.second_node]


def test_train_and_eval_straight_from_s3_equal_a_local_copy_and_copy_goes_both_ways(extracted, s3, tmp_path,
                                                                                    clipreel_cli):
    from safetensors.numpy import load_file

    assert extracted["returncode"] == 0, extracted["output"]
    local = tmp_path / "local.zarr"
    copied = clipreel_cli("copy", extracted["url"], local, "--no-progress", *s3["options"])
    assert copied.exit_code == 0, copied.output
    back = f"s3://{s3['bucket']}/copied-back.zarr"
    copied_back = clipreel_cli("copy", local, back, "--no-progress", "--check-values", *s3["options"])
    assert copied_back.exit_code == 0, copied_back.output

    reports = {}
    for name, store, options in (("s3", extracted["url"], s3["options"]), ("local", str(local), [])):
        run = tmp_path / f"run-{name}"
        trained = clipreel_cli("train", "linear", "--store", store, "--out", run, "--epochs", "3", "--seed", "4",
                               "--batch-size", "4", "--no-progress", *options)
        assert trained.exit_code == 0, trained.output
        evaluated = clipreel_cli("eval", run, "--store", store, "--split", "test", *options)
        assert evaluated.exit_code == 0, evaluated.output
        reports[name] = (load_file(run / "weights.safetensors"), json.loads((run / "eval-test.json").read_text()))

    (weights_s3, report_s3), (weights_local, report_local) = reports["s3"], reports["local"]
    assert sorted(weights_s3) == sorted(weights_local)
    for key in weights_s3:
        np.testing.assert_array_equal(weights_s3[key], weights_local[key])
    for metric in ("top1", "top5", "mean_class_acc", "n", "confusion"):
        assert report_s3[metric] == report_local[metric]


def test_data_parallel_training_on_the_cluster_reads_the_s3_store_in_every_worker(extracted, cluster, s3, tmp_path):
    assert extracted["returncode"] == 0, extracted["output"]
    run = tmp_path / "run-ddp"  # one machine: the run directory is on a folder every node sees
    trained = clipreel("train", "linear", "--store", extracted["url"], "--out", str(run), "--epochs", "1",
                       "--batch-size", "4", "--workers", "2", "--address", cluster.address, "--no-progress",
                       *s3["options"])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert (run / "weights.safetensors").is_file()
