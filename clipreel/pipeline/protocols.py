"""The papers' transfer protocols: few-shot and base-to-novel, for cache heads and fine-tuning methods.

- **Few-shot** (X-CLIP, ViFi-CLIP: their few-shot configs): for each K in `shots` and each seed,
  draw K training videos per class (seeded, without replacement), train on them, and score on the
  whole test split. Reported per K: the mean and standard deviation of top-1 over the seeds, and
  every run's numbers.
- **Base-to-novel** (ViFi-CLIP, EZ-CLIP: their base-to-novel configs): split the classes into base
  and novel (default: the first half of the class ids are base, as ViFi-CLIP's splits take half).
  Train on K-shot videos of the base classes only, then score the test videos of the base classes
  among the base class names, and the test videos of the novel classes among the novel class
  names, never seen in training. Only models that classify against class-name text can do the
  second part: the cache heads that score against class text, and every fine-tuning method.
  Reported: base, novel and their harmonic mean HM = 2·B·N / (B + N), of the means over the seeds
  (as the papers' tables), and per seed.
- Zero-shot on a class list is `evaluate.zero_shot_store(..., classes_file=...)` from a store, and
  `evaluate.zero_shot_raw` / `evaluate_raw_run(..., classes=...)` from raw videos.

Where the videos are decides how a run trains on just the drawn ones (`protocol_videos`):

- a feature store (`StoreVideos`, cache heads): each run gets a *protocol store*, a folder that
  shares the original store's feature arrays through symbolic links and has its own manifest, in
  which the drawn videos form the split "shots" and the labels are renumbered over the protocol's
  classes (other classes unlabelled). The original store is never modified; evaluation reads it.
- a video list (`RawVideos`, fine-tuning methods): each run fine-tunes on a plain CSV listing the
  drawn videos (split "shots", labels renumbered, video ids kept) and is scored on the original list.

Layout of `out_dir`:

    out_dir/
      few_shot.json, few_shot.png            (or base_to_novel.json)
      stores/<K>shot-seed<S>.zarr            protocol stores (links + a manifest), or
      lists/<K>shot-seed<S>.csv              the drawn videos of a fine-tuning run
      runs/<K>shot-seed<S>/                  run directories, with their eval-*.json reports

Re-running the same command resumes: finished runs are kept (both trainers resume run directories).

May import: numpy, pandas, matplotlib, clipreel.errors, clipreel.heads.registry, clipreel.stores,
clipreel.pipeline (data, models, train, finetune, evaluate, reports).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from clipreel.errors import ClipreelError
from clipreel.heads.registry import head_entry, list_heads, list_methods, method_entry
from clipreel.pipeline.data.sources import read_sources
from clipreel.pipeline.evaluate import (
    eval_rows,
    evaluate_raw_run,
    score_store,
    select_videos,
    store_classnames,
)
from clipreel.pipeline.finetune import FinetuneConfig, run_finetune
from clipreel.pipeline.models import text_model_for, trained_head
from clipreel.pipeline.reports import save_report, write_report_files
from clipreel.pipeline.train import TrainConfig, run_training
from clipreel.stores.features import MANIFEST_FILE, FeatureStore
from clipreel.stores.manifest import classnames_from_manifest, write_manifest
from clipreel.stores.runs import load_run

SHOTS_SPLIT = "shots"  # the split of a protocol store that holds the drawn training videos
FEW_SHOT_EPOCHS = 50  # X-CLIP's and ViFi-CLIP's few-shot configs
BASE_TO_NOVEL_EPOCHS = 11  # ViFi-CLIP's base-to-novel configs


# ---------------------------------------------------------------------- drawing K shots


def draw_shots(
    manifest: pd.DataFrame,
    done: np.ndarray,
    split: str,
    classnames: Sequence[str],
    class_ids: Sequence[int],
    shots: int,
    seed: int,
    allow_fewer: bool = False,
) -> np.ndarray:
    """Store rows of `shots` extracted videos of each class in `class_ids` from `split`, sorted.

    classnames: the store's class names by label id (for messages). Drawn without replacement
    with a generator seeded by (seed, shots), class by class in id order, so a (seed, K) pair
    always draws the same videos. A class with fewer than K videos is an error naming it, unless
    `allow_fewer` (then all its videos are taken).
    """
    if shots < 1:
        raise ClipreelError(f"shots = {shots}: draw at least 1 video per class")
    rng = np.random.default_rng([seed, shots])
    candidates = (manifest["split"] == split).to_numpy() & done
    labels = manifest["label"].to_numpy()
    chosen, too_few = [], []
    for class_id in class_ids:
        rows = np.flatnonzero(candidates & (labels == class_id))  # (n,) sorted store rows
        if len(rows) < shots:
            too_few.append(f"{classnames[class_id]!r} (label {class_id}) has {len(rows)}")
        chosen.append(rng.choice(rows, size=min(shots, len(rows)), replace=False))
    if too_few and not allow_fewer:
        raise ClipreelError(
            f"{shots}-shot: {len(too_few)} class(es) have fewer than {shots} extracted videos in split {split!r}: "
            f"{'; '.join(too_few[:10])}. Use fewer shots, or allow fewer (--allow-fewer) to take all their videos."
        )
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------- protocol stores


def protocol_store(
    store: FeatureStore, path: Path, train_rows: np.ndarray, class_ids: Sequence[int], classnames: Sequence[str]
) -> Path:
    """Make (or refresh) the protocol store at `path` over `store`; returns `path`.

    It links to the store's arrays and root metadata (same features, same provenance: symbolic
    links for a local store, a linked store for one behind a URL) and has its own manifest: `train_rows` form the split SHOTS_SPLIT (the other rows keep their split),
    and class `class_ids[i]` becomes label i named `classnames[i]`; videos of other classes are
    unlabelled (label -1), so the trainer neither trains nor validates on them.
    """
    manifest = store.manifest()
    new_label = {int(class_id): index for index, class_id in enumerate(class_ids)}
    labels = np.array([new_label.get(int(label), -1) for label in manifest["label"]], dtype=np.int64)
    manifest["label"] = labels
    manifest["label_name"] = [classnames[label] if label >= 0 else "" for label in labels]
    manifest.loc[manifest["split"] == SHOTS_SPLIT, "split"] = f"{SHOTS_SPLIT}-original"  # keep the name free
    manifest.loc[train_rows, "split"] = SHOTS_SPLIT
    if not isinstance(store.path, Path):  # a store behind a URL: a linked store names its location
        FeatureStore.link(path, store.path, manifest)
        return path
    source = store.path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    for name in ("zarr.json", *store.layout.array_names):
        link = path / name
        if not link.is_symlink():
            link.symlink_to(source / name, target_is_directory=(source / name).is_dir())
        elif Path(os.readlink(link)) != source / name:
            raise ClipreelError(f"{link} links to {os.readlink(link)}, not to {source / name}: use a new out_dir")
    write_manifest(manifest, path / MANIFEST_FILE)
    return path


# ---------------------------------------------------------------------- where the videos are


class StoreVideos:
    """A protocol's videos in a feature store: cache heads train on protocol stores (links + a manifest)."""

    def __init__(self, kind: str, store_path: str | Path, *, lr: float | None = None, batch_size: int | None = None,
                 options: dict | None = None, store_checkpoint: str | None = None, trust_code: bool = False):
        head_entry(kind)  # an unknown head fails here, before any work
        self.kind, self.source = kind, str(store_path)
        self.store = FeatureStore.open(store_path)
        self.manifest, self.done = self.store.manifest(), self.store.done_mask()
        self.classnames = store_classnames(self.store)
        self.lr, self.options = lr, dict(options or {})
        # TrainConfig settings of every run: the batch size, when one is given (else TrainConfig's default)
        self.train_settings = {"batch_size": batch_size} if batch_size is not None else {}
        self.store_checkpoint, self.trust_code = store_checkpoint, trust_code
        self.text_model = text_model_for(kind, self.store.provenance, store_checkpoint, trust_code)

    def check_split(self, split: str) -> None:
        """Fail early on a split that cannot be scored."""
        select_videos(self.store, split, self.classnames, others="refuse")

    def train(self, out_dir: Path, name: str, rows: np.ndarray, class_ids: Sequence[int], classnames: Sequence[str],
              *, seed: int, epochs: int, progress: bool) -> Path:
        """Train the head on store `rows` (classes `class_ids`, named `classnames`); returns the run dir."""
        shots_store = protocol_store(self.store, out_dir / "stores" / f"{name}.zarr", rows, class_ids, classnames)
        run_dir = out_dir / "runs" / name
        run_training(
            TrainConfig(
                kind=self.kind, store=str(shots_store), out=str(run_dir), split=SHOTS_SPLIT, val_split=None,
                epochs=epochs, lr=self.lr, seed=seed, options=self.options, store_checkpoint=self.store_checkpoint,
                trust_checkpoint_code=self.trust_code,
                **self.train_settings,
            ),
            progress=progress,
        )
        return run_dir

    def score(self, run_dir: Path, split: str, classnames: Sequence[str], report_name: str) -> dict:
        """Metrics of the run on the videos of `split` whose class is among `classnames` (classified
        among those names); the report and its confusion PNG go into the run dir."""
        run = load_run(run_dir)
        videos = select_videos(self.store, split, classnames, others="leave out")
        head = trained_head(run, classnames, self.text_model)
        report = {"kind": run.kind, "run": str(run_dir), **score_store(self.store, videos, run.kind, head)}
        write_report_files(report, run_dir / f"{report_name}.json")
        return report


class RawVideos:
    """A protocol's videos as raw files: a fine-tuning method trains on a list of the drawn videos.

    `finetune` holds further `FinetuneConfig` settings of every run (model, pretrained, frames,
    batch_size, augment, workers, ...).
    """

    def __init__(self, method: str, videos: str | Path, *, lr: float | None = None, options: dict | None = None,
                 finetune: dict | None = None):
        method_entry(method)  # an unknown method fails here, before any work
        self.kind, self.source = method, str(videos)
        self.manifest = read_sources(videos)
        self.done = (self.manifest["status"] != "failed").to_numpy()
        self.classnames = classnames_from_manifest(self.manifest, self.source)
        self.lr, self.options, self.finetune = lr, dict(options or {}), dict(finetune or {})

    def check_split(self, split: str) -> None:
        eval_rows(self.manifest, self.source, split, self.classnames)

    def train(self, out_dir: Path, name: str, rows: np.ndarray, class_ids: Sequence[int], classnames: Sequence[str],
              *, seed: int, epochs: int, progress: bool) -> Path:
        """Fine-tune on manifest `rows`, listed in out_dir/lists/NAME.csv; returns the run dir."""
        videos = _write_shots_list(self.manifest.iloc[rows], class_ids, classnames, out_dir / "lists" / f"{name}.csv")
        run_dir = out_dir / "runs" / name
        run_finetune(
            FinetuneConfig(**{**self.finetune, "method": self.kind, "videos": str(videos), "out": str(run_dir),
                              "split": SHOTS_SPLIT, "val_split": None, "epochs": epochs, "lr": self.lr,
                              "seed": seed, "options": self.options}),
            progress=progress,
        )
        return run_dir

    def score(self, run_dir: Path, split: str, classnames: Sequence[str], report_name: str) -> dict:
        settings = {key: self.finetune[key] for key in ("batch_size", "workers", "device") if key in self.finetune}
        return evaluate_raw_run(run_dir, self.source, split, run_dir / f"{report_name}.json", classes=classnames,
                                trust_code=self.finetune.get("trust_checkpoint_code", False), **settings)


def _write_shots_list(rows: pd.DataFrame, class_ids: Sequence[int], classnames: Sequence[str], path: Path) -> Path:
    """A plain CSV of the drawn videos (split SHOTS_SPLIT), class `class_ids[i]` relabelled i, ids kept."""
    new_label = {int(class_id): index for index, class_id in enumerate(class_ids)}
    labels = [new_label[int(label)] for label in rows["label"]]
    listing = pd.DataFrame({"path": rows["path"], "label": labels, "label_name": [classnames[i] for i in labels],
                            "split": SHOTS_SPLIT, "video_id": rows["video_id"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    listing.to_csv(path, index=False)
    return path


def protocol_videos(kind: str, source: str | Path, *, lr: float | None = None, batch_size: int | None = None,
                    options: dict | None = None, store_checkpoint: str | None = None,
                    finetune: dict | None = None, trust_code: bool = False) -> StoreVideos | RawVideos:
    """Where a protocol's videos are for `kind`: a video list for a fine-tuning method, else a feature store.

    batch_size None: each trainer's default (16 cache videos, 8 raw clips)."""
    if kind in list_methods():
        settings = {**(finetune or {}), "trust_checkpoint_code": trust_code,
                    **({"batch_size": batch_size} if batch_size is not None else {})}
        return RawVideos(kind, source, lr=lr, options=options, finetune=settings)
    return StoreVideos(kind, source, lr=lr, batch_size=batch_size, options=options, store_checkpoint=store_checkpoint,
                       trust_code=trust_code)


def _run_numbers(seed: int, run_dir: Path, train_videos: int, report: dict) -> dict:
    """One few-shot run's line in the protocol report."""
    return {
        "seed": seed, "run": str(run_dir), "train_videos": train_videos, "test_videos": report["n"],
        "top1": report["top1"], "top5": report["top5"], "mean_class_acc": report["mean_class_acc"],
    }


def _check_common(seeds: Sequence[int], epochs: int) -> None:
    """Refuse settings that cannot work before anything is trained."""
    if not seeds:
        raise ClipreelError("no seeds given: give at least one (the papers average 3)")
    if epochs < 1:
        raise ClipreelError(f"epochs = {epochs}: train at least 1 epoch")


def _say(console, text: str) -> None:
    """Print on the rich console, if one was given."""
    if console is not None:
        console.print(text, highlight=False)


# ---------------------------------------------------------------------- few-shot


def few_shot(
    kind: str,
    source: str | Path,
    out_dir: str | Path,
    shots: Sequence[int] = (2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    train_split: str = "train",
    test_split: str = "test",
    epochs: int = FEW_SHOT_EPOCHS,
    lr: float | None = None,
    batch_size: int | None = None,
    options: dict | None = None,
    store_checkpoint: str | None = None,
    finetune: dict | None = None,
    trust_code: bool = False,
    allow_fewer: bool = False,
    console=None,
) -> dict:
    """`clipreel fewshot KIND --store STORE --out OUT_DIR`: the K-shot protocol over all classes.

    source: a feature store for a cache head, a video list for a fine-tuning method (`finetune`:
    further FinetuneConfig settings of its runs, e.g. model, pretrained, frames). For each K in
    `shots` and each seed: draw K videos per class from `train_split`, train `kind` for `epochs` (lr:
    the kind's default when None; options: head or method hyper-parameters), score on the whole
    `test_split`. store_checkpoint: the local checkpoint file a store was extracted from (text heads).
    trust_code: let a checkpoint that is a TorchScript archive (not OpenAI's) run its code.
    Writes OUT_DIR/few_shot.json and a plot of top-1 against K (few_shot.png); returns the report.
    """
    out_dir = Path(out_dir)
    _check_common(seeds, epochs)
    videos = protocol_videos(kind, source, lr=lr, batch_size=batch_size, options=options,
                             store_checkpoint=store_checkpoint, finetune=finetune, trust_code=trust_code)
    classnames = videos.classnames
    class_ids = list(range(len(classnames)))
    videos.check_split(test_split)  # fail early on a bad test split

    shot_counts = sorted(set(int(k) for k in shots))
    # Every draw first: a class too small for some K fails before anything is trained.
    drawn = {
        (count, seed): draw_shots(videos.manifest, videos.done, train_split, classnames, class_ids, count, seed,
                                  allow_fewer)
        for count in shot_counts
        for seed in seeds
    }
    by_shots = []
    for shot_count in shot_counts:
        runs = []
        for seed in seeds:
            rows, name = drawn[shot_count, seed], f"{shot_count}shot-seed{seed}"
            _say(console, f"few-shot {kind}: {name} ({len(rows)} training videos)")
            run_dir = videos.train(out_dir, name, rows, class_ids, classnames, seed=seed, epochs=epochs,
                                   progress=console is not None)
            report = videos.score(run_dir, test_split, classnames, f"eval-{test_split}")
            runs.append(_run_numbers(seed, run_dir, len(rows), report))
        top1 = np.array([run["top1"] for run in runs])
        by_shots.append({
            "shots": shot_count,
            "top1_mean": float(top1.mean()),
            "top1_std": float(top1.std()),  # population std over the seeds (0 for one seed)
            "runs": runs,
        })
        _say(console, f"  {shot_count}-shot top-1 {top1.mean():.4f} ± {top1.std():.4f}")

    report = {
        "protocol": "few-shot", "kind": kind, "source": videos.source, "train_split": train_split,
        "test_split": test_split, "seeds": list(seeds), "epochs": epochs, "classes": len(classnames),
        "by_shots": by_shots,
    }
    save_report(report, out_dir / "few_shot.json")
    _plot_few_shot(out_dir / "few_shot.png", report)
    return report


def _plot_few_shot(path: Path, report: dict) -> None:
    """Top-1 (mean ± std over seeds) against the number of shots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["by_shots"]
    figure = Figure(figsize=(5, 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shots = [row["shots"] for row in rows]
    axes.errorbar(shots, [row["top1_mean"] for row in rows], yerr=[row["top1_std"] for row in rows],
                  marker="o", capsize=3)
    axes.set_xscale("log", base=2)
    axes.set_xticks(shots, labels=[str(k) for k in shots])
    axes.set(xlabel="videos per class (K)", ylabel="test top-1", ylim=(0, 1.02),
             title=f"few-shot {report['kind']} ({len(report['seeds'])} seed(s))")
    axes.grid(alpha=0.3)
    figure.savefig(path)


# ---------------------------------------------------------------------- base-to-novel


def base_to_novel(
    kind: str,
    source: str | Path,
    out_dir: str | Path,
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    base_classes: Sequence[int | str] | None = None,
    train_split: str = "train",
    test_split: str = "test",
    epochs: int = BASE_TO_NOVEL_EPOCHS,
    lr: float | None = None,
    batch_size: int | None = None,
    options: dict | None = None,
    store_checkpoint: str | None = None,
    finetune: dict | None = None,
    trust_code: bool = False,
    allow_fewer: bool = False,
    console=None,
) -> dict:
    """`clipreel base2novel KIND --store STORE --out OUT_DIR`: generalisation to unseen classes.

    source, store_checkpoint, finetune, trust_code: as for `few_shot`. base_classes: class ids or names (default:
    the first half of the class ids, rounded up); the other classes are novel. For each seed: train
    on `shots` videos per base class of `train_split`, then score the `test_split` videos of the base
    classes among the base names and those of the novel classes among the novel names. Only heads
    that classify by class-name texts (and every fine-tuning method) can name classes they were not
    trained on. Writes OUT_DIR/base_to_novel.json; returns the report.
    """
    if kind not in list_methods() and not head_entry(kind).scores_text:
        text_heads = [name for name in list_heads() if head_entry(name).scores_text]
        raise ClipreelError(
            f"base-to-novel scores classes the head never saw, by their names: only the text kinds "
            f"({', '.join(text_heads)}) and the fine-tuning methods ({', '.join(list_methods())}) can; a {kind} "
            "head has a fixed set of outputs. Choose a text kind."
        )
    out_dir = Path(out_dir)
    _check_common(seeds, epochs)
    videos = protocol_videos(kind, source, lr=lr, batch_size=batch_size, options=options,
                             store_checkpoint=store_checkpoint, finetune=finetune, trust_code=trust_code)
    classnames = videos.classnames
    base_ids = _base_class_ids(base_classes, classnames)
    novel_ids = [class_id for class_id in range(len(classnames)) if class_id not in base_ids]
    if not novel_ids:
        raise ClipreelError("base-to-novel: every class is a base class; leave some classes out of base_classes")
    base_names = [classnames[class_id] for class_id in base_ids]
    novel_names = [classnames[class_id] for class_id in novel_ids]
    drawn = {
        seed: draw_shots(videos.manifest, videos.done, train_split, classnames, base_ids, shots, seed, allow_fewer)
        for seed in seeds
    }

    runs = []
    for seed in seeds:
        name = f"{shots}shot-seed{seed}"
        _say(console, f"base-to-novel {kind}: {name} ({len(drawn[seed])} videos of {len(base_ids)} base classes)")
        run_dir = videos.train(out_dir, name, drawn[seed], base_ids, base_names, seed=seed, epochs=epochs,
                               progress=console is not None)
        base = videos.score(run_dir, test_split, base_names, f"eval-base-{test_split}")
        novel = videos.score(run_dir, test_split, novel_names, f"eval-novel-{test_split}")
        runs.append({
            "seed": seed, "run": str(run_dir), "train_videos": len(drawn[seed]),
            "base_top1": base["top1"], "novel_top1": novel["top1"], "hm": harmonic_mean(base["top1"], novel["top1"]),
            "base_test_videos": base["n"], "novel_test_videos": novel["n"],
        })
        _say(console, f"  seed {seed}: base {base['top1']:.4f}  novel {novel['top1']:.4f}  HM {runs[-1]['hm']:.4f}")

    base_mean = float(np.mean([run["base_top1"] for run in runs]))
    novel_mean = float(np.mean([run["novel_top1"] for run in runs]))
    report = {
        "protocol": "base-to-novel", "kind": kind, "source": videos.source, "train_split": train_split,
        "test_split": test_split, "shots": shots, "seeds": list(seeds), "epochs": epochs,
        "base_classes": base_names, "novel_classes": novel_names,
        "base": base_mean, "novel": novel_mean,
        "hm": harmonic_mean(base_mean, novel_mean),  # of the means over seeds, as the papers report
        "runs": runs,
    }
    path = save_report(report, out_dir / "base_to_novel.json")
    _say(console, f"base {base_mean:.4f}  novel {novel_mean:.4f}  HM {report['hm']:.4f} → {path}")
    return report


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N), the base-to-novel summary (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def _base_class_ids(base_classes: Sequence[int | str] | None, classnames: Sequence[str]) -> list[int]:
    """Base class ids, sorted: given as ids or names, or the first half of the ids (rounded up)."""
    if base_classes is None:
        return list(range(math.ceil(len(classnames) / 2)))
    ids = []
    for item in base_classes:
        if isinstance(item, str) and item in classnames:
            ids.append(classnames.index(item))
        elif isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().isdigit()):
            class_id = int(item)
            if not 0 <= class_id < len(classnames):
                raise ClipreelError(f"base class id {class_id} is outside 0..{len(classnames) - 1}")
            ids.append(class_id)
        else:
            raise ClipreelError(f"base class {item!r} is neither a class id nor one of the store's class names")
    if not ids:
        raise ClipreelError("base_classes is empty: give at least one base class")
    return sorted(set(ids))


