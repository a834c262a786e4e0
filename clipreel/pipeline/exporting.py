"""`clipreel export RUN_DIR --out FILE.safetensors`: a fine-tuned model that is still a plain CLIP,
as an open_clip checkpoint.

A ViFi-CLIP run (`clipreel finetune vifi`, or a `clipreel import` of a fine-tuned ViFi-CLIP) holds
nothing but CLIP's two towers: they are written as a safetensors file that
`open_clip.create_model(NAME, pretrained=FILE)` loads, with the model config beside it
(FILE with `.json`, registered as NAME, the file's stem, by `open_clip.add_model_config`), and
`--pretrained FILE` of every command reads it back. Every other kind of run is refused with the
reason (`heads.convert.export`).

May import: torch, open_clip, clipreel.errors, clipreel.heads, clipreel.stores, clipreel.pipeline.models.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import open_clip
from open_clip.transformer import QuickGELU

from clipreel.errors import ClipreelError
from clipreel.heads.clip import resolve_model_name
from clipreel.heads.convert.export import export_open_clip
from clipreel.pipeline.models import RUN_KIND_PREFIX, run_model_name, trained_method_model
from clipreel.stores.runs import load_run

CACHE_HEAD_REASON = ("a head trained on a frozen CLIP's cached features adds no weight to that CLIP: its CLIP is the "
                     "checkpoint the store was extracted with")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the run's CLIP to `out` and its open_clip config beside it -> (weights file, config file)."""
    out = Path(out)
    if out.suffix != ".safetensors":  # checked before the model loads
        raise ClipreelError(f"--out {out}: the open_clip checkpoint is written as safetensors; name it *.safetensors")
    run = load_run(run_dir)
    if not run.kind.startswith(RUN_KIND_PREFIX):
        raise ClipreelError(f"cannot export the {run.kind!r} run {run_dir} as an open_clip checkpoint: {CACHE_HEAD_REASON}")
    method = run.kind.removeprefix(RUN_KIND_PREFIX)
    if method != "vifi":
        export_open_clip(method, {}, {}, out)  # refuses, with the reason
    model = trained_method_model(run.path)
    config = run.head_config
    name = resolve_model_name(run_model_name(config))
    clip_config = copy.deepcopy(open_clip.get_model_config(name))
    if isinstance(model.clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU):
        clip_config["quick_gelu"] = True  # OpenAI weights load with QuickGELU whatever the config says
    config_path = export_open_clip(method, model.state_dict(), clip_config, out)
    return out, config_path
