"""The fast Wan VAE decode path computes diffusers' decoder function: frame-wise 2-D convolutions equal the causal
3-D ones (any cache state), the fused norm equals WanRMS_norm (+ SiLU), the whole decode matches, and the VAE object
is left untouched."""

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from oneforcing.kernels import reference
from oneforcing.pipelines.vae_fast import WanFastPath, frame_conv, subpixel_weights, upsample_conv
from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

TIGHT = dict(atol=2e-5, rtol=1e-5)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _vae(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return AutoencoderKLWan(**{**config, **overrides}).eval()


@pytest.fixture(scope="module")
def vae():
    return _vae()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, 5, 3, 4, generator=torch.Generator().manual_seed(0))


# -- one convolution --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (4, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_upsampling_then_the_3x3_convolution(bias, size, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    x = torch.randn(2, 6, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    got = upsample_conv(x, subpixel_weights(conv.weight.detach()), conv.bias)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("mode", ["taps", "stacked"])
@pytest.mark.parametrize(
    "kernel,padding,cache_frames",
    [(3, 1, None), (3, 1, 1), (3, 1, 2), (3, 1, 3), ((3, 1, 1), (1, 0, 0), 2), (1, 0, 2), ((1, 3, 3), (0, 1, 1), None)],
)
def test_frame_conv_equals_the_causal_3d_convolution(mode, kernel, padding, cache_frames):
    torch.manual_seed(1)
    conv = WanCausalConv3d(6, 10, kernel, padding=padding)
    x = torch.randn(2, 6, 4, 5, 7)
    cache = None if cache_frames is None else torch.randn(2, 6, cache_frames, 5, 7)
    with torch.no_grad():
        want = conv(x, cache)
        got = frame_conv(conv, x, cache, mode)
    assert got.shape == want.shape == (2, 10, 4, 5, 7)
    assert got.permute(0, 2, 3, 4, 1).is_contiguous()  # channels-last 3-D memory order
    torch.testing.assert_close(got, want, **TIGHT)
    # channels-last input gives the same
    with torch.no_grad():
        again = frame_conv(conv, x.contiguous(memory_format=torch.channels_last_3d), cache, mode)
    torch.testing.assert_close(again, want, **TIGHT)


def test_frame_conv_rejects_an_unknown_mode():
    conv = WanCausalConv3d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        frame_conv(conv, torch.randn(1, 2, 1, 3, 3), None, "winograd")
    with pytest.raises(ValueError, match="conv must be one of"):
        WanFastPath(torch.nn.Sequential(conv), conv="winograd")


# -- the norm ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_channel_rms_norm_reference_equals_wan_rms_norm(images, bias):
    torch.manual_seed(2)
    norm = WanRMS_norm(12, images=images, bias=bias)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        if bias:
            norm.bias.normal_()
    x = torch.randn(2, 12, 5, 6) if images else torch.randn(2, 12, 3, 5, 6)
    b = norm.bias if bias else None
    with torch.no_grad():
        torch.testing.assert_close(reference.channel_rms_norm(x, norm.gamma, b, norm.scale, False), norm(x), **TIGHT)
        torch.testing.assert_close(reference.channel_rms_norm(x, norm.gamma, b, norm.scale, True),
                                   torch.nn.functional.silu(norm(x)), **TIGHT)


# -- the whole decoder ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(conv="stacked"), dict(conv=None), dict(fuse_norm=False),
                                     dict(bf16_upsample=False), dict(subpixel_upsample=False), dict(chunk_frames=None),
                                     dict(chunk_frames=3)])
def test_fast_decode_equals_diffusers_decode(vae, latents, options):
    want = WanStreamingDecoder(vae, fast=False).decode_all(latents)
    fast = WanFastPath(vae.decoder, **options)
    with fast:
        decoder = WanStreamingDecoder(vae, fast=False)
        pieces = [decoder.decode_block(latents[:, :, :1]), decoder.decode_block(latents[:, :, 1:3]),
                  decoder.decode_block(latents[:, :, 3:])]
    torch.testing.assert_close(torch.cat(pieces, 2), want, **TIGHT)


def test_the_vae_is_left_as_it_was(vae, latents):
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    fast = WanFastPath(vae.decoder, chunk_frames=1)
    silu = vae.decoder.up_blocks[0].resnets[0].nonlinearity
    x = torch.randn(3)
    with fast:
        # inside: every causal conv, norm and upsampler of the decoder runs the fast path; a folded SiLU passes through
        patched = [type(m).__name__ for m in vae.decoder.modules() if "forward" in m.__dict__]
        assert {"WanCausalConv3d", "WanRMS_norm", "WanUpsample", "SiLU", "Sequential", "WanDecoder3d"} <= set(patched)
        assert torch.equal(silu(x), x)
        with pytest.raises(RuntimeError, match="already active"):
            fast.__enter__()
    assert not [m for m in vae.modules() if "forward" in m.__dict__]
    torch.testing.assert_close(silu(x), torch.nn.functional.silu(x))
    for k, v in vae.state_dict().items():
        assert torch.equal(v, state[k]) and v.is_contiguous(), k
    # the encoder is not touched even while active
    with fast:
        assert not [m for m in vae.encoder.modules() if "forward" in m.__dict__]


def test_the_full_resolution_tail_goes_a_frame_at_a_time(vae, latents):
    """Wan2.1's decoder upsamples in time in its first two up blocks: the last two and the head take one frame per
    call with ``chunk_frames=1``."""
    from oneforcing.pipelines.vae_fast import _frame_local_tail

    assert _frame_local_tail(vae.decoder) == 2
    seen = []
    hook = vae.decoder.up_blocks[3].register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[2]),
                                                              with_kwargs=True)
    try:
        with WanFastPath(vae.decoder, chunk_frames=1):
            WanStreamingDecoder(vae, fast=False).decode_all(latents)
        assert seen and set(seen) == {1}
        seen.clear()
        WanStreamingDecoder(vae, fast=True).decode_all(latents)  # on CPU the streaming decoder does not chunk
        assert seen and max(seen) == 4
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="chunk_frames"):
        WanFastPath(vae.decoder, chunk_frames=0)


def test_changed_weights_are_picked_up(latents):
    vae = _vae(seed=3)
    decoder = WanStreamingDecoder(vae, fast=True)
    first = decoder.decode_all(latents)
    with torch.no_grad():
        for m in vae.decoder.modules():
            if isinstance(m, WanCausalConv3d):
                m.weight.mul_(0.5)  # in place: the cached 2-D weights must be rebuilt
    torch.testing.assert_close(decoder.decode_all(latents), WanStreamingDecoder(vae, fast=False).decode_all(latents),
                               **TIGHT)
    assert not torch.allclose(first, decoder.decode_all(latents))


def test_streaming_decoder_takes_the_fast_path_by_default(vae, latents, monkeypatch):
    from oneforcing.pipelines import vae_fast

    calls = []
    real = vae_fast.frame_conv
    monkeypatch.setattr(vae_fast, "frame_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    auto = WanStreamingDecoder(vae).decode_all(latents)
    assert calls
    assert torch.equal(auto, WanStreamingDecoder(vae, fast=True).decode_all(latents))
    calls.clear()
    plain = WanStreamingDecoder(vae, fast=False).decode_all(latents)
    assert not calls
    torch.testing.assert_close(auto, plain, **TIGHT)


@cuda
def test_gpu_fast_decode_is_as_close_to_float32_as_diffusers_bf16():
    vae = _vae(seed=4, base_dim=32).cuda()
    latents = torch.randn(1, 16, 5, 8, 12, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = WanStreamingDecoder(vae, fast=False).decode_all(latents)  # float32
    vae16 = _vae(seed=4, base_dim=32).cuda().to(torch.bfloat16)
    plain = WanStreamingDecoder(vae16, fast=False).decode_all(latents.bfloat16()).float()
    fast = WanStreamingDecoder(vae16).decode_all(latents.bfloat16()).float()  # the default: fast
    plain_err, fast_err = (plain - want).abs().mean(), (fast - want).abs().mean()
    assert fast_err < 1.25 * plain_err + 1e-4, (fast_err, plain_err)
    assert (fast - want).abs().max() < 0.1


@pytest.mark.parametrize("part", ["decoder", "encoder", "encoder (Wan2.2)"])
def test_every_norm_sees_channels_last_activations(vae, latents, monkeypatch, part):
    """The fused Triton norm takes channels-last tensors only: the fast path must keep activations in that layout
    (also after diffusers' temporal upsampling, which stacks frames channels-first, and after the encoder's strided
    temporal downsampling, which keeps diffusers' 3-D convolution)."""
    from oneforcing.pipelines import vae_fast
    from oneforcing.pipelines.vae_streaming import encode_video

    layouts = []
    real = vae_fast.ops.channel_rms_norm

    def recording(x, *args):
        layouts.append((tuple(x.shape), x.movedim(1, -1).is_contiguous()))
        return real(x, *args)

    monkeypatch.setattr(vae_fast.ops, "channel_rms_norm", recording)
    if part == "decoder":
        decoder = WanStreamingDecoder(vae, fast=True)
        decoder.decode_block(latents[:, :, :1])
        decoder.decode_block(latents[:, :, 1:])
    elif part == "encoder":
        encode_video(vae, torch.rand(1, 3, 9, 24, 32) * 2 - 1)
    else:
        wan22 = _vae(seed=8, base_dim=16, dim_mult=[1, 1, 1, 1], z_dim=48, is_residual=True, patch_size=2,
                     in_channels=12, out_channels=12, scale_factor_spatial=16, latents_mean=[0.1] * 48,
                     latents_std=[2.0] * 48)
        encode_video(wan22, torch.rand(1, 3, 9, 32, 32) * 2 - 1)
    assert layouts and all(ok for _, ok in layouts), [shape for shape, ok in layouts if not ok]


def test_modules_with_hooks_keep_them_and_decode_the_plain_way(latents):
    """accelerate's offload hooks replace a module's forward on the instance: the fast path must step aside."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    vae = _vae(seed=5)
    want = WanStreamingDecoder(vae, fast=False).decode_all(latents)
    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    conv_in = vae.decoder.conv_in
    add_hook_to_module(conv_in, Count())
    assert not WanFastPath.applicable(vae.decoder)
    got = WanStreamingDecoder(vae, fast=True).decode_all(latents)
    assert torch.equal(got, want) and calls  # decoded by diffusers' modules, through the hook
    assert "forward" in conv_in.__dict__  # the hook is still in place
    with pytest.raises(RuntimeError, match="already have an instance forward"):
        with WanFastPath(vae.decoder):
            pass
    assert "forward" in conv_in.__dict__


def test_wan22_layout_on_the_fast_path():
    """The patchified Wan2.2 VAE (residual up-blocks with their duplicating shortcut) decodes the same way too."""
    vae = _vae(seed=6, base_dim=16, dim_mult=[1, 1, 1, 1], z_dim=48, is_residual=True, patch_size=2, in_channels=12,
               out_channels=12, scale_factor_spatial=16, latents_mean=[0.1] * 48, latents_std=[2.0] * 48)
    latents = torch.randn(1, 48, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    want = WanStreamingDecoder(vae, fast=False).decode_all(latents)
    decoder = WanStreamingDecoder(vae, fast=True)
    got = torch.cat([decoder.decode_block(latents[:, :, :1]), decoder.decode_block(latents[:, :, 1:])], 2)
    assert got.shape == want.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(got, want, **TIGHT)


def test_weights_made_under_inference_mode(latents):
    """ComfyUI loads models under torch.inference_mode: their weights are inference tensors (no version counter)."""
    with torch.inference_mode():
        vae = _vae(seed=7)
        lat = latents.clone()
        want = WanStreamingDecoder(vae, fast=False).decode_all(lat)
        decoder = WanStreamingDecoder(vae)
        got = torch.cat([decoder.decode_block(lat[:, :, :2]), decoder.decode_block(lat[:, :, 2:])], 2)
    assert vae.decoder.conv_in.weight.is_inference()
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("wan22", [False, True])
def test_fast_encode_equals_diffusers_encode(wan22):
    from oneforcing.pipelines.vae_streaming import encode_video

    if wan22:
        vae = _vae(seed=8, base_dim=16, dim_mult=[1, 1, 1, 1], z_dim=48, is_residual=True, patch_size=2, in_channels=12,
                   out_channels=12, scale_factor_spatial=16, latents_mean=[0.1] * 48, latents_std=[2.0] * 48)
        video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    else:
        vae = _vae(seed=8)
        video = torch.rand(2, 3, 9, 24, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    patched = []
    fast = WanFastPath(vae.encoder)
    with fast:
        patched = {type(m).__name__ for m in vae.encoder.modules() if "forward" in m.__dict__}
    assert {"WanCausalConv3d", "WanRMS_norm", "SiLU"} <= patched
    want = encode_video(vae, video, fast=False)
    torch.testing.assert_close(encode_video(vae, video), want, **TIGHT)
    assert not [m for m in vae.modules() if "forward" in m.__dict__]
