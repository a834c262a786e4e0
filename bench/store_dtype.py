"""8-bit feature stores against float16 on the demo's synthetic world: scales, accuracy, logits, bytes.

    python bench/store_dtype.py                 # the demo's world: 240 videos, EVL 30 epochs per dtype
    python bench/store_dtype.py --epochs 5      # a quicker run of the same comparison

1. The world of `clipreel demo` (8 classes x 30 videos, same seed), extracted three times with
   clipreel-synth as the demo does it (TSN 8 frames x 2 views, the last 4 blocks, sampling seed 0),
   into a float16, an int8 and a float8 store.
2. Scale granularity, measured on those real activations of 48 videos (clipreel-synth is a trained CLIP): the
   relative error (RMS over all values, and the worst token) of int8 and float8 codes with one
   scale per token, per channel, per block of 16 or 32 channels, or per channel times per token;
   also with outliers injected (2 channels 20x larger in every token; 2 tokens with 2 channels at
   +-1000), as real CLIPs have them. And the attention maps (softmax rows) with a scale per row, a
   fixed scale, float8 without scales.
3. Zero-shot CLIP (test split) on each store, and an EVL head trained on each (the demo's recipe,
   seed 0) scored on the test split: top-1 side by side; the float16-trained head's logits on the
   8-bit stores against its logits on the float16 store (same videos, every view): the largest
   difference relative to the largest logit of that view.
4. Bytes per video on disk, each store.

Ends with RESULT lines; temporary files are removed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = ("float16", "int8", "float8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="EVL epochs (default: the demo's)")
    parser.add_argument("--dir", default=None, help="parent folder for the temporary files")
    return parser.parse_args()


# --------------------------------------------------------------------------- 2. scale granularity


def quantize(values: np.ndarray, largest: np.ndarray, kind: str) -> np.ndarray:
    """values with their group's largest magnitude `largest` (broadcastable) -> decoded float32."""
    from clipreel.stores.encoding import E4M3_MAX, E4M3_VALUES, to_e4m3

    largest = np.where(largest == 0, 1, largest).astype(np.float32)
    if kind == "int8":
        step = largest / 127
        return np.clip(np.rint(values / step), -127, 127) * step
    step = largest / E4M3_MAX
    return E4M3_VALUES[to_e4m3(np.clip(values / step, -E4M3_MAX, E4M3_MAX))] * step


def token_schemes(tokens: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """tokens (N, V, T, K, L, D) -> {granularity: decoded tokens}."""
    magnitude = np.abs(tokens)
    width = tokens.shape[-1]
    schemes = {
        "per token": quantize(tokens, magnitude.max(-1, keepdims=True), kind),
        "per channel": quantize(tokens, magnitude.max(axis=(2, 4), keepdims=True), kind),  # per video, view, block
    }
    for block in (16, 32):
        if width % block == 0:
            grouped = tokens.reshape(*tokens.shape[:-1], width // block, block)
            largest = np.abs(grouped).max(-1, keepdims=True)
            schemes[f"per {block} channels"] = quantize(grouped, largest, kind).reshape(tokens.shape)
    channel = np.maximum(magnitude.max(axis=(2, 4), keepdims=True), 1e-30)
    normalised = tokens / channel
    schemes["channel x token"] = quantize(normalised, np.abs(normalised).max(-1, keepdims=True), kind) * channel
    return schemes


def errors(original: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    """(relative RMS error over all values, worst relative error of one token)."""
    difference = decoded - original
    overall = float(np.linalg.norm(difference) / np.linalg.norm(original))
    per_token = np.linalg.norm(difference, axis=-1) / np.maximum(np.linalg.norm(original, axis=-1), 1e-30)
    return overall, float(per_token.max())


def granularity_study(tokens: np.ndarray, attention: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    width = tokens.shape[-1]
    cases = {"as extracted": tokens}
    outlier_channels = tokens.copy()
    outlier_channels[..., rng.choice(width, 2, replace=False)] *= 20
    cases["2 channels x20"] = outlier_channels
    outlier_tokens = tokens.copy()
    channels = rng.choice(width, 2, replace=False)
    outlier_tokens[..., :2, :][..., channels] = 1000 * np.sign(outlier_tokens[..., :2, :][..., channels] + 1e-9)
    cases["2 tokens at +-1000"] = outlier_tokens
    print(f"tokens {tokens.shape}: relative error, overall RMS / worst token")
    header = f"{'':22}" + "".join(f"{name:>24}" for name in cases)
    for kind in ("int8", "float8"):
        print(f"  {kind}\n{header}")
        results = {name: token_schemes(values, kind) for name, values in cases.items()}
        for scheme in results["as extracted"]:
            row = "".join(f"{'%.2e / %.2e' % errors(cases[name], results[name][scheme]):>24}" for name in cases)
            print(f"    {scheme:18}{row}")
    print(f"  scale bytes per value at width {width} (float16 scales): per token {2 / width:.4f}, "
          f"per 32 channels {2 / 32:.4f}; at ViT-B/16 (768): per token {2 / 768:.4f}, per 32 channels {2 / 32:.4f}")

    row_max = attention.max(-1, keepdims=True)
    print(f"attention {attention.shape}: row maxima from {row_max.min():.3f} to {row_max.max():.3f} "
          f"(median {np.median(row_max):.3f}); relative RMS error / largest absolute error / largest row-sum error")
    encodings = {
        "uint8, scale per row": np.rint(attention / row_max * 255) * row_max / 255,
        "uint8, fixed 1/255": np.rint(attention * 255) / 255,
        "float8, scale per row": quantize(attention, row_max, "float8"),
        "float8, no scale": quantize(attention, np.float32(448), "float8"),
        "float16": attention.astype(np.float16).astype(np.float32),
    }
    for name, decoded in encodings.items():
        difference = decoded - attention
        print(f"    {name:24} {np.linalg.norm(difference) / np.linalg.norm(attention):.2e}   "
              f"{np.abs(difference).max():.2e}   {np.abs(decoded.sum(-1) - 1).max():.2e}")


# --------------------------------------------------------------------------- 3. accuracy and logits


def view_logits(run_dir: Path, store_path: Path, split: str) -> np.ndarray:
    """The run's logits on every view of `split`'s videos: (N, V, K) float32."""
    from clipreel.heads.registry import head_entry
    from clipreel.pipeline.data.cache_loader import CacheLoader
    from clipreel.pipeline.models import trained_head
    from clipreel.stores.features import FeatureStore
    from clipreel.stores.runs import load_run

    run = load_run(run_dir)
    head = trained_head(run)
    store = FeatureStore.open(store_path)
    manifest = store.manifest()
    rows = np.flatnonzero((manifest["split"] == split).to_numpy() & store.done_mask())
    entry = head_entry(run.kind)
    loader = CacheLoader(store, rows, manifest["label"].to_numpy()[rows], entry.reads, entry.blocks, 16,
                         shuffle=False, seed=0, views="all")
    logits = []
    with torch.no_grad():
        for batch in loader.epoch(0):  # tokens, attention maps (8-bit stores: codes and their scales)
            count, views = batch["tokens"].shape[:2]
            one_view_each = {name: values.flatten(0, 1) for name, values in batch.items() if name not in ("labels", "rows")}
            logits.append(head(one_view_each).unflatten(0, (count, views)))
    return torch.cat(logits).numpy()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    from clipreel.pipeline.data.synth.world import SynthConfig, make_world
    from clipreel.pipeline.demo import HEADS, WORLD
    from clipreel.pipeline.evaluate import evaluate_store_run, zero_shot_store
    from clipreel.pipeline.extract import ExtractConfig, run_extract
    from clipreel.pipeline.train import TrainConfig, run_training
    from clipreel.stores.features import FeatureStore, summarize

    epochs = args.epochs or HEADS["evl"]
    work = Path(tempfile.mkdtemp(prefix="clipreel-bench-dtype-", dir=args.dir))
    try:
        videos_csv = make_world(work / "world", SynthConfig(**WORLD))
        stores, seconds = {}, {}
        for dtype in DTYPES:
            stores[dtype] = work / f"{dtype}.zarr"
            started = time.perf_counter()
            run_extract(ExtractConfig(videos=str(videos_csv), out=str(stores[dtype]), model="clipreel-synth",
                                      frames=8, views=2, sampling="tsn", layers="4", dtype=dtype), progress=False)
            seconds[dtype] = time.perf_counter() - started
        print(f"world: {WORLD['classes'] * WORLD['videos_per_class']} videos; extraction seconds "
              + ", ".join(f"{dtype} {value:.0f}" for dtype, value in seconds.items()))

        reference = FeatureStore.open(stores["float16"])
        sample = np.flatnonzero(reference.done_mask())[::5]  # 48 videos of every class: enough, and memory stays small
        values = reference.read(sample, fields=("tokens", "attention"))
        print()
        granularity_study(values["tokens"].astype(np.float32), values["attention"].astype(np.float32))

        reports, zero_shot = {}, {}
        for dtype in DTYPES:
            zero_shot[dtype] = zero_shot_store(stores[dtype], "test")
            run_dir = work / "runs" / dtype
            run_training(TrainConfig(kind="evl", store=str(stores[dtype]), out=str(run_dir), epochs=epochs),
                         progress=False)
            reports[dtype] = evaluate_store_run(run_dir, stores[dtype], "test")
        reference_logits = view_logits(work / "runs" / "float16", stores["float16"], "test")  # (N, V, K)
        largest = np.abs(reference_logits).max(-1)  # (N, V)
        logit_difference = {}
        for dtype in DTYPES[1:]:
            logits = view_logits(work / "runs" / "float16", stores[dtype], "test")
            logit_difference[dtype] = float((np.abs(logits - reference_logits).max(-1) / largest).max())
        bytes_per_video = {dtype: summarize(FeatureStore.open(stores[dtype]))["bytes_per_video"] for dtype in DTYPES}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = reports["float16"]["n"]
    print(f"\ntest split, {n} videos x 2 views; EVL {epochs} epochs (seed 0) trained on each store")
    print(f"{'store':8} {'bytes/video':>12} {'ratio':>6} {'zero-shot':>10} {'EVL top-1':>10} {'logits vs float16':>18}")
    for dtype in DTYPES:
        difference = f"{logit_difference[dtype]:.2e}" if dtype in logit_difference else "-"
        print(f"{dtype:8} {bytes_per_video[dtype]:12,d} {bytes_per_video[dtype] / bytes_per_video['float16']:6.3f} "
              f"{zero_shot[dtype]['top1']:10.3f} {reports[dtype]['top1']:10.3f} {difference:>18}")
    print("logits vs float16: the float16-trained head on the same videos and views, largest |difference| "
          "relative to the view's largest |logit|")
    print()
    for dtype in DTYPES[1:]:
        same_zero_shot = ({key: value for key, value in zero_shot[dtype].items() if key != "store"}
                          == {key: value for key, value in zero_shot["float16"].items() if key != "store"})
        print(f"RESULT {dtype}_bytes_ratio {bytes_per_video[dtype] / bytes_per_video['float16']:.3f}")
        print(f"RESULT {dtype}_evl_top1_minus_float16 {reports[dtype]['top1'] - reports['float16']['top1']:+.3f}")
        print(f"RESULT {dtype}_zeroshot_identical {int(same_zero_shot)}")
        print(f"RESULT {dtype}_logits_max_relative_difference {logit_difference[dtype]:.2e}")
    print(f"RESULT float16_evl_top1 {reports['float16']['top1']:.3f}")
    print(f"RESULT float16_bytes_per_video {bytes_per_video['float16']}")


if __name__ == "__main__":
    main()
