"""`clipreel demo`: the whole pipeline on the built-in synthetic world, offline, in minutes on 2 CPUs.

synth -> extract with clipreel-synth (a tiny CLIP that knows the world's colours and shapes, but
nothing of motion) -> zero-shot, a linear probe and EVL from the cache -> a results table.
Zero-shot and the frame-mean probe can only recognise appearance: each class has a twin that is
the same clip played backwards, so they stay near half accuracy. EVL's temporal decoder sees the
order of frames and separates the twins.

May import: rich, clipreel.errors, clipreel.stores, clipreel.pipeline (data.synth, extract, train, evaluate).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from clipreel.errors import ClipreelError

WORLD = dict(classes=8, videos_per_class=30, frames=32, size=128)
HEADS = {"linear": 30, "evl": 30}  # head kind -> epochs


def run_demo(out: Path, console: Console) -> dict:
    """Run every stage into `out` and return {method: test report}."""
    from clipreel.pipeline.data.synth.world import SynthConfig, make_world
    from clipreel.pipeline.evaluate import evaluate_store_run, zero_shot_store
    from clipreel.pipeline.extract import ExtractConfig, run_extract
    from clipreel.pipeline.train import TrainConfig, run_training
    from clipreel.stores.features import FeatureStore, verify

    out = Path(out)
    console.rule("1. the synthetic world")
    videos_csv = make_world(out / "world", SynthConfig(**WORLD), progress=True)
    console.print(f"{WORLD['classes'] * WORLD['videos_per_class']} videos: {videos_csv}")

    console.rule("2. extract (clipreel-synth, local Ray)")
    store_path = out / "features.zarr"
    summary = run_extract(ExtractConfig(videos=str(videos_csv), out=str(store_path), model="clipreel-synth",
                                        frames=8, views=2, sampling="tsn", layers="4"))
    console.print(f"done {summary.done}/{summary.total}, failed {summary.failed}, {summary.seconds:.1f} s")
    problems = verify(FeatureStore.open(store_path))
    if problems:
        raise ClipreelError(f"{store_path} does not verify:\n" + "\n".join(problems))

    reports = {}
    console.rule("3. zero-shot (class names vs frame-mean embeddings)")
    reports["zero-shot"] = zero_shot_store(store_path, "test", report_path=out / "zeroshot" / "eval-test.json")
    for kind, epochs in HEADS.items():
        console.rule(f"4. train {kind} from the cache")
        run_dir = out / "runs" / kind
        run_training(TrainConfig(kind=kind, store=str(store_path), out=str(run_dir), epochs=epochs))
        reports[kind] = evaluate_store_run(run_dir, store_path, "test", run_dir / "eval-test.json")

    console.rule("results on the test split")
    table = Table("method", "top-1", "top-5", "mean class acc", "videos")
    for method, report in reports.items():
        table.add_row(method, f"{report['top1']:.3f}", f"{report['top5']:.3f}",
                      f"{report['mean_class_acc']:.3f}", str(report["n"]))
    console.print(table)
    console.print(
        "Each class has a twin played backwards: appearance alone (zero-shot, linear probe) reaches "
        "about half; EVL's temporal decoder tells the twins apart.\n"
        f"Plots: {out / 'runs' / '*' / 'curves.png'} (training curves), "
        f"{out / 'runs' / '*' / 'eval-test.png'} and {out / 'zeroshot' / 'eval-test.png'} (confusion matrices)."
    )
    return reports
