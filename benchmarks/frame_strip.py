"""A strip of frames from video files, as one PNG: each file is a row, each chosen frame a column.

``--ground-truth CAPTION`` adds a first row: the demo world's own render of that caption (seed 0, the files' size).
The README's picture of the demo model is made from the clip its set-up command writes:

    python -m oneforcing generate --prompt "a yellow circle moves right on a black background" --out clip.mp4
    python benchmarks/frame_strip.py clip.mp4 --ground-truth "a yellow circle moves right on a black background" \
        --out benchmarks/results/demo_strip.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from oneforcing.pipelines.video_io import read_video_frames, video_to_uint8
from oneforcing.training import world


def frame_strip(clips: list[np.ndarray], frames: list[int], gap: int = 2) -> np.ndarray:
    """[R*H + (R-1)*gap, C*W + (C-1)*gap, 3] uint8: frame ``frames[c]`` of clip ``r`` at row r, column c, on white.

    clips: R uint8 RGB videos [T, H, W, 3] of one frame size. Raises ValueError for an empty list, mixed sizes or a
    frame index outside a clip."""
    if not clips or not frames:
        raise ValueError("a strip needs at least one clip and one frame index")
    height, width = clips[0].shape[1:3]
    for r, clip in enumerate(clips):
        if clip.shape[1:3] != (height, width):
            raise ValueError(f"clip {r} has frames of {clip.shape[2]}x{clip.shape[1]}, clip 0 of {width}x{height}")
        bad = [f for f in frames if not -len(clip) <= f < len(clip)]
        if bad:
            raise ValueError(f"clip {r} has {len(clip)} frames; no frame {bad[0]}")
    strip = np.full((len(clips) * (height + gap) - gap, len(frames) * (width + gap) - gap, 3), 255, np.uint8)
    for r, clip in enumerate(clips):
        top = r * (height + gap)
        for c, f in enumerate(frames):
            left = c * (width + gap)
            strip[top:top + height, left:left + width] = clip[f]
    return strip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("videos", nargs="+", type=Path, help="video files, one row each")
    parser.add_argument("--frames", nargs="+", type=int, default=[0, 20, 40, 60, 80], help="frame indices (columns)")
    parser.add_argument("--ground-truth", metavar="CAPTION", help="first row: the world's render of this caption")
    parser.add_argument("--scale", type=int, default=1, help="enlarge every pixel to scale x scale (nearest)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.scale < 1:
        print(f"error: --scale must be >= 1, got {args.scale}", file=sys.stderr)
        return 2
    import cv2

    clips = []
    for path in args.videos:
        clip = read_video_frames(path)
        if len(clip) == 0:
            print(f"error: {path}: no frames could be read (missing or not a video)", file=sys.stderr)
            return 2
        clips.append(clip)
    if args.ground_truth:
        frames, height, width = clips[0].shape[:3]
        try:
            video, _, _ = world.render_clip(0, num_frames=frames, height=height, width=width, caption=args.ground_truth)
        except ValueError as error:
            print(f"error: --ground-truth: {error}", file=sys.stderr)
            return 2
        clips.insert(0, video_to_uint8(video[None]))
    try:
        strip = frame_strip(clips, args.frames)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    strip = strip.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), np.ascontiguousarray(strip[:, :, ::-1])):
        print(f"error: could not write {args.out}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(clips)} row(s) x {len(args.frames)} frame(s), {strip.shape[1]}x{strip.shape[0]} pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
