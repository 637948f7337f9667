"""Training configuration: one file (JSON or TOML) per recipe, read into dataclasses, with command-line overrides.

Every stage of a recipe reads the same file; each stage has its own section. Paths that are left ``null`` default to
the previous stage's output inside ``output_dir``::

    <output_dir>/latents/                   encode: sample_*.safetensors + negative_prompt.safetensors
    <output_dir>/teacher/final/transformer  teacher (diffusers folder; transformer_ema/ too with EMA)
    <output_dir>/ode_pairs/                 pair_*.safetensors
    <output_dir>/ode_init/final/generator   block-causal student after ODE regression
    <output_dir>/distill/final/             generator/, generator_ema/, critic/, discriminator/, one_forcing.pt

Overrides are ``section.field=value`` (the value is JSON when it parses as JSON, a string otherwise), e.g.
``distill.steps=50 distill.gan.enabled=false model.gradient_checkpointing=true``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..pipelines.lora import WAN_LORA_TARGETS


@dataclass
class ModelConfig:
    """The transformers' architecture (for models built from scratch) and how they run.

    ``architecture``: ``CausalWanTransformer3DModel`` keyword arguments (ignored where a stage loads a checkpoint).
    ``frames_per_block``: latent frames per autoregressive block (1 = frame-wise, 3 = chunk-wise).
    """

    architecture: dict = field(default_factory=dict)
    frames_per_block: int = 1
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"


@dataclass
class SchedulerConfig:
    """The student's few-step schedule (un-warped lists, as ``OneForcingScheduler`` takes them)."""

    shift: float = 5.0
    denoising_timesteps: list = field(default_factory=lambda: [1000])
    first_block_timesteps: list | None = None


@dataclass
class DataConfig:
    """``latents``: folder of ``sample_*.safetensors`` (see :mod:`.data`); null = ``<output_dir>/latents``.

    ``stream``: the teacher stage renders new world clips for every batch and encodes them with the ``encode``
    section's components and sizes instead of reading ``latents`` (:mod:`.stream`: no clip is seen twice).
    """

    latents: str | None = None
    stream: bool = False


@dataclass
class EncodeConfig:
    """Stage ``encode``: clips -> normalised latents + prompt embeddings, written as a latent folder.

    ``source``: "world" (the synthetic world of :mod:`.world`) or "videos" (``videos_dir`` holding ``*.mp4`` files,
    each with a caption in a ``.txt`` file of the same name). ``vae``, ``tokenizer``, ``text_encoder``: folders
    loadable with ``from_pretrained``.
    """

    source: str = "world"
    videos_dir: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    text_encoder: str | None = None
    num_samples: int = 64
    num_frames: int = 9
    height: int = 64
    width: int = 64
    max_sequence_length: int = 512
    negative_prompt: str = ""
    world_split: str = "train"
    world_two_object_prob: float = 0.3
    world_texture_prob: float = 0.3
    world_background_rgb: list | None = None  # [r, g, b] in 0..1: every background in this colour (a style to learn)
    batch_size: int = 4


@dataclass
class OptimConfig:
    """AdamW and the loop of one trained stage."""

    steps: int = 100
    batch_size: int = 1
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0
    ema_decay: float = 0.0  # 0 = no EMA
    ema_start_step: int = 0
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end
    max_seconds: float = 0.0  # > 0: stop after this many seconds of this run (all ranks together) and save as final


@dataclass
class TeacherConfig(OptimConfig):
    """Stage ``teacher``: flow matching on latents, bidirectional by default.

    ``init``: a checkpoint to start from (diffusers folder or single file); null = a fresh model from
    ``model.architecture``. ``caption_dropout``: probability of training on the negative-prompt embedding instead of
    the caption (gives the unconditional prediction classifier-free guidance needs). ``attention_mode``:
    "bidirectional" (a teacher) or "block_causal" (blocks of ``model.frames_per_block`` see only earlier blocks, as a
    causal student generates: the way to fine-tune one, e.g. a LoRA of the one-step generator); with it,
    ``clean_context`` gives each clip's first k blocks (k uniform per clip) clean at t = 0, as the student's KV cache
    holds the blocks it made, and trains the later ones only.
    """

    init: str | None = None
    timestep_shift: float = 5.0
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    caption_dropout: float = 0.1
    attention_mode: str = "bidirectional"
    clean_context: bool = False


@dataclass
class OdePairsConfig:
    """Stage ``ode-pairs``: teacher ODE trajectories, states kept at the student's timesteps.

    The teacher integrates the flow ODE with Euler steps on a shift-``shift`` grid of ``num_inference_steps`` steps
    (the student's timesteps are inserted into the grid so their states are exact), with classifier-free guidance in
    the standard form ``uncond + guidance_scale * (cond - uncond)``. ``teacher``: null = the teacher stage's output.
    ``num_pairs``: trajectories to write (prompts cycle through the latent folder).
    """

    teacher: str | None = None
    num_pairs: int = 64
    batch_size: int = 4
    num_inference_steps: int = 48
    shift: float = 8.0
    guidance_scale: float = 6.0


@dataclass
class OdeInitConfig(OptimConfig):
    """Stage ``ode-init``: block-causal student regressed onto the trajectories' endpoints.

    ``init``: the student's starting weights; null = the teacher's. ``pairs``: null = ``<output_dir>/ode_pairs``.
    """

    init: str | None = None
    pairs: str | None = None


@dataclass
class GanConfig:
    """The One-Forcing adversarial head on the critic.

    ``feature_layers``: critic blocks whose output hidden states the register tokens read (one register per layer).
    Losses are non-saturating softplus; ``r1_*`` / ``r2_*``: finite-difference penalties on real / generated inputs,
    mean (D(x + sigma * n) - D(x))^2 (R2 also scaled by 0.5); weight 0 disables them. ``lr``: the head's learning rate
    (null: ``distill.lr_critic``). Only the discriminator loss trains the head, and Adam's step does not scale with the
    loss, so ``discriminator_weight`` sets how much that loss moves the shared critic, not how fast the head learns.
    ``timestep_shift``: the shift of the noise levels at which both adversarial losses noise their videos (null: the
    DMD and critic losses' own timesteps, ``distill.timestep_shift``; a smaller shift shows the head less noisy clips).
    """

    enabled: bool = True
    feature_layers: list = field(default_factory=lambda: [21, 29])
    ffn_dim: int = 2048
    num_heads: int = 12
    generator_weight: float = 0.03
    discriminator_weight: float = 0.03
    r1_weight: float = 0.0
    r1_sigma: float = 0.1
    r2_weight: float = 0.0
    r2_sigma: float = 0.01
    lr: float | None = None
    timestep_shift: float | None = None


@dataclass
class DistillConfig(OptimConfig):
    """Stage ``distill``: self-forcing rollout, DMD against the frozen teacher, adversarial critic.

    ``generator``: null = the ODE-init output; ``teacher``: null = the teacher stage's output; ``critic``: null = the
    teacher's weights. ``guidance_scale``: g of the real score ``cond + g * (cond - uncond)`` (One-Forcing 5,
    Self-Forcing 3). ``critic_steps_per_generator_step``: the generator is updated on every n-th iteration, the
    critic on every iteration (``steps`` counts iterations). ``gradient_blocks``: only the last n blocks of the
    rollout carry gradient (null = all). Timesteps of the DMD and critic losses: shift ``timestep_shift``, clamped to
    [min_timestep, max_timestep].
    """

    generator: str | None = None
    teacher: str | None = None
    critic: str | None = None
    lr: float = 1e-5
    lr_critic: float = 1e-5
    betas: list = field(default_factory=lambda: [0.0, 0.999])
    ema_decay: float = 0.99
    ema_start_step: int = 50
    guidance_scale: float = 5.0
    critic_steps_per_generator_step: int = 5
    gradient_blocks: int | None = None
    timestep_shift: float = 5.0
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    dmd_eps: float = 1e-6
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class LoraSettings:
    """LoRA adapters trained instead of full weights by every stage (teacher, ode-init, distill: the models it
    trains), ``rank`` 0 = full weights. ``targets``: module-name suffixes (PEFT ``target_modules``), by default every
    attention projection and feed-forward layer of the blocks; ``alpha`` (default: ``rank``) scales them by
    alpha / rank. ``export`` then writes a Wan LoRA file."""

    rank: int = 0
    alpha: float | None = None
    targets: list = field(default_factory=lambda: list(WAN_LORA_TARGETS))


@dataclass
class TrainingConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate autocast; master weights stay float32)
    cpu: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ode_pairs: OdePairsConfig = field(default_factory=OdePairsConfig)
    ode_init: OdeInitConfig = field(default_factory=OdeInitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    # -- default paths inside output_dir ----------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage.replace("-", "_")

    def latents_dir(self) -> Path:
        return Path(self.data.latents) if self.data.latents else self.stage_dir("latents")

    def teacher_path(self) -> Path:
        return self.stage_dir("teacher") / "final" / "transformer"

    def pairs_dir(self) -> Path:
        return Path(self.ode_init.pairs) if self.ode_init.pairs else self.stage_dir("ode_pairs")

    def ode_init_path(self) -> Path:
        return self.stage_dir("ode_init") / "final" / "generator"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainingConfig:
    """Read a JSON or TOML config (``None``: all defaults) and apply ``section.field=value`` overrides."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper() or 'JSON'}: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object / TOML table, got a {type(raw).__name__}")
        raw.pop("_comment", None)
    for item in overrides:
        _apply_override(raw, item)
    config = _build(TrainingConfig, raw, source, "")
    _validate(config, source)
    return config


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not section.field=value")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a table/object, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if k not in known and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(known)}")
    values = {}
    for name in known & set(raw):
        hint = hints[name]
        value = raw[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, source, prefix + name)
    return cls(**values)


def _check_type(value, hint, source: str, name: str):
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {name} must be a finite number, got {value!r}")
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    raise ConfigError(f"{source}: {name} must be {hint}, got {value!r}")


def _validate(config: TrainingConfig, source: str) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {message}")

    need(config.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16")
    need(config.model.frames_per_block >= 1, "model.frames_per_block must be >= 1")
    need(config.lora.rank >= 0 and (config.lora.alpha is None or config.lora.alpha > 0),
         "lora.rank must be >= 0 and lora.alpha > 0")
    need(bool(config.lora.targets) and all(isinstance(t, str) for t in config.lora.targets),
         "lora.targets must list module names")
    need(config.encode.world_background_rgb is None or len(config.encode.world_background_rgb) == 3,
         "encode.world_background_rgb must be [r, g, b]")
    need(config.encode.source in ("world", "videos"), "encode.source must be world or videos")
    for name in ("teacher", "ode_init", "distill"):
        section: OptimConfig = getattr(config, name)
        need(section.steps >= 0 and section.batch_size >= 1, f"{name}.steps must be >= 0 and batch_size >= 1")
        need(len(section.betas) == 2, f"{name}.betas must have two entries")
        need(0.0 <= section.ema_decay < 1.0, f"{name}.ema_decay must be in [0, 1)")
        need(section.lr > 0, f"{name}.lr must be > 0")
    for name in ("teacher", "distill"):
        section = getattr(config, name)
        need(
            0.0 <= section.min_timestep <= section.max_timestep <= 1000.0,
            f"{name}: need 0 <= min_timestep <= max_timestep <= 1000",
        )
    need(0.0 <= config.teacher.caption_dropout <= 1.0, "teacher.caption_dropout must be in [0, 1]")
    need(config.teacher.attention_mode in ("bidirectional", "block_causal"),
         "teacher.attention_mode must be bidirectional or block_causal")
    need(not config.teacher.clean_context or (config.teacher.attention_mode == "block_causal"
                                               and config.teacher.min_timestep > 0),
         "teacher.clean_context needs teacher.attention_mode = block_causal and teacher.min_timestep > 0 (t = 0 marks "
         "the clean context)")
    need(config.ode_pairs.num_inference_steps >= 1, "ode_pairs.num_inference_steps must be >= 1")
    need(config.distill.critic_steps_per_generator_step >= 1, "distill.critic_steps_per_generator_step must be >= 1")
    gan = config.distill.gan
    need(len(gan.feature_layers) >= 1, "distill.gan.feature_layers needs at least one layer")
    need(list(gan.feature_layers) == sorted(set(gan.feature_layers)), "distill.gan.feature_layers must increase")
    need(gan.lr is None or gan.lr > 0, "distill.gan.lr must be > 0 (or null: distill.lr_critic)")
    need(gan.timestep_shift is None or gan.timestep_shift > 0,
         "distill.gan.timestep_shift must be > 0 (or null: the DMD loss's timesteps)")
