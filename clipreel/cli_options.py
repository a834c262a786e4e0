"""The options of the `clipreel` commands, declared once: every option that means the same thing in
several commands is one object here (its name, default and help), and so are the key=value and
number-list parsers.

The help of a head or method argument lists the registered names (`heads.registry.list_heads()` /
`list_methods()`, with their one-line summaries). It is written when the help is shown
(`RegistryHelp`), because the registries import torch and open_clip, which `clipreel info`,
`synth` or `--help` should not wait seconds for. (Typer reads an option's help as it builds the
commands, an argument's only when it shows it: registry names go into arguments' help.)

May import: typer, clipreel.errors, clipreel.config (and, when the help is shown, clipreel.heads.registry).
"""

from __future__ import annotations

import json
from collections import UserString
from typing import Optional

import typer

from clipreel.config import DECODE_WORKERS, DEFAULT_MODEL
from clipreel.errors import ClipreelError


class RegistryHelp(UserString):
    """A help text ending with the registered heads and/or methods, composed on first use.

    heads: "all", "text" (only the heads that score against class text) or None.
    """

    def __init__(self, intro: str, heads: str | None = None, methods: bool = False):
        self.intro, self.heads, self.methods = intro, heads, methods

    def __bool__(self) -> bool:
        """A help is there (typer asks while it builds the commands, long before any help is shown)."""
        return True

    @property
    def data(self) -> str:
        from clipreel.heads.registry import head_entry, list_heads, list_methods, method_entry

        heads = [head_entry(name) for name in list_heads()] if self.heads else []
        if self.heads == "text":
            heads = [entry for entry in heads if entry.scores_text]
        methods = [method_entry(name) for name in list_methods()] if self.methods else []
        return f"{self.intro}: " + "; ".join(f"{entry.name} ({entry.summary})" for entry in heads + methods) + "."


HEAD_HELP = RegistryHelp("The cache head", heads="all")
METHOD_HELP = RegistryHelp("The raw-frame method", methods=True)
HEAD_OR_METHOD_HELP = RegistryHelp("A cache head (with --store) or a raw-frame method (with --videos)",
                                   heads="all", methods=True)
TEXT_HEAD_OR_METHOD_HELP = RegistryHelp("A cache head that scores against class text (with --store) or a "
                                        "raw-frame method (with --videos)", heads="text", methods=True)

DECODER_HELP = "auto (DALI when the model is on a GPU, else PyAV), pyav, or dali (on the CPU: VP8/VP9/MJPEG only)."
LOADER_HELP = ("How clips reach the model: workers (decode processes), ray (Ray Data streaming), or device "
               "(decode + augment on the model's device: DALI on a GPU); auto: device for DALI on a GPU, else workers.")

# --- the CLIP
MODEL = typer.Option(DEFAULT_MODEL, help="open_clip model: a ViT (ViT-B-16, ViT-L-14, ...), a built-in tiny one "
                                         "(clipreel-tiny, clipreel-synth), or an open_clip config file (NAME.json).")
PRETRAINED = typer.Option("default", help="The CLIP's weights: default (the model's built-in file, else its openai "
                                          "tag), an open_clip tag, a local checkpoint file, none (random init), or, "
                                          "for a raw-frame method, a run directory: a `finetune vifi` run or an import "
                                          "(its CLIP: ViFi-CLIP's bridge), or a run of the same method (trained or "
                                          "imported) to train further.")
STORE_CHECKPOINT = typer.Option(None, help="The local checkpoint file the store was extracted from, when it was "
                                           "(text heads need its text tower; a store records only its sha256).")
TRUST_CODE = typer.Option(
    False, "--trust-checkpoint-code",
    help="Let a checkpoint file that is a TorchScript archive other than an OpenAI CLIP archive run the code it "
         "carries (it runs while the file loads). Only for files from a source you trust.",
)
FRAMES = typer.Option(8, help="Frames per clip (T).")

# --- where and how it runs
DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")
DECODE_WORKERS_OPTION = typer.Option(DECODE_WORKERS, "--workers", help="Decode worker processes (or concurrent "
                                                                       "Ray tasks with --loader ray); 0 decodes in "
                                                                       "this process.")
DECODER = typer.Option("auto", help=DECODER_HELP)
LOADER = typer.Option("auto", help=LOADER_HELP)
PROGRESS = typer.Option(True, help="Show a progress bar.")
ON_BAD_VIDEO = typer.Option("stop", help="A video that cannot be decoded (or is missing): stop (the first one stops "
                                         "the command, naming its row in the list), or skip (left out of its batch; "
                                         "the rest go on). finetune lists the skipped videos in RUN_DIR/skipped.csv "
                                         "(video_id, path, split, error), eval in its report (skipped_videos).")
STORAGE_OPTION = typer.Option(
    [], "--storage-option",
    help="fsspec storage option key=value for object-store URLs, repeatable (endpoint_url=…, anon=true, "
         "client_kwargs.region_name=…); also read: AWS_* variables and config files, fsspec config. Never recorded.",
)
ADDRESS_HELP = ("Ray cluster to join: auto (the cluster `ray start` runs on this machine) or HOST:PORT "
                "(default: a private local Ray; RAY_ADDRESS, when set, is joined instead).")

# --- what trains, and how
OPTION = typer.Option([], help="Head or method option key=value, repeatable (e.g. n_ctx=4, variant=image).")
AUGMENT = typer.Option([], help="Training augmentation key=value, repeatable: flip=0 where left/right makes the "
                                "class (SSv2, 'moving left'), color_jitter=0 and grayscale=0 where colour does.")
LR = typer.Option(None, help="Peak learning rate (default: the head's or method's reference recipe).")
SEED = typer.Option(0, help="Seeds initialisation, order, views, sampling, augmentation and dropout.")

# --- which videos and classes
SPLIT = typer.Option("test", help="Manifest split to score.")
CLASSES = typer.Option(None, help="Label map naming the store's (or video list's) label ids (one class name "
                                  "per line, line i = label i).")
REPORT = typer.Option(None, help="JSON report path; the confusion PNG goes next to it.")
VIEWS = typer.Option(1, help="Raw videos: temporal views per video (scores: mean softmax over views).")

# --- the protocols (fewshot, base2novel)
PROTOCOL_STORE = typer.Option(None, help="Feature store, a folder or a URL, for a cache head (its train and test "
                                          "splits are used).")
PROTOCOL_VIDEOS = typer.Option(None, help="Video list, for a raw-frame method (its train and test splits are used).")
PROTOCOL_OUT = typer.Option(..., help="Folder for the runs and the protocol's report.")
SEEDS = typer.Option("1,2,3", help="Seeds of the draws (results are averaged over them).")
PROTOCOL_BATCH_SIZE = typer.Option(None, help="Videos per step (default: 16 from a store, 8 from raw videos).")


def parse_options(options: list[str], flag: str = "--option") -> dict:
    """key=value items of a repeatable option -> {key: value}, values parsed as JSON where they can be."""
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClipreelError(f"{flag} {item!r}: write key=value, e.g. {flag} n_ctx=4")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def numbers(text: str, what: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8), with a clear error."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ClipreelError(f"{what} {text!r}: write comma-separated whole numbers, e.g. 2,4,8") from None


def protocol_source(store: Optional[str], videos: Optional[str]) -> str:
    """The protocol's videos: a store (cache heads) or a video list (raw-frame methods)."""
    if (store is None) == (videos is None):
        raise ClipreelError("give either --store (a cache head) or --videos (a raw-frame method)")
    return store if store is not None else videos


def raw_settings(model: str, pretrained: str, frames: int, augment: list[str], workers: int) -> dict:
    """The FinetuneConfig settings of a protocol's raw-frame runs."""
    return {"model": model, "pretrained": pretrained, "frames": frames,
            "augment": parse_options(augment, "--augment"), "workers": workers}
