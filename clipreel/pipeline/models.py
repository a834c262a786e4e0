"""The models the stages train and score, built from where their weights come from.

- Cache heads: the store's text tower when the head scores against class text
  (`text_model_for`), a trained head back from its run directory (`trained_head`), and the weights
  a new training starts from (`start_weights`: a trained or imported run of the same head).
- Raw-frame methods: the CLIP a method starts from (an open_clip tag, a local file, the package's
  built-in weights, seeded random weights, the CLIP a `clipreel finetune vifi` run fine-tuned, or
  the CLIP of a `clipreel import` run: `load_method_clip`), a new method model around it
  (`new_method_model`), and a trained or imported one back from its run directory
  (`trained_method_model`), checked against the CLIP it was trained from.

May import: torch, open_clip, clipreel.errors, clipreel.heads, clipreel.stores.runs.
"""

from __future__ import annotations

import json
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
from clipreel.stores.runs import WEIGHTS_FILE, Run, load_run, load_weights, provenance_mismatch

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


def start_weights(run_dir: str | os.PathLike, kind: str, head_config: Mapping, classnames: Sequence[str],
                  provenance: Mapping) -> dict:
    """The weights of a run (trained or imported) that a new training of the same head starts from.

    The run must be of the same head with the same config, on features that mean the same as the
    store's; a closed-set head also needs the same classes in the same order.
    """
    run = load_run(run_dir)
    if run.kind != kind:
        raise ClipreelError(f"--start {run_dir} is a {run.kind!r} run: a {kind} head starts only from a {kind} run")
    ours = json.loads(json.dumps(dict(head_config)))  # as config.json reads back (tuples as lists)
    differing = sorted(key for key in set(ours) | set(run.head_config) if ours.get(key) != run.head_config.get(key))
    if differing:
        raise ClipreelError(f"--start {run_dir}: its {kind} head differs from this one in "
                            + ", ".join(f"{key} ({run.head_config.get(key)!r} vs {ours.get(key)!r})" for key in differing))
    if not head_entry(kind).scores_text and list(classnames) != run.classnames:
        raise ClipreelError(f"--start {run_dir} classifies among its own {len(run.classnames)} classes "
                            f"({', '.join(run.classnames[:5])}{' ...' if len(run.classnames) > 5 else ''}); give a "
                            "store (or --classes label map) with exactly those classes in that order")
    differences = provenance_mismatch(run.provenance, provenance)
    if differences:
        raise ClipreelError(f"--start {run_dir} was trained on other features than the store's:\n  - "
                            + "\n  - ".join(differences))
    return run.state_dict


# --------------------------------------------------------------------------- raw-frame methods


def load_method_clip(model_name: str, pretrained: str, device: torch.device | str = "cpu", trust_code: bool = False
                     ) -> tuple[nn.Module, str | None]:
    """`load_clip`, and one more source of weights: a run directory that holds a whole CLIP.

    That is ViFi-CLIP's "bridge": the CLIP a `clipreel finetune vifi` run fine-tuned is where
    bridge-and-prompt starts (``finetune prompt --pretrained RUN_DIR``), or any other method; and
    the CLIP of a `clipreel import` run (the model itself for ViFi-CLIP, the CLIP the method was
    built around for the others). The sha256 is that of the run's file holding the CLIP.
    trust_code: see `heads.clip.load_clip`.
    """
    run_dir = Path(pretrained).expanduser()
    if not run_dir.is_dir():
        return load_clip(model_name, pretrained, device=device, trust_code=trust_code)
    run = load_run(run_dir)
    config = run.head_config
    if not run.kind.startswith(RUN_KIND_PREFIX):
        raise ClipreelError(f"--pretrained {run_dir}: a {run.kind!r} run holds no whole CLIP; give the run directory "
                            "of a `clipreel finetune vifi` or of a `clipreel import`, or a checkpoint file")
    run_model = run_model_name(config)
    if resolve_model_name(run_model) != resolve_model_name(model_name):
        raise ClipreelError(f"--pretrained {run_dir} holds a {run_model} CLIP, not {model_name}: pass --model {run_model}")
    if config.get("clip_file"):
        return _imported_clip(run, device)
    prefix = "clip."  # a run that fine-tuned a whole CLIP (ViFi-CLIP) keeps all of it, and only it, under this prefix
    if not all(key.startswith(prefix) for key in run.state_dict):
        raise ClipreelError(f"--pretrained {run_dir}: a {run.kind!r} run holds no whole CLIP; give the run directory "
                            "of a `clipreel finetune vifi` or of a `clipreel import`, or a checkpoint file")
    clip_model, _ = load_clip(model_name, "none", device=device)
    load_weights(clip_model, {key.removeprefix(prefix): value for key, value in run.state_dict.items()},
                 f"--pretrained {run_dir / WEIGHTS_FILE}", f"It does not hold a whole {model_name}: give the run "
                 "directory of a `clipreel finetune vifi` of this --model.")
    return clip_model, file_sha256(run_dir / WEIGHTS_FILE)


def run_model_name(config: Mapping) -> str:
    """The open_clip name of a method run's CLIP, registered again from the config the run records
    when it came from a config file or an import (`model_config`)."""
    if config.get("model_config") is not None:
        register_model_config(config["model"], config["model_config"])
    return config["model"]


def _imported_clip(run: Run, device: torch.device | str) -> tuple[nn.Module, str]:
    """The CLIP an import keeps beside its weights (RUN_DIR/clip.safetensors), checked by checksum."""
    config = run.head_config
    path = run.path / config["clip_file"]
    if not path.is_file():
        raise ClipreelError(f"{run.path} is incomplete: {config['clip_file']} (its CLIP) is missing. Import the checkpoint again.")
    clip_model, sha256 = load_clip(run_model_name(config), str(path), device=device)
    if sha256 != config["checkpoint_sha256"]:
        raise ClipreelError(f"{path} has changed since the import (sha256 {sha256[:12]}..., recorded "
                            f"{config['checkpoint_sha256'][:12]}...). Import the checkpoint again.")
    return clip_model, sha256


def new_method_model(method: str, model_name: str, pretrained: str, classnames: Sequence[str], frames: int,
                     options: Mapping, seed: int, device: torch.device, trust_code: bool = False
                     ) -> tuple[nn.Module, dict, str | None]:
    """A fresh CLIP (a new copy every call) wrapped by the method -> (model, its config, weights sha256).

    `pretrained` naming a run directory of the same method (trained or imported) starts from that
    run's whole model, to train it further (`continued_method_model`).
    """
    run_dir = Path(pretrained).expanduser()
    if run_dir.is_dir() and load_run(run_dir).kind == RUN_KIND_PREFIX + method:
        return continued_method_model(method, model_name, run_dir, classnames, frames, options, device, trust_code)
    clip_model, sha256 = load_method_clip(model_name, pretrained, device, trust_code)
    tokenizer = open_clip.get_tokenizer(resolve_model_name(model_name))
    torch.manual_seed(seed)  # the new modules' initialisation
    model, method_config = create_method(method, clip_model, tokenizer, classnames, frames, options)
    return model.to(device), method_config, sha256


def continued_method_model(method: str, model_name: str, run_dir: Path, classnames: Sequence[str], frames: int,
                           options: Mapping, device: torch.device, trust_code: bool = False
                           ) -> tuple[nn.Module, dict, str]:
    """A run's model (trained or imported) to train further, among `classnames` -> (model, its config, sha256
    of the run's weights). Its architecture is the run's: --model, --frames and options must agree with it."""
    run = load_run(run_dir)
    config = run.head_config
    run_model = run_model_name(config)
    if resolve_model_name(run_model) != resolve_model_name(model_name):
        raise ClipreelError(f"--pretrained {run_dir} is a {run.kind} run of a {run_model} CLIP, not {model_name}: "
                            f"pass --model {run_model} to train it further")
    method_config = dict(config["method_config"])
    fixed_frames = method_config.get("frames")
    if fixed_frames is not None and fixed_frames != frames:
        raise ClipreelError(f"--frames {frames}: the {run.kind} run {run_dir} works on {fixed_frames} frames per clip; "
                            f"pass --frames {fixed_frames}")
    differing = sorted(key for key, value in options.items() if method_config.get(key) != value)
    if differing:
        raise ClipreelError(f"--option {', '.join(differing)}: training {run_dir} further keeps its {method} config "
                            f"({', '.join(f'{key}={method_config.get(key)!r}' for key in differing)}); leave them out")
    model = trained_method_model(run_dir, device, trust_code)  # rebuilt by the method's class: what trains in it trains again
    model.set_classnames(list(classnames))
    return model.train(), method_config, file_sha256(run.path / WEIGHTS_FILE)


def trained_method_model(run_dir: str | os.PathLike, device: torch.device | str = "cpu",
                         trust_code: bool = False) -> nn.Module:
    """The trained model of a `clipreel finetune` run (or of a `clipreel import` of a raw-frame method),
    in eval mode, around the CLIP it was trained from (refused when that CLIP's checkpoint has changed)."""
    run = load_run(run_dir)
    if not run.kind.startswith(RUN_KIND_PREFIX):
        raise ClipreelError(f"{run_dir} is a {run.kind!r} run, not a `clipreel finetune` run: evaluate it with "
                            "`clipreel eval` on a feature store.")
    config = run.head_config
    clip_model = _base_clip(run, device, trust_code)
    tokenizer = open_clip.get_tokenizer(resolve_model_name(run_model_name(config)))
    model = rebuild_method(run.kind.removeprefix(RUN_KIND_PREFIX), clip_model, tokenizer, run.classnames,
                           config["method_config"])
    load_weights(model, run.state_dict, f"{run.path / WEIGHTS_FILE}",
                 f"Its config.json describes a {run.kind} model: the weights file was replaced, or the run is "
                 "damaged. Train the run again.")
    return model.to(device).eval()


def _base_clip(run: Run, device: torch.device | str, trust_code: bool) -> nn.Module:
    """The CLIP a method run's model is built around, before the run's own weights load into it."""
    config = run.head_config
    if config.get("clip_file"):
        return _imported_clip(run, device)[0]
    start = Path(config["pretrained"]).expanduser()
    if start.is_dir() and load_run(start).kind == run.kind:  # trained further from a run of the same method
        sha256 = file_sha256(start / WEIGHTS_FILE)
        if sha256 != config["checkpoint_sha256"]:
            raise ClipreelError(f"{run.path} was trained further from {start}, whose weights have changed since "
                                f"(sha256 {sha256[:12]}..., recorded {config['checkpoint_sha256'][:12]}...).")
        return _base_clip(load_run(start), device, trust_code)
    clip_model, sha256 = load_method_clip(run_model_name(config), config["pretrained"], device, trust_code)
    if config["checkpoint_sha256"] and sha256 != config["checkpoint_sha256"]:
        raise ClipreelError(f"{run.path} was trained from a CLIP checkpoint with sha256 {config['checkpoint_sha256']}, "
                            f"but {config['pretrained']} now has {sha256}: give the run's original weights file.")
    return clip_model
