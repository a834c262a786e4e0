"""The `clipreel` command line. Thin: each command parses its options, calls one pipeline function and
prints what it returns. The options several commands share are declared once, in `cli_options`.

May import: typer, rich, clipreel.errors, clipreel.cli_options, and (inside each command) the one
pipeline or stores function it calls.
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from clipreel import cli_options as options
from clipreel.errors import ClipreelError

app = typer.Typer(
    help="Video recognition on frozen CLIP features: extract once into a Zarr cache, train cheap heads, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write videos/, videos.csv, labels.txt and captions.csv into."),
    classes: int = typer.Option(8, help="Number of classes; they come in pairs that differ only in frame order."),
    videos_per_class: int = typer.Option(10, help="Videos per class (split ~60/20/20 into train/val/test)."),
    frames: int = typer.Option(32, help="Frames per video."),
    size: int = typer.Option(128, help="Frame width and height in pixels (even)."),
    codec: str = typer.Option("h264", help="h264 (.mp4), vp9 (.webm) or mjpeg (.avi)."),
    fps: int = typer.Option(25, help="Frames per second written into the files."),
    seed: int = typer.Option(0, help="The same seed gives byte-identical videos."),
    motions: str = typer.Option("horizontal,vertical,size,rotation", help="Kinds of change the pairs cycle through, comma-separated: horizontal, vertical, size, rotation, colour."),
) -> None:
    """Write the built-in synthetic world: shapes and colours that move, grow, turn (or change colour)."""
    from clipreel.pipeline.data.synth.world import SynthConfig, make_world

    cfg = SynthConfig(
        classes=classes, videos_per_class=videos_per_class, frames=frames, size=size, codec=codec, fps=fps, seed=seed,
        motions=tuple(part.strip() for part in motions.split(",") if part.strip()),
    )
    videos_csv = make_world(out_dir, cfg, progress=True)
    console.print(f"wrote {classes * videos_per_class} videos; list: [bold]{videos_csv}[/]")


@app.command()
def extract(
    videos: str = typer.Option(..., help="Video list: CSV (path,label[,label_name][,split]), 'path label' list, Kinetics CSV, or a folder per class."),
    out: str = typer.Option(..., help="The feature store to create or complete: a folder (NAME.zarr) or a URL (s3://bucket/NAME.zarr, gs://…)."),
    model: str = options.MODEL,
    pretrained: str = options.PRETRAINED,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    frames: int = typer.Option(8, help="Frames per clip (T)."),
    views: int = typer.Option(1, help="Temporal views per video (V)."),
    sampling: str = typer.Option("tsn", help="tsn (segment centres), dense (T frames at --stride, EVL), or uniform."),
    stride: int = typer.Option(16, help="Frame stride for --sampling dense."),
    layers: str = typer.Option("4", help="Blocks to tap: N = the last N, or explicit indices like 3,7,11."),
    norm: Optional[str] = typer.Option(None, help="clip or imagenet mean/std (default: the model's own, CLIP)."),
    crops: int = typer.Option(1, help="1 = centre crop, 3 = three crops along the long side (each a view)."),
    seed: int = typer.Option(0, help="Seed of the frame sampling."),
    decoder: str = typer.Option("auto", help="auto (DALI on GPU, else PyAV), pyav, or dali (DALI-CPU: VP8/VP9/MJPEG only)."),
    batch_size: int = typer.Option(4, help="Videos per backbone batch."),
    dtype: str = typer.Option("float16", help="How the store keeps tokens and attention maps: float16, int8 (half the bytes; 8-bit codes with float16 scales) or float8 (E4M3 codes). Fixed per store."),
    runner: str = typer.Option("auto", help="Where the backbone runs: process (this one, no Ray), ray (a Ray Data job: actors, a cluster with --address), or auto (this process for up to 32 videos to compute without --address, else Ray)."),
    workers: Optional[int] = typer.Option(None, help="Backbone actors of a Ray job (default: one per GPU, else one per CPU)."),
    address: Optional[str] = typer.Option(None, help=options.ADDRESS_HELP),
    root: Optional[Path] = typer.Option(None, help="Folder that relative paths in the list are under (default: the list's folder)."),
    labels: Optional[Path] = typer.Option(None, help="Label map: one class name per line (line i = label i)."),
    skip_missing: bool = typer.Option(False, help="Record missing files as failed instead of refusing the list."),
    progress: bool = options.PROGRESS,
    wait: float = typer.Option(0.0, help="Seconds to wait when another process holds the store's writer lease (default: refuse at once)."),
    force: bool = typer.Option(False, help="Take over the store's writer lease if it has expired (its holder stopped renewing it)."),
    recheck: bool = typer.Option(False, help="Verify every done video first and compute again those that fail (missing or damaged chunks, NaN/inf)."),
    repair: bool = typer.Option(False, help="Repair the store first, as `clipreel verify --repair` does (includes --recheck)."),
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Extract multi-layer CLIP features of every video into a Zarr store (resumable; bad files are recorded, not fatal)."""
    from clipreel.pipeline.extract import ExtractConfig, run_extract
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, out)
    cfg = ExtractConfig(
        videos=videos, out=out, model=model, pretrained=pretrained, layers=layers, norm=norm, frames=frames,
        views=views, sampling=sampling, stride=stride, crops=crops, seed=seed, decoder=decoder, batch_size=batch_size,
        workers=workers, address=address, root=str(root) if root else None, labels=str(labels) if labels else None,
        skip_missing=skip_missing, wait=wait, force=force, recheck=recheck, repair=repair,
        trust_checkpoint_code=trust_checkpoint_code, dtype=dtype, runner=runner,
    )
    summary = run_extract(cfg, progress=progress)
    for change in summary.repairs:
        console.print(f"repaired: {change}", highlight=False, soft_wrap=True)
    startup = f" ({summary.startup_seconds:.1f} to the first stored video)" if summary.startup_seconds else ""
    console.print(f"extract → {summary.store}", highlight=False)
    console.print(f"  videos   {summary.total}", highlight=False)
    where = {"process": "in this process", "ray": "by a Ray job"}[summary.runner]
    console.print(f"  done     {summary.done} ({summary.computed_now} computed now, {where})", highlight=False)
    console.print(f"  failed   {summary.failed}", highlight=False)
    console.print(f"  seconds  {summary.seconds:.1f}{startup}", highlight=False)
    if summary.orphaned:
        console.print(f"  {summary.orphaned} orphan placeholder row(s) wait for videos not yet in the store", highlight=False)
    for video_id, error in summary.failures[:20]:
        console.print(f"[red]failed[/] {video_id}: {error}")
    if summary.failed:
        console.print(f"[red]{summary.failed} video(s) failed[/]; their errors are in the store's manifest.")
        raise typer.Exit(1)


@app.command()
def info(store: str = typer.Argument(..., help="A feature store (NAME.zarr, or a URL)."),
         as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
         storage_option: list[str] = options.STORAGE_OPTION) -> None:
    """Summarise a feature store: videos done/failed/pending, shapes, bytes, provenance."""
    from clipreel.stores.features import FeatureStore, summarize
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, store)
    summary = summarize(FeatureStore.open(store))
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=str(store), show_header=False)
    for key in ("videos", "done", "failed", "pending", "manifest_rows", "orphaned", "schema_version", "clipreel_version"):
        table.add_row(key, str(summary[key]))
    lease = summary["writer_lease"]
    table.add_row("writer lease", "never taken" if lease is None else f"{lease['state']}: {lease['description']}")
    for name, array in summary["arrays"].items():
        table.add_row(f"array {name}", f"{tuple(array['shape'])} {array['dtype']}, chunks {tuple(array['chunks'])}")
    table.add_row("bytes on disk", f"{summary['bytes_on_disk']:,} ({summary['bytes_on_disk'] / 2**30:.2f} GiB)")
    table.add_row("bytes per video", f"{summary['bytes_per_video']:,}")
    console.print(table)
    provenance = Table(title="provenance", show_header=False)
    for key, value in summary["provenance"].items():
        provenance.add_row(key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    console.print(provenance)


@app.command()
def verify(
    store: str = typer.Argument(..., help="A feature store (NAME.zarr, or a URL)."),
    repair: bool = typer.Option(False, help="Make the store consistent (holding its writer lease): restore lost manifest rows, and mark every video that fails the checks not done, for extract to compute again."),
    force: bool = typer.Option(False, help="With --repair: take over the store's writer lease if it has expired."),
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Check every done video's data: present, finite, consistent with the manifest. Exits 1 naming each problem."""
    from clipreel.stores.features import FeatureStore
    from clipreel.stores.features import verify as verify_store
    from clipreel.stores.location import apply_storage_option_items
    from clipreel.stores.repair import repair_store_at

    apply_storage_option_items(storage_option, store)
    if force and not repair:
        raise ClipreelError("clipreel verify: --force takes over the writer lease for --repair; give both, or neither")
    if repair:
        report, problems = repair_store_at(store, force=force)
        for action in report.actions or ["nothing to repair"]:
            console.print(f"repaired: {action}", highlight=False, soft_wrap=True)
    else:
        problems = verify_store(FeatureStore.open(store))
    if problems:
        for problem in problems:
            console.print(f"[red]✗[/] {problem}")
        console.print(f"[red]{len(problems)} problem(s) in {store}[/]")
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {store} verifies")


@app.command()
def copy(
    source: str = typer.Argument(..., help="The store to copy: a folder (NAME.zarr) or a URL (s3://bucket/NAME.zarr, …)."),
    destination: str = typer.Argument(..., help="Where the copy goes: a folder or a URL. Run again to resume or update it."),
    check_values: bool = typer.Option(False, help="Also read every done video of the copy and check its values (as verify does)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Copy a feature store between any two locations (local ↔ object store), resumably, then check the copy."""
    from clipreel.pipeline.progress import progress_to
    from clipreel.stores.copy import copy_store
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, source, destination)
    with progress_to("copy", progress) as update:
        report = copy_store(source, destination, check_values=check_values,
                            progress=lambda done, total, size: update(done, total, f"{size / 1e6:,.0f} MB copied"))
    console.print(f"copy {report.source} → {report.destination}", highlight=False)
    console.print(f"  objects  {report.objects} ({report.copied} copied, {report.skipped} already there, "
                  f"{len(report.deleted)} deleted)", highlight=False)
    console.print(f"  copied   {report.copied_bytes / 1e6:,.1f} MB", highlight=False)
    if report.problems:
        for problem in report.problems:
            console.print(f"[red]✗[/] {problem}")
        console.print(f"[red]{len(report.problems)} problem(s) in the copy[/]")
        raise typer.Exit(1)
    console.print("[green]✓[/] the copy has every object of the source and verifies", highlight=False)


@app.command()
def manifest(
    videos: str = typer.Argument(..., help="Video list or folder (same formats as extract --videos)."),
    out: str = typer.Argument(..., help="Parquet file to write (a path or a URL)."),
    root: Optional[Path] = typer.Option(None, help="Folder that relative paths are under."),
    labels: Optional[Path] = typer.Option(None, help="Label map: one class name per line."),
    skip_missing: bool = typer.Option(False, help="Record missing files as failed instead of refusing the list."),
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Read a video list and write its Parquet manifest (what extract does first), to check a list."""
    from clipreel.pipeline.data.sources import read_sources
    from clipreel.stores.location import apply_storage_option_items
    from clipreel.stores.manifest import status_counts, write_manifest

    apply_storage_option_items(storage_option, out)
    table = read_sources(videos, root=root, label_map=labels, skip_missing=skip_missing)
    write_manifest(table, out)
    console.print(f"{len(table)} videos → {out}  {status_counts(table)}")


@app.command()
def train(
    head: str = typer.Argument(..., help=options.HEAD_HELP),
    store: str = typer.Option(..., help="Feature store to train from (written by clipreel extract): a folder or a URL."),
    out: Path = typer.Option(..., help="Run directory; re-running the same command resumes it."),
    split: str = typer.Option("train", help="Manifest split to train on."),
    val_split: str = typer.Option("val", help="Split to validate on after each epoch ('' for none; a store "
                                              "without a 'val' split trains without validation)."),
    epochs: int = typer.Option(10, help="Passes over the training videos."),
    lr: Optional[float] = options.LR,
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default: the head's recipe)."),
    batch_size: int = typer.Option(16, help="Videos per step (over all workers)."),
    accumulate: int = typer.Option(1, help="Steps whose gradients are summed before each update."),
    warmup_epochs: Optional[int] = typer.Option(None, help="Linear warm-up epochs before the cosine decay."),
    label_smoothing: float = typer.Option(0.0, help="Cross-entropy label smoothing (X-CLIP/ViFi-CLIP: 0.1)."),
    seed: int = options.SEED,
    option: list[str] = options.OPTION,
    store_checkpoint: Optional[str] = options.STORE_CHECKPOINT,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    classes: Optional[Path] = options.CLASSES,
    device: str = options.DEVICE,
    workers: int = typer.Option(1, help="Data-parallel workers; more than 1 trains through Ray Train (one GPU each)."),
    address: Optional[str] = typer.Option(None, help="With --workers > 1: " + options.ADDRESS_HELP),
    start: Optional[Path] = typer.Option(None, help="A run of the same head (trained, or an imported EVL) whose weights the training starts from."),
    progress: bool = options.PROGRESS,
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Train a head from the feature cache (the backbone never runs): weights, config, log and plot in OUT."""
    from clipreel.pipeline.train import TrainConfig, run_training
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, store)
    summary = run_training(TrainConfig(
        kind=head, store=store, out=str(out), split=split, val_split=val_split or None, epochs=epochs, lr=lr,
        weight_decay=weight_decay, batch_size=batch_size, accumulate=accumulate, warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing, seed=seed, options=options.parse_options(option),
        store_checkpoint=store_checkpoint, trust_checkpoint_code=trust_checkpoint_code,
        classes=str(classes) if classes else None, device=device, workers=workers, address=address,
        start=str(start) if start else None,
    ), progress=progress)
    console.print(f"train {summary.kind} → {summary.run_dir}", highlight=False)
    console.print(f"  epochs       {summary.epochs} (resumed after {summary.resumed_from_epoch})", highlight=False)
    console.print(f"  videos       {summary.train_videos} train, {summary.val_videos} val", highlight=False)
    if summary.train_loss is not None:
        console.print(f"  train        loss {summary.train_loss:.4f}, top-1 {summary.train_acc:.3f}", highlight=False)
    if summary.val_top1 is not None:
        console.print(f"  val top-1    {summary.val_top1:.3f} (best {summary.best_val_top1:.3f})", highlight=False)
    console.print(f"  seconds      {summary.seconds:.1f}", highlight=False)


@app.command()
def finetune(
    method: str = typer.Argument(..., help=options.METHOD_HELP),
    videos: str = typer.Option(..., help="Video list (same formats as extract --videos); its train/val splits are used."),
    out: Path = typer.Option(..., help="Run directory; re-running the same command resumes it."),
    model: str = options.MODEL,
    pretrained: str = options.PRETRAINED,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    epochs: int = typer.Option(10, help="Passes over the training videos."),
    lr: Optional[float] = options.LR,
    batch_size: int = typer.Option(8, help="Clips per micro-batch."),
    accumulate: int = typer.Option(1, help="Micro-batches whose gradients are summed before each update (X-CLIP: 4)."),
    frames: int = options.FRAMES,
    mixup: bool = typer.Option(False, help="Mixup/cutmix with soft targets (X-CLIP / ViFi-CLIP recipe)."),
    augment: list[str] = options.AUGMENT,
    workers: int = options.DECODE_WORKERS_OPTION,
    decoder: str = options.DECODER,
    loader: str = options.LOADER,
    address: Optional[str] = typer.Option(None, help="With --loader ray: " + options.ADDRESS_HELP),
    seed: int = options.SEED,
    option: list[str] = options.OPTION,
    device: str = options.DEVICE,
    on_bad_video: str = options.ON_BAD_VIDEO,
    progress: bool = options.PROGRESS,
) -> None:
    """Fine-tune or prompt the backbone itself on raw frames (prints the trainable-parameter count first)."""
    from clipreel.pipeline.finetune import FinetuneConfig, run_finetune

    summary = run_finetune(FinetuneConfig(
        method=method, videos=videos, out=str(out), model=model, pretrained=pretrained, epochs=epochs, lr=lr,
        batch_size=batch_size, accumulate=accumulate, frames=frames, mixup=mixup,
        augment=options.parse_options(augment, "--augment"), workers=workers, decoder=decoder, loader=loader,
        address=address, seed=seed, options=options.parse_options(option), device=device,
        trust_checkpoint_code=trust_checkpoint_code, on_bad_video=on_bad_video,
    ), progress=progress)
    console.print(f"finetune {summary.method} → {summary.run_dir}", highlight=False)
    console.print(f"  trainable    {summary.trainable_parameters:,} parameters", highlight=False)
    console.print(f"  epochs       {summary.epochs} (resumed after {summary.resumed_from_epoch})", highlight=False)
    if summary.val_top1 is not None:
        console.print(f"  val top-1    {summary.val_top1:.3f} (best {summary.best_val_top1:.3f})", highlight=False)
    if summary.skipped_videos:
        console.print(f"  skipped      {summary.skipped_videos} video(s) that cannot be decoded: "
                      f"{Path(summary.run_dir) / 'skipped.csv'}", highlight=False)
    console.print(f"  seconds      {summary.seconds:.1f}", highlight=False)


@app.command(name="eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A run directory written by clipreel train or clipreel finetune."),
    store: Optional[str] = typer.Option(None, help="Feature store (folder or URL) to evaluate a `train` run on (same model/frames/blocks/norm)."),
    videos: Optional[str] = typer.Option(None, help="Video list to evaluate a `finetune` run on, from raw frames."),
    split: str = options.SPLIT,
    views: Optional[int] = typer.Option(None, help="Raw videos: temporal views per video (default: an imported run's reference test, else 1)."),
    crops: Optional[int] = typer.Option(None, help="Raw videos: spatial crops per view, 1 or 3 (default: an imported run's reference test, else 1)."),
    report: Optional[Path] = typer.Option(None, help="JSON report path (default: RUN_DIR/eval-SPLIT.json); the confusion PNG goes next to it."),
    store_checkpoint: Optional[str] = options.STORE_CHECKPOINT,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    classes: Optional[Path] = options.CLASSES,
    batch_size: int = typer.Option(8, help="Videos per batch (all their views at once)."),
    workers: int = options.DECODE_WORKERS_OPTION,
    decoder: str = options.DECODER,
    loader: str = options.LOADER,
    device: str = options.DEVICE,
    on_bad_video: str = options.ON_BAD_VIDEO,
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Score a trained run on a held-out split: top-1/top-5, mean class accuracy, per class, confusion matrix.

    Heads trained from the cache (`clipreel train`) are scored on a feature store (--store);
    fine-tuned models (`clipreel finetune`) on raw videos (--videos).
    """
    from clipreel.pipeline.evaluate import EvalConfig, evaluate
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, store)
    scores, path = evaluate(EvalConfig(
        run=str(run_dir), store=store, videos=videos, split=split,
        report=str(report) if report else None, store_checkpoint=store_checkpoint,
        trust_checkpoint_code=trust_checkpoint_code, classes=str(classes) if classes else None, views=views,
        crops=crops, batch_size=batch_size, workers=workers, decoder=decoder, loader=loader, device=device,
        on_bad_video=on_bad_video,
    ))
    if scores["classes_matched_by_name"]:
        console.print("classes matched by name: the labels number the run's classes otherwise", highlight=False)
    if scores.get("skipped_videos"):
        console.print(f"skipped {len(scores['skipped_videos'])} video(s) that cannot be decoded (listed in the "
                      "report)", highlight=False)
    _print_scores(f"eval {scores['kind']} on {split}", scores, path)


@app.command()
def zeroshot(
    store: Optional[str] = typer.Option(None, help="Feature store (folder or URL) whose projected frame embeddings are scored."),
    videos: Optional[str] = typer.Option(None, help="Video list scored from raw frames, by --method (untrained) or --run."),
    method: Optional[str] = typer.Option(None, help="With --videos: an untrained raw-frame method (where `finetune` starts; `clipreel finetune --help` lists them)."),
    run: Optional[Path] = typer.Option(None, help="With --videos: a `finetune` run, scored among the list's classes (zero-shot transfer)."),
    split: str = options.SPLIT,
    classes: Optional[Path] = typer.Option(None, help="Class list (one name per line): restricts or renames the classes."),
    template: str = typer.Option("ensemble", help="--store: template set (none, photo, video, ensemble) or a literal like 'a video of {}.'."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report (and confusion PNG) here."),
    store_checkpoint: Optional[str] = options.STORE_CHECKPOINT,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    model: str = options.MODEL,
    pretrained: str = options.PRETRAINED,
    frames: int = options.FRAMES,
    views: int = options.VIEWS,
    option: list[str] = options.OPTION,
    workers: int = options.DECODE_WORKERS_OPTION,
    device: str = options.DEVICE,
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """Zero-shot: class names as text, no training on these classes.

    From a store (--store): CLIP's frame-mean embeddings against the class texts. From raw videos
    (--videos): an untrained method model (--method), or a fine-tuned run (--run) classifying among
    the list's own classes, as X-CLIP and ViFi-CLIP test zero-shot transfer.
    """
    from clipreel.pipeline.evaluate import ZeroShotEvalConfig, zero_shot
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, store)
    scores = zero_shot(ZeroShotEvalConfig(
        store=store, videos=videos, method=method, run=str(run) if run else None,
        split=split, classes=str(classes) if classes else None, template=template,
        report=str(report) if report else None, store_checkpoint=store_checkpoint,
        trust_checkpoint_code=trust_checkpoint_code, model=model,
        pretrained=pretrained, frames=frames, views=views, options=options.parse_options(option), workers=workers,
        device=device,
    ))
    _print_scores(f"zero-shot {method or run or 'CLIP'} on {split}", scores, report)


@app.command()
def fewshot(
    head: str = typer.Argument(..., help=options.HEAD_OR_METHOD_HELP),
    store: Optional[str] = options.PROTOCOL_STORE,
    videos: Optional[str] = options.PROTOCOL_VIDEOS,
    out: Path = options.PROTOCOL_OUT,
    shots: str = typer.Option("2,4,8,16", help="Videos per class K, comma-separated."),
    seeds: str = options.SEEDS,
    epochs: int = typer.Option(50, help="Epochs per run (X-CLIP / ViFi-CLIP few-shot: 50)."),
    lr: Optional[float] = options.LR,
    option: list[str] = options.OPTION,
    store_checkpoint: Optional[str] = options.STORE_CHECKPOINT,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    model: str = options.MODEL,
    pretrained: str = options.PRETRAINED,
    frames: int = options.FRAMES,
    batch_size: Optional[int] = options.PROTOCOL_BATCH_SIZE,
    augment: list[str] = options.AUGMENT,
    workers: int = options.DECODE_WORKERS_OPTION,
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """The few-shot protocol: K videos per class, several seeded draws, test top-1 averaged."""
    from clipreel.pipeline.protocols import few_shot
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, store)
    few_shot(head, options.protocol_source(store, videos), out, shots=options.numbers(shots, "--shots"),
             seeds=options.numbers(seeds, "--seeds"), epochs=epochs, lr=lr, batch_size=batch_size,
             options=options.parse_options(option), store_checkpoint=store_checkpoint,
             finetune=options.raw_settings(model, pretrained, frames, augment, workers),
             trust_code=trust_checkpoint_code, console=console)


@app.command()
def base2novel(
    head: str = typer.Argument(..., help=options.TEXT_HEAD_OR_METHOD_HELP),
    store: Optional[str] = options.PROTOCOL_STORE,
    videos: Optional[str] = options.PROTOCOL_VIDEOS,
    out: Path = options.PROTOCOL_OUT,
    shots: int = typer.Option(16, help="Training videos per base class."),
    seeds: str = options.SEEDS,
    base_classes: Optional[str] = typer.Option(None, help="Base classes, ids or names, comma-separated (default: the first half)."),
    epochs: int = typer.Option(11, help="Epochs per run (ViFi-CLIP base-to-novel: 11)."),
    lr: Optional[float] = options.LR,
    option: list[str] = options.OPTION,
    store_checkpoint: Optional[str] = options.STORE_CHECKPOINT,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    model: str = options.MODEL,
    pretrained: str = options.PRETRAINED,
    frames: int = options.FRAMES,
    batch_size: Optional[int] = options.PROTOCOL_BATCH_SIZE,
    augment: list[str] = options.AUGMENT,
    workers: int = options.DECODE_WORKERS_OPTION,
    storage_option: list[str] = options.STORAGE_OPTION,
) -> None:
    """The base-to-novel protocol: train on base classes, score base and novel classes, harmonic mean."""
    from clipreel.pipeline.protocols import base_to_novel
    from clipreel.stores.location import apply_storage_option_items

    apply_storage_option_items(storage_option, store)
    base = None
    if base_classes:
        base = [int(part) if part.strip().isdigit() else part.strip() for part in base_classes.split(",")]
    base_to_novel(head, options.protocol_source(store, videos), out, shots=shots,
                  seeds=options.numbers(seeds, "--seeds"), base_classes=base, epochs=epochs, lr=lr,
                  batch_size=batch_size, options=options.parse_options(option),
                  store_checkpoint=store_checkpoint,
                  finetune=options.raw_settings(model, pretrained, frames, augment, workers),
                  trust_code=trust_checkpoint_code, console=console)


@app.command("import")
def import_checkpoint(
    checkpoint: Path = typer.Argument(..., help="The released checkpoint (e.g. k400_vitb16_8f_dec4x768.pth, k400_32_8.pth), or a transformers X-CLIP model folder."),
    method: str = typer.Option(..., help="evl, xclip (original or transformers layout), vifi (fine-tuned ViFi-CLIP), prompt (ViFi-CLIP bridge-and-prompt) or ezclip."),
    out: Path = typer.Option(..., help="The run directory to create."),
    clip: Optional[Path] = typer.Option(None, help="The CLIP the method was trained from (an OpenAI archive such as ViT-B-16.pt, an OpenAI-layout state dict, or an open_clip checkpoint): needed by evl, vifi and prompt."),
    classes: Optional[Path] = typer.Option(None, help="The class list in class order: one name per line, a JSON list, the method's label CSV (id,name), or EZ-CLIP's description CSV."),
    model: Optional[str] = typer.Option(None, help="The open_clip model the checkpoint was trained with (default: read from the tensors; attention heads width / 64)."),
    frames: Optional[int] = typer.Option(None, help="Frames per clip, where the checkpoint does not fix it (ViFi-CLIP: default 32)."),
    trust_checkpoint_code: bool = options.TRUST_CODE,
) -> None:
    """Import a released EVL, X-CLIP, ViFi-CLIP or EZ-CLIP checkpoint as a run: eval, zeroshot, predict and training accept it."""
    from clipreel.pipeline.importing import ImportConfig, run_import

    summary = run_import(ImportConfig(
        checkpoint=str(checkpoint), method=method, out=str(out), clip=str(clip) if clip else None,
        classes=str(classes) if classes else None, model=model, frames=frames,
        trust_checkpoint_code=trust_checkpoint_code,
    ))
    console.print(f"import {summary.method} → {summary.run_dir} (a {summary.kind} run, {summary.classes} classes)", highlight=False)
    facts = ", ".join(f"{key} {value}" for key, value in summary.facts.items() if not isinstance(value, (list, dict)))
    console.print(f"  from the tensors: {facts}", highlight=False, soft_wrap=True)
    for convention in summary.conventions:
        console.print(f"  - {convention}", highlight=False, soft_wrap=True)
    if summary.kind != "evl":
        console.print(f"  its CLIP is open_clip model {summary.model}: train from it with --pretrained {summary.run_dir} "
                      f"--model {summary.model}", highlight=False, soft_wrap=True)


@app.command()
def predict(
    videos: Optional[list[Path]] = typer.Argument(None, help="Video files to classify."),
    video_list: Optional[str] = typer.Option(None, "--videos", help="A video list (same formats as extract --videos; start,end columns sample inside a segment)."),
    run: Optional[Path] = typer.Option(None, help="A run directory (train, finetune or import); without it, zero-shot CLIP of --model/--pretrained."),
    classes: Optional[str] = typer.Option(None, help="The classes to choose among: 'a,b,c' or a class list file (default: the run's). Closed-set runs take only their own."),
    top: int = typer.Option(5, help="Classes shown per video."),
    views: Optional[int] = typer.Option(None, help="Temporal views per video (default: the run's test setting)."),
    crops: Optional[int] = typer.Option(None, help="Spatial crops per view, 1 or 3 (default: the run's test setting)."),
    frames: Optional[int] = typer.Option(None, help="Frames per clip (default: the run's; zero-shot CLIP: 8)."),
    sampling: Optional[str] = typer.Option(None, help="tsn, dense or uniform (default: the run's)."),
    stride: Optional[int] = typer.Option(None, help="Frame stride of --sampling dense (default: the run's)."),
    short_side: Optional[int] = typer.Option(None, help="Resize the short side to N pixels before the centre crop (default: the run's)."),
    start: Optional[float] = typer.Option(None, help="Seconds: sample inside the segment from here (every video)."),
    end: Optional[float] = typer.Option(None, help="Seconds: sample inside the segment up to here (every video)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every class's probability and raw score per video here."),
    model: str = options.MODEL,
    pretrained: str = options.PRETRAINED,
    template: str = typer.Option("ensemble", help="Zero-shot CLIP: template set (none, photo, video, ensemble) or a literal like 'a video of {}.'."),
    store_checkpoint: Optional[str] = options.STORE_CHECKPOINT,
    trust_checkpoint_code: bool = options.TRUST_CODE,
    decoder: str = options.DECODER,
    device: str = options.DEVICE,
) -> None:
    """What happens in these videos? The top classes of each, from a run or zero-shot CLIP (exit 1 if a video failed)."""
    from clipreel.pipeline.predict import PredictConfig, predict as run_predict

    predictions = run_predict(PredictConfig(
        videos=[str(video) for video in videos or []], video_list=video_list, run=str(run) if run else None,
        model=model, pretrained=pretrained, template=template, classes=classes, top=top, frames=frames,
        sampling=sampling, stride=stride, views=views, crops=crops, short_side=short_side, start=start, end=end,
        json=str(json_path) if json_path else None, store_checkpoint=store_checkpoint,
        trust_checkpoint_code=trust_checkpoint_code, decoder=decoder, device=device,
    ))
    for video in predictions.videos:
        segment = "" if video.start is None and video.end is None else f"  [{video.start or 0:g} s .. {'end' if video.end is None else f'{video.end:g} s'}]"
        if video.error is not None:
            console.print(f"[red]error[/] {video.error}", highlight=False, soft_wrap=True)
            continue
        console.print(f"[bold]{video.path}[/]{segment}", highlight=False, soft_wrap=True)
        table = Table(show_header=False)
        for name, probability in video.top(predictions.classnames, top):
            table.add_row(f"{probability:.3f}", name)
        console.print(table)
    done = len(predictions.videos) - len(predictions.failed)
    console.print(f"{done} video(s) predicted by {predictions.source} in {predictions.seconds:.1f} s "
                  f"({predictions.startup_seconds:.1f} s start-up)", highlight=False)
    if json_path:
        console.print(f"json → {json_path}", highlight=False)
    if predictions.failed:
        console.print(f"[red]{len(predictions.failed)} video(s) failed[/]")
        raise typer.Exit(1)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A ViFi-CLIP run (finetune vifi, or an import of a fine-tuned ViFi-CLIP)."),
    out: Path = typer.Option(..., help="The open_clip checkpoint to write (FILE.safetensors; its config goes to FILE.json)."),
) -> None:
    """Write a fine-tuned model that is still a plain CLIP as an open_clip checkpoint (other methods are refused with the reason)."""
    from clipreel.pipeline.exporting import export_run

    weights, config = export_run(run_dir, out)
    console.print(f"export → {weights} (open_clip config {config}: open_clip.add_model_config('{config}'); "
                  f"open_clip.create_model('{config.stem}', pretrained='{weights}'))", highlight=False, soft_wrap=True)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), help="Folder for the demo's videos, store and results.")) -> None:
    """Run the whole pipeline on the built-in synthetic world with a tiny model, offline, on CPU."""
    from clipreel.pipeline.demo import run_demo

    run_demo(out, console)


def _print_scores(title: str, scores: dict, path) -> None:
    """One line of metrics, and where the report went."""
    console.print(
        f"{title}: top-1 {scores['top1']:.4f}  top-{scores['top5_k']} {scores['top5']:.4f}  "
        f"mean class {scores['mean_class_acc']:.4f}  ({scores['n']} videos x {scores['views']} views)",
        highlight=False,
    )
    if path is not None:
        console.print(f"report → {path}", highlight=False)


def main() -> None:
    """Entry point: user-fixable problems print one clear message and exit 2."""
    # What a command imports (torch, open_clip, ...) is millions of objects, which the interpreter's
    # garbage collections at exit would walk (~2 s) to free memory that the process gives back
    # anyway: at exit, after the atexit handlers registered later, they are frozen, which leaves
    # them out of every collection.
    atexit.register(gc.freeze)
    try:
        app()
    except ClipreelError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
