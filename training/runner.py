"""What every stage shares: the accelerate set-up, model loading and saving, checkpoints, resuming, loss logs.

Checkpoints are folders ``<stage>/checkpoints/step_<n>/`` with one diffusers model folder per trained model (and
per EMA), ``config.json`` + ``diffusion_pytorch_model.safetensors``, plus ``state.pt``: optimizer states, the step,
and the global RNG states; it is loaded with ``torch.load(weights_only=True)``. The stages draw all other randomness
from generators keyed by (seed, step, rank) (:func:`.flow.step_generator`), so a resumed run repeats the
uninterrupted one. The loss log is ``<stage>/log.jsonl``, one JSON object per logged step (averaged over ranks).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..pipelines.atomic import discard, is_partial, replaced_on_success
from ..pipelines.checks import non_finite_names, shown_names
from ..pipelines.loading import CheckpointError
from ..pipelines.transformer_causal_wan import CausalWanTransformer3DModel
from .config import TrainingConfig
from .ema import ExponentialMovingAverage

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name for a LoRA config
STATE_NAME = "state.pt"
CHECKPOINT_NAME = re.compile(r"step_\d+")


# -- models -----------------------------------------------------------------------------------------------------------
def load_transformer(
    path: str | Path | None, config: TrainingConfig, *, seed_offset: int = 0, what: str = "transformer",
    trained: bool = False,
) -> CausalWanTransformer3DModel:
    """A transformer from a diffusers folder (or a folder with a ``transformer/`` subfolder), a single file, or -- for
    ``path=None`` -- freshly initialised from ``model.architecture`` with the run's seed. float32, train mode. A
    ``trained`` model gets LoRA adapters when the config asks for them (:func:`add_lora`)."""
    frames_per_block = config.model.frames_per_block
    if path is None:
        if not config.model.architecture:
            raise ValueError(f"{what}: no checkpoint given and model.architecture is empty")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + seed_offset)
            model = CausalWanTransformer3DModel(**config.model.architecture, frames_per_block=frames_per_block)
    else:
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{what}: {path} is not a diffusers model folder (no config.json)")
            model = (load_lora_trained_folder(path) if (path / ADAPTER_CONFIG).is_file()
                     else CausalWanTransformer3DModel.from_pretrained(str(path)))
        elif path.is_file():
            model = CausalWanTransformer3DModel.from_single_file(path)
        else:
            raise FileNotFoundError(f"{what}: {path} does not exist (run the stage that writes it, or set the path)")
        model.register_to_config(frames_per_block=frames_per_block)
    model = model.float().train()
    if config.model.attention_backend != "auto":
        model.set_attention_backend(config.model.attention_backend)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if trained and config.lora.rank:
        add_lora(model, config.lora)
    return model


def load_lora_trained_folder(folder: Path) -> CausalWanTransformer3DModel:
    """A folder a LoRA run saved (base + adapter, PEFT names, ``adapter_config.json``) as a plain model with the
    adapter merged, the next stage's starting point."""
    from peft import LoraConfig

    model = CausalWanTransformer3DModel.from_config(CausalWanTransformer3DModel.load_config(str(folder)))
    model.add_adapter(LoraConfig.from_pretrained(str(folder)))
    load_model_weights(model, folder)
    model.fuse_lora()
    model.unload_lora()
    return model


def add_lora(model: CausalWanTransformer3DModel, settings) -> None:
    """Train a LoRA adapter ("default") of ``settings`` (a :class:`.config.LoraSettings`) instead of the model's
    weights, which PEFT freezes. Its checkpoints and final folders hold the base and the adapter (PEFT names)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                                 target_modules=list(settings.targets)))


def save_model_folder(model, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A diffusers model folder (config + one safetensors file) of ``model``, or of ``state_dict`` with its config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    peft_config = getattr(model, "peft_config", None)
    if peft_config:  # a LoRA run: the adapter's settings (rank, alpha, targets) beside its weights
        peft_config["default"].save_pretrained(str(folder))
    tensors = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))
    return folder


def load_model_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load a folder written by :func:`save_model_folder` into ``model`` (strict; cast to the model's dtypes)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(path, "checkpoint weights are missing")
    try:
        model.load_state_dict(read_weights(path), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped keys
        raise CheckpointError(path, f"does not fit the model: {err}") from err


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file; a :class:`CheckpointError` naming it when it is damaged."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(path, f"not a readable safetensors file ({err})") from err


def read_training_state(folder: Path) -> dict:
    """``state.pt`` of a checkpoint (weights only); a :class:`CheckpointError` naming it when it is damaged."""
    path = folder / STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a damaged pickle stream...
        raise CheckpointError(path, f"not a readable training state ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not {"step", "optimizers", "torch_rng", "cuda_rng"} <= set(state):
        raise CheckpointError(path, "not a training state (expected step, optimizers and RNG states)")
    return state


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a checkpoint folder unreadable ("<file> (<cause>)"), or None when its state and every weights file
    read back whole."""
    try:
        read_training_state(folder)
        for weights in sorted(folder.glob(f"*/{WEIGHTS_NAME}")):
            expected = _safetensors_size(weights)
            if weights.stat().st_size != expected:
                raise CheckpointError(weights, f"is truncated ({weights.stat().st_size} of {expected} bytes)")
    except CheckpointError as err:
        return f"{err.path} ({err.problem})"
    return None


def _safetensors_size(path: Path) -> int:
    """The size a safetensors file must have: 8 + its header's length + the end of its last tensor (read from the
    header alone, so a checkpoint is checked without reading its weights)."""
    try:
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:  # JSON errors are ValueErrors
        raise CheckpointError(path, f"not a readable safetensors file ({type(err).__name__}: {err})") from err
    return 8 + header_length + max(ends, default=0)


class NonFiniteTrainingError(RuntimeError):
    """Training produced NaN or Inf (a loss, or weights about to be saved); the run stops, the checkpoints on disk
    are the last finite ones."""


# -- the run ----------------------------------------------------------------------------------------------------------
class StageRun:
    """One stage of a recipe under accelerate: device, autocast, logging, checkpoints.

    Args:
        resume: "auto" (the latest checkpoint of this stage if any), "never", or a checkpoint folder.
    """

    def __init__(
        self, config: TrainingConfig, stage: str, resume: str = "auto", log_every: int = 10, directory: Path | None = None
    ):
        from accelerate import Accelerator
        from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs

        self.config = config
        self.stage = stage
        self.dir = Path(directory) if directory is not None else config.stage_dir(stage)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=config.cpu,
            # every parameter gets a gradient in every backward; several forwards may precede one backward
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=False),
                # with several forwards in one autocast region (the rollout), autocast's weight-cast cache can make a
                # checkpointed forward save other tensors than its recomputation: off when checkpointing
                AutocastKwargs(cache_enabled=not config.model.gradient_checkpointing),
            ],
        )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.resume = resume
        self.log_every = max(1, log_every)
        self.started = time.time()
        self.history: list[dict] = []
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        self.accelerator.wait_for_everyone()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision, torch.float32)

    @property
    def is_fsdp(self) -> bool:
        return self.accelerator.distributed_type.name == "FSDP"

    def autocast(self):
        return self.accelerator.autocast() if self.config.mixed_precision != "no" else nullcontext()

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    # -- logging ------------------------------------------------------------------------------------------------------
    def log(self, step: int, values: dict[str, float], force: bool = False, reduce: bool = True) -> None:
        """Append ``values`` to ``log.jsonl`` (every step; printed every ``log_every``), averaged over ranks when
        ``reduce`` (a collective call: every rank must log the same names at the same step)."""
        names = sorted(values)
        local = torch.tensor([float(values[k]) for k in names], device=self.device, dtype=torch.float64)
        if reduce and self.world_size > 1:
            local = self.accelerator.reduce(local, reduction="mean")
        row = {"stage": self.stage, "step": step, **{k: v for k, v in zip(names, local.tolist())}}
        if reduce:  # the same averaged losses on every rank: all ranks stop together
            self.refuse_non_finite(f"step {step}", {k: row[k] for k in names if "loss" in k})
        row["seconds"] = round(time.time() - self.started, 3)
        self.history.append(row)
        if self.is_main or not reduce:
            with open(self.dir / ("log.jsonl" if self.is_main else f"log.rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            if force or step % self.log_every == 0 or step == 1:
                shown = " ".join(f"{k}={_short(v)}" for k, v in row.items() if k not in ("stage", "step", "seconds"))
                print(f"[{self.stage}] step {step} {shown} ({row['seconds']:.1f}s)", flush=True)

    def out_of_time(self, max_seconds: float) -> bool:
        """Whether this run has trained ``max_seconds`` (0 = no limit). A collective call when ``max_seconds > 0``:
        the ranks agree (any rank over the limit stops them all), so all ranks stop after the same step."""
        if max_seconds <= 0:
            return False
        over = torch.tensor([float(time.time() - self.started > max_seconds)], device=self.device)
        if self.world_size > 1:
            over = self.accelerator.reduce(over, reduction="max")
        return bool(over.item())

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.dir / "checkpoints" / f"step_{step:07d}"

    def checkpoints(self) -> list[Path]:
        """The stage's complete checkpoints, oldest first: folders ``step_<n>`` renamed into place when whole (a
        temporary folder of a save that was cut short never counts)."""
        root = self.dir / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / STATE_NAME).is_file())

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that reads back whole; a damaged newer one is skipped with a message naming both."""
        found = self.checkpoints()
        for newest, previous in zip(reversed(found), [*reversed(found[:-1]), None]):
            problem = checkpoint_problem(newest)
            if problem is None:
                return newest
            self.print(f"[{self.stage}] skipping the damaged checkpoint {problem}; "
                       f"{f'resuming from {previous} instead' if previous else 'no earlier checkpoint: starting anew'}")
        return None

    def resume_from(self) -> Path | None:
        if self.resume == "never":
            return None
        if self.resume == "auto":
            return self.latest_checkpoint()
        path = Path(self.resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"--resume {path}: no {STATE_NAME} there (not a complete checkpoint)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(path, f"--resume: cannot read {problem}")
        return path

    def save_checkpoint(
        self,
        step: int,
        models: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        emas: dict[str, tuple[ExponentialMovingAverage, torch.nn.Module]] | None = None,
        keep: int = 2,
    ) -> Path:
        """Write ``checkpoints/step_<n>/`` (models, EMAs as model folders, ``state.pt``); keep the last ``keep``."""
        folder = self.checkpoint_dir(step)
        states = {name: self.accelerator.get_state_dict(model) for name, model in models.items()}
        ema_states = {name: gathered_state(ema.state_dict()) for name, (ema, _) in (emas or {}).items()}
        sharded = self.is_fsdp
        if sharded:
            self.print(f"[{self.stage}] FSDP: optimizer states are not saved; a resume restarts the AdamW moments")
        self.refuse_non_finite(f"the weights to save at step {step}", {**states, **ema_states})
        if self.is_main:
            folder.parent.mkdir(parents=True, exist_ok=True)
            with replaced_on_success(folder) as tmp:  # whole or not at all: a kill mid-save leaves the older ones
                for name, model in models.items():
                    save_model_folder(self.unwrap(model), tmp / name, states[name])
                for name, (_, model) in (emas or {}).items():
                    save_model_folder(self.unwrap(model), tmp / name, ema_states[name])
                state = {
                    "step": step,
                    "optimizers": {} if sharded else {name: opt.state_dict() for name, opt in optimizers.items()},
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                }
                torch.save(state, tmp / STATE_NAME)
            for stale in self.checkpoints()[:-keep] if keep > 0 else []:
                shutil.rmtree(stale, ignore_errors=True)
            for torn in (p for p in folder.parent.iterdir() if is_partial(p)):  # saves killed earlier
                discard(torn)
        self.accelerator.wait_for_everyone()
        return folder

    def refuse_non_finite(self, what: str, values: dict[str, dict[str, torch.Tensor] | float]) -> None:
        """Stop the run with :class:`NonFiniteTrainingError` when any of ``values`` (numbers, or model states) holds
        NaN or Inf on any rank (a collective call: every rank stops), naming them and the last checkpoint."""
        bad = [name for name, value in values.items()
               if (non_finite_names(value.items()) if isinstance(value, dict) else not math.isfinite(value))]
        flag = torch.tensor([float(bool(bad))], device=self.device)
        if self.world_size > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        if flag.item():
            latest = self.checkpoints()
            raise NonFiniteTrainingError(
                f"[{self.stage}] {what}: non-finite values (NaN or Inf) in {shown_names(bad) or 'another rank'}; "
                f"stopped without saving them. The last checkpoint, {latest[-1] if latest else 'none yet'}, holds "
                "the last finite weights (lower the learning rate, or enable gradient clipping)."
            )

    def load_model_states(
        self, folder: Path, models: dict[str, torch.nn.Module], emas: dict[str, ExponentialMovingAverage] | None = None
    ) -> None:
        """Load model and EMA weights of a checkpoint (call before ``accelerator.prepare``)."""
        for name, model in models.items():
            load_model_weights(model, folder / name)
        for name, ema in (emas or {}).items():
            ema.load_state_dict(read_weights(folder / name / WEIGHTS_NAME))

    def load_training_state(self, folder: Path, optimizers: dict[str, torch.optim.Optimizer]) -> int:
        """Load optimizer and RNG states (after ``prepare``); returns the step the checkpoint was taken at."""
        state = read_training_state(folder)
        for name, opt in optimizers.items():
            if not state["optimizers"] and self.is_fsdp:
                continue  # written under FSDP without optimizer states
            if name not in state["optimizers"]:
                raise CheckpointError(folder / STATE_NAME, f"has no optimizer state {name!r}")
            try:
                opt.load_state_dict(state["optimizers"][name])
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(folder / STATE_NAME, f"optimizer state {name!r} does not fit: {err}") from err
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.print(f"[{self.stage}] resumed from {folder} at step {state['step']}")
        return int(state["step"])

    def save_final(self, models: dict[str, torch.nn.Module], state_dicts: dict[str, dict] | None = None) -> Path:
        """``<stage>/final/<name>/`` diffusers folders (``state_dicts`` override a model's own weights, e.g. EMA)."""
        final = self.dir / "final"
        states = {name: self.accelerator.get_state_dict(model) for name, model in models.items()}
        states.update({name: gathered_state(state) for name, state in (state_dicts or {}).items()})
        self.refuse_non_finite("the final weights", states)
        if self.is_main:
            for name, model in models.items():
                save_model_folder(self.unwrap(model), final / name, states[name])
        self.accelerator.wait_for_everyone()
        return final

    def check_replicas(self, models: dict[str, torch.nn.Module]) -> None:
        """Under DDP every rank must hold the same weights after a stage: compare a checksum of each model."""
        if self.world_size == 1 or self.is_fsdp:
            return
        for name, model in models.items():
            local = torch.stack([p.detach().double().sum() for p in self.unwrap(model).parameters()]).sum()
            sums = self.accelerator.gather(local[None])
            if not torch.equal(sums, sums[:1].expand_as(sums)):
                raise RuntimeError(f"{name}: replicas diverged across ranks (checksums {sums.tolist()})")
        self.print(f"[{self.stage}] {', '.join(models)}: identical on all {self.world_size} ranks")

    def finish(self, summary: dict) -> dict:
        """Write ``summary.json`` (first/last logged losses, time) and return it."""
        summary = {"stage": self.stage, "seconds": round(time.time() - self.started, 2), **summary}
        if self.history:
            keys = sorted({k for row in self.history for k in row} - {"stage", "step", "seconds"})
            summary["first"] = {k: next(r[k] for r in self.history if k in r) for k in keys}
            summary["last"] = {k: next(r[k] for r in reversed(self.history) if k in r) for k in keys}
        if self.is_main:
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.accelerator.wait_for_everyone()
        return summary


def trainable(params) -> list[torch.nn.Parameter]:
    """The parameters an optimizer steps: those that require grad (frozen ones, e.g. a LoRA run's base weights, not)."""
    return [p for p in params if p.requires_grad]


def make_optimizer(params, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    params = trainable(params)
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(float(b) for b in betas), weight_decay=weight_decay)


def clip_and_step(run: StageRun, model_params, optimizer, max_grad_norm: float) -> float:
    """Clip gradients (if max_grad_norm > 0), step, zero; returns the gradient norm before clipping."""
    norm = float("nan")
    if max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(model_params, max_grad_norm)
        norm = float(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _short(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def gathered_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors of a state that may hold FSDP2 shards (DTensors); a collective call under FSDP."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
