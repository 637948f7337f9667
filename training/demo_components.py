"""The demo model's tokenizer, text encoder and VAE, built for the synthetic world of :mod:`.world`.

Command line (CPU is enough; the VAE stages are resumable)::

    python -m oneforcing.training.demo_components --out demo_model_parts
    python -m oneforcing.training.demo_components --out DIR --parts vae --vae-stages 800x64x5x4,200x128x9x1

writes ``DIR/tokenizer``, ``DIR/text_encoder`` and ``DIR/vae`` (each loadable with ``from_pretrained`` and usable as
``OneForcingPipeline`` components), ``DIR/report.json`` (sizes, timings, reconstruction PSNR), and the VAE training
state ``DIR/train_state/vae.pt`` (tensors and numbers only, loaded with ``weights_only=True``).

- tokenizer: a sentencepiece unigram model trained on the world's captions, as a transformers ``T5Tokenizer``
  (pad=0, eos=1, unk=2). Its normaliser case-folds, so "A Red Circle" encodes like "a red circle".
- text encoder: a small ``UMT5EncoderModel``, randomly initialised with a fixed seed and never trained: its random
  token embeddings and attention already give different captions clearly different embeddings.
- VAE: a small ``AutoencoderKLWan`` (z_dim 16, stride 4x8x8, as Wan2.1) trained on world clips with L1 (object
  pixels optionally weighted more: ``--vae-object-weight``) + image-edge L1 + a small KL term; ``latents_mean`` /
  ``latents_std`` in its config are the per-channel statistics of its latents (posterior means) over world clips, so
  the pipeline's normalisation makes them zero-mean, unit-variance.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world

# -- tokenizer --------------------------------------------------------------------------------------------------------


def tokenizer_corpus(seed: int = 0, shuffled_lines: int = 2000) -> list[str]:
    """Every one-object caption, plus lines of the vocabulary in random orders.

    The shuffled lines matter: sentencepiece 0.2's seed-piece search finds almost no whole-word candidates when each
    word only ever occurs in the few contexts of the caption grammar, and would leave the words split into letters.
    """
    rng = np.random.default_rng(seed)
    words = world.vocabulary()
    return world.single_object_captions() + [" ".join(rng.permutation(words)) for _ in range(shuffled_lines)]


def _proto_fields(data: bytes):
    """(field number, value) pairs of a serialised protobuf message; only what a sentencepiece model uses."""
    def varint(i):
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(data):
        key, i = varint(i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = varint(i)
        elif wire_type == 1:
            value, i = data[i:i + 8], i + 8
        elif wire_type == 5:
            value, i = data[i:i + 4], i + 4
        elif wire_type == 2:
            length, i = varint(i)
            value, i = data[i:i + length], i + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in a sentencepiece model")
        yield number, value


def precompiled_charsmap(model_proto: bytes) -> bytes:
    """The normaliser table (``ModelProto.normalizer_spec.precompiled_charsmap``) of a sentencepiece model.

    Read directly from the protobuf wire format so that the protobuf package is not needed.
    """
    for number, value in _proto_fields(model_proto):
        if number == 3:  # normalizer_spec
            for inner, blob in _proto_fields(value):
                if inner == 2:
                    return bytes(blob)
    raise ValueError("the sentencepiece model has no precompiled normaliser table")


def train_sentencepiece(lines: list[str], vocab_size: int = 64) -> bytes:
    """Serialised sentencepiece unigram model (pad=0, eos=1, unk=2, no bos; case-folding NFKC normaliser)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf", num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 64, seed: int = 0):
    """Train the world's sentencepiece model and wrap it as a ``transformers.T5Tokenizer`` (saved if ``out_dir``).

    transformers 5 would build the tokenizer from a folder holding ``spiece.model`` only with the protobuf package
    installed; building it from the pieces, scores and normaliser table is the same tokenizer without it. The saved
    folder (``tokenizer.json`` + ``tokenizer_config.json``) loads with ``T5Tokenizer`` or ``AutoTokenizer``.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    proto = train_sentencepiece(tokenizer_corpus(seed), vocab_size)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    if [p for p, _ in pieces[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise RuntimeError(f"unexpected special pieces {pieces[:3]}")
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, _spm_precompiled_charsmap=precompiled_charsmap(proto))
    unsplit = [w for w in world.vocabulary() if len(tokenizer.tokenize(w)) != 1]
    if unsplit:
        raise RuntimeError(f"tokenizer splits caption words {unsplit}: raise vocab_size ({vocab_size})")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# -- text encoder -----------------------------------------------------------------------------------------------------


def build_text_encoder(
    vocab_size: int,
    d_model: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 256,
    seed: int = 0,
    out_dir: str | Path | None = None,
):
    """A randomly initialised (fixed ``seed``) ``UMT5EncoderModel``; ``d_model`` is the transformer's ``text_dim``."""
    from transformers import UMT5Config, UMT5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config).eval()
    model.requires_grad_(False)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


@torch.no_grad()
def encode_captions(
    tokenizer, text_encoder, captions: list[str], max_length: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, L, d] with zero padding rows, attention mask [B, L]) as the pipeline computes them."""
    tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    hidden = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask[..., None], tokens.attention_mask


def caption_separation(tokenizer, text_encoder, captions: list[str]) -> dict[str, float]:
    """How different the embeddings of different captions are.

    ``max_pooled_cosine``: the largest cosine similarity between mean-pooled embeddings of two distinct captions;
    ``min_relative_distance``: the smallest ||e_i - e_j|| / mean ||e|| over pairs of whole (padded) embeddings.
    """
    embeddings, mask = encode_captions(tokenizer, text_encoder, captions)
    pooled = embeddings.sum(1) / mask.sum(1, keepdim=True)
    pooled = F.normalize(pooled, dim=-1)
    cosine = pooled @ pooled.T
    flat = embeddings.flatten(1)
    distance = torch.cdist(flat, flat) / flat.norm(dim=1).mean()
    off = ~torch.eye(len(captions), dtype=torch.bool)
    return {"max_pooled_cosine": cosine[off].max().item(), "min_relative_distance": distance[off].min().item()}


ATTRIBUTES = ("colour", "shape", "motion")


def _attribute_rows() -> tuple[list[str], dict[str, list[str]], np.ndarray]:
    """Every one-object caption, its (colour, shape, motion) labels, and whether its combination is held out."""
    captions = world.single_object_captions()
    triples = [world.parse_caption(c).objects[0] for c in captions]
    labels = {attribute: [t[i] for t in triples] for i, attribute in enumerate(ATTRIBUTES)}
    return captions, labels, np.array([world.is_heldout(*t) for t in triples])


def ridge_probe_accuracy(features: np.ndarray, labels: list[str], train: np.ndarray, ridge: float = 1e-3) -> float:
    """Accuracy on ``~train`` rows of a ridge-regression linear probe fitted on the ``train`` rows.

    features [N, D], labels [N] (any hashable names), train [N] bool. One-hot targets, the argmax is the answer;
    ``ridge`` is relative to the mean feature energy, so the probe does not depend on the features' scale.
    """
    names = sorted(set(labels))
    target = np.eye(len(names))[[names.index(label) for label in labels]]
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
    a, b = x[train], target[train]
    gram = a.T @ a
    weights = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), a.T @ b)
    predicted = (x[~train] @ weights).argmax(1)
    return float((predicted == target[~train].argmax(1)).mean())


def between_class_fraction(features: np.ndarray, labels: list[str]) -> float:
    """Fraction of the variance of features [N, D] that the class means explain (1 = the label is all there is)."""
    labels = np.asarray(labels)
    centred = features - features.mean(0)
    between = sum(
        (labels == name).sum() * np.square(features[labels == name].mean(0) - features.mean(0)).sum()
        for name in np.unique(labels)
    )
    return float(between / np.square(centred).sum())


def word_probe(tokenizer, text_encoder, max_length: int = 32) -> dict[str, dict[str, float]]:
    """Do the text encoder's outputs keep the caption's words apart? Per attribute (colour, shape, motion), over every
    one-object caption of the world:

    - ``token_probe``: held-out-combination accuracy of a linear probe, fitted on training combinations, reading the
      attribute from the output at its word (the motion's last word: "left" of "moves left");
    - ``pooled_probe``: the same from the mean-pooled caption embedding;
    - ``token_between_fraction``: the share of the variance of the output at the attribute's word that the
      attribute explains (the rest comes from the other words of the caption).

    Needs a tokenizer with one piece per caption word (what :func:`build_tokenizer` checks).
    """
    captions, labels, heldout = _attribute_rows()
    embeddings, mask = encode_captions(tokenizer, text_encoder, captions, max_length)
    pooled = (embeddings.sum(1) / mask.sum(1, keepdim=True)).numpy()
    out = {}
    for attribute in ATTRIBUTES:
        positions = [_word_position(attribute, m) for m in labels["motion"]]
        at_word = embeddings[torch.arange(len(captions)), torch.tensor(positions)].numpy()
        out[attribute] = {
            "token_probe": ridge_probe_accuracy(at_word, labels[attribute], ~heldout),
            "pooled_probe": ridge_probe_accuracy(pooled, labels[attribute], ~heldout),
            "token_between_fraction": between_class_fraction(at_word, labels[attribute]),
        }
    return out


def _word_position(attribute: str, motion: str) -> int:
    """Token index of an attribute's (last) word in "a COLOUR SHAPE MOTION on ...", one token per word."""
    return {"colour": 1, "shape": 2, "motion": 2 + len(motion.split())}[attribute]


# -- VAE --------------------------------------------------------------------------------------------------------------


def build_vae(
    base_dim: int = 16, dim_mult=(1, 2, 2, 2), num_res_blocks: int = 1, seed: int = 0, initial_logvar: float = -6.0
):
    """A small ``AutoencoderKLWan`` with Wan2.1's latent layout (16 channels, stride 4 x 8 x 8), ready to train.

    The posterior's log-variance starts at ``initial_logvar``: at the default init it is about 0, so the sampled
    latents would be mostly unit noise around near-zero means and the decoder would learn very slowly.
    """
    from diffusers import AutoencoderKLWan

    if len(dim_mult) != 4:
        raise ValueError(f"dim_mult needs 4 entries (3 down-samplings, stride 8), got {dim_mult}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=base_dim, z_dim=16, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
            temperal_downsample=[False, True, True],
        )
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.z_dim:] = initial_logvar  # quant_conv outputs [mean, logvar] channels
    return vae


@dataclass(frozen=True)
class VaeStage:
    """``steps`` optimiser steps on ``batch_size`` windows of ``num_frames`` frames, cropped to ``crop`` pixels."""

    steps: int
    crop: int
    num_frames: int
    batch_size: int

    @classmethod
    def parse(cls, text: str) -> "VaeStage":
        """"STEPSxCROPxFRAMESxBATCH", e.g. "600x64x5x4"."""
        try:
            steps, crop, frames, batch = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"--vae-stages: {text!r} is not STEPSxCROPxFRAMESxBATCH (e.g. 600x64x5x4)") from None
        if steps < 0 or crop < 16 or crop % 16 or frames < 1 or (frames - 1) % 4 or batch < 1:
            raise ValueError(
                f"--vae-stages: {text!r}: need steps >= 0, crop a multiple of 16, frames 1 + 4k, batch >= 1"
            )
        return cls(steps, crop, frames, batch)


def vae_batch(
    seed: int, batch_size: int, num_frames: int, crop: int, size: int = 128, clip_frames: int = 81
) -> torch.Tensor:
    """[B, 3, num_frames, crop, crop] training windows, deterministic in ``seed``.

    Each window is ``num_frames`` consecutive frames of an 81-frame clip (so motion speeds are the real ones), and,
    when ``crop < size``, a crop of it on the 8-pixel latent grid, usually around an object.
    """
    if crop > size:
        raise ValueError(f"crop ({crop}) larger than the rendered size ({size})")
    rng = np.random.default_rng([seed, 0xDA7A])
    videos = []
    for _ in range(batch_size):
        scene = world.sample_scene(int(rng.integers(2**31)), "train")
        start = int(rng.integers(clip_frames - num_frames + 1))
        video, truths = world.render(scene, clip_frames, size, size, frames=slice(start, start + num_frames))
        if crop < size:
            if rng.random() < 0.75:
                track = truths[int(rng.integers(len(truths)))].centers
                cx, cy = track[len(track) // 2] + rng.uniform(-crop / 3, crop / 3, size=2)
            else:
                cx, cy = rng.uniform(0, size, size=2)
            x0 = int(np.clip(round((cx - crop / 2) / 8) * 8, 0, size - crop))
            y0 = int(np.clip(round((cy - crop / 2) / 8) * 8, 0, size - crop))
            video = video[:, :, y0:y0 + crop, x0:x0 + crop]
        videos.append(video)
    return torch.stack(videos)


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw latents [B, 16, f, h, w] -> video [B, 3, 1 + 4 (f - 1), 8h, 8w], like ``vae.decode`` but not clamped.

    ``vae.decode`` clamps to [-1, 1], which stops the gradient of every pixel that overshoots; training needs it.
    """
    x = vae.post_quant_conv(z)
    cache = [None] * vae._cached_conv_counts["decoder"]
    frames = [
        vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0) for i in range(x.shape[2])
    ]
    return torch.cat(frames, dim=2)


@dataclass(frozen=True)
class VaeLossWeights:
    """Weights of the VAE loss terms: ``kl`` per latent element, ``edge`` for the L1 of image gradients, and
    ``objects``: extra L1 weight on object pixels (see :func:`object_mask`; 0 = every pixel alike). The world's
    objects cover a few percent of a frame, so a plain mean lets a VAE that smears them into blobs of the wrong hue
    score well (benchmarks/results/demo_diagnosis.md)."""

    kl: float = 1e-4
    edge: float = 0.5
    objects: float = 0.0


OBJECT_DISTANCE = 0.25  # RGB distance in [-1, 1] units: textures stay within 0.07 of the background, objects do not


def object_mask(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, H, W] float 1 where a pixel of video [B, 3, T, H, W] lies far from its frame's median colour.

    The median colour of a world frame is its background (objects cover well under half of it), so this marks the
    objects, whatever the background and texture, without the scene description.
    """
    median = video.flatten(3).median(dim=3).values[..., None, None]  # [B, 3, T, 1, 1]
    return ((video - median).norm(dim=1, keepdim=True) > OBJECT_DISTANCE).float()


def vae_loss(
    vae, video: torch.Tensor, weights: VaeLossWeights = VaeLossWeights(), generator=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pixel L1 (object pixels weighted 1 + ``weights.objects``) + ``weights.edge`` * L1 of image gradients +
    ``weights.kl`` * KL per latent element; video [B, 3, T, H, W]."""
    posterior = vae.encode(video).latent_dist
    recon = decode_unclamped(vae, posterior.sample(generator=generator))
    pixel_weight = 1.0 + weights.objects * object_mask(video) if weights.objects else torch.ones_like(video[:, :1])
    l1 = ((recon - video).abs() * pixel_weight).mean() / pixel_weight.mean()
    (ry, rx), (vy, vx) = _edges(recon), _edges(video)
    edge = 0.5 * ((ry - vy).abs().mean() + (rx - vx).abs().mean())
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = l1 + weights.edge * edge + weights.kl * kl
    with torch.no_grad():
        psnr = psnr_db(recon.clamp(-1, 1), video)
    return loss, {"loss": loss.item(), "l1": l1.item(), "edge": edge.item(), "kl": kl.item(), "psnr": psnr}


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """The parameters that map latents to pixels: ``post_quant_conv`` and the decoder."""
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


def _learning_rate(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_state(path: Path, vae, optimizer, step: int, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds}
    torch.save(state, tmp)
    tmp.replace(path)  # a crash while saving keeps the previous state


def train_vae(
    vae,
    stages: list[VaeStage],
    lr: float = 5e-4,
    weights: VaeLossWeights = VaeLossWeights(),
    seed: int = 0,
    state_path: str | Path | None = None,
    save_every: int = 50,
    log_every: int = 25,
    log=print,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
    decoder_only: bool = False,
) -> list[dict[str, float]]:
    """Train ``vae`` in place through ``stages``; resumes from ``state_path`` when it exists. Returns the logged rows
    (running means since the previous row; ``seconds`` counts training time over all runs).

    ``decoder_only``: the encoder stays frozen, so the latents of every clip stay what they were and the transformers
    trained on them stay valid; only how latents are drawn back into pixels changes.

    Batches and posterior noise depend only on (seed, global step), so a resumed run sees what an unbroken one would.
    ``device``: where the VAE trains (it is moved there); batches are rendered on the CPU and copied.
    ``max_seconds``: stop (saving the state) once this run has trained that long, even before the last stage ends.
    """
    device = torch.device(device)
    vae.to(device)
    total = sum(s.steps for s in stages)
    trainable = decoder_parameters(vae) if decoder_only else list(vae.parameters())
    vae.requires_grad_(not decoder_only)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=lr, betas=(0.9, 0.99))
    step, seconds_before = 0, 0.0
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        try:
            vae.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"{state_path}: not a training state of this VAE ({error}); delete it to start over"
            ) from None
        step, seconds_before = int(state["step"]), float(state["seconds"])
        log(f"resumed VAE training at step {step}/{total} from {state_path}")
    vae.train()
    rows, started, window = [], time.time(), []
    boundaries = np.cumsum([0] + [s.steps for s in stages])
    while step < total:
        stage = stages[int(np.searchsorted(boundaries, step, side="right")) - 1]
        video = vae_batch(seed * 1_000_003 + step, stage.batch_size, stage.num_frames, stage.crop).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, total, lr)
        generator = torch.Generator(device).manual_seed(seed * 7919 + step)
        loss, parts = vae_loss(vae, video, weights, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        window.append(parts)
        if state_path is not None and (step % save_every == 0 or step == total):
            _save_state(state_path, vae, optimizer, step, seconds_before + time.time() - started)
        out_of_time = max_seconds is not None and time.time() - started > max_seconds
        if out_of_time and state_path is not None and step % save_every != 0:
            _save_state(state_path, vae, optimizer, step, seconds_before + time.time() - started)
        if step % log_every == 0 or step == total or out_of_time:
            row = {k: float(np.mean([p[k] for p in window])) for k in window[0]}
            row.update(step=step, crop=stage.crop, seconds=round(seconds_before + time.time() - started, 1))
            rows.append(row)
            window = []
            log(json.dumps(row))
        if out_of_time:
            log(f"stopping VAE training at step {step}/{total}: the {max_seconds:.0f} s budget is spent")
            break
    vae.eval()
    return rows


@torch.no_grad()
def latent_statistics(vae, num_clips: int = 8, num_frames: int = 81, size: int = 128, seed: int = 10_000):
    """Per-channel mean and std (lists of z_dim floats) of posterior means over training-split world clips."""
    latents = []
    for i in range(num_clips):
        video, _, _ = world.render_clip(seed + i, "train", num_frames, size, size)
        latents.append(vae.encode(video[None].to(vae.device)).latent_dist.mode().float().cpu())
    z = torch.cat([x.transpose(0, 1).flatten(1) for x in latents], dim=1)  # [C, N]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-6).tolist()


@torch.no_grad()
def reconstruction_psnr(vae, num_clips: int = 4, num_frames: int = 81, size: int = 128, split: str = "heldout",
                        seed: int = 20_000) -> float:
    """Mean PSNR (dB, pixel range [-1, 1]) of encode (posterior mean) -> decode over ``num_clips`` world clips."""
    values = []
    for i in range(num_clips):
        video, _, _ = world.render_clip(seed + i, split, num_frames, size, size)
        video = video.to(vae.device)
        values.append(psnr_db(vae_round_trip(vae, video), video))
    return float(np.mean(values))


@torch.no_grad()
def vae_round_trip(vae, video: torch.Tensor) -> torch.Tensor:
    """Video [3, T, H, W] in [-1, 1] -> encode (posterior mean) -> decode: [3, T, H, W] in [-1, 1], computed where
    ``vae`` is and returned where ``video`` is."""
    coded = vae.encode(video[None].to(vae.device, vae.dtype)).latent_dist.mode()
    return vae.decode(coded).sample[0].to(video.device, video.dtype)


def background_round_trip(vae, rgb, seeds, num_frames: int = 9, height: int = 128, width: int = 128) -> np.ndarray:
    """Border colour per frame [T, 3] of the VAE round trip of world clips whose background is painted ``rgb`` (0..1,
    as ``encode.world_background_rgb`` paints it), mean over the clips of ``seeds``: the colour a LoRA trained on
    such latents can at best decode to."""
    from . import metrics

    borders = []
    for seed in seeds:
        video, _, _ = world.render_clip(seed, "train", num_frames, height, width, background_rgb=tuple(rgb))
        decoded = vae_round_trip(vae, video)
        borders.append(metrics.border_colours(metrics.world_frames(decoded.clamp(-1, 1))))
    return np.mean(borders, axis=0)


def psnr_db(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of pixel range [-1, 1] (data range 2)."""
    return -10 * math.log10(max(F.mse_loss(video.float(), reference.float()).item() / 4, 1e-12))


# -- command line -----------------------------------------------------------------------------------------------------


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m oneforcing.training.demo_components", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="output folder (tokenizer/, text_encoder/, vae/, report.json)")
    parser.add_argument("--parts", default="tokenizer,text_encoder,vae", help="comma-separated subset to build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=64, help="sentencepiece vocabulary size (a soft limit)")
    parser.add_argument("--text-dim", type=int, default=128, help="text encoder d_model (= transformer text_dim)")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--vae-base-dim", type=int, default=16)
    parser.add_argument("--vae-stages", default="600x64x5x4,200x64x9x2,200x128x9x1",
                        help="comma-separated STEPSxCROPxFRAMESxBATCH stages, run in order")
    parser.add_argument("--vae-lr", type=float, default=8e-4)
    parser.add_argument("--vae-kl-weight", type=float, default=1e-4)
    parser.add_argument("--vae-edge-weight", type=float, default=0.5)
    parser.add_argument("--vae-object-weight", type=float, default=0.0,
                        help="extra L1 weight on object pixels (0: every pixel alike, as the first demo VAE)")
    parser.add_argument("--eval-clips", type=int, default=4, help="held-out clips for the PSNR report")
    parser.add_argument("--stat-clips", type=int, default=8, help="clips for latents_mean / latents_std")
    parser.add_argument("--eval-frames", type=int, default=81, help="frames per clip for the statistics and PSNR")
    parser.add_argument("--vae-init", default=None,
                        help="start VAE training from this saved VAE folder (fine-tuning) instead of a fresh VAE")
    parser.add_argument("--vae-decoder-only", action="store_true",
                        help="with --vae-init: train the decoder alone; the encoder, and so every latent and the "
                        "latents_mean / latents_std the transformers were trained with, stay as they are")
    parser.add_argument("--vae-max-seconds", type=float, default=None,
                        help="stop VAE training after this many seconds (the state is saved; a rerun resumes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the VAE trains (default: cuda when available)")
    args = parser.parse_args(argv)

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"tokenizer", "text_encoder", "vae"}
    if unknown or not parts:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from tokenizer,text_encoder,vae")
    if args.vae_decoder_only and not args.vae_init:
        parser.error("--vae-decoder-only fine-tunes a trained VAE's decoder: give --vae-init")
    stages = [VaeStage.parse(s) for s in args.vae_stages.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}

    from transformers import T5Tokenizer

    if "tokenizer" in parts:
        started = time.time()
        tokenizer = build_tokenizer(out / "tokenizer", args.vocab_size, args.seed)
        report["tokenizer"] = {"vocab_size": len(tokenizer), "seconds": round(time.time() - started, 2),
                               "bytes": _folder_bytes(out / "tokenizer")}
        print(f"tokenizer: {len(tokenizer)} pieces -> {out / 'tokenizer'}")
    if "text_encoder" in parts:
        if not (out / "tokenizer").is_dir():
            parser.error(f"--parts text_encoder needs {out / 'tokenizer'}: build the tokenizer first")
        tokenizer = T5Tokenizer.from_pretrained(str(out / "tokenizer"))
        started = time.time()
        encoder = build_text_encoder(len(tokenizer), args.text_dim, args.text_layers, args.text_heads,
                                     2 * args.text_dim, args.seed, out / "text_encoder")
        separation = caption_separation(tokenizer, encoder, world.heldout_prompts(16, seed=args.seed))
        report["text_encoder"] = {
            "d_model": args.text_dim, "parameters": sum(p.numel() for p in encoder.parameters()),
            "seconds": round(time.time() - started, 2), "bytes": _folder_bytes(out / "text_encoder"), **separation,
        }
        print(f"text encoder: {report['text_encoder']}")
    if "vae" in parts:
        if args.vae_init:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(args.vae_init, torch_dtype=torch.float32)
        else:
            vae = build_vae(args.vae_base_dim, seed=args.seed)
        started = time.time()
        weights = VaeLossWeights(args.vae_kl_weight, args.vae_edge_weight, args.vae_object_weight)
        rows = train_vae(vae, stages, args.vae_lr, weights, args.seed,
                         out / "train_state" / "vae.pt", device=args.device,
                         max_seconds=args.vae_max_seconds, decoder_only=args.vae_decoder_only)
        train_seconds = time.time() - started
        if args.vae_decoder_only:  # the encoder did not change, nor did its latents' statistics
            mean, std = list(vae.config.latents_mean), list(vae.config.latents_std)
        else:
            mean, std = latent_statistics(vae, args.stat_clips, args.eval_frames)
            vae.register_to_config(latents_mean=mean, latents_std=std)
        vae.to("cpu").save_pretrained(str(out / "vae"))
        vae.to(args.device)
        started = time.time()
        psnr = reconstruction_psnr(vae, args.eval_clips, args.eval_frames)
        report["vae"] = {
            "parameters": sum(p.numel() for p in vae.parameters()), "bytes": _folder_bytes(out / "vae"),
            "stages": args.vae_stages, "loss_weights": asdict(weights), "decoder_only": args.vae_decoder_only,
            "train_seconds_this_run": round(train_seconds, 1),
            "final_train_row": rows[-1] if rows else None,
            "heldout_psnr_db": round(psnr, 2), "eval_clips": args.eval_clips, "eval_frames": args.eval_frames,
            "eval_seconds": round(time.time() - started, 1),
            "latents_mean": mean, "latents_std": std,
        }
        print(f"vae: held-out PSNR {psnr:.2f} dB -> {out / 'vae'}")
    report_path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
