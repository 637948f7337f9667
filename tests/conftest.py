"""Tiny real models shared by the tests (built from random weights with fixed seeds; nothing is mocked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_TRAINING_DIR = REPOSITORY / "models" / "oneforcing-demo-training"  # bundled for retraining the demo
DEMO_TEACHER_DIR = DEMO_TRAINING_DIR / "teacher"
DEMO_CHUNKWISE_DIR = DEMO_TRAINING_DIR / "chunkwise"  # the chunk-wise One-Forcing student

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=128,
    num_layers=2,
)


def write_random_latent_folder(folder, count: int = 4):
    """``count`` random latent clips [16, 3, 8, 8] with 8x32 prompt embeddings, and the negative prompt, in ``folder``
    (what ``encode`` writes; seed 0). Returns ``folder``."""
    from oneforcing.training.data import write_latent_sample, write_negative_prompt

    g = torch.Generator().manual_seed(0)
    for i in range(count):
        write_latent_sample(folder / f"sample_{i:06d}.safetensors", torch.randn(16, 3, 8, 8, generator=g),
                            torch.randn(8, 32, generator=g), f"clip {i}")
    write_negative_prompt(folder, torch.zeros(8, 32))
    return folder


WORDS = ["a", "corgi", "surfing", "wave", "red", "circle", "moves", "left", "right", "cat", "on", "the", "beach"]


def make_tiny_transformer(seed: int = 0, **overrides):
    from oneforcing import CausalWanTransformer3DModel

    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


def make_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def make_tiny_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0 - i * 0.01) for i, w in enumerate(WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny_text_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def make_tiny_pipeline(seed: int = 0, frames_per_block: int = 1):
    from oneforcing import OneForcingPipeline, OneForcingScheduler

    tokenizer = make_tiny_tokenizer()
    return OneForcingPipeline(
        tokenizer=tokenizer,
        text_encoder=make_tiny_text_encoder(len(tokenizer), d_model=TINY_TRANSFORMER["text_dim"], seed=seed),
        transformer=make_tiny_transformer(seed, frames_per_block=frames_per_block),
        vae=make_tiny_vae(seed),
        scheduler=OneForcingScheduler(),
    )


@pytest.fixture
def tiny_transformer():
    return make_tiny_transformer()


@pytest.fixture
def tiny_pipeline():
    return make_tiny_pipeline()


@pytest.fixture
def one_thread():
    """Torch on one thread: tiny models run faster on a shared CI machine, and float sums come out in one order
    whatever the machine's load (the nodes' CPU policy runs on the idle cores, at most torch's thread count), so
    bit-for-bit comparisons hold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
