"""Loading open_clip CLIPs: model names, built-in tiny configs and weights, checkpoint files.

`load_clip(name, pretrained)` gives the full CLIP (both towers), frozen and in eval mode, from an
open_clip tag, a local checkpoint file, the package's built-in weights ("default") or seeded random
weights ("none"). `load_text_model` loads the CLIP whose image tower made a feature store, so that
the text heads score against the matching text tower. NORMS are the two input normalisations the
reference methods use.

A model is named by an open_clip config name ("ViT-B-16"), one of the package's tiny configs, or
the path of an open_clip config JSON file ("configs/MyViT.json"). A file's config is registered
with open_clip under its stem and the start of its content's sha256 ("MyViT-1a2b3c4d"), so that
two different files never share a name and the same content always gets the same one; stores and
runs record that content (`user_model_config`), from which `register_model_config` rebuilds it.

May import: torch, open_clip, clipreel.errors, clipreel.heads.checkpoints. Nothing from pipeline/
or stores/.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import open_clip.factory
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.pretrained import has_hf_hub
from torch import nn

from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import OPENAI_ARCHIVE_BUFFERS, read_state_dict

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
# Weights shipped in the package (clipreel/weights/), used by --pretrained default:
# model name -> file name. clipreel-synth knows the synthetic world's colours and shapes
# (trained by clipreel.pipeline.data.synth.train_clip).
BUILTIN_WEIGHTS = {"clipreel-synth": "clipreel-synth.safetensors"}
# name -> (mean, std) per RGB channel, on [0, 1] pixels: CLIP's own statistics (EVL, EZ-CLIP) and
# ImageNet's (X-CLIP, ViFi-CLIP).
NORMS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
HUB_PROBE_SECONDS = 3.0  # an offline machine fails this fast instead of ~45 s of download retries
LOCAL_WEIGHTS_HINT = (
    "Pass a local checkpoint file instead (--pretrained /path/to/checkpoint: .pt, .pth, .bin or "
    ".safetensors) or --pretrained none for random weights"
)


# The open_clip configs registered from JSON files in this process: registered name -> config.
_USER_CONFIGS: dict[str, dict] = {}
# What an open_clip model config holds at least (open_clip.factory._rescan_model_configs checks the same).
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def register_builtin_models() -> list[str]:
    """Make the configs shipped in clipreel/model_configs known to open_clip; returns their names.

    Safe to call any number of times (the directory is added once).
    """
    names = sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return names


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def builtin_weights(model_name: str) -> Path | None:
    """The weights file shipped in the package for `model_name` (see BUILTIN_WEIGHTS), or None.

    The path may not exist (a build without the weights): `default_pretrained` checks.
    """
    filename = BUILTIN_WEIGHTS.get(model_name)
    if filename is None:
        return None
    package_dir = resources.files("clipreel")  # a pathlib.Path: clipreel installs as files, never zipped
    return Path(package_dir / "weights" / filename)


def default_pretrained(model_name: str) -> str:
    """What --pretrained default means for `model_name`: its built-in weights file, else "openai".

    Raises ClipreelError when the model has neither (say what to pass instead), or when its
    built-in file is missing from this installation.
    """
    shipped = builtin_weights(model_name)
    if shipped is not None:
        if not shipped.is_file():
            raise ClipreelError(
                f"the built-in weights of {model_name} ({shipped}) are missing from this installation: "
                f"reinstall clipreel, or rebuild them with: python -m clipreel.pipeline.data.synth.train_clip --out {shipped}"
            )
        return str(shipped)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if "openai" in tags:
        return "openai"
    known = f"its tags: {', '.join(tags)}" if tags else "it has no download tags"
    raise ClipreelError(
        f"--pretrained default: {model_name} has no built-in weights and no 'openai' tag ({known}). "
        f"{LOCAL_WEIGHTS_HINT}, or name one of its tags. Models with built-in weights: "
        f"{', '.join(BUILTIN_WEIGHTS)}."
    )


def load_clip(
    model_name: str, pretrained: str, device: str | torch.device = "cpu", trust_code: bool = False
) -> tuple[torch.nn.Module, str | None]:
    """The full open_clip CLIP (both towers), frozen and in eval mode, on `device`.

    Returns (model, checkpoint sha256 or None). `pretrained` is an open_clip tag, a local file,
    "none" or "default" (the model's built-in weights file, else its "openai" tag: see
    `default_pretrained`). Local files are read here (clipreel.heads.checkpoints: no code in them
    runs unless `trust_code`) rather than by open_clip, because open_clip 3.3 cannot open OpenAI's
    TorchScript archives (it loads with weights_only=True) and does not notice that OpenAI
    weights need QuickGELU; for the same reason a tag whose weights were trained with QuickGELU
    (e.g. "openai") gets it, whatever the model config says.
    """
    name = resolve_model_name(model_name)
    sha256 = None
    if pretrained.lower() == "default":
        pretrained = default_pretrained(name)
    if pretrained.lower() == "none":
        # Seeded: every actor of a job, and every re-run, must build the same random model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _untrained_model(name)
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        model = _model_from_file(name, path, trust_code)
        sha256 = file_sha256(path)
    elif _looks_like_path(pretrained):
        raise ClipreelError(f"--pretrained {pretrained}: no such file. {LOCAL_WEIGHTS_HINT}.")
    else:
        model = _model_from_tag(name, pretrained)
    model.eval()
    model.requires_grad_(False)
    return model.to(device), sha256


def resolve_model_name(model_name: str) -> str:
    """The open_clip config name for `model_name` ("ViT-B/16" -> "ViT-B-16"), or a helpful error.

    A path ending in .json is an open_clip config file: it is registered (`register_model_config`)
    and its registered name returned.
    """
    builtin = register_builtin_models()
    if model_name.lower().endswith(".json"):
        path = Path(model_name).expanduser()
        config = read_model_config(path)
        return register_model_config(f"{path.stem}-{config_digest(config)}", config)
    name = model_name.replace("/", "-")
    known = open_clip.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    raise ClipreelError(
        f"--model {model_name!r} is not an open_clip model. "
        f"Close names: {', '.join(close) or 'none'}. Built-in tiny models: {', '.join(builtin)}. "
        "Or give the path of an open_clip model config file (NAME.json). "
        "All names: python -c 'import open_clip; print(open_clip.list_models())'"
    )


def read_model_config(path: Path) -> dict:
    """The open_clip model config in a JSON file, checked (a clear error for anything else)."""
    if not path.is_file():
        raise ClipreelError(f"--model {path}: no such file; give an open_clip model config file (NAME.json) or a model name")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ClipreelError(f"--model {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ClipreelError(f"--model {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    check_model_config(config, str(path))
    return config


def check_model_config(config, source: str) -> None:
    """Refuse what open_clip could not build a model from, naming what is wrong."""
    example = "see open_clip's model_configs/ViT-B-16.json for an example"
    if not isinstance(config, dict) or not all(key in config for key in CONFIG_KEYS):
        missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
        raise ClipreelError(
            f"--model {source}: not an open_clip model config (it lacks {', '.join(missing)}); a model config "
            f"holds embed_dim, vision_cfg and text_cfg: {example}"
        )
    if not isinstance(config["embed_dim"], int) or isinstance(config["embed_dim"], bool) or config["embed_dim"] < 1:
        raise ClipreelError(f"--model {source}: embed_dim must be a positive whole number, not {config['embed_dim']!r}")
    for key, settings in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if not isinstance(config[key], dict):
            raise ClipreelError(f"--model {source}: {key} must be an object of settings, not {config[key]!r}; {example}")
        known = {field.name for field in dataclasses.fields(settings)}
        unknown = sorted(set(config[key]) - known)
        if unknown:
            raise ClipreelError(
                f"--model {source}: {key} has settings open_clip does not know: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )


def config_digest(config: Mapping) -> str:
    """The first 8 hex digits of the sha256 of `config` written canonically (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def register_model_config(name: str, config: Mapping) -> str:
    """Make `config` (an open_clip model config, checked) known to open_clip as `name`; returns `name`.

    open_clip registers configs only from files, by file stem (`add_model_config`); clipreel
    registers them by content under a name of its choice, so it writes open_clip's registry (a
    dict that open_clip rebinds when it rescans, so it is looked up on every call) itself.
    """
    check_model_config(config, name)
    config = copy.deepcopy(dict(config))
    registry = open_clip.factory._MODEL_CONFIGS
    if name in registry and _USER_CONFIGS.get(name) != config:
        raise ClipreelError(f"--model: the name {name!r} is taken by another open_clip config; rename the file")
    registry[name] = config
    _USER_CONFIGS[name] = copy.deepcopy(config)
    return name


def user_model_config(name: str) -> dict | None:
    """The config of a model registered from a JSON file (what rebuilds it elsewhere), else None."""
    config = _USER_CONFIGS.get(name)
    return copy.deepcopy(config) if config is not None else None


def _looks_like_path(pretrained: str) -> bool:
    """A missing file rather than a tag: has a directory part or a checkpoint suffix."""
    suffixes = (".pt", ".pth", ".bin", ".safetensors")
    return os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(suffixes)


def _model_from_tag(name: str, tag: str) -> torch.nn.Module:
    """open_clip's own download-and-cache path, failing fast and clearly when it cannot download."""
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "it has no download tags"
        raise ClipreelError(
            f"--pretrained {tag!r} is neither a file nor a known weights tag of {name} ({known}). "
            f"{LOCAL_WEIGHTS_HINT}."
        )
    host = _unreachable_download_host(tag_cfg)
    if host is not None:
        raise ClipreelError(
            f"cannot download the {tag!r} weights of {name}: {host} is not reachable (no network?). "
            f"{LOCAL_WEIGHTS_HINT}. If the weights are already in your Hugging Face cache, "
            "set HF_HUB_OFFLINE=1 to use them."
        )
    try:
        return open_clip.create_model(
            name, pretrained=tag, force_quick_gelu=tag_cfg.get("quick_gelu", False)
        )
    except RuntimeError as exc:  # open_clip reports every failed download as a RuntimeError
        reason = str(exc).rstrip(". ")
        raise ClipreelError(f"could not load the {tag!r} weights of {name}: {reason}. {LOCAL_WEIGHTS_HINT}.") from exc


def _unreachable_download_host(tag_cfg: dict) -> str | None:
    """The host open_clip would download this tag from, if it cannot be reached; else None.

    Without this check an offline machine spends ~45 s in huggingface_hub's retries before
    failing. The check is skipped when it could be wrong or is not needed: under HF_HUB_OFFLINE
    (open_clip then reads the local cache only), behind a proxy, or for a tag naming a file.
    """
    proxy_set = any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if os.environ.get("HF_HUB_OFFLINE") or proxy_set or tag_cfg.get("file"):
        return None
    if tag_cfg.get("hf_hub") and has_hf_hub():  # open_clip prefers the hub
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(tag_cfg.get("url", "")).hostname
    if not host:
        return None
    try:
        with socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS):
            return None
    except OSError:
        return host


def _untrained_model(name: str, **options) -> torch.nn.Module:
    """open_clip's model without weights, minus its warning that none were loaded (we load them
    ourselves, or chose random init on purpose)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(name, pretrained=None, **options)
    finally:
        root.setLevel(level)


def _model_from_file(name: str, path: Path, trust_code: bool) -> torch.nn.Module:
    """Build `name` and load a local checkpoint into it (strict: every tensor must fit)."""
    state_dict = read_state_dict(path, trust_code=trust_code)
    # OpenAI's released weights carry these entries, and were trained with QuickGELU.
    openai_format = OPENAI_ARCHIVE_BUFFERS[0] in state_dict
    for key in OPENAI_ARCHIVE_BUFFERS:
        state_dict.pop(key, None)
    model = _model_without_weights(name, force_quick_gelu=openai_format)
    # TorchScript archives also hold non-persistent buffers (e.g. the text causal mask); the
    # model builds its own.
    rebuilt_buffers = {key for key, _ in model.named_buffers()} - set(model.state_dict())
    for key in rebuilt_buffers:
        state_dict.pop(key, None)
    # The model takes copies of the checkpoint's tensors as its own (assign: it may be on the meta
    # device), in its dtypes, contiguous and freshly allocated: the tensors safetensors reads are
    # views into one buffer, not aligned as the CPU kernels expect, which then round differently.
    declared = model.state_dict()
    state_dict = {key: value.to(declared[key].dtype, copy=True, memory_format=torch.contiguous_format)
                  if key in declared else value for key, value in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        details = "\n".join(str(exc).splitlines()[:6])
        raise ClipreelError(
            f"{path} does not hold weights for model {name}: check that --model matches the "
            f"checkpoint.\n{details}"
        ) from exc
    return model


def _model_without_weights(name: str, **options) -> torch.nn.Module:
    """`name` built to receive a checkpoint: on the meta device (no memory, no random init, which
    the checkpoint replaces anyway) with its non-persistent buffers rebuilt on the CPU. A model
    with a tower from timm or Hugging Face, or with a non-persistent buffer of another kind, gets
    open_clip's plain random build instead: clipreel cannot rebuild their buffers, and their
    constructors may read tensor values.

    open_clip's own towers keep one kind of non-persistent buffer: the causal mask of a text
    transformer, `attn_mask` (L, L), -inf above the diagonal and 0 elsewhere (open_clip/transformer.py,
    TextTransformer.build_causal_mask and MultimodalTransformer.build_attention_mask; CLIP keeps
    its text tower's as its own `attn_mask`).
    """
    config = open_clip.get_model_config(name)
    if "timm_model_name" in config["vision_cfg"] or "hf_model_name" in config["text_cfg"]:
        return _untrained_model(name, **options)
    with torch.device("meta"):
        model = _untrained_model(name, device="meta", **options)
    persistent = set(model.state_dict())
    masks = {key: buffer for key, buffer in model.named_buffers() if key not in persistent}
    if not all(key.rpartition(".")[2] == "attn_mask" and buffer.ndim == 2 and buffer.shape[0] == buffer.shape[1]
               for key, buffer in masks.items()):
        return _untrained_model(name, **options)
    for key, buffer in masks.items():
        owner, _, buffer_name = key.rpartition(".")
        mask = torch.full(tuple(buffer.shape), float("-inf"), dtype=buffer.dtype).triu_(1)  # (L, L)
        model.get_submodule(owner).register_buffer(buffer_name, mask, persistent=False)
    return model


# --------------------------------------------------------------------------- the text tower

# The pretrained values that name no file: load_clip resolves them by itself.
_NON_FILE_PRETRAINED = ("none", "default")


@dataclass
class TextModel:
    """The store's full CLIP (both towers, frozen) and its tokenizer, for the text kinds."""

    clip: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str


def load_text_model(
    provenance: Mapping, store_checkpoint: str | None = None, trust_code: bool = False
) -> TextModel:
    """Load the CLIP whose image tower made the store, so its text tower matches the features.

    The store's provenance names the model (and holds its config when it came from a JSON file)
    and the weights. Tags, "default" and "none" load as they are. A local checkpoint file is
    recorded only by its name and sha256, so the caller must pass the file (`--store-checkpoint FILE`);
    its sha256 must equal the recorded one. `trust_code`: see `load_clip`.
    """
    register_builtin_models()
    model_name = provenance.get("model")
    if provenance.get("model_config") is not None:
        register_model_config(model_name, provenance["model_config"])
    recorded = provenance.get("pretrained")
    recorded_sha = provenance.get("checkpoint_sha256")
    if not model_name or recorded is None:
        raise ClipreelError(
            "the store's provenance records no 'model'/'pretrained': it was not written by `clipreel "
            "extract`, so the matching text tower is unknown. Re-extract the store with clipreel."
        )
    names_a_file = recorded_sha is not None and str(recorded).lower() not in _NON_FILE_PRETRAINED
    if store_checkpoint is None and names_a_file:
        raise ClipreelError(
            f"the store was extracted with the local checkpoint {recorded!r} (sha256 {recorded_sha[:12]}...): "
            f"pass that file with --store-checkpoint PATH so that the text tower matches the image features."
        )
    pretrained = store_checkpoint if store_checkpoint is not None else str(recorded)
    clip, sha256 = load_clip(model_name, pretrained, trust_code=trust_code)
    if recorded_sha is not None and sha256 != recorded_sha:
        raise ClipreelError(
            f"--store-checkpoint {pretrained}: its sha256 is {str(sha256)[:12]}..., but the store was extracted "
            f"with {recorded!r} (sha256 {recorded_sha[:12]}...). Pass the checkpoint the store was made with."
        )
    if recorded_sha is None and sha256 is not None:
        raise ClipreelError(
            f"--store-checkpoint {pretrained}: the store was extracted with the weights {recorded!r}, which a "
            "file cannot be checked against. Drop --store-checkpoint to load those weights."
        )
    return TextModel(clip=clip, tokenizer=open_clip.get_tokenizer(model_name), model_name=model_name)
