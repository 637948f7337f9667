"""Tiny TAEHV-architecture VAE: public key layout, streaming == full decode, Wan frame counts, safe loading with clear
errors, and the pipeline / CLI preview path (random weights; the real taew2_1 file cannot be downloaded here)."""

import cv2
import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_vae
from safetensors.torch import save_file

from oneforcing.__main__ import main
from oneforcing.pipelines.loading import CheckpointError
from oneforcing.pipelines.tiny_vae import TinyWanStreamingDecoder, TinyWanVAE
from oneforcing.pipelines.vae_streaming import WanStreamingDecoder

SMALL = dict(decoder_widths=(8, 8, 4, 4), encoder_width=4)
FRAMES, H, W = 7, 3, 5  # latent frames and size -> 25 video frames of 24 x 40


def _small(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TinyWanVAE(**{**SMALL, **overrides}).eval()
    with torch.no_grad():  # default init decodes to near-constant frames: widen it, centre the output on grey
        for p in model.parameters():
            p.mul_(1.5)
        model.decoder[22].bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    return _small()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, FRAMES, H, W, generator=torch.Generator().manual_seed(0))


def _public_layout(latent=16, dec=(256, 128, 64, 64), enc=64) -> dict[str, tuple]:
    """taew2_1's keys and shapes, written out from the public architecture (madebyollin/taehv)."""
    shapes: dict[str, tuple] = {}

    def conv(name, out, inp, k=3, bias=True):
        shapes[f"{name}.weight"] = (out, inp, k, k)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    def memory_blocks(stack, first, width):
        for i in range(first, first + 3):
            conv(f"{stack}.{i}.conv.0", width, 2 * width)
            conv(f"{stack}.{i}.conv.2", width, width)
            conv(f"{stack}.{i}.conv.4", width, width)

    conv("encoder.0", enc, 3)
    for pool, stride in ((2, 2), (7, 2), (12, 1)):
        conv(f"encoder.{pool}.conv", enc, enc * stride, k=1, bias=False)
        conv(f"encoder.{pool + 1}", enc, enc, bias=False)
        memory_blocks("encoder", pool + 2, enc)
    conv("encoder.17", latent, enc)
    conv("decoder.1", dec[0], latent)
    for stage, (first, stride) in enumerate(((3, 1), (9, 2), (15, 2))):
        memory_blocks("decoder", first, dec[stage])
        conv(f"decoder.{first + 4}.conv", dec[stage] * stride, dec[stage], k=1, bias=False)
        conv(f"decoder.{first + 5}", dec[stage + 1], dec[stage], bias=False)
    conv("decoder.22", 3, dec[3])
    return shapes


def test_full_size_state_dict_is_the_public_layout():
    model = TinyWanVAE()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _public_layout()
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    assert 9e6 < decoder_params < 1.1e7  # ~9.8 M: the decoder is tiny next to the Wan VAE's ~73 M
    assert {k: tuple(v.shape) for k, v in _small().state_dict().items()} == _public_layout(dec=(8, 8, 4, 4), enc=4)


@pytest.mark.parametrize("split", [[1] * FRAMES, [3, 3, 1], [1, 2, 4], [2, 5], [FRAMES]])
def test_streaming_equals_full_decode(tiny, latents, split):
    full = tiny.decode(latents)
    assert full.shape == (1, 3, 1 + 4 * (FRAMES - 1), 8 * H, 8 * W)
    assert full.min() >= -1 and full.max() <= 1 and full.std() > 0.1
    decoder = TinyWanStreamingDecoder(tiny)
    pieces, start = [], 0
    for size in split:
        pieces.append(decoder.decode_block(latents[:, :, start:start + size]))
        start += size
    assert [p.shape[2] for p in pieces] == [1 + 4 * (split[0] - 1)] + [4 * s for s in split[1:]]
    assert decoder.frames_decoded == full.shape[2] and decoder.latent_frames_decoded == FRAMES
    assert (torch.cat(pieces, 2) - full).abs().max() < 5e-5  # float round-off of differently batched convs
    decoder.reset()  # a new video starts from empty memory again
    assert decoder.first_block
    assert (decoder.decode_block(latents[:, :, :2]) - full[:, :, :5]).abs().max() < 5e-5


def test_decode_is_causal(tiny, latents):
    changed = latents.clone()
    changed[:, :, 4] += 1.0
    a, b = tiny.decode(latents), tiny.decode(changed)
    first_affected = 1 + 4 * (4 - 1)  # latent frame k >= 1 makes video frames 4k - 3 .. 4k
    assert torch.equal(a[:, :, :first_affected], b[:, :, :first_affected])
    assert (a[:, :, first_affected:] - b[:, :, first_affected:]).abs().amax(dim=(0, 1, 3, 4)).min() > 0


def test_stream_rejects_a_different_size(tiny, latents):
    decoder = TinyWanStreamingDecoder(tiny)
    decoder.decode_block(latents[:, :, :1])
    with pytest.raises(ValueError, match="do not continue this stream"):
        decoder.decode_block(latents[:, :, 1:2, :2])
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        decoder.decode_block(latents[:, :8])
    with pytest.raises(TypeError, match="TinyWanVAE"):
        TinyWanStreamingDecoder(make_tiny_vae())


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_frame_counts_match_the_wan_vae(tiny, frames):
    lat = torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(frames))
    wan = WanStreamingDecoder(make_tiny_vae()).decode_all(lat)
    assert tiny.decode(lat).shape == wan.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48)


def test_encode_shapes_and_end_padding(tiny):
    video = torch.rand(2, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = tiny.encode(video)
    assert z.shape == (2, 16, 3, 2, 3)  # 1 + 4k frames -> 1 + k latent frames, as the Wan VAE
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
    assert torch.equal(tiny.encode(padded), z)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.encode(video[..., :20])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_the_public_layout(tmp_path, tiny, latents, suffix):
    path = tmp_path / f"taew2_1{suffix}"
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    loaded = TinyWanVAE.from_single_file(path)
    assert loaded.decoder_widths == SMALL["decoder_widths"] and loaded.encoder_width == SMALL["encoder_width"]
    assert torch.equal(loaded.decode(latents), tiny.decode(latents))
    half = TinyWanVAE.from_single_file(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.decode(latents).dtype == torch.bfloat16


def test_decoder_only_file_and_wider_temporal_upsampler(tmp_path, tiny, latents):
    state = {k: v for k, v in tiny.state_dict().items() if k.startswith("decoder.")}
    # a file whose first temporal upsampler was trained with stride 2: the last step's channels are the ones used
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(state["decoder.7.conv.weight"]),
                                                state["decoder.7.conv.weight"]])
    save_file(state, tmp_path / "decoder.safetensors")
    loaded = TinyWanVAE.from_single_file(tmp_path / "decoder.safetensors")
    assert loaded.encoder is None
    assert torch.equal(loaded.decode(latents), tiny.decode(latents))
    with pytest.raises(ValueError, match="without an encoder"):
        loaded.encode(torch.zeros(1, 3, 1, 8, 8))


def test_wrong_layouts_name_the_keys(tmp_path, tiny):
    state = dict(tiny.state_dict())
    renamed = dict(state)
    renamed["decoder.3.conv.zero.weight"] = renamed.pop("decoder.3.conv.0.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"missing keys.*decoder\.3\.conv\.0\.weight.*unexpected keys.*"
                                              r"decoder\.3\.conv\.zero\.weight"):
        TinyWanVAE.from_single_file(tmp_path / "renamed.pth")

    reshaped = dict(state)
    reshaped["decoder.9.conv.2.weight"] = torch.zeros(8, 8, 1, 1)
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    with pytest.raises(CheckpointError, match=r"mismatched shapes.*decoder\.9\.conv\.2\.weight"):
        TinyWanVAE.from_single_file(tmp_path / "reshaped.safetensors")

    save_file(make_tiny_vae().state_dict(), tmp_path / "wan_vae.safetensors")
    with pytest.raises(CheckpointError, match="not a TAEHV"):
        TinyWanVAE.from_single_file(tmp_path / "wan_vae.safetensors")

    wan22 = {k: v for k, v in _small(latent_channels=48).state_dict().items()}
    save_file(wan22, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="48-channel latents"):
        TinyWanVAE.from_single_file(tmp_path / "other.safetensors")

    torch.save({"decoder.1.weight": torch.zeros(1), "note": CheckpointError("x", "y")}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        TinyWanVAE.from_single_file(tmp_path / "code.pth")


def _pipeline_video(pipe, **kwargs):
    return pipe("a red circle", num_frames=9, height=32, width=32, generator=torch.Generator().manual_seed(3),
                **kwargs).frames


def test_pipeline_preview_decoder():
    pipe = make_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    full = _pipeline_video(pipe, output_type="pt")
    latents = _pipeline_video(pipe, output_type="latent")
    tiny = _small(seed=1)
    pipe.set_preview_decoder(tiny)
    assert pipe.preview_decoder is tiny
    preview = _pipeline_video(pipe, output_type="pt")
    assert preview.shape == full.shape == (1, 9, 3, 32, 32)
    expected = (tiny.decode(latents) / 2 + 0.5).transpose(1, 2)
    assert (preview - expected).abs().max() < 1e-5
    assert (preview - full).abs().max() > 0.1
    streamed = list(pipe.stream("a red circle", num_frames=9, height=32, width=32, output_type="pt",
                                generator=torch.Generator().manual_seed(3)))
    assert (torch.cat(streamed, dim=1) - preview).abs().max() < 1e-5
    assert _pipeline_video(pipe, output_type="np").shape == (1, 9, 32, 32, 3)
    extended = _pipeline_video(pipe, output_type="pt", context_latents=latents[:, :, :2])  # the context's decode first
    assert extended.shape == (1, 9, 3, 32, 32)
    assert (extended[:, :5] - expected[:, :5]).abs().max() < 1e-5
    pipe.set_preview_decoder(None)
    assert torch.equal(_pipeline_video(pipe, output_type="pt"), full)
    with pytest.raises(TypeError, match="TinyWanVAE or None"):
        pipe.set_preview_decoder(pipe.vae)


def test_cli_tiny_vae(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_pipeline().save_pretrained(model_dir)
    weights = tmp_path / "taew2_1.safetensors"
    save_file(_small().state_dict(), weights)
    out = tmp_path / "preview.mp4"
    args = ["--prompt", "a cat", "--model", str(model_dir), "--num-frames", "9", "--height", "32", "--width", "48"]
    main(["generate", *args, "--out", str(out), "--tiny-vae", str(weights)])
    capture = cv2.VideoCapture(str(out))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 9
    assert (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (48, 32)
    capture.release()
    with pytest.raises(SystemExit, match="not a file"):
        main(["generate", *args, "--out", str(out), "--tiny-vae", str(tmp_path / "missing.pth")])
    save_file(make_tiny_vae().state_dict(), tmp_path / "wan.safetensors")
    with pytest.raises(SystemExit, match="not a TAEHV"):
        main(["generate", *args, "--out", str(out), "--tiny-vae", str(tmp_path / "wan.safetensors")])
