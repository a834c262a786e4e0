"""A run directory: one trained head, enough to rebuild it and to know what it was trained on.

    RUN_DIR/
      weights.safetensors   the head's state dict (prompt heads leave out their frozen text tower)
      config.json           {"kind", "head" (the head's config), "classnames",
                             "store": {"path", "provenance"}, "train" (the TrainConfig), "clipreel_version",
                             and for a run made by `clipreel import`, "imported" (where from, what the
                             checkpoint fixed, the reference's conventions and preprocessing)}
      clip.safetensors      an imported run's CLIP, where its weights file does not hold it
      metrics.json          final metrics (optional)
      log.csv, curves.png   the training log and its plot (written by the trainer)
      checkpoint.pt         the trainer's resume state (written by the trainer)
      skipped.csv           the videos a fine-tuning run left out as unreadable: video_id, path, split, error

`load_run` reads the first three back; `provenance_mismatch` says whether a store's features mean
the same thing as those the head was trained on (so that it may be evaluated on them).

Weights are finite: `save_run` refuses to write weights holding inf or NaN, and `load_run` refuses
to read them (`nonfinite_tensors` names the tensors). `load_weights` puts a state dict into a model
and explains a mismatch (the weights of another model) instead of listing hundreds of keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from clipreel import __version__
from clipreel.errors import ClipreelError
from clipreel.stores.audit import provenance_diff

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped.csv"
SKIPPED_COLUMNS = ("video_id", "path", "split", "error")
CLIP_FILE = "clip.safetensors"

# The provenance settings that change what a stored feature means. Views, crops and the sampling
# policy may differ between the store a head was trained on and the one it is evaluated on.
FEATURE_MEANING_KEYS = ("model", "pretrained", "checkpoint_sha256", "image_size", "mean", "std", "frames",
                        "feature_blocks", "preprocess")


@dataclass
class Run:
    """A run directory as read back by load_run."""

    path: Path
    kind: str
    head_config: dict
    classnames: list[str]
    provenance: dict  # of the store the head was trained on
    store_path: str
    train_config: dict
    state_dict: dict[str, torch.Tensor]
    metrics: dict | None
    imported: dict | None = None  # set for runs made by `clipreel import`


def save_run(
    run_dir: str | os.PathLike,
    *,
    kind: str,
    head: nn.Module,
    head_config: Mapping,
    classnames: Sequence[str],
    provenance: Mapping,
    store_path: str | os.PathLike,
    train_config: Mapping,
    metrics: Mapping | None = None,
    imported: Mapping | None = None,
) -> Path:
    """Write the head's weights, config.json and (if given) metrics.json into `run_dir`.

    Each file is written to a temporary name and renamed, so a crash never leaves a torn file.
    The weights go first and config.json last: a folder with a config.json is a complete run.
    """
    run_dir = Path(run_dir)
    broken = nonfinite_tensors(head.state_dict())
    if broken:
        raise ClipreelError(f"the trained weights are not finite ({'; '.join(broken)}), so {run_dir} is not written: "
                            "the training diverged. Lower the learning rate (--lr) and train again.")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_weights(run_dir / WEIGHTS_FILE, head.state_dict())
    if metrics is not None:
        _write_json(run_dir / METRICS_FILE, dict(metrics))
    config = {
        "kind": kind,
        "head": dict(head_config),
        "classnames": list(classnames),
        "store": {"path": str(store_path), "provenance": dict(provenance)},
        "train": dict(train_config),
        "clipreel_version": __version__,
    }
    if imported is not None:
        config["imported"] = dict(imported)
    _write_json(run_dir / CONFIG_FILE, config)
    return run_dir


def write_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write tensors as a safetensors file, atomically (a crash never leaves a torn file)."""
    from safetensors.torch import save_file

    path = Path(path)
    # clone(): safetensors refuses tensors that share memory or are not contiguous.
    weights = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in tensors.items()}
    with _replaced_atomically(path) as temporary:
        save_file(weights, str(temporary))
    return path


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory written by save_run (clear errors for missing or incomplete ones)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ClipreelError(f"{run_dir} is not a run directory: no such folder. Train one with `clipreel train`.")
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    if not config_path.is_file():
        hint = (
            " It holds a checkpoint.pt: training was interrupted; re-run the same `clipreel train` command "
            "to finish it."
            if (run_dir / "checkpoint.pt").is_file()
            else " Train a head into it with `clipreel train`."
        )
        raise ClipreelError(f"{run_dir} is not a complete run: {CONFIG_FILE} is missing.{hint}")
    config = _read_json(config_path)
    missing = [key for key in ("kind", "head", "classnames", "store", "train") if key not in config]
    if missing or not isinstance(config.get("store"), dict):
        raise ClipreelError(
            f"{config_path} lacks {missing or ['store']}: it was not written by clipreel's save_run. "
            "Train the head again."
        )
    if not weights_path.is_file():
        raise ClipreelError(f"{run_dir} is incomplete: {WEIGHTS_FILE} is missing. Train the head again.")
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ClipreelError(
            f"{weights_path} cannot be read ({error}): the file is damaged. Train the head again."
        ) from None
    broken = nonfinite_tensors(state_dict)
    if broken:
        raise ClipreelError(f"{weights_path} holds weights that are not finite ({'; '.join(broken)}): the run's "
                            "training diverged, and nothing it predicts means anything. Train it again with a lower "
                            "learning rate (--lr).")
    metrics_path = run_dir / METRICS_FILE
    return Run(
        path=run_dir,
        kind=config["kind"],
        head_config=config["head"],
        classnames=list(config["classnames"]),
        provenance=dict(config["store"].get("provenance", {})),
        store_path=str(config["store"].get("path", "")),
        train_config=config["train"],
        state_dict=state_dict,
        metrics=_read_json(metrics_path) if metrics_path.is_file() else None,
        imported=config.get("imported"),
    )


def write_skipped(run_dir: str | os.PathLike, skipped: list[dict]) -> None:
    """Write skipped.csv: one row (SKIPPED_COLUMNS) per video the run left out."""
    table = pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS))
    with _replaced_atomically(Path(run_dir) / SKIPPED_FILE) as temporary:
        table.to_csv(temporary, index=False)


def read_skipped(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's skipped.csv ([] when it has none)."""
    path = Path(run_dir) / SKIPPED_FILE
    if not path.is_file():
        return []
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def nonfinite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per floating-point tensor holding inf or NaN, e.g. "head.weight: 12 of 4096 values"
    ([] = all finite)."""
    lines = []
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            lines.append(f"{name}: {bad} of {tensor.numel()} values")
    return lines


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, fix: str) -> None:
    """`model.load_state_dict(state_dict)`, or a ClipreelError saying how `source` does not fit the model
    (a few of the missing, unexpected and misshapen keys) and `fix`."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    misshapen = [f"{name} {tuple(state_dict[name].shape)} (the model: {tuple(tensor.shape)})"
                 for name, tensor in expected.items() if name in state_dict and state_dict[name].shape != tensor.shape]
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if problems:
        raise ClipreelError(f"{source} holds the weights of another model: {'; '.join(problems)}. {fix}")
    model.load_state_dict(state_dict)


def provenance_mismatch(run_provenance: Mapping, store_provenance: Mapping) -> list[str]:
    """One line per setting that makes the store's features mean something else than the
    features the run was trained on ([] = compatible), e.g. "frames: store has 16, this run asks for 8".

    The weights are compared by checksum when both sides have one (the same file may be named
    differently, or be --pretrained default), else by name. Views, crops and sampling may differ.
    """
    keys = list(FEATURE_MEANING_KEYS)
    if run_provenance.get("checkpoint_sha256") and store_provenance.get("checkpoint_sha256"):
        keys.remove("pretrained")
    return provenance_diff(_without_crops(store_provenance), _without_crops(run_provenance), keys)


def _without_crops(provenance: Mapping) -> dict:
    """The provenance with preprocess.crops left out (crops are views, which may differ)."""
    provenance = dict(provenance)
    if isinstance(provenance.get("preprocess"), dict):
        provenance["preprocess"] = {k: v for k, v in provenance["preprocess"].items() if k != "crops"}
    return provenance


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ClipreelError(f"{path} cannot be read as JSON ({error}). Train the head again.") from None
    if not isinstance(values, dict):
        raise ClipreelError(f"{path} holds {type(values).__name__}, not a JSON object. Train the head again.")
    return values


def _write_json(path: Path, values: dict) -> None:
    with _replaced_atomically(path) as temporary:
        temporary.write_text(json.dumps(values, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value):
    """numpy scalars and arrays, paths: what a config may hold that json cannot write."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class _replaced_atomically:
    """`with _replaced_atomically(path) as tmp:` write tmp; on success it is renamed to `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(handle)
        self.temporary = Path(name)
        return self.temporary

    def __exit__(self, exc_type, *unused) -> bool:
        if exc_type is None:
            os.replace(self.temporary, self.path)
        else:
            self.temporary.unlink(missing_ok=True)
        return False
