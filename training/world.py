"""A procedural video world with captions that say what happens: the demo model's training and evaluation data.

A scene is one or two flat objects (a shape, a colour and a motion each) over a plain, checkered or striped
background. Everything about a scene follows from an integer seed, and a scene renders at any resolution and frame
count: positions are stored as fractions of the frame and motions as functions of normalised time ``t = i / (T - 1)``,
so the whole motion always spans the clip.

Clips are float tensors [3, T, H, W] in [-1, 1] with anti-aliased edges. The ground truth gives, per object, the
shape, colour, motion and the per-frame centre (x, y in pixels, x to the right, y downwards) and size (the shape's
radius in pixels: the circle's radius, half the square's side, ...). Every shape is point-symmetric or equilateral, so
the centroid of the drawn object is its centre.

Prompt split: a colour x shape x motion combination is held out when ``motion == (2 * colour + 3 * shape) % 7``
(indices into ``COLOURS``, ``SHAPES``, ``MOTIONS``). That holds out 30 of the 210 combinations, at most one shape per
(colour, motion) pair and at most one colour per (shape, motion) pair, so every colour, shape and motion, and every
pair of them, still appears in training. Training scenes use only training combinations for all their objects,
held-out scenes only held-out ones, so the two caption sets are disjoint.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("square", "circle", "triangle", "diamond", "cross")
COLOURS = {  # RGB in 0..1, bright so that they stand out on every background
    "red": (0.92, 0.16, 0.14),
    "green": (0.18, 0.82, 0.22),
    "blue": (0.22, 0.42, 1.00),
    "yellow": (0.96, 0.86, 0.12),
    "white": (0.96, 0.96, 0.96),
    "purple": (0.70, 0.24, 0.88),
}
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "bounces", "grows", "shrinks")
BACKGROUNDS = {
    "black": (0.03, 0.03, 0.03),
    "dark blue": (0.05, 0.09, 0.30),
    "dark green": (0.05, 0.24, 0.09),
    "gray": (0.38, 0.38, 0.40),
}
TEXTURES = ("plain", "checkered", "striped")  # "plain" is not said in the caption
SPLITS = ("train", "heldout")

TEXTURE_PERIOD = 16  # pixels at any resolution: keeps texture edges on the VAE's 8-pixel grid
TEXTURE_CONTRAST = 0.07
EXTENT = 1.3  # the largest distance of a shape's outline from its centre, in units of its size


def is_heldout(colour: str, shape: str, motion: str) -> bool:
    """Whether this colour x shape x motion combination belongs to the held-out prompt split."""
    c, s, m = list(COLOURS).index(colour), SHAPES.index(shape), MOTIONS.index(motion)
    return m == (2 * c + 3 * s) % len(MOTIONS)


def combinations(split: str) -> list[tuple[str, str, str]]:
    """All (colour, shape, motion) combinations of a split, in a fixed order."""
    _check_split(split)
    want = split == "heldout"
    return [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if is_heldout(c, s, m) == want]


# -- scene description ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """One object, resolution-free.

    ``x0, y0`` / ``x1, y1``: centre at the first / last frame as fractions of width / height; ``size0`` / ``size1``:
    radius at the first / last frame as a fraction of min(H, W); ``bounce_height``: bounce amplitude as a fraction of
    the height; ``bounces``: number of hops over the clip (``motion == "bounces"`` only).
    """

    shape: str
    colour: str
    motion: str
    x0: float
    y0: float
    x1: float
    y1: float
    size0: float
    size1: float
    bounce_height: float = 0.0
    bounces: int = 0

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    background: str
    texture: str = "plain"
    background_rgb: tuple[float, float, float] | None = None  # drawn instead of the named colour (a restyled world)

    @property
    def caption(self) -> str:
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return " and ".join(o.phrase for o in self.objects) + f" on a {self.background}{texture} background"


@dataclass
class ObjectTruth:
    """Ground truth of one object in one rendered clip: ``centers`` [T, 2] (x, y) and ``sizes`` [T], in pixels."""

    shape: str
    colour: str
    motion: str
    centers: np.ndarray
    sizes: np.ndarray


@dataclass
class Truth:
    caption: str
    background: str
    texture: str
    split: str
    seed: int | None
    objects: list[ObjectTruth] = field(default_factory=list)


# -- captions ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionSpec:
    """What a caption says: ``objects`` as (colour, shape, motion) triples, the background and its texture."""

    objects: tuple[tuple[str, str, str], ...]
    background: str
    texture: str


_ALT = lambda names: "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # noqa: E731
_PHRASE = rf"a ({_ALT(COLOURS)}) ({_ALT(SHAPES)}) ({_ALT(MOTIONS)})"
_CAPTION = re.compile(
    rf"^{_PHRASE}(?: and {_PHRASE})? on a ({_ALT(BACKGROUNDS)})(?: ({_ALT(TEXTURES[1:])}))? background$"
)


def parse_caption(caption: str) -> CaptionSpec:
    """The inverse of ``Scene.caption``. Case and surrounding/repeated spaces and a final full stop are forgiven."""
    text = " ".join(caption.lower().split()).rstrip(".")
    match = _CAPTION.match(text)
    if match is None:
        raise ValueError(f"caption {caption!r} is not a sentence of this world (e.g. {example_caption()!r})")
    g = match.groups()
    objects = [(g[0], g[1], g[2])] + ([(g[3], g[4], g[5])] if g[3] else [])
    return CaptionSpec(objects=tuple(objects), background=g[6], texture=g[7] or "plain")


def example_caption() -> str:
    return Scene((ObjectSpec("circle", "red", "moves left", 0.7, 0.5, 0.3, 0.5, 0.1, 0.1),), "dark blue").caption


def caption_split(caption: str) -> str | None:
    """"train" or "heldout" when every object's combination is in that split, None for a mix of both."""
    kinds = {is_heldout(*o) for o in parse_caption(caption).objects}
    return None if len(kinds) > 1 else ("heldout" if kinds.pop() else "train")


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "and", "on", "background"}
    for name in (*COLOURS, *SHAPES, *MOTIONS, *BACKGROUNDS, *TEXTURES[1:]):
        words.update(name.split())
    return sorted(words)


def single_object_captions() -> list[str]:
    """Every one-object caption of the world (both splits), in a fixed order."""
    return [
        Scene((ObjectSpec(s, c, m, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1),), bg, tex).caption
        for c in COLOURS for s in SHAPES for m in MOTIONS for bg in BACKGROUNDS for tex in TEXTURES
    ]


def split_prompts(split: str, count: int = 16, seed: int = 0, two_object_prob: float = 0.0) -> list[str]:
    """``count`` distinct captions of ``split`` (deterministic in ``seed``), for evaluation: "train" gives prompts of
    combinations seen in training (not the training clips' own layouts), "heldout" of combinations never seen."""
    _check_split(split)
    captions, attempt = [], 0
    while len(captions) < count:
        caption = sample_scene(seed * 1_000_003 + attempt, split, two_object_prob=two_object_prob).caption
        if caption not in captions:
            captions.append(caption)
        attempt += 1
        if attempt > 100 * count + 1000:
            raise ValueError(f"cannot find {count} distinct {split} captions")
    return captions


def heldout_prompts(count: int = 16, seed: int = 0, two_object_prob: float = 0.0) -> list[str]:
    """``count`` distinct held-out captions (deterministic in ``seed``), for evaluation."""
    return split_prompts("heldout", count, seed, two_object_prob)


# -- sampling ---------------------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _sample_object(rng: np.random.Generator, colour: str, shape: str, motion: str) -> ObjectSpec:
    # Fractions of the frame. The margin keeps the whole outline inside the frame at every instant (centroid checks
    # and segmentation rely on it): EXTENT * size of min(H, W) is at most that fraction of either side.
    if motion in ("grows", "shrinks"):
        small, large = rng.uniform(0.05, 0.07), rng.uniform(0.16, 0.20)
        size0, size1 = (small, large) if motion == "grows" else (large, small)
        m = EXTENT * large + 0.02
        x = rng.uniform(m, 1 - m)
        y = rng.uniform(m, 1 - m)
        return ObjectSpec(shape, colour, motion, x, y, x, y, size0, size1)
    size = rng.uniform(0.08, 0.13)
    m = EXTENT * size + 0.02
    if motion == "bounces":
        x = rng.uniform(m, 1 - m)
        floor = rng.uniform(1 - m - 0.05, 1 - m)
        height = rng.uniform(0.45, 0.8) * (floor - m)
        return ObjectSpec(shape, colour, motion, x, floor, x, floor, size, size, height, int(rng.integers(2, 4)))
    travel = min(rng.uniform(0.35, 0.55), 1 - 2 * m)
    start = rng.uniform(m + travel, 1 - m)  # along the axis of motion, moving towards smaller values
    across = rng.uniform(m, 1 - m)
    end = start - travel
    if motion in ("moves right", "moves down"):
        start, end = 1 - start, 1 - end
    if motion in ("moves left", "moves right"):
        return ObjectSpec(shape, colour, motion, start, across, end, across, size, size)
    return ObjectSpec(shape, colour, motion, across, start, across, end, size, size)


def sample_scene(
    seed: int,
    split: str = "train",
    two_object_prob: float = 0.3,
    texture_prob: float = 0.3,
    caption: str | None = None,
) -> Scene:
    """A random scene of ``split``, deterministic in ``seed``.

    With ``caption`` the scene says exactly that (positions, sizes and speeds still come from ``seed``); its split is
    not checked, so ground truth can be rendered for any prompt.
    """
    _check_split(split)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, SPLITS.index(split), 0x5EED])
    if caption is not None:
        spec = parse_caption(caption)
        triples, background, texture = spec.objects, spec.background, spec.texture
    else:
        pool = combinations(split)
        first = pool[rng.integers(len(pool))]
        triples = [first]
        if rng.random() < two_object_prob:
            others = [t for t in pool if t[0] != first[0]]  # distinct colours keep objects separable
            triples.append(others[rng.integers(len(others))])
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        texture = "plain" if rng.random() >= texture_prob else TEXTURES[1 + rng.integers(2)]
    objects = tuple(_sample_object(rng, c, s, m) for c, s, m in triples)
    return Scene(objects, background, texture)


# -- rendering --------------------------------------------------------------------------------------------------------
def check_size(num_frames: int, height: int, width: int) -> None:
    """The video sizes the world renders (and the demo models take): 1 + 4k frames, sides multiples of 16."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 1 + 4k (e.g. 81), got {num_frames}")
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ValueError(f"height and width must be positive multiples of 16, got {height}x{width}")


def object_track(obj: ObjectSpec, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame centres [T, 2] (x, y) and sizes [T] in pixels (pixel centres are at integer + 0.5)."""
    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    x = obj.x0 + (obj.x1 - obj.x0) * t
    y = obj.y0 + (obj.y1 - obj.y0) * t
    if obj.motion == "bounces":  # hops off a floor like a ball: |sin| gives the sharp turn at each impact
        y = y - obj.bounce_height * np.abs(np.sin(math.pi * obj.bounces * t))
    size = (obj.size0 + (obj.size1 - obj.size0) * t) * min(height, width)
    return np.stack([x * width, y * height], axis=1), size


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) to the outline of ``shape`` of radius ``r``; exact near edges.

    dx, dy: [T, H, W] offsets from the centre; r: [T, 1, 1]. Shapes are scaled to have similar areas.
    """
    ax, ay = dx.abs(), dy.abs()
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return torch.maximum(ax, ay) - 0.886 * r
    if shape == "diamond":
        return (ax + ay - 1.25 * r) * (1 / math.sqrt(2))
    if shape == "cross":
        arm, half = 1.15 * r, 0.38 * r
        return torch.minimum(torch.maximum(ax - arm, ay - half), torch.maximum(ax - half, ay - arm))
    if shape == "triangle":  # equilateral, apex up, circumradius EXTENT * r: its centroid is the centre
        inset = 0.5 * EXTENT * r
        sin30, cos30 = 0.5, math.sqrt(3) / 2
        return torch.maximum(dy - inset, cos30 * ax - sin30 * dy - inset)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(scene: Scene, height: int, width: int, device=None) -> torch.Tensor:
    """[3, H, W] in 0..1."""
    colour = torch.tensor(scene.background_rgb or BACKGROUNDS[scene.background], dtype=torch.float32, device=device)
    colour = colour.view(3, 1, 1)
    ys = torch.arange(height, device=device).view(-1, 1) // TEXTURE_PERIOD
    xs = torch.arange(width, device=device).view(1, -1) // TEXTURE_PERIOD
    if scene.texture == "checkered":
        pattern = ((ys + xs) % 2).float()
    elif scene.texture == "striped":
        pattern = (xs % 2).float().expand(height, width)
    elif scene.texture == "plain":
        pattern = torch.full((height, width), 0.5, device=device)
    else:
        raise ValueError(f"unknown texture {scene.texture!r}; known: {TEXTURES}")
    return (colour + TEXTURE_CONTRAST * (pattern - 0.5)).clamp(0, 1).expand(3, height, width)


def render(
    scene: Scene,
    num_frames: int = 81,
    height: int = 128,
    width: int = 128,
    frames: slice | np.ndarray | list[int] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[ObjectTruth]]:
    """Render a scene: video [3, T', H, W] in [-1, 1] and per-object truth for those frames.

    ``frames`` picks frames of the ``num_frames``-frame clip (e.g. a window of 5 for VAE training); T' is their count.
    Objects are drawn in order, the later on top. ``device``: where the video is drawn (default the CPU; the same
    picture on any device, to float rounding).
    """
    check_size(num_frames, height, width)
    index = np.arange(num_frames)[frames] if frames is not None else np.arange(num_frames)
    index = np.atleast_1d(index)
    ys = torch.arange(height, dtype=torch.float32, device=device).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=device).view(1, 1, -1) + 0.5
    video = _background(scene, height, width, device).unsqueeze(1).repeat(1, len(index), 1, 1)  # [3, T, H, W]
    truths = []
    for obj in scene.objects:
        centers, sizes = object_track(obj, num_frames, height, width)
        centers, sizes = centers[index], sizes[index]
        c = torch.from_numpy(centers).float().to(device)
        r = torch.from_numpy(sizes).float().view(-1, 1, 1).to(device)
        distance = _signed_distance(obj.shape, xs - c[:, 0].view(-1, 1, 1), ys - c[:, 1].view(-1, 1, 1), r)
        alpha = (0.5 - distance).clamp(0, 1)  # area coverage of a pixel by a straight edge, to first order
        colour = torch.tensor(COLOURS[obj.colour], dtype=torch.float32, device=device).view(3, 1, 1, 1)
        video = torch.lerp(video, colour, alpha.unsqueeze(0))
        truths.append(ObjectTruth(obj.shape, obj.colour, obj.motion, centers, sizes))
    return video * 2 - 1, truths


def render_clip(
    seed: int,
    split: str = "train",
    num_frames: int = 81,
    height: int = 128,
    width: int = 128,
    two_object_prob: float = 0.3,
    texture_prob: float = 0.3,
    caption: str | None = None,
    background_rgb: tuple[float, float, float] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, str, Truth]:
    """(video [3, T, H, W] in [-1, 1], on ``device``, caption, truth) of the scene ``sample_scene(seed, split, ...)``;
    ``background_rgb`` (0..1) paints every background that colour while the caption still names the usual one."""
    scene = replace(sample_scene(seed, split, two_object_prob, texture_prob, caption), background_rgb=background_rgb)
    video, objects = render(scene, num_frames, height, width, device=device)
    truth = Truth(scene.caption, scene.background, scene.texture, split, seed, objects)
    return video, scene.caption, truth


class WorldDataset(Dataset):
    """Clips of one split: item ``i`` is ``render_clip(base_seed + i, ...)`` as (video [3, T, H, W], caption, truth).

    Use :func:`collate_clips` as the DataLoader's ``collate_fn``.
    """

    def __init__(
        self,
        length: int,
        split: str = "train",
        num_frames: int = 81,
        height: int = 128,
        width: int = 128,
        base_seed: int = 0,
        two_object_prob: float = 0.3,
        texture_prob: float = 0.3,
    ):
        _check_split(split)
        check_size(num_frames, height, width)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length, self.split, self.base_seed = length, split, base_seed
        self.num_frames, self.height, self.width = num_frames, height, width
        self.two_object_prob, self.texture_prob = two_object_prob, texture_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, Truth]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} clips")
        i %= self.length
        return render_clip(
            self.base_seed + i, self.split, self.num_frames, self.height, self.width,
            self.two_object_prob, self.texture_prob,
        )


def collate_clips(batch) -> tuple[torch.Tensor, list[str], list[Truth]]:
    """[(video, caption, truth)] -> (videos [B, 3, T, H, W], captions, truths)."""
    videos, captions, truths = zip(*batch)
    return torch.stack(videos), list(captions), list(truths)
