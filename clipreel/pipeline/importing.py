"""`clipreel import`: a released checkpoint of a reference method -> an ordinary run directory.

    clipreel import k400_vitb16_8f_dec4x768.pth --method evl --clip ViT-B-16.pt --classes k400.txt --out runs/evl-k400

The recipe, top to bottom:

1. Read the class list (`data.class_lists`: names, and EZ-CLIP's descriptions where the file has them).
2. Read the checkpoint, and the base CLIP (`--clip`) where the checkpoint lacks weights: EVL's
   frozen backbone, ViFi-CLIP's token table. Nothing but tensors and plain containers is read,
   yacs configs are skipped unread, anything else is refused (`read_checkpoint_file`).
3. Convert (`heads.convert`): every tensor's shape checked, --frames / --classes / --model checked
   against what the tensors fix. transformers' X-CLIP layout is recognised by its key names.
4. Build the model and load the converted weights strictly, so that nothing is written for a
   checkpoint the model cannot run.
5. Write the run directory (`stores.runs.save_run`):
   - EVL: a cache-head run (kind "evl") whose store provenance is what `clipreel extract` records
     for the base CLIP (so that `eval --store` accepts a store extracted from the same --clip file
     with the same --model), plus the converted backbone in RUN_DIR/clip.safetensors, from which
     `predict` taps the frames itself;
   - X-CLIP, ViFi-CLIP (fine-tuned: method "vifi"; prompted: "prompt") and EZ-CLIP: a raw-frame
     method run (kind "finetune-METHOD"), as `clipreel finetune` writes, whose CLIP is registered
     with open_clip from the config the run records (`model_config`); where the model's weights do
     not hold the whole CLIP, it is kept in RUN_DIR/clip.safetensors.
   Both record under "imported" where the weights came from, what the tensors fixed, the
   reference's conventions and its evaluation preprocessing (`heads.convert.common.Preprocessing`),
   which `eval` and `predict` use by default.

May import: torch, open_clip, clipreel.errors, clipreel.heads, clipreel.stores, clipreel.pipeline (data,
models).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch

from clipreel import __version__
from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import OPENAI_ARCHIVE_BUFFERS, read_checkpoint
from clipreel.heads.clip import file_sha256, resolve_model_name, user_model_config
from clipreel.heads.convert.clip_layout import build_clip, register_imported_clip
from clipreel.heads.convert.common import Imported, UserChoices
from clipreel.heads.convert.evl import convert_evl
from clipreel.heads.convert.ezclip import convert_ezclip
from clipreel.heads.convert.vifi import convert_vifi
from clipreel.heads.convert.xclip import convert_xclip
from clipreel.heads.convert.xclip_hf import convert_xclip_hf
from clipreel.heads.registry import rebuild_head, rebuild_method
from clipreel.pipeline.data.class_lists import ClassList, read_class_list
from clipreel.pipeline.models import RUN_KIND_PREFIX
from clipreel.stores.runs import CLIP_FILE, CONFIG_FILE, save_run, write_weights

METHODS = ("evl", "xclip", "vifi", "prompt", "ezclip")
NEEDS_BASE_CLIP = {
    "evl": "EVL's checkpoints hold the decoder only: give the frozen CLIP it was trained on (ViT-B-16.pt for dec4x768, "
           "ViT-L-14.pt for dec4x1024)",
    "vifi": "ViFi-CLIP's checkpoints lack the token table: give the CLIP it was fine-tuned from (OpenAI ViT-B-16.pt)",
    "prompt": "ViFi-CLIP's checkpoints lack the token table: give the CLIP it was fine-tuned from (OpenAI ViT-B-16.pt)",
}
# Objects of these classes in a checkpoint are skipped unread: X-CLIP's and ViFi-CLIP's
# utils/tools.py: epoch_saving stores the run's yacs config next to the weights.
SKIPPED_CLASSES = ("yacs.config.CfgNode",)
# Files transformers' save_pretrained writes into a model folder (newest format first).
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_KEY_PREFIXES = ("vision_model.", "text_model.")


@dataclass
class ImportConfig:
    """Everything `clipreel import` needs."""

    checkpoint: str  # the released file (or a transformers model folder for X-CLIP)
    method: str  # evl, xclip, vifi, prompt or ezclip
    out: str  # the run directory to create
    clip: str | None = None  # the base CLIP (an OpenAI archive, an OpenAI-layout state dict, an open_clip checkpoint)
    classes: str | None = None  # a class list file (names per line, a JSON list, a label or description CSV)
    model: str | None = None  # an open_clip model name: supplies what no tensor fixes (attention heads)
    frames: int | None = None  # T, where the checkpoint does not fix it
    trust_checkpoint_code: bool = False  # allow TorchScript archives (other than OpenAI's CLIP) whose loading runs code


@dataclass
class ImportSummary:
    """What an import made."""

    run_dir: str
    method: str
    kind: str
    classes: int
    model: str  # the open_clip name of the imported CLIP (--model with --pretrained RUN_DIR)
    facts: dict
    conventions: list[str] = field(default_factory=list)


def run_import(cfg: ImportConfig) -> ImportSummary:
    """Import `cfg.checkpoint` as a run directory at `cfg.out` (nothing is written unless it all converts)."""
    # 1. What the user gave, checked before anything is read.
    if cfg.method not in METHODS:
        raise ClipreelError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    out = Path(cfg.out)
    if (out / CONFIG_FILE).exists():
        raise ClipreelError(f"--out {out} already holds a run ({CONFIG_FILE}); choose another folder, or remove it")
    if cfg.classes is None:
        raise ClipreelError("--classes: give the class list the checkpoint was trained on (one name per line, a JSON "
                            "list, or the method's label CSV), in its class order")
    if cfg.frames is not None and cfg.frames < 1:
        raise ClipreelError(f"--frames {cfg.frames}: give at least 1")
    if cfg.method in NEEDS_BASE_CLIP and cfg.clip is None:
        raise ClipreelError(f"--clip is needed for --method {cfg.method}: {NEEDS_BASE_CLIP[cfg.method]}")
    classes = read_class_list(cfg.classes)
    model_name = resolve_model_name(cfg.model) if cfg.model is not None else None

    # 2. The files.
    checkpoint_path = Path(cfg.checkpoint).expanduser()
    checkpoint = read_checkpoint_file(checkpoint_path, "the checkpoint", cfg.trust_checkpoint_code)
    base_path = Path(cfg.clip).expanduser() if cfg.clip is not None and cfg.method in NEEDS_BASE_CLIP else None
    base = read_checkpoint_file(base_path, "--clip", cfg.trust_checkpoint_code) if base_path is not None else None

    # 3. The conversion.
    user = UserChoices(model=model_name, frames=cfg.frames,
                       num_classes=len(classes.names) if cfg.method == "evl" else None)
    imported = _convert(cfg.method, checkpoint, base, user, str(checkpoint_path))

    # 4. The model, loaded strictly; 5. the run directory.
    record = {
        "checkpoint": str(checkpoint_path.resolve()),
        "checkpoint_sha256": _sha256_of(checkpoint_path),
        "clip": str(base_path.resolve()) if base_path is not None else None,
        "clip_sha256": file_sha256(base_path) if base_path is not None else None,
        "method": imported.method,
        "facts": imported.facts,
        "conventions": imported.conventions,
        "preprocessing": imported.preprocessing.to_dict(),
        "clipreel_version": __version__,
    }
    if imported.method == "evl":
        kind = _write_evl_run(out, imported, classes, record, model_name, base)
    else:
        kind = _write_method_run(out, imported, classes, record)
    return ImportSummary(run_dir=str(out), method=imported.method, kind=kind, classes=len(classes.names),
                         model=register_imported_clip(imported.clip_config), facts=imported.facts,
                         conventions=imported.conventions)


# --------------------------------------------------------------------------- reading files


def read_checkpoint_file(path: Path, what: str, trust_code: bool = False) -> Mapping:
    """A checkpoint file (or a transformers model folder) -> what it holds, as tensors in plain containers.

    Read by `heads.checkpoints.read_checkpoint`: nothing but tensors and plain containers is
    unpickled; the yacs `CfgNode` that X-CLIP's and ViFi-CLIP's `epoch_saving` stores under
    "config" is skipped unread, and a pickle that names any other class is refused. OpenAI's CLIP
    archives are read without running their code; other TorchScript archives only with `trust_code`.
    """
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise ClipreelError(f"{what} {path} is a folder without {' or '.join(HF_WEIGHT_FILES)}; give the checkpoint file")
        path = found[0]
    if not path.is_file():
        raise ClipreelError(f"{what} {path}: no such file")
    return read_checkpoint(path, trust_code=trust_code, drop_foreign=SKIPPED_CLASSES)


def _sha256_of(path: Path) -> str:
    """The sha256 of a checkpoint file, or of a transformers folder's weights file."""
    if path.is_dir():
        path = next(path / name for name in HF_WEIGHT_FILES if (path / name).is_file())
    return file_sha256(path)


# --------------------------------------------------------------------------- converting


def _convert(method: str, checkpoint: Mapping, base: Mapping | None, user: UserChoices, source: str) -> Imported:
    """The converter of `method` (transformers' X-CLIP recognised by its keys); --method checked against the file."""
    if method == "evl":
        return convert_evl(checkpoint, base, user, source)
    if method == "xclip":
        if _holds_hf_keys(checkpoint):
            return convert_xclip_hf(checkpoint, user, source)
        return convert_xclip(checkpoint, user, source)
    if method == "ezclip":
        return convert_ezclip(checkpoint, user, source)
    imported = convert_vifi(checkpoint, base, user, source)
    if imported.method != method:
        found = ("learned prompts (prompt_learner.ctx, image_encoder.VPT)" if imported.method == "prompt"
                 else "no learned prompts (no prompt_learner.ctx)")
        raise ClipreelError(f"--method {method}: {source} holds {found}, so it is a ViFi-CLIP "
                            f"{'bridge-and-prompt' if imported.method == 'prompt' else 'fine-tuned'} checkpoint: "
                            f"pass --method {imported.method}")
    return imported


def _holds_hf_keys(checkpoint: Mapping) -> bool:
    """Whether the checkpoint's weights carry transformers' X-CLIP key names."""
    weights = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else {}
    return isinstance(weights, Mapping) and any(str(key).startswith(HF_KEY_PREFIXES) for key in weights)


# --------------------------------------------------------------------------- writing the run


def _write_method_run(out: Path, imported: Imported, classes: ClassList, record: dict) -> str:
    """A raw-frame method run: the model's weights, and its CLIP where those do not hold it."""
    name = register_imported_clip(imported.clip_config)
    method_config = dict(imported.method_config)
    if imported.method == "ezclip" and classes.descriptions:
        method_config["descriptions"] = classes.descriptions
    clip_model = build_clip(imported.clip_config, imported.clip_state_dict)
    model = rebuild_method(imported.method, clip_model, open_clip.get_tokenizer(name), classes.names, method_config)
    _load_strictly(model, imported.state_dict)
    # ViFi-CLIP's weights are the whole CLIP; the other methods keep a frozen CLIP beside what they learned.
    keeps_clip = imported.method != "vifi"
    out.mkdir(parents=True, exist_ok=True)
    sha256 = file_sha256(write_weights(out / CLIP_FILE, imported.clip_state_dict)) if keeps_clip else None
    record = _with_layout(record, imported)
    head_config = {
        "method": imported.method, "model": name, "model_config": imported.clip_config,
        "pretrained": CLIP_FILE if keeps_clip else "none", "clip_file": CLIP_FILE if keeps_clip else None,
        "checkpoint_sha256": sha256, "frames": imported.preprocessing.frames,
        "image_size": imported.preprocessing.image_size, "norm": imported.preprocessing.norm,
        "method_config": method_config,
    }
    kind = RUN_KIND_PREFIX + imported.method
    save_run(
        out, kind=kind, head=model, head_config=head_config, classnames=classes.names,
        provenance={"source": "imported", "model": name, "pretrained": head_config["pretrained"],
                    "checkpoint_sha256": sha256, "image_size": head_config["image_size"],
                    "norm": head_config["norm"], "frames": head_config["frames"]},
        store_path=record["checkpoint"], train_config={"imported_from": record["checkpoint"]}, imported=record,
    )
    return kind


def _write_evl_run(out: Path, imported: Imported, classes: ClassList, record: dict, model_name: str | None,
                   base: Mapping) -> str:
    """A cache-head run of the EVL decoder, whose features are those `extract` makes from the base CLIP."""
    from clipreel.pipeline.data.preprocess import PreprocessConfig
    from clipreel.pipeline.data.sampling import SamplingConfig

    name = register_imported_clip(imported.clip_config)
    head = rebuild_head("evl", imported.method_config, classes.names)
    _load_strictly(head, imported.state_dict)
    if model_name is not None:
        _check_extracts_alike(model_name, base)
    prep = imported.preprocessing
    feature_blocks = imported.facts["feature_blocks"]
    provenance = {  # what `clipreel extract --model M --pretrained CLIP --layers K --frames T` records (taps.Backbone)
        "model": model_name or name, **_config_of(model_name or name), "pretrained": Path(record["clip"]).name, "checkpoint_sha256": record["clip_sha256"],
        "activation": "quick_gelu", "image_size": prep.image_size, "patch_size": imported.facts["patch_size"],
        "width": imported.facts["width"], "num_heads": imported.facts["heads"], "tokens": imported.facts["grid"] ** 2 + 1,
        "embed_dim": imported.clip_config["embed_dim"], "num_blocks": imported.clip_config["vision_cfg"]["layers"],
        "feature_blocks": feature_blocks, "norm": prep.norm, "mean": list(prep.mean), "std": list(prep.std),
        "frames": prep.frames, "views": prep.views * prep.crops, "temporal_views": prep.views, "crops": prep.crops,
        "sampling": SamplingConfig(policy=prep.sampling, frames=prep.frames, stride=prep.stride or 1, views=prep.views).to_dict(),
        "preprocess": PreprocessConfig(image_size=prep.image_size, mean=prep.mean, std=prep.std, crops=prep.crops).to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    sha256 = file_sha256(write_weights(out / CLIP_FILE, imported.clip_state_dict))
    record = {**_with_layout(record, imported),
              "backbone": {"model": name, "model_config": imported.clip_config, "clip_file": CLIP_FILE,
                           "checkpoint_sha256": sha256, "layers": ",".join(map(str, feature_blocks)) + ","}}
    save_run(out, kind="evl", head=head, head_config=imported.method_config, classnames=classes.names,
             provenance=provenance, store_path="", train_config={"imported_from": record["checkpoint"]}, imported=record)
    return "evl"


def _config_of(model_name: str) -> dict:
    """{"model_config": ...} for a model registered from a config (a file, or an import), as a store records it."""
    config = user_model_config(model_name)
    return {"model_config": config} if config is not None else {}


def _with_layout(record: dict, imported: Imported) -> dict:
    """The "imported" entry of the run's config.json: the record, and whose key names the file used."""
    return {**record, "layout": imported.facts.get("layout", "reference")}


def _load_strictly(model: torch.nn.Module, state_dict: Mapping) -> None:
    """Load converted weights; a mismatch here is a converter bug, not the user's file."""
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _check_extracts_alike(model_name: str, base: Mapping) -> None:
    """`extract --model M --pretrained CLIP` must run the base CLIP as EVL did, with QuickGELU
    (OpenAI's CLIP): open_clip uses it when the file carries OpenAI's archive entries or M says so."""
    config = open_clip.get_model_config(model_name) or {}
    weights = base.get("state_dict", base) if isinstance(base, Mapping) else {}
    if not config.get("quick_gelu") and OPENAI_ARCHIVE_BUFFERS[0] not in weights:
        raise ClipreelError(
            f"--model {model_name}: its config uses GELU and --clip is not an OpenAI archive, so `clipreel extract "
            f"--model {model_name}` would not compute the features EVL was trained on (QuickGELU). Pass "
            f"--model {model_name}-quickgelu (or the OpenAI archive as --clip)"
        )
