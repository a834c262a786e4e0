"""Video-consistent training augmentation of raw clips, and mixup / cutmix of whole batches.

The fine-tuning methods augment each clip the way the reference repositories do (X-CLIP
`datasets/pipeline.py`, EZ-CLIP `utils/Augmentation.py`):

    multi-scale crop (or random resized crop) -> resize to S x S -> horizontal flip
    -> colour jitter (p 0.8) -> grayscale (p 0.2) -> normalise (CLIP or ImageNet mean/std)

Video-consistent: ONE random draw per clip, applied to all its frames (the same crop box, the
same flip, the same jitter factors and order). X-CLIP differs on one point: it calls
torchvision's `ColorJitter` once per frame, so its jitter factors change from frame to frame;
here they are drawn once per clip, because a brightness that flickers from frame to frame is a
fake motion cue. `mix_batch` (mixup / cutmix with label smoothing, X-CLIP's
`CutmixMixupBlending`) runs on whole batches in the trainer.

Every draw comes from a generator seeded by a stable hash (`stable_generator`), never from a
global RNG, so a clip's augmentation is the same in any process.

May import: torch, torchvision, clipreel.config, clipreel.errors, clipreel.pipeline.data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from clipreel.config import CHANCE, POSITIVE, SIZE, JsonConfig, Range, ranged
from clipreel.errors import ClipreelError
from clipreel.heads.clip import NORMS
from clipreel.pipeline.data.preprocess import PreprocessConfig, preprocess
from clipreel.pipeline.data.sampling import stable_seed

CROPS = ("multiscale", "rrc")
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop: tries before falling back to a centre crop
JITTERS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class AugmentConfig(JsonConfig):
    """The training augmentation of one clip (defaults: X-CLIP / ViFi-CLIP / EZ-CLIP) and its output size.

    crop "multiscale": mmaction's `MultiScaleCrop(random_crop=False)` as X-CLIP configures it. The
    frames' short side is first scaled to `short_side_ratio * image_size` (256 for 224); a crop
    width and height are picked among `scales` x short side (their scale indices at most
    `max_wh_scale_gap` apart), placed at one of 5 fixed positions (4 corners, centre), and resized
    to S x S. crop "rrc": torchvision's RandomResizedCrop (area fraction `rrc_area`, aspect ratio
    `rrc_ratio`) on the frames as decoded. Probabilities: `flip`, `color_jitter` (then factors drawn
    from `brightness`, `contrast`, `saturation`, `hue` as in torchvision's ColorJitter), `grayscale`.
    """

    image_size: int = ranged(224, SIZE)
    crop: str = "multiscale"
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    max_wh_scale_gap: int = ranged(1, Range(low=0))
    short_side_ratio: float = ranged(256 / 224, POSITIVE)
    rrc_area: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = ranged(0.5, CHANCE)
    color_jitter: float = ranged(0.8, CHANCE)
    brightness: float = ranged(0.4, Range(low=0))
    contrast: float = ranged(0.4, Range(low=0))
    saturation: float = ranged(0.2, Range(low=0))
    hue: float = ranged(0.1, Range(low=0, high=0.5))
    grayscale: float = ranged(0.2, CHANCE)
    norm: str = "clip"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        super().__post_init__()
        # Tuples even when given lists (e.g. read back from JSON).
        for name in ("scales", "rrc_area", "rrc_ratio"):
            object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))
        if self.crop not in CROPS:
            raise ClipreelError(f"augmentation crop {self.crop!r} is unknown: choose one of {', '.join(CROPS)}")
        if self.norm not in NORMS:
            raise ClipreelError(f"normalisation {self.norm!r} is unknown: choose one of {', '.join(NORMS)}")
        if not self.scales or min(self.scales) <= 0 or max(self.scales) > 1:
            raise ClipreelError(f"augmentation scales must be fractions in (0, 1] (got {self.scales})")

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The evaluation transform with the same size and normalisation (one centre crop)."""
        mean, std = NORMS[self.norm]
        return PreprocessConfig(image_size=self.image_size, mean=mean, std=std, interpolation=self.interpolation)


@dataclass(frozen=True)
class ClipAugmentation:
    """One random draw for a clip, applied identically to every frame.

    box: (top, left, height, width) in the pixels of the decoded frames. jitter_order: indices into
    JITTERS, the order torchvision's ColorJitter would apply them; jitter_factors: the factor of
    each (brightness, contrast, saturation, hue); both empty when jitter is off for this clip.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter_order: tuple[int, ...]
    jitter_factors: tuple[float, float, float, float]
    grayscale: bool


def draw_augmentation(height: int, width: int, cfg: AugmentConfig, generator: torch.Generator) -> ClipAugmentation:
    """Draw the augmentation of one clip whose frames are `height` x `width` pixels."""
    if cfg.crop == "multiscale":
        box = _multiscale_box(height, width, cfg, generator)
    else:
        box = _random_resized_box(height, width, cfg, generator)
    flip = _uniform(generator) < cfg.flip
    jitter_order: tuple[int, ...] = ()
    jitter_factors = (1.0, 1.0, 1.0, 0.0)  # the identity: no change in brightness, contrast, saturation, hue
    if _uniform(generator) < cfg.color_jitter:
        jitter_order = tuple(torch.randperm(len(JITTERS), generator=generator).tolist())
        jitter_factors = (
            _uniform(generator, 1 - cfg.brightness, 1 + cfg.brightness),
            _uniform(generator, 1 - cfg.contrast, 1 + cfg.contrast),
            _uniform(generator, 1 - cfg.saturation, 1 + cfg.saturation),
            _uniform(generator, -cfg.hue, cfg.hue),
        )
    grayscale = _uniform(generator) < cfg.grayscale
    return ClipAugmentation(box, flip, jitter_order, jitter_factors, grayscale)


def apply_augmentation(frames: torch.Tensor, draw: ClipAugmentation, cfg: AugmentConfig) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, S, S) float32, normalised, every frame transformed alike."""
    top, left, box_height, box_width = draw.box
    crop = frames[:, top : top + box_height, left : left + box_width]  # (T, h, w, 3) uint8
    images = crop.permute(0, 3, 1, 2).float() / 255  # (T, 3, h, w) in [0, 1]
    size = cfg.image_size
    if (box_height, box_width) != (size, size):
        images = F.interpolate(
            images, size=(size, size), mode=cfg.interpolation, antialias=True, align_corners=False
        ).clamp_(0, 1)  # (T, 3, S, S)
    if draw.flip:
        images = images.flip(-1)
    for which in draw.jitter_order:
        factor = draw.jitter_factors[which]
        if JITTERS[which] == "brightness":
            images = TF.adjust_brightness(images, factor)
        elif JITTERS[which] == "contrast":
            images = TF.adjust_contrast(images, factor)  # contrast is taken around each frame's own grey mean
        elif JITTERS[which] == "saturation":
            images = TF.adjust_saturation(images, factor)
        else:
            images = TF.adjust_hue(images, factor)
    if draw.grayscale:
        images = TF.rgb_to_grayscale(images, num_output_channels=3)
    mean, std = (torch.tensor(values, device=images.device).view(1, 3, 1, 1) for values in NORMS[cfg.norm])
    return (images - mean) / std


def augment_clip(frames: np.ndarray | torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, S, S) float32: one random augmentation for the whole clip."""
    frames = _check_frames(frames)
    draw = draw_augmentation(frames.shape[1], frames.shape[2], cfg, generator)
    return apply_augmentation(frames, draw, cfg)


def eval_clip(frames: np.ndarray | torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, S, S) float32: short side to S, centre crop, normalise."""
    return preprocess(_check_frames(frames), cfg.preprocess_config)[0]


def _check_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.dtype} {tuple(frames.shape)}")
    return frames


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One float drawn uniformly from [low, high) with `generator`."""
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, count: int) -> int:
    """One integer drawn uniformly from 0..count-1 with `generator`."""
    return int(torch.randint(count, (), generator=generator))


def _multiscale_box(height: int, width: int, cfg: AugmentConfig, generator: torch.Generator) -> tuple[int, int, int, int]:
    """mmaction's MultiScaleCrop box, computed on the short-side-resized frame, returned in decoded pixels.

    Working out the box first and resizing only the crop, once, to S x S gives the reference's
    result (resize whole frame, crop, resize crop) with one interpolation instead of two.
    """
    short_side = round(cfg.short_side_ratio * cfg.image_size)
    to_resized = short_side / min(height, width)  # decoded pixels -> resized pixels
    resized_height, resized_width = round(height * to_resized), round(width * to_resized)
    crop_sizes = [int(short_side * scale) for scale in cfg.scales]
    pairs = [  # (crop width, crop height), their scale indices at most max_wh_scale_gap apart
        (crop_w, crop_h)
        for i, crop_h in enumerate(crop_sizes)
        for j, crop_w in enumerate(crop_sizes)
        if abs(i - j) <= cfg.max_wh_scale_gap
    ]
    crop_w, crop_h = pairs[_choice(generator, len(pairs))]
    # a side within 3 px of the output size snaps to it (mmaction), so no resize is needed on that axis
    crop_w = cfg.image_size if abs(crop_w - cfg.image_size) < 3 else crop_w
    crop_h = cfg.image_size if abs(crop_h - cfg.image_size) < 3 else crop_h
    crop_w, crop_h = min(crop_w, resized_width), min(crop_h, resized_height)
    step_w, step_h = (resized_width - crop_w) // 4, (resized_height - crop_h) // 4
    offsets = [(0, 0), (4 * step_w, 0), (0, 4 * step_h), (4 * step_w, 4 * step_h), (2 * step_w, 2 * step_h)]
    left, top = offsets[_choice(generator, len(offsets))]
    # back to decoded pixels, kept inside the frame
    box_h = max(1, min(height, round(crop_h / to_resized)))
    box_w = max(1, min(width, round(crop_w / to_resized)))
    box_top = min(round(top / to_resized), height - box_h)
    box_left = min(round(left / to_resized), width - box_w)
    return box_top, box_left, box_h, box_w


def _random_resized_box(height: int, width: int, cfg: AugmentConfig, generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: a random area fraction and log-uniform aspect ratio."""
    area = height * width
    log_ratio = (math.log(cfg.rrc_ratio[0]), math.log(cfg.rrc_ratio[1]))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * _uniform(generator, *cfg.rrc_area)
        aspect = math.exp(_uniform(generator, *log_ratio))
        box_w = round(math.sqrt(target_area * aspect))
        box_h = round(math.sqrt(target_area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = _choice(generator, height - box_h + 1)
            left = _choice(generator, width - box_w + 1)
            return top, left, box_h, box_w
    # fallback: the largest centre crop whose aspect ratio is inside rrc_ratio
    frame_ratio = width / height
    if frame_ratio < cfg.rrc_ratio[0]:
        box_w, box_h = width, round(width / cfg.rrc_ratio[0])
    elif frame_ratio > cfg.rrc_ratio[1]:
        box_h, box_w = height, round(height * cfg.rrc_ratio[1])
    else:
        box_w, box_h = width, height
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def mix_batch(
    clips: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix a batch, with smoothed soft targets (X-CLIP's CutmixMixupBlending).

    clips (B, T, 3, S, S), labels (B,) class ids -> (mixed clips, soft targets (B, K) summing to 1).
    Targets start as one-hot smoothed to 1 - eps + eps/K and eps/K. Per batch, with probability
    `switch_prob` cutmix, else mixup, each pairing clip b with clip perm[b] of a random permutation
    and a weight lam ~ Beta(alpha, alpha): mixup blends whole clips, lam x + (1 - lam) x[perm];
    cutmix pastes ONE box (for the whole batch, so the same in every frame of every clip) from x[perm]
    and sets lam to the area kept. Targets mix with the same lam. Inputs are not modified.
    """
    if clips.ndim != 5:
        raise ValueError(f"expected clips (B, T, 3, S, S), got {tuple(clips.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be class ids in 0..{num_classes - 1} (unknown labels, -1, cannot train)")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batch_size = clips.shape[0]
    off_value = label_smoothing / num_classes
    targets = torch.full((batch_size, num_classes), off_value, dtype=torch.float32)
    targets[torch.arange(batch_size), labels] = 1 - label_smoothing + off_value  # (B, K)

    # Beta draws need numpy; its generator is seeded from `generator`, so the whole batch stays seeded.
    beta_rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
    use_cutmix = _uniform(generator) < switch_prob
    partner = torch.randperm(batch_size, generator=generator)  # (B,): clip b mixes with clip partner[b]
    if use_cutmix:
        lam = float(beta_rng.beta(cutmix_alpha, cutmix_alpha))
        height, width = clips.shape[-2:]
        top, bottom, left, right = _cutmix_box(height, width, lam, generator)
        mixed = clips.clone()
        mixed[..., top:bottom, left:right] = clips[partner][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the fraction of each clip kept
    else:
        lam = float(beta_rng.beta(mixup_alpha, mixup_alpha))
        mixed = lam * clips + (1 - lam) * clips[partner]
    return mixed, lam * targets + (1 - lam) * targets[partner]


def _cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): a box of (1 - lam) of the area around a random centre, clipped to the frame."""
    cut_ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    centre_y, centre_x = _choice(generator, height), _choice(generator, width)
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return top, bottom, left, right


def stable_generator(*parts) -> torch.Generator:
    """A torch generator seeded by a stable hash of `parts`: the same in every process (unlike `hash`)."""
    return torch.Generator().manual_seed(stable_seed(*parts) >> 1)
