"""What a clip of the synthetic world shows, measured from its pixels and checked against its caption.

Every function takes a video as frames [T, H, W, 3] RGB, uint8 or floats in 0..1 (numpy or torch), and a caption of
:mod:`.world` (parsed with :func:`world.parse_caption`).

- Prompt adherence, per object the caption names. Pixels are labelled with the nearest colour among the world's
  object colours and the caption's background (``colour_tolerance`` away at most, else unlabelled); the object is the
  largest 8-connected region of its colour. *Colour*: that region exists (at least a small object's quarter area) in
  at least half of the frames. *Shape*: in every frame where it exists, the region is compared (IoU) with each of the
  world's shapes drawn by the world's own renderer at the region's centroid and area; the shape with the highest IoU
  summed over frames is the answer. *Motion*: from the centroid and sqrt(area) tracks (robust Theil-Sen line fits
  over normalised time, as the world's motions are linear in ``t = i / (T - 1)``): translation = the fitted
  displacement, bounce = the vertical spread of the track around its line (hops, ``|sin|`` in the world), grow /
  shrink = the fitted end / start size ratio. The largest of these, relative to a threshold well below what every
  world clip shows, names the motion; none over its threshold is "still".
  Shape and motion count as wrong when the colour is not found: an object that is not there has no right shape.
  *Joint*: all three right for the object. *Background*: the background colour most pixels are nearest to (object
  colours competing) is the caption's.
- Sharpness: mean squared Sobel gradient of the luminance ("edge energy"), also after a 3x3 median that removes
  pixel grain; and the gradient-weighted mean gradient ("edge sharpness", ~ contrast / edge width, which unlike the
  edge energy does not fall when an object is missing); compare with ground truth as ratios.
- Temporal consistency: flicker = mean absolute frame-to-frame difference (compare with ground truth as a ratio);
  identity = the fraction of frames in which the object is found with a size within ``identity_tolerance`` (and a
  pixel) of its fitted size track (a constant size, or the linear growth of "grows" / "shrinks").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import cv2
import numpy as np

from . import world

COLOUR_NAMES = tuple(world.COLOURS)
BACKGROUND_NAMES = tuple(world.BACKGROUNDS)
OBJECT_COLOURS = np.array([world.COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # [6, 3]

# Thresholds well inside what world.py guarantees (see _sample_object): translation >= 0.35 of the side, bounce height
# >= ~0.26 of the height, size ratio of grows/shrinks >= 0.16 / 0.07 ~ 2.3.
MIN_TRANSLATION = 0.15  # fitted displacement, fraction of the frame side along the axis
MIN_BOUNCE = 0.12  # spread of the vertical residuals around the fitted line, fraction of the height
MIN_SIZE_RATIO = 1.6  # fitted end / start (or start / end) sqrt(area) ratio
SMALLEST_OBJECT = 0.05  # smallest radius of a world object, fraction of min(H, W)


def as_frames(video) -> np.ndarray:
    """[T, H, W, 3] uint8 or floats in 0..1 (numpy or torch) -> float32 numpy in 0..1."""
    if hasattr(video, "detach"):
        video = video.detach().cpu()
        video = video.float().numpy() if video.is_floating_point() else video.numpy()
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be frames [T, H, W, 3] RGB, got shape {video.shape}")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    if not np.issubdtype(video.dtype, np.floating):
        raise TypeError(f"video must be uint8 or floats in 0..1, got dtype {video.dtype}")
    if video.size and (video.min() < -0.02 or video.max() > 1.02):
        raise ValueError(f"float video must lie in 0..1, got {video.min():.3f}..{video.max():.3f} (a [-1, 1] tensor?)")
    return np.clip(video, 0.0, 1.0).astype(np.float32)


# -- segmentation -----------------------------------------------------------------------------------------------------
def colour_labels(frame: np.ndarray, background: str, colour_tolerance: float = 0.3) -> np.ndarray:
    """Per pixel of one frame [H, W, 3] (0..1): index into ``COLOUR_NAMES``, or -1 for background / no colour."""
    bg = np.array(world.BACKGROUNDS[background], dtype=np.float32)
    candidates = np.concatenate([OBJECT_COLOURS, bg[None]])  # the background is the last candidate
    distance = np.linalg.norm(frame[:, :, None, :] - candidates, axis=-1)  # [H, W, 7]
    nearest = distance.argmin(-1)
    labels = np.where(distance.min(-1) <= colour_tolerance, nearest, -1)
    labels[labels == len(OBJECT_COLOURS)] = -1
    return labels.astype(np.int8)


def min_object_area(height: int, width: int) -> float:
    """A quarter of the area of the world's smallest object: smaller regions are noise."""
    return max(4.0, 0.25 * math.pi * (SMALLEST_OBJECT * min(height, width)) ** 2)


def largest_region(mask: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected region of a boolean mask [H, W], or None when the mask is empty."""
    if not mask.any():
        return None
    _, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    biggest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    return components == biggest


def dominant_background(frames: np.ndarray, colour_tolerance: float = 0.3, stride: int = 4) -> str | None:
    """The world background colour that most pixels of frames [T, H, W, 3] (0..1; every ``stride``-th frame) are
    nearest to, object colours competing; None when fewer than a quarter of the pixels are near any background."""
    sample = frames[::stride]
    candidates = np.concatenate([np.array(list(world.BACKGROUNDS.values()), dtype=np.float32), OBJECT_COLOURS])
    distance = np.linalg.norm(sample[..., None, :] - candidates, axis=-1)  # [T', H, W, 4 + 6]
    nearest = np.where(distance.min(-1) <= colour_tolerance, distance.argmin(-1), -1)
    counts = np.bincount(nearest[nearest >= 0].ravel(), minlength=len(candidates))[: len(world.BACKGROUNDS)]
    if counts.max() < 0.25 * nearest.size:
        return None
    return BACKGROUND_NAMES[int(counts.argmax())]


# -- shapes -----------------------------------------------------------------------------------------------------------
def shape_patch(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """The world's ``shape`` of ``radius`` pixels centred at (cx, cy), drawn by ``world.render`` on a ``size`` x
    ``size`` patch (``size`` a multiple of 16): boolean mask [size, size] of pixels at least half covered."""
    spec = world.ObjectSpec(shape, "white", "moves left", cx / size, cy / size, cx / size, cy / size,
                            radius / size, radius / size)
    video, _ = world.render(world.Scene((spec,), "black"), num_frames=1, height=size, width=size)
    lo, hi = world.BACKGROUNDS["black"][0], world.COLOURS["white"][0]
    coverage = ((video[0, 0].numpy() + 1) / 2 - lo) / (hi - lo)
    return coverage >= 0.5


@lru_cache(maxsize=None)
def shape_area_per_radius2(shape: str) -> float:
    """Drawn area / radius^2 of the world's ``shape`` (the shapes are scaled to similar, not equal, areas)."""
    radius, size = 40.0, 128
    return float(shape_patch(shape, size / 2, size / 2, radius, size).sum()) / radius**2


def shape_ious(region: np.ndarray) -> dict[str, float]:
    """IoU of a region [H, W] (bool) with each world shape drawn at the region's centroid with the region's area."""
    ys, xs = np.nonzero(region)
    area = float(len(xs))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres at integer + 0.5, as world.render draws them
    ious = {}
    for shape in world.SHAPES:
        radius = math.sqrt(area / shape_area_per_radius2(shape))
        size = 16 * math.ceil((2 * world.EXTENT * radius + 8) / 16)
        left, top = math.floor(cx) - size // 2, math.floor(cy) - size // 2
        template = shape_patch(shape, cx - left, cy - top, radius, size)
        # the region cut to the patch (the patch may reach past the frame's edges)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + size, region.shape[0]), min(left + size, region.shape[1])
        inside = np.zeros_like(template)
        inside[y0 - top : y1 - top, x0 - left : x1 - left] = region[y0:y1, x0:x1]
        overlap = float((template & inside).sum())
        ious[shape] = overlap / (template.sum() + area - overlap)
    return ious


# -- tracks and motion ------------------------------------------------------------------------------------------------
def theil_sen(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Robust line fit y ~ a + b t: (a, b), b the median of pairwise slopes, a the median of y - b t."""
    i, j = np.triu_indices(len(t), k=1)
    dt = t[j] - t[i]
    keep = dt > 0
    slope = float(np.median((y[j] - y[i])[keep] / dt[keep])) if keep.any() else 0.0
    return float(np.median(y - slope * t)), slope


@dataclass
class ObjectTrack:
    """One named object followed through a clip: per frame [T] whether found, its area (pixels) and centroid (x, y)."""

    found: np.ndarray
    area: np.ndarray
    centers: np.ndarray
    shape_iou_sum: dict[str, float]


def track_object(
    frames: np.ndarray, colour: str, background: str, colour_tolerance: float = 0.3, with_shapes: bool = True
) -> ObjectTrack:
    """Follow the largest region of ``colour`` through frames [T, H, W, 3] (0..1)."""
    num_frames, height, width = frames.shape[:3]
    index = COLOUR_NAMES.index(colour)
    smallest = min_object_area(height, width)
    found = np.zeros(num_frames, bool)
    area = np.zeros(num_frames)
    centers = np.full((num_frames, 2), np.nan)
    iou_sum = {s: 0.0 for s in world.SHAPES}
    for i, frame in enumerate(frames):
        region = largest_region(colour_labels(frame, background, colour_tolerance) == index)
        if region is None or region.sum() < smallest:
            continue
        ys, xs = np.nonzero(region)
        found[i], area[i] = True, len(xs)
        centers[i] = xs.mean() + 0.5, ys.mean() + 0.5
        if with_shapes:
            for shape, iou in shape_ious(region).items():
                iou_sum[shape] += iou
    return ObjectTrack(found, area, centers, iou_sum)


def motion_features(track: ObjectTrack, height: int, width: int) -> dict[str, float] | None:
    """Fitted displacement (dx / W, dy / H), vertical and horizontal residual spread (/ H, / W), and end / start
    size ratio of a track; None with fewer than 3 found frames."""
    num_frames = len(track.found)
    if track.found.sum() < 3:
        return None
    t = (np.arange(num_frames) / max(num_frames - 1, 1))[track.found]
    x, y = track.centers[track.found, 0], track.centers[track.found, 1]
    size = np.sqrt(track.area[track.found])
    ax, bx = theil_sen(t, x)
    ay, by = theil_sen(t, y)
    a_s, b_s = theil_sen(t, size)
    ry, rx = y - (ay + by * t), x - (ax + bx * t)
    start, end = max(a_s, 1e-6), max(a_s + b_s, 1e-6)
    return {
        "dx": bx / width,
        "dy": by / height,
        "spread_y": float(ry.max() - ry.min()) / height,
        "spread_x": float(rx.max() - rx.min()) / width,
        "size_ratio": end / start,
    }


def classify_motion(features: dict[str, float] | None) -> str:
    """One of ``world.MOTIONS``, or "still" when nothing moves enough (or the object was not followed)."""
    if features is None:
        return "still"
    scores = {
        "translate": max(abs(features["dx"]), abs(features["dy"])) / MIN_TRANSLATION,
        "scale": abs(math.log(features["size_ratio"])) / math.log(MIN_SIZE_RATIO),
        # hops are vertical: a track that also jumps sideways as much is not a bounce
        "bounce": features["spread_y"] / MIN_BOUNCE if features["spread_y"] > 2 * features["spread_x"] else 0.0,
    }
    kind = max(scores, key=scores.get)
    if scores[kind] < 1.0:
        return "still"
    if kind == "scale":
        return "grows" if features["size_ratio"] > 1 else "shrinks"
    if kind == "bounce":
        return "bounces"
    if abs(features["dx"]) >= abs(features["dy"]):
        return "moves right" if features["dx"] > 0 else "moves left"
    return "moves down" if features["dy"] > 0 else "moves up"


def size_consistency(track: ObjectTrack, tolerance: float = 0.25) -> float:
    """Fraction of all frames in which the object is found with sqrt(area) within ``tolerance`` (relative, plus one
    pixel) of its robust linear fit over time."""
    num_frames = len(track.found)
    if track.found.sum() < 2:
        return float(track.found.sum()) / num_frames if track.found.sum() else 0.0
    t = np.arange(num_frames) / max(num_frames - 1, 1)
    size = np.sqrt(track.area)
    a, b = theil_sen(t[track.found], size[track.found])
    fitted = np.maximum(a + b * t, 1e-6)
    # one pixel of slack: the area of a small object drawn on the pixel grid wobbles by about its perimeter
    consistent = track.found & (np.abs(size - fitted) <= tolerance * fitted + 1.0)
    return float(consistent.sum()) / num_frames


# -- sharpness and flicker --------------------------------------------------------------------------------------------
def _luminance_gradients(frames: np.ndarray, denoise: bool):
    """Per frame of [T, H, W, 3] (0..1): the Sobel gradient magnitude [H, W] of the luminance (3x3 median first when
    ``denoise``)."""
    for frame in frames:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if denoise:
            gray = cv2.medianBlur(gray, 3)
        gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
        yield np.sqrt(gx * gx + gy * gy)


def edge_energy(video, denoise: bool = False) -> float:
    """Mean squared Sobel gradient magnitude of the luminance over all frames (0..1 intensities).

    Squared on purpose: the mean gradient *magnitude* of an edge is its contrast whatever its width (blur spreads the
    same total change over more pixels), while the mean squared gradient falls as the edge widens. Pixel noise raises
    it too (grain reads as "sharp"); ``denoise`` first takes a 3x3 median, which removes most pixel noise and keeps
    step edges, so that blur is measured rather than grain. It also falls when there are fewer edges (an object
    missing): see :func:`edge_sharpness` for a measure of the edges that are there.
    """
    frames = as_frames(video)
    total = sum(float(np.square(g).mean(dtype=np.float64)) for g in _luminance_gradients(frames, denoise))
    return total / max(len(frames), 1)


def edge_sharpness(video) -> float:
    """Gradient-weighted mean gradient magnitude, sum |g|^2 / sum |g|, of the 3x3-median-denoised luminance.

    A step edge of contrast c blurred over w pixels gives |g| ~ c / w over its w pixels: the weighted mean is ~c / w
    however many edges a frame holds, so unlike :func:`edge_energy` it does not fall when an object is missing (the
    palette fixes c). 0 for a clip without any gradient.
    """
    squares = weights = 0.0
    for g in _luminance_gradients(as_frames(video), denoise=True):
        squares += float(np.square(g).sum(dtype=np.float64))
        weights += float(g.sum(dtype=np.float64))
    return squares / weights if weights > 0 else 0.0


def paired_sign_flip_p(differences, draws: int = 200_000, seed: int = 0, exact_up_to: int = 16) -> float:
    """One-sided p-value that paired ``differences`` (first minus second, one per pair) have a mean above 0.

    A sign-flip permutation test: under "no difference" each pair's sign is a coin flip, so p is the share of sign
    patterns whose mean is at least the observed one -- over all 2^n patterns when n <= ``exact_up_to``, else
    ``draws`` random ones (``(hits + 1) / (draws + 1)``, seeded). Needs no normality and no equal variances.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise ValueError(f"need a non-empty 1-D array of finite differences, got shape {d.shape}")
    observed = d.mean()
    tolerance = 1e-12 * max(1.0, np.abs(d).max())  # ties with the observed mean count as hits
    if len(d) <= exact_up_to:
        signs = 1.0 - 2.0 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        return float(np.mean((signs * d).mean(axis=1) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, draws, 10_000):
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, draws - start), len(d)))
        hits += int(np.sum((signs * d).mean(axis=1) >= observed - tolerance))
    return (hits + 1) / (draws + 1)


def flicker(video) -> float:
    """Mean absolute difference between consecutive frames (0..1 intensities); 0 for a single frame."""
    frames = as_frames(video)
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames, axis=0)).mean(dtype=np.float64))


# -- one clip ---------------------------------------------------------------------------------------------------------
@dataclass
class ObjectResult:
    colour: str
    shape: str
    motion: str
    found_fraction: float
    colour_ok: bool
    predicted_shape: str | None
    shape_ok: bool
    shape_iou: float  # mean IoU with the named shape over the frames where the object was found
    predicted_motion: str
    motion_ok: bool
    motion_features: dict[str, float] | None
    identity: float


@dataclass
class ClipResult:
    caption: str
    background: float  # 1 when the clip's dominant background colour is the caption's
    colour: float  # fraction of the caption's objects with the right colour / shape / motion
    shape: float
    motion: float
    joint: float  # fraction of the caption's objects with all three right
    identity: float
    edge_energy: float
    edge_energy_denoised: float
    edge_sharpness: float
    flicker: float
    objects: list[ObjectResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_object(
    frames: np.ndarray, colour: str, shape: str, motion: str, background: str, *,
    colour_tolerance: float = 0.3, identity_tolerance: float = 0.25,
) -> ObjectResult:
    """Adherence and identity of one (colour, shape, motion) object of a caption in frames [T, H, W, 3] (0..1)."""
    height, width = frames.shape[1:3]
    track = track_object(frames, colour, background, colour_tolerance)
    found = int(track.found.sum())
    found_fraction = found / len(frames)
    colour_ok = found_fraction >= 0.5
    predicted_shape = max(track.shape_iou_sum, key=track.shape_iou_sum.get) if found else None
    features = motion_features(track, height, width)
    predicted_motion = classify_motion(features)
    return ObjectResult(
        colour=colour, shape=shape, motion=motion, found_fraction=found_fraction, colour_ok=colour_ok,
        predicted_shape=predicted_shape, shape_ok=colour_ok and predicted_shape == shape,
        shape_iou=track.shape_iou_sum[shape] / found if found else 0.0,
        predicted_motion=predicted_motion, motion_ok=colour_ok and predicted_motion == motion,
        motion_features=features, identity=size_consistency(track, identity_tolerance),
    )


def evaluate_clip(
    video, caption: str, *, colour_tolerance: float = 0.3, identity_tolerance: float = 0.25
) -> ClipResult:
    """All metrics of one clip [T, H, W, 3] against its ``caption`` (a sentence of the world)."""
    spec = world.parse_caption(caption)
    frames = as_frames(video)
    objects = [
        evaluate_object(frames, c, s, m, spec.background, colour_tolerance=colour_tolerance,
                        identity_tolerance=identity_tolerance)
        for c, s, m in spec.objects
    ]
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return ClipResult(
        caption=caption,
        background=float(dominant_background(frames, colour_tolerance) == spec.background),
        colour=mean([o.colour_ok for o in objects]),
        shape=mean([o.shape_ok for o in objects]),
        motion=mean([o.motion_ok for o in objects]),
        joint=mean([o.colour_ok and o.shape_ok and o.motion_ok for o in objects]),
        identity=mean([o.identity for o in objects]),
        edge_energy=edge_energy(frames),
        edge_energy_denoised=edge_energy(frames, denoise=True),
        edge_sharpness=edge_sharpness(frames),
        flicker=flicker(frames),
        objects=objects,
    )


def border_colours(video, margin: int = 12) -> np.ndarray:
    """Per frame, the median RGB of the outer ``margin``-pixel ring: the background colour (an object touches the ring
    with a small part at most, which the median ignores). video: frames [T, H, W, 3] -> [T, 3] in 0..1."""
    frames = as_frames(video)
    ring = np.ones(frames.shape[1:3], dtype=bool)
    ring[margin:-margin, margin:-margin] = False
    return np.median(frames[:, ring], axis=1)


def colour_distance(a, b) -> np.ndarray:
    """The largest channel difference of RGB colours (broadcast) [..., 3] -> [...]."""
    return np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max(axis=-1)


def world_frames(video) -> np.ndarray:
    """A clip of ``world.render`` ([3, T, H, W] in [-1, 1], torch or numpy) -> frames [T, H, W, 3] float32 in 0..1."""
    if hasattr(video, "detach"):
        video = video.detach().cpu().float().numpy()
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"a world clip is [3, T, H, W], got shape {video.shape}")
    return np.clip((video.transpose(1, 2, 3, 0) + 1) / 2, 0, 1)
