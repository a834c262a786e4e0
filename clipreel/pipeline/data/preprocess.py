"""From decoded RGB frames to normalised model input: short-side resize, crop(s), mean/std.

Everything is torch, so it runs wherever the frames are: on the GPU when DALI decoded there
and the model is there too. The evaluation transform of the reference methods:
resize the short side to S (antialiased bilinear on float pixels), or to a larger `short_side`
(X-CLIP's single-view test, ViFi-CLIP and EZ-CLIP: 256 before a 224 crop), cut one centre S x S
crop or three crops along the long side (start, centre, end; EVL and X-CLIP multi-view testing),
then normalise with CLIP or ImageNet statistics on [0, 1] pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clipreel.config import SIZE, JsonConfig, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.clip import NORMS

INTERPOLATIONS = ("bilinear", "bicubic")  # the modes torch can antialias
CROP_COUNTS = (1, 3)
FRAMES_PER_CHUNK = 16  # frames resized at once: bounds float memory for long, large inputs


@dataclass(frozen=True)
class PreprocessConfig(JsonConfig):
    """Output size S, normalisation, crops (1 = centre, 3 = start/centre/end of the long side), and
    the short side the frames are resized to before cropping (None: S)."""

    image_size: int = ranged(224, SIZE)
    mean: tuple[float, float, float] = NORMS["clip"][0]
    std: tuple[float, float, float] = NORMS["clip"][1]
    crops: int = 1
    interpolation: str = "bilinear"
    short_side: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # Stored as tuples of floats even when given lists (e.g. read back from JSON).
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ClipreelError(
                f"mean/std must be 3 values each, std > 0 (got {self.mean}, {self.std}): "
                f"or pick a named norm: {', '.join(NORMS)}"
            )
        if self.crops not in CROP_COUNTS:
            raise ClipreelError(
                f"crops must be 1 (centre) or 3 (along the long side), got {self.crops!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ClipreelError(
                f"interpolation {self.interpolation!r} is unknown: choose one of {', '.join(INTERPOLATIONS)}"
            )
        if self.short_side is not None and (
            not isinstance(self.short_side, (int, np.integer)) or self.short_side < self.image_size
        ):
            raise ClipreelError(
                f"short side {self.short_side!r}: the frames are resized to it before the {self.image_size}-pixel "
                f"crop, so give a whole number >= {self.image_size} (or leave it out: {self.image_size})"
            )

    @property
    def resize_to(self) -> int:
        """The short side the frames are resized to before cropping."""
        return self.image_size if self.short_side is None else int(self.short_side)

    def to_dict(self) -> dict:
        """As JsonConfig, without `short_side` while it is unset: stores record this dict as their
        provenance, and one made with the plain resize reads the same as before the field existed."""
        values = super().to_dict()
        if values["short_side"] is None:
            del values["short_side"]
        return values

    @classmethod
    def from_norm(cls, norm: str, image_size: int = 224, crops: int = 1) -> PreprocessConfig:
        """The config for a named normalisation ("clip" or "imagenet")."""
        if norm not in NORMS:
            raise ClipreelError(
                f"normalisation {norm!r} is unknown: choose one of {', '.join(NORMS)}"
            )
        mean, std = NORMS[norm]
        return cls(image_size=image_size, mean=mean, std=std, crops=crops)



def preprocess(
    frames: np.ndarray | torch.Tensor, cfg: PreprocessConfig, device=None
) -> torch.Tensor:
    """(F, H, W, 3) uint8 RGB frames -> (C crops, F, 3, S, S) float32 model input on `device`.

    `frames` may be numpy or torch on any device; `device=None` keeps the frames' device.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(
            f"expected (F, H, W, 3) uint8 frames, got {frames.dtype} {tuple(frames.shape)}"
        )
    frames = frames.to(device) if device is not None else frames  # move as uint8: 4x less to copy
    size = cfg.image_size
    if frames.shape[0] == 0:
        return torch.empty((cfg.crops, 0, 3, size, size), device=frames.device)
    chunks = frames.split(FRAMES_PER_CHUNK)
    # (F, 3, H', W') with min(H', W') = the short side (S unless cfg.short_side)
    resized = torch.cat([_resize_short_side(chunk, cfg.resize_to, cfg.interpolation) for chunk in chunks])
    crops = _crops(resized, size, cfg.crops)  # (C, F, 3, S, S)
    mean = torch.tensor(cfg.mean, device=crops.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=crops.device).view(1, 1, 3, 1, 1)
    return (crops - mean) / std


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H', W') with the short side = `size` and the aspect ratio kept (long side floored)."""
    if height <= width:
        return size, width * size // height
    return height * size // width, size


def _resize_short_side(frames: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H', W') float in [0, 1], short side = `size`."""
    images = frames.permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
    height, width = images.shape[-2:]
    target = resized_shape(height, width, size)
    if target == (height, width):
        return images
    images = F.interpolate(
        images, size=target, mode=interpolation, antialias=True, align_corners=False
    )
    return images.clamp_(0, 1)  # bicubic overshoots near edges; bilinear never does


def _crops(images: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """(F, 3, H', W') -> (count, F, 3, S, S): the centre, or start/centre/end of the long side."""
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2  # the centre crop
    if count == 1:
        return images[None, :, :, top : top + size, left : left + size]
    if height > width:  # portrait: slide down the frame
        starts = (0, (height - size) // 2, height - size)
        views = [images[:, :, start : start + size, left : left + size] for start in starts]
    else:  # landscape (or square: three equal crops): slide across
        starts = (0, (width - size) // 2, width - size)
        views = [images[:, :, top : top + size, start : start + size] for start in starts]
    return torch.stack(views)
