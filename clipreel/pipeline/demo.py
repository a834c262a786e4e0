"""`clipreel demo`: the whole pipeline on the built-in synthetic world, offline, in minutes on 2 CPUs."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from clipreel.errors import ClipreelError


def run_demo(out: Path, console: Console) -> None:
    """Synthesise videos, extract them with the tiny model through the Ray job, verify the store."""
    from clipreel.pipeline.extract import ExtractConfig, run_extract
    from clipreel.pipeline.synth import SynthConfig, make_world
    from clipreel.stores.features import FeatureStore, summarize, verify

    out = Path(out)
    world = out / "world"
    console.rule("1. synthetic world")
    videos_csv = make_world(world, SynthConfig(classes=8, videos_per_class=10, frames=32, size=128), progress=True)
    console.print(f"videos: {videos_csv}")

    console.rule("2. extract (clipreel-tiny, local Ray)")
    store_path = out / "features.zarr"
    summary = run_extract(
        ExtractConfig(videos=str(videos_csv), out=str(store_path), model="clipreel-tiny", pretrained="none",
                      frames=8, layers="4")
    )
    console.print(f"done {summary.done}/{summary.total}, failed {summary.failed}, {summary.seconds:.1f} s")

    console.rule("3. verify")
    store = FeatureStore.open(store_path)
    problems = verify(store)
    if problems:
        raise ClipreelError(f"{store_path} does not verify:\n" + "\n".join(problems))
    facts = summarize(store)
    console.print(f"[green]✓[/] {store_path} verifies: {facts}")
