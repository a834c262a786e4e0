"""The models the stages train and score, built from where their weights come from.

- Cache heads: the store's text tower when the head scores against class text
  (`text_model_for`), and a trained head back from its run directory (`trained_head`).
- Raw-frame methods: the CLIP a method starts from (an open_clip tag, a local file, the package's
  built-in weights, seeded random weights, or the CLIP a `clipreel finetune vifi` run fine-tuned:
  `load_method_clip`), a new method model around it (`new_method_model`), and a trained one back
  from its run directory (`trained_method_model`), checked against the CLIP it was trained from.

May import: torch, open_clip, clipreel.errors, clipreel.heads, clipreel.stores.runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import open_clip
import torch
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.clip import (
    TextModel,
    file_sha256,
    load_clip,
    load_text_model,
    register_model_config,
    resolve_model_name,
)
from clipreel.heads.registry import create_method, head_entry, rebuild_head, rebuild_method
from clipreel.stores.runs import WEIGHTS_FILE, Run, load_run, load_weights

# Run kinds of `clipreel finetune` runs: "finetune-" + the method.
RUN_KIND_PREFIX = "finetune-"


# --------------------------------------------------------------------------- cache heads


def text_model_for(name: str, provenance: Mapping, store_checkpoint: str | None = None,
                   trust_code: bool = False) -> TextModel | None:
    """The CLIP that made the store, for a head that scores against class text (else None).

    store_checkpoint: the local checkpoint file a store was extracted from (its provenance records
    only the file's name and sha256). trust_code: see `heads.clip.load_clip`.
    """
    if not head_entry(name).scores_text:
        return None
    return load_text_model(provenance, store_checkpoint, trust_code=trust_code)


def trained_head(run: Run, classnames: Sequence[str] | None = None, text_model: TextModel | None = None) -> nn.Module:
    """The run's trained head, in eval mode, classifying among `classnames` (default: the run's).

    Heads that score against class text may be given other class names (novel classes: their class
    text is recomputed); they need the store's text tower (`text_model`).
    """
    classnames = list(run.classnames if classnames is None else classnames)
    head = rebuild_head(run.kind, run.head_config, classnames, text_model)
    load_weights(head, run.state_dict, f"{run.path / WEIGHTS_FILE}",
                 f"Its config.json describes a {run.kind} head: the weights file was replaced, or the run is damaged. "
                 "Train the run again.")
    return head.eval()


# --------------------------------------------------------------------------- raw-frame methods


def load_method_clip(model_name: str, pretrained: str, device: torch.device | str = "cpu", trust_code: bool = False
                     ) -> tuple[nn.Module, str | None]:
    """`load_clip`, and one more source of weights: the run directory of a `clipreel finetune vifi`.

    That is ViFi-CLIP's "bridge": its fine-tuned CLIP is where bridge-and-prompt starts (``finetune
    prompt --pretrained RUN_DIR``), or any other method. The sha256 is that of the run's weights file.
    trust_code: see `heads.clip.load_clip`.
    """
    run_dir = Path(pretrained).expanduser()
    if not run_dir.is_dir():
        return load_clip(model_name, pretrained, device=device, trust_code=trust_code)
    run = load_run(run_dir)
    prefix = "clip."  # a run that fine-tuned a whole CLIP (ViFi-CLIP) keeps all of it, and only it, under this prefix
    if not run.kind.startswith(RUN_KIND_PREFIX) or not all(key.startswith(prefix) for key in run.state_dict):
        raise ClipreelError(f"--pretrained {run_dir}: a {run.kind!r} run holds no whole CLIP; give the run directory "
                            "of a `clipreel finetune vifi`, or a checkpoint file")
    if resolve_model_name(run.head_config["model"]) != resolve_model_name(model_name):
        raise ClipreelError(f"--pretrained {run_dir} fine-tuned {run.head_config['model']}, not {model_name}: "
                            f"pass --model {run.head_config['model']}")
    clip_model, _ = load_clip(model_name, "none", device=device)
    load_weights(clip_model, {key.removeprefix(prefix): value for key, value in run.state_dict.items()},
                 f"--pretrained {run_dir / WEIGHTS_FILE}", f"It does not hold a whole {model_name}: give the run "
                 "directory of a `clipreel finetune vifi` of this --model.")
    return clip_model, file_sha256(run_dir / WEIGHTS_FILE)


def new_method_model(method: str, model_name: str, pretrained: str, classnames: Sequence[str], frames: int,
                     options: Mapping, seed: int, device: torch.device, trust_code: bool = False
                     ) -> tuple[nn.Module, dict, str | None]:
    """A fresh CLIP (a new copy every call) wrapped by the method -> (model, its config, weights sha256)."""
    clip_model, sha256 = load_method_clip(model_name, pretrained, device, trust_code)
    tokenizer = open_clip.get_tokenizer(resolve_model_name(model_name))
    torch.manual_seed(seed)  # the new modules' initialisation
    model, method_config = create_method(method, clip_model, tokenizer, classnames, frames, options)
    return model.to(device), method_config, sha256


def trained_method_model(run_dir: str | os.PathLike, device: torch.device | str = "cpu",
                         trust_code: bool = False) -> nn.Module:
    """The trained model of a `clipreel finetune` run, in eval mode, around the CLIP it was trained
    from (refused when that CLIP's checkpoint has changed)."""
    run = load_run(run_dir)
    if not run.kind.startswith(RUN_KIND_PREFIX):
        raise ClipreelError(f"{run_dir} is a {run.kind!r} run, not a `clipreel finetune` run: evaluate it with "
                            "`clipreel eval` on a feature store.")
    config = run.head_config
    if config.get("model_config") is not None:  # a model from a config file, rebuilt without the file
        register_model_config(config["model"], config["model_config"])
    clip_model, sha256 = load_method_clip(config["model"], config["pretrained"], device, trust_code)
    if config["checkpoint_sha256"] and sha256 != config["checkpoint_sha256"]:
        raise ClipreelError(f"{run_dir} was trained from a CLIP checkpoint with sha256 {config['checkpoint_sha256']}, "
                            f"but {config['pretrained']} now has {sha256}: give the run's original weights file.")
    tokenizer = open_clip.get_tokenizer(resolve_model_name(config["model"]))
    model = rebuild_method(run.kind.removeprefix(RUN_KIND_PREFIX), clip_model, tokenizer, run.classnames,
                           config["method_config"])
    load_weights(model, run.state_dict, f"{run.path / WEIGHTS_FILE}",
                 f"Its config.json describes a {run.kind} model: the weights file was replaced, or the run is "
                 "damaged. Train the run again.")
    return model.to(device).eval()
