"""The named choices the CLI and the nodes share (pipelines/presets.py): one list each, read by both."""

import pytest
import torch
from comfyui_node_info import recorded

from oneforcing.__main__ import _parser
from oneforcing.pipelines.presets import (
    DTYPE_CHOICES, TIMESTEP_PRESETS, cli_name, resolve_dtype, storage_dtype, timestep_preset,
)


def test_a_preset_is_one_entry_in_either_spelling():
    assert timestep_preset("first block four steps") == timestep_preset("first-block-four-steps") == (
        [1000], [1000, 750, 500, 250])
    assert timestep_preset("one-step") == ([1000], None)
    assert timestep_preset("four steps") == ([1000, 750, 500, 250], None)
    denoising, _ = timestep_preset("one step")
    denoising.append(1)  # a caller's list is its own copy
    assert TIMESTEP_PRESETS["one step"][0] == [1000]
    with pytest.raises(ValueError, match="timesteps must be one of one step, first block four steps, four steps"):
        timestep_preset("two steps")


def test_the_cli_and_the_nodes_offer_the_same_presets_and_dtypes():
    for name in TIMESTEP_PRESETS:
        args = _parser().parse_args(["generate", "--out", "clip.mp4", "--timesteps", cli_name(name)])
        assert timestep_preset(args.timesteps) == timestep_preset(name)
    for name in DTYPE_CHOICES:
        assert _parser().parse_args(["generate", "--out", "clip.mp4", "--dtype", name]).dtype == name
    nodes = recorded()
    rollout = nodes["OneForcingRollout"]["input"]["required"]["timesteps"][1]
    assert rollout["options"] == list(TIMESTEP_PRESETS)
    for node, widget in (("OneForcingModelLoader", "dtype"), ("OneForcingTextEncode", "dtype")):
        assert nodes[node]["input"]["required"][widget][1]["options"] == list(DTYPE_CHOICES)


def test_default_dtype_follows_the_device():
    assert resolve_dtype("default", "cpu") == torch.float32
    assert resolve_dtype("default", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of default, bfloat16, float16, float32, fp8_e4m3fn, got "
                                         "'fp64'"):
        resolve_dtype("fp64", "cpu")


def test_fp8_storage_computes_in_the_default_dtype():
    assert resolve_dtype("fp8_e4m3fn", "cpu") == torch.float32
    assert resolve_dtype("fp8_e4m3fn", "cuda") == torch.bfloat16
    assert storage_dtype("fp8_e4m3fn") == torch.float8_e4m3fn
    assert storage_dtype("default") is None and storage_dtype("bfloat16") is None
