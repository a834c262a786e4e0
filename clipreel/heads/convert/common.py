"""What every checkpoint converter shares: unwrapping containers, the key report, reading shapes,
the user's values checked against the tensors, and what a conversion returns.

A converter takes the checkpoint's tensors as a plain dict (reading files is not done here) and
returns an `Imported`: what the tensors fix (`facts`), the open_clip CLIP the method's model is
built around (`clip_config` + `clip_state_dict`), the config and the strict state dict of
clipreel's model class, and the method's evaluation preprocessing. Every tensor's shape is
checked against the layout the facts imply; a checkpoint that does not fit is refused with a
message naming every missing, unexpected and mis-shaped key (`check_layout`).

May import: torch, clipreel.config, clipreel.errors, clipreel.heads.clip.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from clipreel.config import JsonConfig
from clipreel.errors import ClipreelError
from clipreel.heads.clip import NORMS

Tensors = dict[str, torch.Tensor]
Shape = tuple[int, ...]

# Where training scripts put the weights inside a saved dict: EVL, X-CLIP and ViFi-CLIP save
# {"model": ...} (their checkpoint.py / utils/tools.py), EZ-CLIP {"model_state_dict": ...}
# (utils/saving.py), Lightning-style tools {"state_dict": ...}.
CONTAINER_KEYS = ("model", "model_state_dict", "state_dict")
DDP_PREFIX = "module."


def unwrap_checkpoint(checkpoint: Mapping, source: str) -> Tensors:
    """A loaded checkpoint -> its tensors, name -> tensor.

    Takes the weights out of a training container (`CONTAINER_KEYS`) and strips the DDP
    `module.` prefix when every key carries it. `source` names the checkpoint in messages (a
    file name or an option such as "--clip"). Refuses anything that is not, in the end, a dict
    of tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise ClipreelError(f"{source}: holds a {type(checkpoint).__name__}, not a dict of tensors (a state dict).")
    for key in CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    not_tensors = sorted(str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if not_tensors or not checkpoint:
        found = f"entries that are not tensors: {', '.join(not_tensors)}" if not_tensors else "no tensors"
        raise ClipreelError(
            f"{source}: expected a state dict (name -> tensor), or a training checkpoint holding one under "
            f"{', '.join(repr(key) for key in CONTAINER_KEYS)}; found {found}."
        )
    tensors = dict(checkpoint)
    if all(key.startswith(DDP_PREFIX) for key in tensors):
        tensors = {key[len(DDP_PREFIX) :]: value for key, value in tensors.items()}
    return tensors


def as_float32(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Contiguous float32 copies of floating tensors (EZ-CLIP saves fp16); other dtypes copied as they are."""
    return {
        key: (value.float() if value.is_floating_point() else value).detach().clone().contiguous()
        for key, value in tensors.items()
    }


def round_to_fp16(tensor: torch.Tensor) -> torch.Tensor:
    """float32 holding the value nearest in float16: what a reference computes after `.half()`."""
    return tensor.half().float()


# --------------------------------------------------------------------------- reading shapes


def tensor_shape(tensors: Mapping[str, torch.Tensor], key: str, source: str, ndim: int) -> Shape:
    """The shape of `tensors[key]`, which a converter reads a fact from; refused when absent or of
    the wrong rank (naming the key)."""
    if key not in tensors:
        raise ClipreelError(
            f"{source}: has no {key!r}, which this layout always holds. Check that the file is a checkpoint of "
            "the method you import (keys are named without the DDP 'module.' prefix)."
        )
    shape = tuple(tensors[key].shape)
    if len(shape) != ndim:
        raise ClipreelError(f"{source}: {key} has shape {shape}; this layout has a {ndim}-d tensor there.")
    return shape


def numbered(tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered modules `prefix{i}.` the keys hold (1 + the largest i; 0 when none).

    A gap in the numbering shows up in the key report as the missing keys of the absent index.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(match.group(1)) for key in tensors if (match := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def whole_ratio(numerator: int, denominator: int, what: str, source: str) -> int:
    """numerator / denominator when it divides exactly, else refused naming `what`."""
    if denominator <= 0 or numerator % denominator:
        raise ClipreelError(f"{source}: {what} ({numerator} / {denominator}) is not a whole number.")
    return numerator // denominator


# --------------------------------------------------------------------------- the key report


@dataclass
class KeyReport:
    """How a checkpoint's tensors differ from the layout its facts imply."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # (key, found, expected)

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)

    def describe(self) -> str:
        """One line per kind of problem, each naming the keys."""
        lines = []
        if self.mis_shaped:
            shapes = [f"{key} {found} (expected {expected})" for key, found, expected in self.mis_shaped]
            lines.append(f"mis-shaped ({len(shapes)}): {', '.join(shapes)}")
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def key_report(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Shape]) -> KeyReport:
    """Compare `tensors` with the expected key -> shape table."""
    report = KeyReport()
    for key in sorted(expected):
        if key not in tensors:
            report.missing.append(key)
        elif tuple(tensors[key].shape) != tuple(expected[key]):
            report.mis_shaped.append((key, tuple(tensors[key].shape), tuple(expected[key])))
    report.unexpected = sorted(key for key in tensors if key not in expected)
    return report


def check_layout(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Shape], source: str, facts: str) -> None:
    """Refuse `tensors` unless they hold exactly the expected keys with the expected shapes.

    `facts` says what the expected layout was derived from (e.g. "ViT width 768, 12 layers, T=8"),
    so that the user sees which reading of the checkpoint the problems are relative to.
    """
    report = key_report(tensors, expected)
    if not report.fits:
        raise ClipreelError(
            f"{source} does not fit the layout its own tensors imply ({facts}); keys are named without the DDP "
            f"'module.' prefix.\n{report.describe()}\nThe file is incomplete, damaged, or a checkpoint of another "
            "method or variant."
        )


# --------------------------------------------------------------------------- the user's values


@dataclass(frozen=True)
class UserChoices:
    """What the user passed besides the checkpoint; each is checked against the tensors.

    model: an open_clip model name (--model); it supplies what the tensors cannot tell, the
    attention heads, and must agree with every size the tensors fix. frames (--frames) and
    num_classes (the length of --classes) must agree with the tensors where a checkpoint fixes them.
    """

    model: str | None = None
    frames: int | None = None
    num_classes: int | None = None


NO_CHOICES = UserChoices()  # nothing passed: every value comes from the checkpoint


def check_user_value(option: str, given: int | None, fixed: int, evidence: str) -> None:
    """Refuse a user value that contradicts the checkpoint; `evidence` names the tensor and what it says."""
    if given is not None and given != fixed:
        raise ClipreelError(
            f"{option} {given} contradicts the checkpoint: {evidence}. Pass {fixed}, or leave {option} out "
            "to take it from the checkpoint."
        )


# --------------------------------------------------------------------------- what a conversion returns


@dataclass(frozen=True)
class Preprocessing(JsonConfig):
    """How the method's own evaluation turns a video into model input, so that eval and predict
    reproduce it by default.

    Frames: `sampling` ("tsn" segment centres, or "dense" clips `stride` frames apart), `frames`
    per view, `views` temporal views. Pixels: resize the short side to `short_side`, cut `crops`
    crops of `image_size` (1 = centre, 3 = start/centre/end of the long side), normalise with
    `norm` (`mean`/`std` on [0, 1] pixels). Scores: `view_scores` says how the views' class
    scores combine ("mean_softmax" or "sum_softmax": the same ranking).
    """

    norm: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    short_side: int
    crops: int
    sampling: str
    frames: int
    stride: int | None
    views: int
    view_scores: str

    @classmethod
    def named(cls, norm: str, **values) -> Preprocessing:
        mean, std = NORMS[norm]
        return cls(norm=norm, mean=tuple(mean), std=tuple(std), **values)


def short_side_256_for(image_size: int) -> int:
    """The resize before a centre crop in X-CLIP, ViFi-CLIP and EZ-CLIP testing: 256 for 224-pixel
    crops, scaled with the crop (X-CLIP `datasets/build.py`: int(256 / 224 * input size))."""
    return int(256 / 224 * image_size)


@dataclass
class Imported:
    """A converted checkpoint: everything needed to rebuild clipreel's model of the method.

    method: "evl" (`heads.cache.evl.EVLHead` over the frozen CLIP's taps), "xclip"
    (`heads.raw.xclip.XCLIP`), "vifi" (`heads.raw.vifi.ViFiCLIP`), "prompt"
    (`heads.raw.bridge_prompt.BridgePrompt`) or "ezclip" (`heads.raw.ezclip.EZCLIPClassifier`).
    clip_config / clip_state_dict: the open_clip CLIP the model is built around (an open_clip
    model config, and weights that load into it strictly). method_config: the model class's
    config as a dict. state_dict: what the model loads strictly. facts: what the tensors fixed
    (sizes, T, classes, ...). conventions: the reference's conventions applied in the conversion,
    and the ones clipreel's model does not reproduce, in words.
    """

    method: str
    facts: dict
    clip_config: dict
    clip_state_dict: Tensors
    method_config: dict
    state_dict: Tensors
    preprocessing: Preprocessing
    conventions: list[str] = field(default_factory=list)
