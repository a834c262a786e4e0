"""The trainers' checkpoint (`checkpoint.pt` in the run directory, after every epoch) and the one
resume rule of both.

The resume rule. Re-running a command on its run directory continues the run from its last
finished epoch, and only if the command asks for what made the run: every setting of the command
must be the same, except the ones that say how long it trains and where and how it runs
(MAY_CHANGE_ON_RESUME); and what the settings resolved to must be the same too: the optimisation
recipe (defaults filled in), the class names, the model's config, and what the inputs mean (the
store's provenance, or the CLIP checkpoint's sha256). A refusal names every difference.

A checkpoint holds finite weights only: `save_checkpoint` refuses to write others, and a checkpoint
that cannot be read (truncated), that is not clipreel's, or whose weights are not finite is refused
with what is wrong and what to do.

May import: torch, clipreel.errors, clipreel.heads.checkpoints, clipreel.stores.runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import read_checkpoint
from clipreel.stores.runs import CONFIG_FILE, load_weights, nonfinite_tensors

CHECKPOINT_FILE = "checkpoint.pt"
# The settings that may differ between a run and the command that resumes it: how many epochs (a
# finished run asked for more continues on the longer schedule), the validation split, and where
# and how it runs. `workers` (data-parallel ranks or decode processes) and the frame loader change
# nothing a run trains on for a given seed; the decoder does (pixels), so it must match. A run that a
# bad video stopped ("stop") continues skipping it ("skip").
MAY_CHANGE_ON_RESUME = ("out", "epochs", "val_split", "device", "workers", "address", "prefetch", "loader",
                        "trust_checkpoint_code", "on_bad_video")
_ABSENT = "(not set)"
# What a checkpoint.pt of this clipreel holds.
CHECKPOINT_KEYS = ("epoch", "identity", "model", "optimizer", "scheduler", "history")


def run_identity(settings: dict, recipe: dict, **resolved) -> dict:
    """What must match for a run directory to be resumed: the command's settings but those that may
    change (and those the recipe holds resolved), the recipe, and `resolved` (class names, the
    model's config, what the inputs mean)."""
    kept = {name: value for name, value in settings.items()
            if name not in MAY_CHANGE_ON_RESUME and name not in recipe}
    return {**kept, "recipe": recipe, **resolved}


def checkpoint_to_resume(run_dir: Path, identity: dict, epochs: int, command: str, trains: bool = True) -> dict | None:
    """The checkpoint of an earlier run of the same command in `run_dir`, or None for a new run.

    Refuses a run directory that is not one, or that was made with other settings (the resume rule
    above), or that has trained more epochs than asked for. A run with nothing to train (`trains`
    False) keeps no checkpoint: its finished run directory is simply made again.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ClipreelError(f"--out {run_dir} is a file, not a run directory: choose a new --out.")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file() and not trains and (run_dir / CONFIG_FILE).is_file():
        return None
    if not path.is_file():
        raise ClipreelError(f"{run_dir} exists and holds no {CHECKPOINT_FILE} of an earlier `clipreel {command}`: "
                            "choose a new --out (or delete the folder).")
    checkpoint = _read_checkpoint(path)
    differences = _differences(checkpoint["identity"], identity)
    if differences:
        raise ClipreelError(
            f"{run_dir} was trained with other settings, so it cannot be resumed:\n  - " + "\n  - ".join(differences)
            + "\nUse the same settings to continue it, or choose a new --out."
        )
    if checkpoint["epoch"] > epochs:
        raise ClipreelError(
            f"{run_dir} has already trained {checkpoint['epoch']} epochs, more than the {epochs} asked for: "
            "ask for at least that many epochs, or choose a new --out."
        )
    return checkpoint


def restore_model(model: nn.Module, checkpoint: dict, run_dir: Path) -> None:
    """Load a checkpoint's weights into the model the resuming command built."""
    load_weights(model, checkpoint["model"], str(run_dir / CHECKPOINT_FILE),
                 "It was made for another model although its settings match: choose a new --out.")


def save_checkpoint(run_dir: Path, identity: dict, model: nn.Module, optimizer, scheduler, epoch: int,
                    history: list[dict]) -> None:
    """Write checkpoint.pt through a temporary file: a crash while saving keeps the previous one.
    Weights that are not finite are never written: the run stops, keeping the previous checkpoint."""
    weights = model.state_dict()
    broken = nonfinite_tensors(weights)
    if broken:
        kept = (f"The run directory keeps the checkpoint of epoch {epoch - 1}, the last good one."
                if epoch > 1 else "No epoch had finished: the run directory holds no checkpoint.")
        raise ClipreelError(f"training stopped after epoch {epoch}: the weights are not finite "
                            f"({'; '.join(broken[:5])}). {kept} Lower the learning rate (--lr) and train into a "
                            "new --out.")
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "identity": identity, "model": weights, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": history}
    handle, temporary = tempfile.mkstemp(dir=run_dir, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, run_dir / CHECKPOINT_FILE)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _read_checkpoint(path: Path) -> dict:
    """checkpoint.pt, read without running code (`heads.checkpoints`), checked to be clipreel's and finite."""
    fix = f"delete {path} to train the run from its start, or choose a new --out"
    try:
        checkpoint = read_checkpoint(path)
    except ClipreelError as error:
        raise ClipreelError(f"{error} This checkpoint.pt is damaged (truncated?) or not clipreel's: {fix}.") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else None
    if missing is None or missing:
        holds = f"lacks {missing}" if missing else f"holds a {type(checkpoint).__name__}"
        raise ClipreelError(f"{path} is not a checkpoint of this clipreel: it {holds}, where a checkpoint holds "
                            f"{list(CHECKPOINT_KEYS)}; {fix}.")
    broken = nonfinite_tensors(checkpoint["model"]) if isinstance(checkpoint["model"], dict) else ["not a state dict"]
    if broken:
        raise ClipreelError(f"{path} holds weights that are not finite ({'; '.join(broken[:5])}): the run diverged "
                            f"before it was saved; {fix} with a lower learning rate (--lr).")
    return checkpoint


def _differences(old, new, path: str = "") -> list[str]:
    """One line per value that differs between two identities; nested dicts are compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [line for key in keys
                for line in _differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}{key}.")]
    if old == new:
        return []
    return [f"{path[:-1]}: the run has {_shown(old)}, this command {_shown(new)}"]


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
