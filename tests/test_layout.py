"""BlockLayout: video <-> latent frames, blocks (uniform or with an independent first frame), cache size, switches."""

from __future__ import annotations

import itertools

import pytest
import torch

from oneforcing.pipelines.attention import block_causal_mask
from oneforcing.pipelines.layout import (
    BlockLayout,
    latent_frame_count,
    latent_frame_of_video,
    video_frame_count,
    video_frame_of_latent,
)


def test_video_and_latent_frame_counts():
    assert [latent_frame_count(n) for n in (1, 5, 81)] == [1, 2, 21]
    assert [video_frame_count(n) for n in (0, 1, 2, 21)] == [0, 1, 5, 81]
    with pytest.raises(ValueError, match="clip has 6 frames.*use 5 or 9"):
        latent_frame_count(6, what="clip")
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_frame_count(0)
    for latent in range(1, 8):  # every video frame of latent frame l maps back to a frame at or after it
        first = video_frame_of_latent(latent)
        assert latent_frame_of_video(first) == latent and latent_frame_of_video(first + 1) == latent + 1


@pytest.mark.parametrize("layout,sizes,cache", [
    (BlockLayout(1, 5), [1, 1, 1, 1, 1], 4),
    (BlockLayout(3, 5), [3, 2], 3),
    (BlockLayout(3, 7, independent_first_frame=True), [1, 3, 3], 4),
    (BlockLayout(3, 6, independent_first_frame=True), [1, 3, 2], 4),
    (BlockLayout(3, 6, context_frames=1, independent_first_frame=True), [3, 3], 4),  # the image is frame 0
    (BlockLayout(2, 3, context_frames=2), [2, 1], 4),
])
def test_block_sizes_and_cache_frames(layout, sizes, cache):
    assert layout.block_sizes() == sizes and layout.num_blocks == len(sizes)
    blocks = list(layout.blocks())
    assert [b.size for b in blocks] == sizes
    assert [b.start for b in blocks] == list(itertools.accumulate([layout.context_frames] + sizes[:-1]))
    assert blocks[-1].end == layout.total_frames
    assert layout.cache_frames() == cache
    assert layout.cache_frames(commit_last_block=True) == layout.total_frames
    assert layout.block_after(blocks[-1]) is None and layout.block_after(blocks[0]) == (blocks + [None])[1]


def test_context_is_split_by_the_same_rule():
    assert BlockLayout(3, independent_first_frame=True).split(0, 5) == [1, 3, 1]
    assert BlockLayout(3).split(0, 5) == [3, 2]
    assert BlockLayout(3, independent_first_frame=True).split(2, 4) == [3, 1]  # not the video's start
    assert BlockLayout(3).split(0, 0) == []


def test_endless_layout():
    layout = BlockLayout(3, None, independent_first_frame=True)
    assert layout.endless and layout.total_frames is None and layout.num_blocks is None
    assert [(b.start, b.size) for b in itertools.islice(layout.blocks(), 4)] == [(0, 1), (1, 3), (4, 3), (7, 3)]
    with pytest.raises(ValueError, match="rolling"):
        layout.cache_frames()


def test_for_video_counts_the_context_in_the_video():
    layout = BlockLayout.for_video(81, 3, context_frames=1)
    assert (layout.num_frames, layout.context_frames, layout.total_frames) == (20, 1, 21)
    assert BlockLayout.for_video(None, 1).endless
    with pytest.raises(ValueError, match="nothing to generate after the context's 5 frames"):
        BlockLayout.for_video(5, 1, context_frames=2)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        BlockLayout.for_video(80, 1)


def test_block_starts_and_switches():
    uniform = BlockLayout(3, 9, context_frames=1)
    assert [uniform.block_start_at_or_after(f) for f in (0, 1, 2, 4, 5)] == [1, 1, 4, 4, 7]
    assert [f for f in range(12) if uniform.is_block_start(f)] == [1, 4, 7]
    independent = BlockLayout(3, 10, independent_first_frame=True)
    assert [f for f in range(12) if independent.is_block_start(f)] == [0, 1, 4, 7]
    assert independent.block_start_at_or_after(2) == 4
    independent.check_switch(4)
    with pytest.raises(ValueError, match="not a block start"):
        independent.check_switch(3)
    with pytest.raises(ValueError, match="inside the committed context"):
        uniform.check_switch(0)
    with pytest.raises(ValueError, match="past the end"):
        uniform.check_switch(10)


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="frames_per_block"):
        BlockLayout(0)
    with pytest.raises(ValueError, match="at least one latent frame"):
        BlockLayout(1, 0)
    with pytest.raises(ValueError, match="endless"):
        BlockLayout(1).block_sizes()


def test_block_causal_mask_follows_the_layout():
    mask = block_causal_mask(BlockLayout(3, 4, independent_first_frame=True).block_sizes(), tokens_per_frame=1)
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert block_causal_mask([2, 1], tokens_per_frame=2).shape == (6, 6)
