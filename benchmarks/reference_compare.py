"""Same-run speed comparison with the public One-Forcing reference code (Aurora-edu/One-Forcing, Apache-2.0).

Both implementations get the same random transformer weights (ours in diffusers names, the reference's in original
Wan2.1 names, converted by ``pipelines/loading.py``), the same prompt embeddings and the same initial noise, and run
one after the other in one process on one device, each alone in its memory. The reference runs its own inference
pipeline (``pipeline/causal_inference.py`` and its causal Wan model, on PyTorch SDPA attention: see
:func:`import_reference`) and decodes with its own Wan VAE at the end; ours runs ``OneForcingPipeline`` as a user calls it
(streaming VAE decode with the fast path, overlapped on a side stream on CUDA). Per rollout variant and implementation:
transformer time, end-to-end time, first-frame latency (the reference decodes at the end: its end-to-end time), peak
memory (CUDA), medians of ``--repeats`` timed runs after a warm-up; and the largest difference between the two
implementations' latents for the same noise (re-noising draws made in the reference's order). Everything runs in
bfloat16, the only dtype the reference's SDPA path runs in.

    git -C <One-Forcing git dir> archive HEAD -- . ':!sample_dataset' | tar -x -C /tmp/oneforcing-ref
    python benchmarks/reference_compare.py --reference-root /tmp/oneforcing-ref --json out.json         # GPU, 1.3B
    python benchmarks/reference_compare.py --reference-root /tmp/oneforcing-ref --tiny --json out.json  # CPU

The reference's inference imports need, beyond torch, diffusers and transformers: ftfy (with wcwidth) and einops
(regex and tqdm come with transformers). Its ``wan/__init__.py`` also imports the original Wan text- and
image-to-video pipelines (torchvision, CLIP, easydict, the scipy-based solvers), which its inference never runs: the
``wan`` folder is entered without that ``__init__`` (the reference's files are not changed). Its cross-attention calls
flash-attn directly (its README installs it; no wheel of it can be had offline): without flash-attn the script sends
it through the reference's own ``attention()``, which is its SDPA fallback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the reference's per-block progress bars

import torch
from rollout_benchmark import WAN_1_3B, clean_memory, video_arguments, wall_time  # this folder is on sys.path

# the reference pipeline hard-codes 12 heads of 128 channels and 512 x 4096 prompt embeddings: the tiny model keeps them
TINY = {**WAN_1_3B, "num_layers": 2, "ffn_dim": 256}
TINY_VIDEO = dict(frames=21, height=32, width=32)
TEXT_TOKENS = 512
FOUR_STEPS = (1000, 750, 500, 250)
REFERENCE_TIMESTEP_SHIFT = 5.0  # model_kwargs.timestep_shift of the reference's config.yaml and chunkwise_config.yaml
REFERENCE_MODEL_DIR = "wan_models/Wan2.1-T2V-1.3B"  # where its wrappers read weights, relative to the working directory
SEED = 0
# the reference's SDPA path casts queries, keys and values to bfloat16 whatever the model's dtype (its attention()
# default), and its output projection then needs bfloat16 weights: it runs in bfloat16 only, on any device
DTYPE = torch.bfloat16
_START = time.perf_counter()


@dataclass(frozen=True)
class Variant:
    """A rollout setting: latent frames per block and the (un-warped) timesteps of every block and of the first."""

    name: str
    frames_per_block: int
    steps: tuple = (1000,)
    first_block_steps: tuple | None = None


VARIANTS = {
    v.name: v
    for v in (
        Variant("framewise", 1),
        Variant("framewise_first4", 1, first_block_steps=FOUR_STEPS),
        Variant("chunkwise", 3),
        Variant("chunkwise_4steps", 3, steps=FOUR_STEPS),
    )
}


@dataclass
class Setting:
    """What every run shares: device, video size, repeats and the inputs both implementations get."""

    device: torch.device
    frames: int
    height: int
    width: int
    repeats: int
    decode: bool  # False: transformer times only (no VAE)
    noise: torch.Tensor = field(init=False)  # [B, F, C, H, W] in bfloat16, as the reference takes it
    prompt_embeds: torch.Tensor = field(init=False)  # [B, 512, 4096]

    def make_inputs(self, channels: int, text_dim: int) -> None:
        latent_frames = (self.frames - 1) // 4 + 1
        gen = torch.Generator().manual_seed(SEED)
        noise = torch.randn(1, latent_frames, channels, self.height // 8, self.width // 8, generator=gen)
        self.noise = noise.to(self.device, DTYPE)
        self.prompt_embeds = torch.randn(1, TEXT_TOKENS, text_dim, generator=gen).to(self.device, DTYPE)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time(self, fn) -> float:
        """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
        return round(wall_time(fn, self.device, 1, self.repeats), 4)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


# -- the reference ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def working_directory(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def cuda_device_query_without_cuda():
    """The reference's ``wan/modules/t5.py`` evaluates ``torch.cuda.current_device()`` as a default argument when it
    is imported (of a T5 class its inference never uses), which raises on a machine without CUDA. There, and only
    during the import, that query answers device 0; on a CUDA machine nothing is changed."""
    if torch.cuda.is_available():
        yield
        return
    query = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = query


def import_reference(root: Path) -> SimpleNamespace:
    """The reference's inference pipeline, wrappers and VAE module, imported from its checkout at ``root``."""
    if not (root / "pipeline" / "causal_inference.py").is_file():
        raise SystemExit(f"--reference-root {root} is not a One-Forcing checkout (no pipeline/causal_inference.py); "
                         "export one with: git -C <git dir> archive HEAD -- . ':!sample_dataset' | tar -x -C DIR")
    sys.path.insert(0, str(root))
    for package in ("wan", "utils"):  # entered without wan/__init__.py; no installed "utils" may shadow the folder
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(root / package)]
        sys.modules[package] = importlib.util.module_from_spec(spec)
    with cuda_device_query_without_cuda():
        from pipeline.causal_inference import CausalInferencePipeline
        from utils.wan_wrapper import WanDiffusionWrapper, WanVAEWrapper
        from wan.modules import attention, model
        from wan.modules.vae import WanVAE_
    if attention.FLASH_ATTN_3_AVAILABLE or attention.FLASH_ATTN_2_AVAILABLE:
        print("warning: flash-attn is installed: the reference runs it, not its SDPA path", flush=True)
        backend = "flash_attn_3" if attention.FLASH_ATTN_3_AVAILABLE else "flash_attn_2"
    else:
        # Its self-attention calls attention(), which is flash_attention() with flash-attn installed and PyTorch SDPA
        # without; its cross-attention calls flash_attention() itself, which needs flash-attn (and CUDA). Without
        # flash-attn the cross-attention goes through that same attention() of the reference, i.e. SDPA.
        model.flash_attention = attention.attention
        backend = "sdpa"
    return SimpleNamespace(pipeline=CausalInferencePipeline, transformer=WanDiffusionWrapper, vae=WanVAEWrapper,
                           vae_module=WanVAE_, attention=backend)


class PromptEmbeddings(torch.nn.Module):
    """The text-encoder slot of the reference pipeline (which its own export script fills with cached embeddings):
    returns the prompt embeddings ours gets, so that neither side's time includes text encoding."""

    def __init__(self, prompt_embeds: torch.Tensor):
        super().__init__()
        self.prompt_embeds = prompt_embeds

    def forward(self, text_prompts):
        return {"prompt_embeds": self.prompt_embeds}


def reference_config(config: dict) -> dict:
    """The reference ``CausalWanModel`` config (original Wan2.1 ``config.json`` fields) of our transformer config.

    It ignores ``patch_size`` and ``text_dim`` in a config file and always takes (1, 2, 2) and 4096: a model that has
    others fails to load its weights."""
    return {
        "_class_name": "CausalWanModel", "model_type": "t2v",
        "dim": config["num_attention_heads"] * config["attention_head_dim"], "num_heads": config["num_attention_heads"],
        "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"],
        "in_dim": config["in_channels"], "out_dim": config["out_channels"], "num_layers": config["num_layers"],
        "text_len": TEXT_TOKENS, "eps": config.get("eps", 1e-6),
    }


def write_reference_weights(folder: Path, transformer, vae_config, reference) -> None:
    """Lay out, where the reference's wrappers read them, our transformer's weights in original Wan2.1 names (a
    ``CausalWanModel.from_pretrained`` folder) and random weights of its Wan VAE (``Wan2.1_VAE.pth``)."""
    from safetensors.torch import save_file

    from oneforcing.pipelines.loading import to_original_names

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(reference_config(dict(transformer.config))))
    weights = to_original_names({k: v.detach().to("cpu", DTYPE).contiguous()
                                 for k, v in transformer.state_dict().items()})
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(SEED)
    vae = reference.vae_module(  # the architecture of our Wan VAE's config, in the reference's own module
        dim=vae_config.base_dim, z_dim=vae_config.z_dim, dim_mult=list(vae_config.dim_mult),
        num_res_blocks=vae_config.num_res_blocks, attn_scales=list(vae_config.attn_scales),
        temperal_downsample=list(vae_config.temperal_downsample), dropout=0.0)
    torch.save(vae.state_dict(), folder / "Wan2.1_VAE.pth")


def reference_pipeline(reference, variant: Variant, components: SimpleNamespace, config: dict, setting: Setting):
    """The reference's ``CausalInferencePipeline`` for one variant, with the arguments its config files give."""
    args = SimpleNamespace(denoising_step_list=list(variant.steps), warp_denoising_step=True,
                           num_frame_per_block=variant.frames_per_block, independent_first_frame=False,
                           context_noise=0)
    if variant.first_block_steps is not None:
        args.first_frame_denoising_step_list = list(variant.first_block_steps)
    pipe = reference.pipeline(args, setting.device, generator=components.transformer,
                              text_encoder=components.text_encoder, vae=components.vae)
    # it hard-codes the 1.3B model's 30 blocks and 1560 tokens per frame (480x832); the tiny model has others
    pipe.num_transformer_blocks = config["num_layers"]
    pipe.frame_seq_length = (setting.height // 16) * (setting.width // 16)
    return pipe


def measure_reference(reference, root_dir: Path, config: dict, setting: Setting, variants) -> dict:
    """Every variant with the reference pipeline; returns {variant: row} with its latents (CPU, [B, C, F, H, W])."""
    with working_directory(root_dir):
        components = SimpleNamespace(
            transformer=reference.transformer(timestep_shift=REFERENCE_TIMESTEP_SHIFT, is_causal=True),
            vae=reference.vae(),
            text_encoder=PromptEmbeddings(setting.prompt_embeds),
        )
    components.transformer.to(device=setting.device, dtype=DTYPE)  # as its export script does
    components.vae.to(device=setting.device, dtype=DTYPE)
    resident = memory_in_use(setting)
    rows = {}
    for variant in variants:
        pipe = reference_pipeline(reference, variant, components, config, setting)
        with torch.no_grad():
            torch.manual_seed(SEED)  # its re-noising draws come from the global generator
            latents = pipe.inference(setting.noise, [""], return_video=False).permute(0, 2, 1, 3, 4).float().cpu()
            row = {"resident_gb": resident, "latents": latents}
            start_peak(setting)
            row["transformer_s"] = setting.time(lambda: pipe.inference(setting.noise, [""], return_video=False))
            if setting.decode:
                start_peak(setting)
                row["end_to_end_s"] = setting.time(lambda: pipe.inference(setting.noise, [""]))
                row["first_frame_s"] = row["end_to_end_s"]  # it decodes the whole video at the end
                row["frames_per_s"] = round(setting.frames / row["end_to_end_s"], 2)
            row["peak_mem_gb"] = peak_gb(setting)
        rows[variant.name] = row
        log(f"reference {variant.name}: {summary(rows[variant.name])}")
        del pipe
        clean(setting)
    return rows


# -- ours -------------------------------------------------------------------------------------------------------------
def build_ours(config: dict, setting: Setting):
    """Our pipeline without text encoder (prompt embeddings are given) on random weights: transformer and Wan VAE
    (built on the CPU; :func:`measure_ours` moves them to the device)."""
    from diffusers import AutoencoderKLWan

    from oneforcing import CausalWanTransformer3DModel, OneForcingPipeline, OneForcingScheduler

    torch.manual_seed(SEED)
    with torch.device(setting.device):  # random init is much faster on a GPU
        transformer = CausalWanTransformer3DModel(**config).to(DTYPE).eval()
    vae = AutoencoderKLWan().to(DTYPE).eval()  # Wan2.1 VAE architecture, random weights
    pipe = OneForcingPipeline(tokenizer=None, text_encoder=None, transformer=transformer.to("cpu"), vae=vae,
                              scheduler=OneForcingScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_order_noise(shape, dtype, device) -> torch.Tensor:
    """A re-noising draw made as the reference makes it (``torch.randn_like`` of its [B * f, C, H, W] bfloat16
    latents, from the global generator), handed to our rollout as [B, C, f, H, W] in ``dtype``."""
    batch, channels, frames, height, width = shape
    draw = torch.randn(batch, frames, channels, height, width, dtype=DTYPE, device=device)
    return draw.permute(0, 2, 1, 3, 4).to(dtype)


def our_latents(pipe, variant: Variant, setting: Setting) -> torch.Tensor:
    """Our rollout's latents [B, C, F, H, W] for the shared noise, re-noised in the reference's order."""
    from oneforcing import causal_rollout

    torch.manual_seed(SEED)
    blocks = causal_rollout(
        pipe.transformer, pipe.scheduler, setting.noise.float().permute(0, 2, 1, 3, 4), setting.prompt_embeds,
        frames_per_block=variant.frames_per_block, denoising_timesteps=list(variant.steps),
        first_block_timesteps=None if variant.first_block_steps is None else list(variant.first_block_steps),
        noise_sampler=reference_order_noise,
    )
    return torch.cat([block.latents for block in blocks], dim=2).float().cpu()


def measure_ours(pipe, setting: Setting, variants) -> dict:
    """Every variant with ``OneForcingPipeline``; returns {variant: row} with its latents (CPU, [B, C, F, H, W])."""
    pipe.to(setting.device)
    resident = memory_in_use(setting)
    rows = {}
    for variant in variants:
        arguments = dict(
            prompt_embeds=setting.prompt_embeds, latents=setting.noise.float().permute(0, 2, 1, 3, 4),
            num_frames=setting.frames, height=setting.height, width=setting.width,
            frames_per_block=variant.frames_per_block, denoising_timesteps=list(variant.steps),
            first_block_timesteps=None if variant.first_block_steps is None else list(variant.first_block_steps),
        )

        def first_frame():
            frames = pipe.stream(**arguments, output_type="pt")
            next(frames)
            frames.close()

        with torch.no_grad():
            row = {"resident_gb": resident, "latents": our_latents(pipe, variant, setting)}
            start_peak(setting)
            row["transformer_s"] = setting.time(lambda: pipe(**arguments, output_type="latent"))
            if setting.decode:
                start_peak(setting)
                row["end_to_end_s"] = setting.time(lambda: pipe(**arguments, output_type="pt"))
                row["frames_per_s"] = round(setting.frames / row["end_to_end_s"], 2)
            row["peak_mem_gb"] = peak_gb(setting)
            if setting.decode:
                row["first_frame_s"] = setting.time(first_frame)
        rows[variant.name] = row
        log(f"ours {variant.name}: {summary(rows[variant.name])}")
        clean(setting)
    return rows


# -- memory, environment, results -------------------------------------------------------------------------------------
def clean(setting: Setting) -> None:
    gc.collect()
    if setting.cuda:
        clean_memory()


def start_peak(setting: Setting) -> None:
    if setting.cuda:
        clean_memory()


def peak_gb(setting: Setting) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if setting.cuda else None


def memory_in_use(setting: Setting) -> float | None:
    """GiB allocated on the device now: the resident weights."""
    return round(torch.cuda.memory_allocated() / 2**30, 2) if setting.cuda else None


def summary(row: dict) -> str:
    shown = ("transformer_s", "end_to_end_s", "frames_per_s", "first_frame_s", "peak_mem_gb")
    return ", ".join(f"{key} {row[key]}" for key in shown if key in row)


def git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout at ``folder`` (with "+dirty" when it has changes), or None outside one."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment(setting: Setting, args, reference_attention: str) -> dict:
    import diffusers

    repository = Path(__file__).resolve().parents[1]
    return {
        "gpu": torch.cuda.get_device_name(setting.device) if setting.cuda else None,
        "driver": gpu_driver() if setting.cuda else None,
        "cuda": torch.version.cuda, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "commit": args.commit or git_commit(repository),
        "reference_commit": args.reference_commit or git_commit(args.reference_root),
        "reference_attention": reference_attention,
        "device": str(setting.device) if setting.cuda else f"cpu, {torch.get_num_threads()} threads",
        "dtype": str(DTYPE).removeprefix("torch."),
        "model": "tiny" if args.tiny else "Wan2.1-1.3B", "frames": setting.frames,
        "size": f"{setting.width}x{setting.height}", "repeats": setting.repeats, "warmup": 1,
    }


def compare(reference_row: dict, our_row: dict) -> dict:
    """Speed-ups (reference time / our time) and how far apart the two implementations' latents are."""
    reference_latents = reference_row.pop("latents")
    diff = (reference_latents - our_row.pop("latents")).abs()
    out = {"reference": reference_row, "ours": our_row}
    for figure in ("transformer", "end_to_end", "first_frame"):
        if f"{figure}_s" in our_row:
            out[f"speedup_{figure}"] = round(reference_row[f"{figure}_s"] / our_row[f"{figure}_s"], 2)
    out["latents_max_abs_diff"] = diff.max().item()
    out["latents_mean_abs_diff"] = diff.mean().item()
    out["latents_mean_abs"] = reference_latents.abs().mean().item()  # the scale the differences compare with
    return out


def parse_arguments(argv=None):
    parser = video_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--reference-root", type=Path, required=True,
                        help="a work tree of Aurora-edu/One-Forcing (never copied into this repository)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a {TINY['num_layers']}-block model (ffn {TINY['ffn_dim']}) and, unless given, "
                             f"{TINY_VIDEO['frames']} frames at {TINY_VIDEO['height']}x{TINY_VIDEO['width']}: for the CPU")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--transformer-only", action="store_true",
                        help="no VAE decode: transformer times and latents only (a quick check on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median; after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--commit", default=None, help="this project's commit (default: git rev-parse HEAD)")
    parser.add_argument("--reference-commit", default=None, help="the reference's commit (default: git, if it is one)")
    known, _ = parser.parse_known_args(argv)
    if known.tiny:
        parser.set_defaults(**TINY_VIDEO)
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    latent_frames = (args.frames - 1) // 4 + 1
    if (args.frames - 1) % 4 or latent_frames % 3:
        parser.error(f"--frames must be 1 + 4k with 1 + (frames - 1) / 4 latent frames a multiple of 3 (the "
                     f"reference's chunk-wise pipeline takes whole chunks only), e.g. 21 or 81; got {args.frames}")
    if args.height % 16 or args.width % 16:
        parser.error("--height and --width must be multiples of 16")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    setting = Setting(device, args.frames, args.height, args.width, args.repeats, decode=not args.transformer_only)
    config = TINY if args.tiny else WAN_1_3B
    setting.make_inputs(config["in_channels"], config["text_dim"])
    variants = [VARIANTS[name] for name in args.variants.split(",")]

    reference = import_reference(args.reference_root.resolve())
    log(f"reference imported from {args.reference_root} (attention: {reference.attention}); building the models")
    ours = build_ours(config, setting)
    with tempfile.TemporaryDirectory() as scratch:
        write_reference_weights(Path(scratch) / REFERENCE_MODEL_DIR, ours.transformer, ours.vae.config, reference)
        log("same weights written for the reference; measuring it")
        reference_rows = measure_reference(reference, Path(scratch), config, setting, variants)
    clean(setting)
    log("measuring ours")
    our_rows = measure_ours(ours, setting, variants)

    result = environment(setting, args, reference.attention)
    result["variants"] = {v.name: compare(reference_rows[v.name], our_rows[v.name]) for v in variants}
    for name, row in result["variants"].items():
        speedups = ", ".join(f"{key.removeprefix('speedup_')} x{value}" for key, value in row.items()
                             if key.startswith("speedup_"))
        log(f"{name}: {speedups}; latents max abs diff {row['latents_max_abs_diff']:.3g} "
            f"(mean {row['latents_mean_abs_diff']:.3g}, latents' mean abs {row['latents_mean_abs']:.3g})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
