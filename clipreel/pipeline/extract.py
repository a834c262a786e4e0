"""The extraction job: a video list -> decoded frames -> frozen backbone -> Zarr feature store.

A large job is a Ray Data pipeline:

    manifest rows (pending) --map--> probe + sample (tasks), and decode there with PyAV ahead of
                                     GPU actors
                            --map_batches--> backbone actor pool (one GPU per actor where there are
                                             GPUs): decode (DALI, or PyAV on CPU-only clusters),
                                             preprocess on the model's device, forward, and write
                                             each video's chunks into the store
                            --> the driver: progress bar, manifest status, summary

A small job (`runner="auto"`: at most IN_PROCESS_VIDEOS videos to compute, no cluster) skips Ray,
whose start costs far more than such a job's work: the driver decodes the next batch on a thread
while its own backbone computes this one, and writes through the same VideoFeatureWriter as the
actors, under the same lease, into the same store.

The store keeps tokens and attention maps as float16 or as 8-bit codes with scales (`dtype`,
stores/encoding.py); the writers encode them on the model's device.

Each video owns its chunks in the store and its `done` flag is written last, so a crash (even a
SIGKILL of the whole job) never leaves a half-written video marked done, and re-running the same
command only computes what is missing. Bad files never stop the job: their errors travel as rows
and end up in the manifest with status `failed`.

Every setting is checked before anything happens (no store created, no lease taken, no Ray
started): the numbers, the list, the sampling, the decoder, and the backbone itself (model, weights,
tapped blocks, normalisation, crops), which the driver builds once for the shapes and provenance
the store records (on the CPU, or on the GPU of a job it computes in this process).

The driver holds the store's writer lease for the whole run (a second extract on the same store
waits or is refused), and merges statuses into the manifest in storage rather than overwriting
it. Before computing it completes an interrupted append, and on request repairs the store
(--repair) or clears the done flags of videos that verify rejects (--recheck).

The store may be a local folder or an object-store URL. The actors open it themselves on
whichever node they run, with the storage options and variables the driver hands them
(StoreAccess). A local folder on a multi-node cluster is refused unless every node sees it
(extract_nodes.py). Each run records which node and process wrote which rows in
`extract_log/` inside the store.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clipreel import __version__
from clipreel.errors import ClipreelError
from clipreel.pipeline.data.decode import choose_decoder
from clipreel.pipeline.data.sampling import SamplingConfig
from clipreel.pipeline.extract_workers import decode_video
from clipreel.pipeline.progress import progress_bar
from clipreel.pipeline.raycluster import ensure_ray, quiet_ray_data
from clipreel.stores.audit import EXTRACT_LOG_FOLDER
from clipreel.stores.encoding import DEFAULT_DTYPE, checked_dtype, provenance_entries
from clipreel.stores.features import FeatureStore, StoreLayout, provenance_diff
from clipreel.stores.lease import WriterLease
from clipreel.stores.location import StoreAccess, is_remote, store_location
from clipreel.stores.manifest import orphan_mask
from clipreel.stores.objects import StoreObjects
from clipreel.stores.repair import (
    complete_append,
    recheck,
    reconcile_statuses,
    repair_store,
)

MANIFEST_FLUSH_SECONDS = 5.0
RESULT_COLUMNS = ("status", "error", "num_frames", "fps")  # what a finished video sets in the manifest
RUNNERS = ("auto", "process", "ray")
# runner "auto" computes at most this many videos in this process, more in a Ray Data job. A Ray
# job spends its first 30-80 s starting (Ray, then actors that import torch and load the model
# each) on the 2-core dev VM; this process starts computing within seconds but uses one
# process: measured in docs/store.md ("Extraction start-up").
IN_PROCESS_VIDEOS = 32
IN_PROCESS_NODE = "in-process"  # the extract log's name for the driver writing the store itself


@dataclass
class ExtractConfig:
    """Everything `clipreel extract` needs; the settings that shape the store go into its provenance."""

    videos: str
    out: str
    model: str = "ViT-B-16"  # an open_clip model name or config file (NAME.json)
    pretrained: str = "default"
    trust_checkpoint_code: bool = False  # let a --pretrained TorchScript file that is not OpenAI's run its code
    layers: str = "4"
    norm: str | None = None
    frames: int = 8
    views: int = 1
    sampling: str = "tsn"
    stride: int = 16
    crops: int = 1
    seed: int = 0
    decoder: str = "auto"
    batch_size: int = 4
    workers: int | None = None
    address: str | None = None
    root: str | None = None
    labels: str | None = None
    skip_missing: bool = False
    wait: float = 0.0  # seconds to wait for another writer's lease on the store
    force: bool = False  # take over an expired writer lease
    recheck: bool = False  # clear the done flags of videos that verify rejects, so they are computed again
    repair: bool = False  # repair_store first (includes recheck)
    dtype: str = DEFAULT_DTYPE  # how the store keeps tokens and attention maps: float16, int8 or float8
    runner: str = "auto"  # where the backbone runs: "process" (this one), "ray" (a Ray Data job), "auto"

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(
            policy=self.sampling, frames=self.frames, stride=self.stride, views=self.views, seed=self.seed
        )


@dataclass
class ExtractSummary:
    """What one run did, for the CLI's closing table."""

    store: str
    total: int
    done: int
    failed: int
    computed_now: int
    failed_now: int
    seconds: float
    startup_seconds: float | None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video_id, error)
    repairs: list[str] = field(default_factory=list)  # what repair, recheck or append completion changed
    orphaned: int = 0  # orphan placeholder rows still waiting for a video
    writers: dict[str, dict] = field(default_factory=dict)  # Ray node id -> {"host", "pids", "rows"} this run
    runner: str = "ray"  # where the videos were computed: "process" (this one) or "ray"


class WriterLog:
    """Which Ray node (host, process) stored which rows in this run, kept in the store as
    extract_log/<start time>-<driver pid>.json (rewritten whole at every manifest merge)."""

    def __init__(self, out: str):
        self._objects = StoreObjects(store_location(out))
        self.started = time.time()
        self.name = f"{EXTRACT_LOG_FOLDER}/{time.strftime('%Y%m%dT%H%M%S', time.gmtime(self.started))}-{os.getpid()}.json"
        self.writers: dict[str, dict] = {}

    def add(self, result: dict) -> None:
        writer = self.writers.setdefault(str(result["writer_node"]), {"host": str(result["writer_host"]),
                                                                      "pids": [], "rows": []})
        if int(result["writer_pid"]) not in writer["pids"]:
            writer["pids"].append(int(result["writer_pid"]))
        writer["rows"].append(int(result["row"]))

    def save(self) -> None:
        record = {"driver_host": socket.gethostname(), "driver_pid": os.getpid(), "started": self.started,
                  "saved": time.time(), "writers": self.writers}
        self._objects.replace(self.name, json.dumps(record, indent=1).encode())


def run_extract(cfg: ExtractConfig, progress: bool = True) -> ExtractSummary:
    """Extract every not-yet-done video of `cfg.videos` into the store `cfg.out`, holding its writer lease."""
    started = time.perf_counter()
    import torch

    from clipreel.heads.clip import register_builtin_models
    from clipreel.heads.taps import Backbone, BackboneConfig
    from clipreel.pipeline.data.preprocess import PreprocessConfig
    from clipreel.pipeline.data.sources import read_sources

    _check_numbers(cfg)
    checked_dtype(cfg.dtype)
    if cfg.runner not in RUNNERS:
        raise ClipreelError(f"--runner {cfg.runner!r}: choose one of {', '.join(RUNNERS)}")
    if cfg.runner == "process" and cfg.address is not None:
        raise ClipreelError("--runner process computes on this machine alone: drop --address, or use --runner ray")
    sampling = cfg.sampling_config()
    choose_decoder(cfg.decoder)  # refuses an unknown or uninstalled decoder
    sources = read_sources(
        cfg.videos,
        root=Path(cfg.root) if cfg.root else None,
        label_map=Path(cfg.labels) if cfg.labels else None,
        skip_missing=cfg.skip_missing,
    )
    in_process = _runs_in_process(cfg, _videos_to_compute(cfg.out, sources))
    register_builtin_models()
    # The driver builds the backbone once: it refuses a bad model, weights, blocks or norm, gives the
    # shapes and provenance the store records, and computes the videos itself when it runs them in
    # this process (on the GPU if there is one; the Ray actors build their own).
    device = "cuda" if in_process and torch.cuda.is_available() else "cpu"
    backbone = Backbone(BackboneConfig(model=cfg.model, pretrained=cfg.pretrained, layers=cfg.layers, norm=cfg.norm,
                                       trust_checkpoint_code=cfg.trust_checkpoint_code, device=device))
    preprocess = PreprocessConfig(image_size=backbone.image_size, mean=backbone.mean, std=backbone.std, crops=cfg.crops)
    provenance = _provenance(backbone, sampling, preprocess, cfg.dtype)
    if FeatureStore.exists(cfg.out):  # checked again under the lease, where the store is opened for writing
        _refuse_other_settings(cfg.out, FeatureStore.open(cfg.out).provenance, provenance)
    location = store_location(cfg.out)
    started_ray = False
    try:
        if cfg.address is not None and not is_remote(location):
            from clipreel.pipeline.extract_nodes import check_every_node_sees

            started_ray = ensure_ray(cfg.address)
            check_every_node_sees(location)
        with WriterLease.acquire(cfg.out, "clipreel extract", wait_seconds=cfg.wait, force=cfg.force) as lease:
            return _extract_holding_lease(cfg, sources, sampling, backbone, preprocess, provenance, lease, started,
                                          progress, in_process)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _check_numbers(cfg: ExtractConfig) -> None:
    """Refuse the counts that Ray or the store would trip over later."""
    problems = []
    if cfg.batch_size < 1:
        problems.append(f"--batch-size {cfg.batch_size}: give at least 1 video per backbone batch")
    if cfg.workers is not None and cfg.workers < 1:
        problems.append(f"--workers {cfg.workers}: give at least 1 backbone actor (or leave it out: one per GPU, "
                        "else one per CPU)")
    if not (math.isfinite(cfg.wait) and cfg.wait >= 0):
        problems.append(f"--wait {cfg.wait}: give the seconds to wait for the writer lease, 0 or more")
    if problems:
        raise ClipreelError("clipreel extract: " + "; ".join(problems))


def _extract_holding_lease(cfg, sources, sampling, backbone, preprocess, provenance, lease, started: float,
                           progress: bool, in_process: bool) -> ExtractSummary:
    """run_extract's work, while this process holds the store's writer lease."""
    has_work = _videos_to_compute(cfg.out, sources) > 0
    started_ray = ensure_ray(cfg.address) if has_work and not in_process else False
    try:
        store = _open_or_create_store(cfg.out, backbone, provenance, sources, sampling, preprocess, cfg.dtype)
        repairs = _make_consistent(store, cfg)
        _add_new_videos(store, sources)
        manifest, _ = reconcile_statuses(store)
        todo = manifest.index[(manifest["status"] != "done") & ~orphan_mask(manifest)].to_numpy()

        startup_seconds = None
        computed_now = failed_now = 0
        finished: dict[str, dict] = {}  # video_id -> its RESULT_COLUMNS, until merged into storage
        writer_log = WriterLog(cfg.out)
        if len(todo):
            if in_process:
                results = _results_in_process(store, manifest, todo, cfg, backbone, preprocess, sampling)
            else:
                import ray

                started_ray = ensure_ray(cfg.address) or started_ray
                results = _stream_results(store, manifest, todo, cfg, backbone, preprocess, sampling, ray)
            try:
                last_flush, flush_every = time.perf_counter(), MANIFEST_FLUSH_SECONDS
                with progress_bar("extract", len(todo), progress) as advance:
                    for result in results:
                        if startup_seconds is None and result["status"] == "done":
                            startup_seconds = time.perf_counter() - started
                        video_id = manifest.at[int(result["row"]), "video_id"]
                        finished[video_id] = {column: result[column] for column in RESULT_COLUMNS}
                        computed_now += result["status"] == "done"
                        failed_now += result["status"] == "failed"
                        if result["status"] == "done":
                            writer_log.add(result)
                        advance(f"done {computed_now}  failed {failed_now}")
                        if time.perf_counter() - last_flush > flush_every:
                            flush_started = time.perf_counter()
                            _save_results(store, lease, finished)
                            writer_log.save()
                            last_flush = time.perf_counter()
                            # Merging into a big manifest takes a while (1.1 s at a million rows):
                            # keep it under a tenth of the driver's time.
                            flush_every = max(MANIFEST_FLUSH_SECONDS, 10 * (last_flush - flush_started))
            finally:
                _save_results(store, lease, finished)
                if writer_log.writers:
                    writer_log.save()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    lease.ensure_held()
    manifest, _ = reconcile_statuses(store)
    failed = manifest[manifest["status"] == "failed"]
    return ExtractSummary(
        store=str(cfg.out),
        total=len(manifest),
        done=int((manifest["status"] == "done").sum()),
        failed=len(failed),
        computed_now=int(computed_now),
        failed_now=int(failed_now),
        seconds=time.perf_counter() - started,
        startup_seconds=startup_seconds,
        failures=list(zip(failed["video_id"], failed["error"])),
        repairs=repairs,
        orphaned=int(orphan_mask(manifest).sum()),
        writers=writer_log.writers,
        runner="process" if in_process else "ray",
    )


def _runs_in_process(cfg: ExtractConfig, videos: int) -> bool:
    """Whether this run computes its videos in this process rather than in a Ray Data job."""
    if cfg.runner != "auto":
        return cfg.runner == "process"
    return cfg.address is None and videos <= IN_PROCESS_VIDEOS


def _videos_to_compute(path, sources: pd.DataFrame) -> int:
    """How many videos this run computes, known before any model or Ray starts (cheap): the store's
    videos without a done flag, and the videos of `sources` it lacks."""
    if not FeatureStore.exists(path):
        return len(sources)
    store = FeatureStore.open(path)
    manifest, done = store.manifest(), store.done_mask()
    new = int((~sources["video_id"].isin(set(manifest["video_id"]))).sum())
    if len(manifest) != len(done):  # an inconsistent store: this run completes or repairs it first
        return len(manifest) + new
    return int((~done & ~orphan_mask(manifest)).sum()) + new


def _provenance(backbone, sampling: SamplingConfig, preprocess, dtype: str) -> dict:
    """The store's provenance: everything that decides what the stored numbers mean."""
    return {
        **backbone.provenance(),
        "clipreel_version": __version__,
        "frames": sampling.frames,
        "views": sampling.views * preprocess.crops,
        "temporal_views": sampling.views,
        "crops": preprocess.crops,
        "sampling": sampling.to_dict(),
        "preprocess": preprocess.to_dict(),
        "view_order": "view = temporal_view * crops + crop",
        **provenance_entries(dtype, backbone.width),  # dtype, tokens_dtype, attention_dtype, ...
    }


def _open_or_create_store(path, backbone, provenance, sources: pd.DataFrame, sampling, preprocess, dtype: str):
    """Open the store at `path` (refusing different settings), or create it with `sources` as its videos."""
    if FeatureStore.exists(path):
        store = FeatureStore.open(path, mode="r+")
        _refuse_other_settings(path, store.provenance, provenance)
        return store
    layout = StoreLayout(
        videos=len(sources),
        views=sampling.views * preprocess.crops,
        frames=sampling.frames,
        layers=len(backbone.feature_blocks),
        tokens=backbone.tokens,
        width=backbone.width,
        embed_dim=backbone.embed_dim,
        dtype=dtype,
    )
    return FeatureStore.create(path, layout, provenance, sources)


def _refuse_other_settings(path, store_provenance: dict, provenance: dict) -> None:
    """Refuse to add to a store extracted with other settings, naming each."""
    differences = provenance_diff(store_provenance, provenance)
    if differences:
        raise ClipreelError(
            f"{path} was extracted with different settings:\n  - "
            + "\n  - ".join(differences)
            + "\nUse the same settings to resume or add videos, or choose a new --out."
        )


def _make_consistent(store: FeatureStore, cfg: ExtractConfig) -> list[str]:
    """Repair the store (--repair), or complete an interrupted append and recheck (--recheck).

    Returns one line per change, for the summary.
    """
    if cfg.repair:
        return repair_store(store).actions
    grown = complete_append(store)
    changes = [f"completed an interrupted append: {name} grown to {after} rows" for name, (_, after) in grown.items()]
    if cfg.recheck:
        ids = store.manifest()["video_id"]
        for row, problems in recheck(store).items():
            changes.append(f"row {row} ({ids.iloc[row]}) to be extracted again: {'; '.join(problems)}")
    return changes


def _add_new_videos(store: FeatureStore, sources: pd.DataFrame) -> None:
    """Append the videos of `sources` that the store does not have yet (into orphan placeholders first)."""
    known = set(store.manifest()["video_id"])
    new_rows = sources[~sources["video_id"].isin(known)]
    if len(new_rows):
        store.append(new_rows.reset_index(drop=True))


def _save_results(store: FeatureStore, lease: WriterLease, finished: dict[str, dict]) -> None:
    """Merge the finished videos' results into the manifest in storage (if this process still holds
    the lease), then forget them."""
    if not finished:
        return
    lease.ensure_held()
    store.update_manifest(pd.DataFrame([{"video_id": video_id, **columns} for video_id, columns in finished.items()]))
    finished.clear()


def _results_in_process(store, manifest, todo, cfg, backbone, preprocess, sampling):
    """Compute the rows in `todo` in this process with the driver's backbone and yield one status
    dict per video, as the Ray job does: a background thread decodes the next batch (PyAV releases
    the GIL) while the backbone runs on this one; the same writer as the actors' writes each video's
    chunks, done flag last."""
    from clipreel.pipeline.data.decode import make_decoder
    from clipreel.pipeline.data.prefetch import read_ahead
    from clipreel.pipeline.extract_workers import VideoFeatureWriter

    decoder = choose_decoder(cfg.decoder, backbone.device.type)
    decode_in_writer = decoder == "dali"  # DALI decodes on the model's device, in the writer
    writer = VideoFeatureWriter(
        backbone, preprocess, store, make_decoder(decoder, device=backbone.device.type) if decode_in_writer else None,
        writer={"writer_node": IN_PROCESS_NODE, "writer_host": socket.gethostname(), "writer_pid": os.getpid()},
    )
    items = [
        {"row": int(row), "path": manifest.at[row, "path"], "video_id": manifest.at[row, "video_id"],
         "start": float(manifest.at[row, "start"]), "end": float(manifest.at[row, "end"])}
        for row in todo
    ]
    # The first batch is one video: its result is stored after one video's forward, not a batch's.
    starts = [0, *range(1, len(items), cfg.batch_size)]
    batches = (items[start : start + (1 if start == 0 else cfg.batch_size)] for start in starts)
    decoded = (_numpy_batch([decode_video(item, sampling=sampling.to_dict(), decode=not decode_in_writer)
                             for item in batch]) for batch in batches)
    for batch in read_ahead(decoded, depth=1, name="clipreel-decode"):
        written = writer(batch)
        for i in range(len(written["row"])):
            yield {key: values[i] for key, values in written.items()}


def _numpy_batch(items: list[dict]) -> dict:
    """decode_video's results as one batch of numpy columns, as Ray Data hands them to the actors
    (the frames, whose shapes differ between videos, in an object array)."""
    batch = {}
    for key in items[0]:
        if key == "frames":
            batch[key] = np.empty(len(items), dtype=object)
            for i, item in enumerate(items):
                batch[key][i] = item[key]
        else:
            batch[key] = np.array([item[key] for item in items])
    return batch


# How often a backbone actor of a multi-node extraction is started again after its node is lost.
ACTOR_RESTARTS_ON_A_CLUSTER = 3


def _stream_results(store, manifest, todo, cfg, backbone, preprocess, sampling, ray):
    """Build the Ray Data pipeline over the rows in `todo` and yield one status dict per video."""
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from clipreel.pipeline.extract_workers import ExtractActor

    quiet_ray_data(DataContext.get_current())

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = cfg.workers or (gpus if gpus else max(1, cpus))
    on_a_cluster = sum(1 for node in ray.nodes() if node["Alive"]) > 1
    items = [
        {"row": int(row), "path": manifest.at[row, "path"], "video_id": manifest.at[row, "video_id"],
         "start": float(manifest.at[row, "start"]), "end": float(manifest.at[row, "end"])}
        for row in todo
    ]
    # Where frames are decoded: in the backbone actors with DALI (its pipelines are expensive to
    # build: each actor builds one, NVDEC on its GPU) and on CPU-only clusters (where the actors
    # hold every CPU); in CPU tasks ahead of the GPU actors otherwise. Tasks that only probe and
    # sample ask for no CPU, so they run next to actors that hold them all.
    decoder = choose_decoder(cfg.decoder, "cuda" if gpus else "cpu")  # auto: DALI on GPU clusters
    decode_in_actor = decoder == "dali" or not gpus
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * workers))
    dataset = dataset.map(
        decode_video,
        fn_kwargs={"sampling": sampling.to_dict(), "decode": not decode_in_actor},
        compute=TaskPoolStrategy(size=workers) if decode_in_actor else None,
        num_cpus=0 if decode_in_actor else 1,
    )
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts only among the `ray_remote_args` it marks deprecated (for
        # 2.64) and has no named parameter for it yet.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        dataset = dataset.map_batches(
            ExtractActor,
            fn_constructor_kwargs={
                "store_access": StoreAccess.of(store_location(cfg.out)),
                "backbone": asdict(backbone.config),
                "preprocess": preprocess.to_dict(),
                "decoder": decoder if decode_in_actor else None,
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=0 if gpus else 1,
            num_gpus=1 if gpus else 0,
            # On one machine an actor that dies ends the job (re-running the same command computes
            # only the videos not stored yet): it died of this machine's memory or of a bug, and a
            # restart would die the same way. Ray Data hands its actors their constructor arguments
            # through the object store, and Ray prints an error line for every such actor that may
            # restart (ray-project/ray#53727), so one machine allows none. On a cluster a node
            # can be lost on its own (preempted, rebooted): its actors are started again
            # elsewhere, a few times, and their batches retried.
            max_restarts=ACTOR_RESTARTS_ON_A_CLUSTER if on_a_cluster else 0,
            max_task_retries=ACTOR_RESTARTS_ON_A_CLUSTER if on_a_cluster else 0,
        )
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["row"])):
                yield {key: values[i] for key, values in batch.items()}
    except ray.exceptions.RayActorError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipreelError(
            f"a backbone worker of the extraction died ({reason}). The videos stored so far are kept: "
            "run the same command again to compute the others (fewer --workers or a smaller --batch-size "
            "if it ran out of memory)."
        ) from None
