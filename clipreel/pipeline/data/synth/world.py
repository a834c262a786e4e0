"""The built-in synthetic world (`clipreel synth OUT_DIR`): real encoded videos of shapes that move.

Each class is an **appearance** (a coloured shape) with a **motion**. Classes come in time-reversed
pairs: class 2k draws a clip with the pair's motion (e.g. "moving left") and class 2k+1 plays exactly
such a clip backwards ("moving right"). The two classes of a pair therefore differ only in the order of
their frames: a model that averages frames cannot tell them apart, a temporal model can. Each pair has
its own appearance, so appearance alone identifies the pair.

The kinds of change cycle over the pairs: moving left/right, moving up/down, growing/shrinking and
rotating (clockwise/counter-clockwise) by default; `SynthConfig.motions` may also pick "colour", a shape
whose colour fades into another ("red circle turning blue" / "blue circle turning red"), where every single
frame shows how far the change has gone and the twins' names differ in words a CLIP knows.

Output: `OUT_DIR/videos/<class_slug>/<class_slug>_<index>.<suffix>`, `videos.csv` (path,label,label_name,
split; paths relative to OUT_DIR), `labels.txt` (the label map) and `captions.csv` (path,caption; the
caption names the appearance only, e.g. "a red circle"). Shapes are drawn with numpy alone, from signed
distances, so edges are anti-aliased and motion is sub-pixel smooth.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from clipreel.errors import ClipreelError
from clipreel.pipeline.data.synth.videofile import CODECS, video_suffix, write_video
from clipreel.stores.manifest import write_label_map

# Shape outlines in unit coordinates (about radius 1, y pointing down), as polygon vertices (N, 2).
# The circle is drawn from its exact distance, not from a polygon.
_SHAPE_OUTLINES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": 1.1 * np.array([[np.cos(a), np.sin(a)] for a in np.radians([-90, 30, 150])]),
    "star": np.array(
        [[r * np.cos(a), r * np.sin(a)] for a, r in zip(np.radians(np.arange(-90, 270, 36)), [1.1, 0.45] * 5)]
    ),
    "diamond": np.array([[0.0, -1.1], [0.7, 0.0], [0.0, 1.1], [-0.7, 0.0]]),
    "cross": np.array(
        [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
         [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]
    ),
    "hexagon": np.array([[np.cos(a), np.sin(a)] for a in np.radians(np.arange(0, 360, 60))]),
    "arrow": np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.7], [1, 0], [0.2, 0.7], [0.2, 0.3], [-1, 0.3]]),
}
SHAPES = tuple(_SHAPE_OUTLINES)
_SHAPE_EXTENT = 1.15  # every outline fits in a circle of this radius (the square's corners: 0.8 * sqrt 2)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.20),
    "magenta": (0.90, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
}

# (motion drawn for class 2k, the same clip played backwards for class 2k+1)
MOTION_PAIRS = (
    ("moving left", "moving right"),
    ("moving up", "moving down"),
    ("growing", "shrinking"),
    ("rotating clockwise", "rotating counter-clockwise"),
)
# A fifth kind of change, not in the default world: the shape stays put and its colour fades into its
# partner colour (COLOURS order, two on), e.g. "red circle turning blue", played backwards "blue circle
# turning red". Here a single frame's appearance already says how far the change has gone, and the two
# names differ in words a CLIP knows (colours), unlike "moving left" and "moving right".
COLOUR_CHANGE = "changing colour"
# The kinds of change a world may cycle through (`SynthConfig.motions`, `clipreel synth --motions`),
# each named by the motion drawn for the first class of its pairs.
MOTIONS = {"horizontal": "moving left", "vertical": "moving up", "size": "growing",
           "rotation": "rotating clockwise", "colour": COLOUR_CHANGE}
DEFAULT_MOTIONS = ("horizontal", "vertical", "size", "rotation")
# Pair k gets appearance k: shape k mod 8 with colour (k + k // 8) mod 8, so the first 8 pairs differ in
# both shape and colour and no two pairs share an appearance. Pair k's motion is motions[k mod len(motions)];
# with 8 shapes and the 4 default motions the rotating pairs get the star or the arrow (never the circle,
# whose turning is invisible).
MAX_CLASSES = 2 * len(SHAPES) * len(COLOURS)

SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}  # the rest is train


@dataclass
class SynthConfig:
    """What `make_world` writes; checked on creation (a bad value raises `ClipreelError`)."""

    classes: int = 8  # pairs of time-reversed classes; an odd count leaves the last class without its twin
    videos_per_class: int = 10
    frames: int = 32
    size: int = 128  # frame width = height, in pixels
    codec: str = "h264"
    fps: int = 25
    seed: int = 0  # the same seed gives byte-identical videos
    motions: tuple[str, ...] = DEFAULT_MOTIONS  # keys of MOTIONS, cycled over the pairs

    def __post_init__(self) -> None:
        self.motions = tuple(self.motions)
        unknown = [motion for motion in self.motions if motion not in MOTIONS]
        if unknown or not self.motions:
            raise ClipreelError(f"motions {list(self.motions)}: choose one or more of {', '.join(MOTIONS)}")
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ClipreelError(
                f"classes = {self.classes}: choose 2..{MAX_CLASSES} (classes come in time-reversed pairs, each "
                f"pair with its own appearance: {len(SHAPES)} shapes x {len(COLOURS)} colours)"
            )
        if self.videos_per_class < 1:
            raise ClipreelError(f"videos_per_class = {self.videos_per_class}: choose at least 1 (3+ fills every split)")
        if self.frames < 4:
            raise ClipreelError(f"frames = {self.frames}: choose at least 4 so that motion shows")
        if self.size < 32 or self.size % 2:
            raise ClipreelError(
                f"size = {self.size}: choose an even number of pixels >= 32 (video codecs need even sizes)"
            )
        if self.codec not in CODECS:
            raise ClipreelError(f"codec {self.codec!r} is unknown; choose one of {', '.join(CODECS)}")
        if self.fps < 1:
            raise ClipreelError(f"fps = {self.fps}: choose at least 1")
        if self.seed < 0:
            raise ClipreelError(f"seed = {self.seed}: choose a seed >= 0")
        if 2 <= self.classes <= MAX_CLASSES:
            turning_circles = [pair for pair in range((self.classes + 1) // 2)
                               if synth_class(2 * pair, self.motions).motion == MOTIONS["rotation"]
                               and SHAPES[pair % len(SHAPES)] == "circle"]
            if turning_circles:
                raise ClipreelError(f"motions {list(self.motions)} give pair {turning_circles[0]} (a circle) the rotation, "
                                    "which a circle does not show: order the motions so that rotation falls elsewhere")


@dataclass(frozen=True)
class SynthClass:
    """One class of the synthetic world."""

    shape: str
    colour: str
    motion: str  # the motion drawn, the first of its pair (e.g. "moving left")
    played_backwards: bool  # True for class 2k+1: the drawn clip in reverse frame order
    name: str  # e.g. "red circle moving right"
    end_colour: str | None = None  # COLOUR_CHANGE: the colour `colour` fades into, as drawn

    @property
    def slug(self) -> str:
        """The name as a folder name: "red_circle_rotating_counter_clockwise"."""
        return self.name.replace(" ", "_").replace("-", "_")

    @property
    def caption(self) -> str:
        """What the class looks like, without its motion: "a red circle" ("a red and blue circle")."""
        if self.end_colour is not None:
            return f"a {self.colour} and {self.end_colour} {self.shape}"
        return f"a {self.colour} {self.shape}"


def synth_class(class_id: int, motions: Sequence[str] = DEFAULT_MOTIONS) -> SynthClass:
    """The shape, colour and motion of class `class_id` (0 <= class_id < MAX_CLASSES) in a world of `motions`."""
    if not 0 <= class_id < MAX_CLASSES:
        raise ValueError(f"class_id {class_id} is outside 0..{MAX_CLASSES - 1}")
    pair, played_backwards = divmod(class_id, 2)
    shape = SHAPES[pair % len(SHAPES)]
    colour_names = list(COLOURS)
    colour = colour_names[(pair + pair // len(SHAPES)) % len(COLOURS)]
    motion = MOTIONS[motions[pair % len(motions)]]
    if motion == COLOUR_CHANGE:
        partner = colour_names[(colour_names.index(colour) + 2) % len(COLOURS)]
        start, end = (partner, colour) if played_backwards else (colour, partner)
        return SynthClass(shape, colour, motion, bool(played_backwards), f"{start} {shape} turning {end}", partner)
    motion_pair = next(pair_ for pair_ in MOTION_PAIRS if pair_[0] == motion)
    return SynthClass(shape, colour, motion, bool(played_backwards), f"{colour} {shape} {motion_pair[played_backwards]}")


def split_of(index: int, videos_per_class: int) -> str:
    """train / val / test for the index-th video of a class: ~60/20/20 by index, each split non-empty from 3 videos."""
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * videos_per_class)) if videos_per_class >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * videos_per_class)) if videos_per_class >= 2 else 0
    n_train = videos_per_class - n_val - n_test
    if index < n_train:
        return "train"
    return "val" if index < n_train + n_val else "test"


def render_clip(class_id: int, rng_seed: int | Sequence[int], cfg: SynthConfig) -> np.ndarray:
    """One video of class `class_id` as (T, H, W, 3) uint8 RGB frames, drawn from `rng_seed`.

    The clip is drawn with the pair's first motion; for the second class of a pair it is returned in
    reverse frame order, so render_clip(2k+1, s, cfg) == render_clip(2k, s, cfg)[::-1].
    """
    spec = synth_class(class_id, cfg.motions)
    rng = np.random.default_rng(rng_seed)
    size, frames = cfg.size, cfg.frames
    background = _background(rng, size, frames)  # (T, H, W, 3) float32 in [0, 1]
    colour = np.clip(np.array(COLOURS[spec.colour]) + rng.normal(0.0, 0.04, 3), 0.0, 1.0).astype(np.float32)
    colours = np.repeat(colour[None], frames, axis=0)  # (T, 3)
    if spec.end_colour is not None:  # COLOUR_CHANGE: a linear fade from the colour to its partner
        progress = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
        colours = (1 - progress) * colour + progress * np.array(COLOURS[spec.end_colour], dtype=np.float32)
    centres, radii, angles = _trajectory(rng, spec.motion, size, frames)  # (T, 2), (T,), (T,)

    clip = background
    for t in range(frames):
        rows, cols, coverage = _shape_coverage(spec.shape, centres[t], radii[t], angles[t], size)
        patch = clip[t, rows, cols]  # (h, w, 3)
        clip[t, rows, cols] = patch + coverage[..., None] * (colours[t] - patch)
    clip = np.clip(clip * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return clip[::-1].copy() if spec.played_backwards else clip


def _background(rng: np.random.Generator, size: int, frames: int) -> np.ndarray:
    """A mild, random per-video background: a tinted grey, a smooth texture, faint per-frame noise."""
    base = rng.uniform(0.15, 0.40) + rng.normal(0.0, 0.03, 3)  # (3,)
    coarse = rng.normal(0.0, 0.06, (5, 5, 3))  # texture control points, bilinearly stretched over the frame
    stretch = _bilinear_weights(5, size)  # (size, 5)
    texture = np.einsum("yi,ijc,xj->yxc", stretch, coarse, stretch)  # (H, W, 3)
    still = (base + texture).astype(np.float32)
    noise = rng.standard_normal((frames, size, size, 3), dtype=np.float32) * np.float32(0.012)
    return np.clip(still[None] + noise, 0.0, 1.0)  # (T, H, W, 3)


def _bilinear_weights(points: int, size: int) -> np.ndarray:
    """(size, points) weights that linearly interpolate `points` evenly spaced values over `size` pixels."""
    positions = np.linspace(0.0, points - 1.0, size)
    return np.stack([np.interp(positions, np.arange(points), np.eye(points)[i]) for i in range(points)], axis=1)


def _trajectory(
    rng: np.random.Generator, motion: str, size: int, frames: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame object centre (T, 2) as (x, y) pixels, radius (T,) and angle (T,) for the pair's first motion.

    Distances scale with the frame size and are spread over the clip, so the object stays mostly in frame.
    """
    progress = np.linspace(0.0, 1.0, frames)  # 0 at the first frame, 1 at the last
    radius = size * rng.uniform(0.10, 0.15)
    angle = rng.uniform(-0.25, 0.25)  # a slight random tilt
    radii = np.full(frames, radius)
    angles = np.full(frames, angle)
    if motion in ("moving left", "moving up"):
        travel = size * rng.uniform(0.35, 0.55)
        lead = rng.uniform(radius + travel, size - radius)  # start on the axis of motion
        across = rng.uniform(radius, size - radius)
        along = lead - travel * progress
        x, y = (along, np.full(frames, across)) if motion == "moving left" else (np.full(frames, across), along)
    elif motion == "growing":
        start = size * rng.uniform(0.06, 0.09)
        end = start * rng.uniform(1.8, 2.4)
        radii = start + (end - start) * progress
        x = np.full(frames, rng.uniform(end, size - end))
        y = np.full(frames, rng.uniform(end, size - end))
    elif motion == COLOUR_CHANGE:  # the shape stays where it is; its colour changes (render_clip)
        x = np.full(frames, rng.uniform(radius, size - radius))
        y = np.full(frames, rng.uniform(radius, size - radius))
    elif motion == "rotating clockwise":  # a growing angle turns clockwise on screen, since y points down
        turn_per_frame = rng.uniform(0.06, 0.12)  # radians, well under the star's 72 degree symmetry
        angles = rng.uniform(0.0, 2 * np.pi) + turn_per_frame * np.arange(frames)
        x = np.full(frames, rng.uniform(radius, size - radius))
        y = np.full(frames, rng.uniform(radius, size - radius))
    else:
        raise ValueError(f"no trajectory for motion {motion!r}")
    return np.stack([x, y], axis=1), radii, angles


def _shape_coverage(
    shape: str, centre: np.ndarray, radius: float, angle: float, size: int
) -> tuple[slice, slice, np.ndarray]:
    """How much of each pixel near the shape it covers: (row slice, column slice, (h, w) coverage in [0, 1])."""
    reach = _SHAPE_EXTENT * radius + 2.0
    x0, x1 = (int(np.clip(v, 0, size)) for v in (np.floor(centre[0] - reach), np.ceil(centre[0] + reach)))
    y0, y1 = (int(np.clip(v, 0, size)) for v in (np.floor(centre[1] - reach), np.ceil(centre[1] + reach)))
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres, (h, w) each
    # into the shape's own unit frame: undo the translation, the rotation and the scale
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = x - centre[0], y - centre[1]
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / radius
    outline = _SHAPE_OUTLINES[shape]
    unit_distance = np.hypot(u, v) - 1.0 if outline is None else _polygon_signed_distance(u, v, outline)
    coverage = np.clip(0.5 - unit_distance * radius, 0.0, 1.0)  # 1 px anti-aliasing ramp on the edge
    return slice(y0, y1), slice(x0, x1), coverage.astype(np.float32)


def _polygon_signed_distance(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance from points (x, y) to a closed polygon (negative inside), any polygon, convex or not."""
    nearest_sq = np.full(x.shape, np.inf, dtype=x.dtype)
    inside = np.zeros(x.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0)):
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        along = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)  # nearest point of the edge
        nearest_sq = np.minimum(nearest_sq, (wx - ex * along) ** 2 + (wy - ey * along) ** 2)
        # crossing-number test: does a ray to the right of the point cross this edge?
        spans = (ay > y) != (by > y)
        inside ^= spans & (x < ax + (y - ay) * ex / (ey if ey != 0 else 1.0))
    distance = np.sqrt(nearest_sq)
    return np.where(inside, -distance, distance)


def make_world(out_dir: Path, cfg: SynthConfig, progress: bool = False) -> Path:
    """Write the synthetic world into `out_dir`; returns the path of its `videos.csv`.

    Video i of class c is drawn from the seed (cfg.seed, c, i), so the same config gives the same bytes.
    """
    out_dir = Path(out_dir)
    classes = [synth_class(class_id, cfg.motions) for class_id in range(cfg.classes)]
    jobs = [(class_id, index) for class_id in range(cfg.classes) for index in range(cfg.videos_per_class)]
    video_rows, caption_rows = [], []
    for class_id, index in track(jobs, description="synth videos", disable=not progress):
        spec = classes[class_id]
        relative = f"videos/{spec.slug}/{spec.slug}_{index:03d}{video_suffix(cfg.codec)}"
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        write_video(out_dir / relative, render_clip(class_id, (cfg.seed, class_id, index), cfg), cfg.codec, cfg.fps)
        video_rows.append([relative, class_id, spec.name, split_of(index, cfg.videos_per_class)])
        caption_rows.append([relative, spec.caption])

    write_label_map([spec.name for spec in classes], out_dir / "labels.txt")
    _write_csv(out_dir / "captions.csv", ["path", "caption"], caption_rows)
    videos_csv = out_dir / "videos.csv"
    _write_csv(videos_csv, ["path", "label", "label_name", "split"], video_rows)
    return videos_csv


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """A small CSV with a header row."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
