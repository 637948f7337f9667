"""The block-causal Wan2.1 video transformer used by One-Forcing, Self-Forcing and CausVid.

Parameters are exactly those of diffusers' ``WanTransformer3DModel`` (this class subclasses it and keeps its modules),
so diffusers folders, the original Wan2.1 files and the autoregressive checkpoints all load. What differs is the
forward pass:

- timesteps are given per latent frame ([B, F]); the time modulation is computed once per frame and broadcast over that
  frame's tokens (diffusers' per-token path would build a [B, tokens, 6, C] float32 tensor);
- three attention modes share the weights:
  ``"kv_cache"`` (a block of frames attends to the committed frames of a :class:`KVCache` plus itself, rotary time
  positions offset by the block's first frame), ``"block_causal"`` (the whole sequence at once, each block sees itself
  and earlier blocks; for training and checks) and ``"bidirectional"`` (teacher and critic);
- hidden states after chosen blocks can be returned (the adversarial critic reads them).

Shapes: B batch, C latent channels (16), F latent frames, H/W latent height/width, L tokens = F * (H/ph) * (W/pw),
``dim`` model width, heads x head_dim attention geometry.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from diffusers.utils import BaseOutput

from ..kernels import ops
from ..kernels.reference import rope
from .attention import attention, block_causal_mask, check_attention_backend
from .kv_cache import CrossAttentionEntry, KVCache, RollingWindow
from .layout import BlockLayout
from .rope import WanRotaryTables

ATTENTION_MODES = ("bidirectional", "block_causal", "kv_cache")


@dataclass(frozen=True)
class ForwardPlan:
    """What the host decided for one forward before any arithmetic (``CausalWanTransformer3DModel.forward`` makes it,
    ``compute_planned`` carries it out).

    ``timestep``: [B, F] per-frame timesteps; ``cos``/``sin``: [F*h*w, D/2] rotary tables of the block's positions;
    ``frame_offset``: rotary time position of the first frame; ``cross_ready``: the KV cache holds this prompt's
    cross-attention keys/values.
    """

    mode: str
    grid_h: int
    grid_w: int
    timestep: torch.Tensor
    commit_frames: int
    frame_offset: int
    cross_ready: bool
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    kv_cache: KVCache | None
    hidden_states_at: frozenset
    attention_backend: str


class _TensorIdentity:
    """A prompt identified by its embeddings tensor: the same object, not modified in place since (inference tensors,
    as ComfyUI makes, cannot be modified in place outside inference mode and have no version counter)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = None if tensor.is_inference() else tensor._version

    def __eq__(self, other) -> bool:
        return isinstance(other, _TensorIdentity) and other.tensor is self.tensor and other.version == self.version

    def __hash__(self) -> int:
        return id(self.tensor)


@dataclass(frozen=True)
class _ForwardOptions:
    """The keyword options of one ``forward`` call (see its docstring)."""

    mode: str
    frames_per_block: int | None
    kv_cache: KVCache | None
    start_frame: int
    commit: bool
    commit_frames: int | None
    wanted: frozenset
    prompt_key: Hashable | None


@dataclass
class CausalWanOutput(BaseOutput):
    """``sample``: [B, C, F, H, W] flow prediction. ``hidden_states``: [B, L, dim] after each requested block."""

    sample: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CausalWanBlock(WanTransformerBlock):
    """diffusers' ``WanTransformerBlock`` (the same modules and parameters) with the causal forward: per-frame time
    modulation, the three attention modes, the KV cache. The model calls each block as a module, so hooks on blocks
    (diffusers' block-level group offload, accelerate's) run."""

    def _queries_and_keys(self, h, cos, sin):
        """Self-attention queries and keys of ``h`` [B, L, dim], RMS-normalised and rotated: [B, L, heads, D] each.
        The fused op reads the q/k norm gains; where they are not on ``h``'s device (a per-module offload hook, such as
        accelerate's sequential CPU offload, brings a module's weights only when the module is called) the norms run
        as modules."""
        attn = self.attn1
        q, k = attn.to_q(h), attn.to_k(h)
        if attn.norm_q.weight.device == h.device and attn.norm_k.weight.device == h.device:
            return ops.qk_norm_rope_pair(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin, attn.heads,
                                         self.norm1.eps)
        return rope(attn.norm_q(q), cos, sin, attn.heads), rope(attn.norm_k(k), cos, sin, attn.heads)

    def forward(self, x, index: int, context, time_mod, plan: ForwardPlan):
        """x: [B, L, dim] -> [B, L, dim]; ``index``: this block's layer in the KV cache; context: [B, Ltext, dim]
        embedded prompt (None when the cache holds its keys/values); time_mod: [B, F, 6, dim] float32 (without the
        block's table)."""
        backend = plan.attention_backend
        cos, sin, mask, kv_cache, commit_frames = plan.cos, plan.sin, plan.mask, plan.kv_cache, plan.commit_frames
        eps = self.norm1.eps
        heads = self.attn1.heads
        batch, length, _ = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table.float()[:, None] + time_mod).unbind(2)

        # self-attention
        attn = self.attn1
        h = ops.adaln_modulate(x, shift1, scale1, eps)
        q, k = self._queries_and_keys(h, cos, sin)
        v = attn.to_v(h).view(batch, length, heads, -1)
        if kv_cache is not None:
            # keys that record autograd stay out of the shared buffers (later writes would change what backward
            # reads); the cache stores their values
            carries_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
            k, v = kv_cache.attend(index, k, v, commit_frames, (k.detach(), v.detach()) if carries_grad else None)
        if kv_cache is not None and 0 < commit_frames < time_mod.shape[1]:
            # the clean block's queries must not see the next block: two unmasked calls instead of a mask
            split = commit_frames * (length // time_mod.shape[1])
            visible = k.shape[1] - length + split
            out = torch.cat(
                [
                    attention(q[:, :split], k[:, :visible], v[:, :visible], None, backend),
                    attention(q[:, split:], k, v, None, backend),
                ],
                dim=1,
            )
        else:
            out = attention(q, k, v, mask, backend)
        x = ops.gated_residual(x, attn.to_out[0](out.flatten(2)), gate1)

        # cross-attention to the prompt (keys/values cached per prompt when a KV cache is used)
        cross = self.attn2
        h = self.norm2(x.float()).type_as(x)
        q = cross.norm_q(cross.to_q(h)).view(batch, length, heads, -1)
        entry = kv_cache.cross[index] if kv_cache is not None else None
        if entry is None:
            ctx_len = context.shape[1]
            entry = CrossAttentionEntry(
                key=cross.norm_k(cross.to_k(context)).view(batch, ctx_len, heads, -1),
                value=cross.to_v(context).view(batch, ctx_len, heads, -1),
            )
            if kv_cache is not None and not torch.is_grad_enabled():
                entry = kv_cache.store_cross_attention(index, entry)
        out = attention(q, entry.key, entry.value, None, backend)
        x = x + cross.to_out[0](out.flatten(2))

        # feed-forward
        h = ops.adaln_modulate(x, shift2, scale2, eps)
        return ops.gated_residual(x, self.ffn(h), gate2)


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 transformer with per-frame timesteps, a KV cache and block-causal attention.

    Args (beyond ``WanTransformer3DModel``'s):
        frames_per_block: latent frames generated per autoregressive block by default (1 = frame-wise, 3 = chunk-wise).
        independent_first_frame: the model was trained with latent frame 0 as a block of its own (blocks
            ``[1, 3, 3, ...]``, see :class:`~.layout.BlockLayout`).
    """

    _no_split_modules = ["CausalWanBlock"]  # diffusers' names its own block class; ours is the causal one
    _repeated_blocks = ["CausalWanBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        frames_per_block: int = 1,
        independent_first_frame: bool = False,
    ) -> None:
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError("image-conditioned (I2V) Wan transformers are not supported by the causal model")
        if frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        for block in self.blocks:  # the same block, with the causal forward (no new parameters, no new weights drawn)
            block.__class__ = CausalWanBlock
        self.rotary = WanRotaryTables(attention_head_dim, rope_max_seq_len)
        self.attention_backend = "auto"
        self._cuda_graphs = None

    # -- public helpers -----------------------------------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        """Pick the attention backend of every attention call, as diffusers' ``ModelMixin.set_attention_backend``:
        PyTorch's SDPA kernels ("auto", "cudnn", "flash", "efficient", "math", or diffusers' "native",
        "_native_cudnn", "_native_flash", "_native_efficient", "_native_math") or any other diffusers
        ``AttentionBackendName`` ("flex", "sage", "xformers", "_flash_3", ...), run through diffusers' dispatcher
        (see ``pipelines/attention.py``)."""
        self.attention_backend = check_attention_backend(backend)

    def reset_attention_backend(self) -> None:
        """Back to "auto" (PyTorch chooses the SDPA kernel)."""
        self.attention_backend = "auto"

    # -- inherited diffusers API that this model's forward does not go through ----------------------------------------
    def _not_here(name: str, alternative: str):
        def refuse(self, *args, **kwargs):
            raise NotImplementedError(
                f"CausalWanTransformer3DModel.{name} is not supported: the causal forward calls its attention itself "
                f"(no diffusers attention processors or hooks run). {alternative}"
            )

        refuse.__name__ = name
        refuse.__doc__ = f"Not supported (raises NotImplementedError). {alternative}"
        return refuse

    _BACKENDS_INSTEAD = "Choose the attention kernel with set_attention_backend(...)."
    _CACHE_INSTEAD = ("Its key/value cache is explicit (new_kv_cache, pipelines/session.py); for speed use "
                      "enable_cuda_graphs().")
    set_attn_processor = _not_here("set_attn_processor", _BACKENDS_INSTEAD)
    set_default_attn_processor = _not_here("set_default_attn_processor", _BACKENDS_INSTEAD)
    enable_xformers_memory_efficient_attention = _not_here(
        "enable_xformers_memory_efficient_attention", 'Use set_attention_backend("xformers").')
    set_use_memory_efficient_attention_xformers = _not_here(
        "set_use_memory_efficient_attention_xformers", 'Use set_attention_backend("xformers").')
    enable_npu_flash_attention = _not_here("enable_npu_flash_attention", _BACKENDS_INSTEAD)
    enable_xla_flash_attention = _not_here("enable_xla_flash_attention", _BACKENDS_INSTEAD)
    fuse_qkv_projections = _not_here(
        "fuse_qkv_projections", "The fused kernels of kernels/ops.py and enable_cuda_graphs() are the fast paths.")
    unfuse_qkv_projections = _not_here("unfuse_qkv_projections", "Nothing is fused by this model's API.")
    enable_cache = _not_here("enable_cache", _CACHE_INSTEAD)
    cache_context = _not_here("cache_context", _CACHE_INSTEAD)
    enable_parallelism = _not_here("enable_parallelism", "Run one model per GPU (the training recipe uses DDP/FSDP).")
    del _not_here

    @property
    def attn_processors(self):
        raise NotImplementedError("CausalWanTransformer3DModel has no diffusers attention processors: its causal "
                                  "forward calls its attention itself. Use set_attention_backend(...).")

    def enable_cuda_graphs(self, warmup: int = 1, max_graphs: int = 256, capture: str = "cuda") -> None:
        """Replay the KV-cached inference forwards as CUDA graphs, one per block position (see ``cuda_graphs``).

        A position's forward is captured the second time it is seen (``warmup`` eager runs first), so graphs pay off
        from the second video made with the same KV cache (``OneForcingPipeline`` keeps its cache for this). Forwards
        that cannot be graphed (training, the first forward of a prompt, hidden states requested, not on CUDA) run as
        usual.
        """
        from .cuda_graphs import CudaGraphForwards

        self._cuda_graphs = CudaGraphForwards(self, warmup=warmup, max_graphs=max_graphs, capture=capture)

    def enable_fp8_storage(self, compute_dtype: torch.dtype | None = None) -> None:
        """Keep the blocks' linear weights (nearly all of the model) in float8_e4m3fn with a per-layer scale, upcast to
        ``compute_dtype`` (default: the model's dtype) layer by layer at compute; see ``fp8.py``. Not undone: reload
        the model for full precision."""
        from .fp8 import TRANSFORMER_FP8_LAYERS, enable_fp8_storage

        enable_fp8_storage(self, TRANSFORMER_FP8_LAYERS, compute_dtype or self.dtype)

    def disable_cuda_graphs(self) -> None:
        """Drop the captured graphs (and their memory); forwards run eagerly again."""
        self._cuda_graphs = None

    @property
    def cuda_graphs(self):
        """The :class:`~.cuda_graphs.CudaGraphForwards` in use, or None."""
        return self._cuda_graphs

    def block_layout(self, frames_per_block: int | None = None, num_frames: int | None = None,
                     context_frames: int = 0) -> BlockLayout:
        """The block layout this model generates with: ``frames_per_block`` (default: the config's) and the config's
        ``independent_first_frame``, for ``num_frames`` latent frames after ``context_frames`` (None: endless)."""
        return BlockLayout(frames_per_block or self.config.frames_per_block, num_frames, context_frames,
                           bool(self.config.independent_first_frame))

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of size height x width."""
        _, ph, pw = self.config.patch_size
        self._check_spatial(height, width)
        return (height // ph) * (width // pw)

    def new_kv_cache(
        self,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        window_frames: int | None = None,
        sink_frames: int = 0,
        relative_positions: bool = False,
    ) -> KVCache:
        """A cache for a video of ``num_frames`` latent frames of size height x width (latent pixels).

        With ``window_frames`` the cache rolls instead: ``sink_frames`` first frames plus the ``window_frames`` most
        recent ones, at constant memory, for videos of any length (``relative_positions`` lifts the 1024-frame limit
        of absolute rotary positions). See :class:`KVCache`.
        """
        if window_frames is None and (sink_frames or relative_positions):
            raise ValueError("sink_frames and relative_positions need a rolling cache (window_frames=...)")
        return KVCache(
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            num_frames=num_frames,
            tokens_per_frame=self.tokens_per_frame(height, width),
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            dtype=dtype or self.proj_out.weight.dtype,
            device=device or self.proj_out.weight.device,
            window=None if window_frames is None else RollingWindow(window_frames, sink_frames, relative_positions,
                                                                    self.rotary.time_shift),
        )

    @classmethod
    def from_wan(cls, model: WanTransformer3DModel, frames_per_block: int = 1) -> "CausalWanTransformer3DModel":
        """The same weights as a diffusers ``WanTransformer3DModel``, as the causal model (parameters are shared)."""
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config.setdefault("frames_per_block", frames_per_block)
        with torch.device("meta"):
            causal = cls(**config)
        causal.load_state_dict(model.state_dict(), strict=True, assign=True)
        causal._rebuild_rope_buffers()
        return causal.train(model.training)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        config: dict | None = None,
        num_attention_heads: int | None = None,
        frames_per_block: int | None = None,
        prefer_ema: bool = True,
        dtype: torch.dtype | None = None,
        storage_dtype: torch.dtype | None = None,
    ) -> "CausalWanTransformer3DModel":
        """Load a One-Forcing/Self-Forcing ``.pt``, an original Wan2.1 or ComfyUI ``.safetensors`` file.

        The config is read from tensor shapes, and what shapes cannot show (the head count, the block size) from the
        config the file records (:func:`.loading.read_recorded_config`), unless ``config`` is given. A file that
        records no head count needs ``num_attention_heads`` unless it is a released Wan2.1 model; the count is never
        guessed. Weights holding NaN or Inf are refused. float32 unless ``dtype`` (the modules diffusers keeps in
        float32 stay float32 either way). Never unpickles code.

        ``storage_dtype``: ``torch.float8_e4m3fn`` keeps the blocks' linear weights in fp8 with a per-layer scale,
        upcast to ``dtype`` per layer at compute (``fp8.py``); None (the default) does so exactly when the file's
        are fp8 already (ComfyUI's ``*_fp8_e4m3fn`` files, scaled or not: no wider copy is made); a float dtype
        widens them.
        """
        from .fp8 import TRANSFORMER_FP8_LAYERS
        from .loading import (
            check_state_dict_matches, check_storage_dtype, infer_transformer_config, load_transformer_state_dict,
            read_recorded_config, with_fp8_storage,
        )

        check_storage_dtype(storage_dtype)
        keep_fp8 = TRANSFORMER_FP8_LAYERS if storage_dtype in (None, torch.float8_e4m3fn) else None
        state_dict = load_transformer_state_dict(path, prefer_ema=prefer_ema, keep_fp8=keep_fp8)
        model_config = dict(config) if config else infer_transformer_config(
            state_dict, num_attention_heads=num_attention_heads, recorded=read_recorded_config(path), path=path
        )
        if frames_per_block is not None:
            model_config["frames_per_block"] = frames_per_block
        with torch.device("meta"):
            model = cls(**model_config)
        state_dict = with_fp8_storage(model, state_dict, TRANSFORMER_FP8_LAYERS, storage_dtype, dtype or torch.float32)
        check_state_dict_matches(model, state_dict, path)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model._rebuild_rope_buffers()
        model._cast_keeping_fp32_modules(dtype or torch.float32)  # float32 by default, as from_pretrained
        return model.eval()

    # -- forward ------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        attention_mode: str | None = None,
        frames_per_block: int | None = None,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        commit: bool = False,
        commit_frames: int | None = None,
        hidden_states_at: Sequence[int] = (),
        prompt_key: Hashable | None = None,
        attention_kwargs: dict | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CausalWanOutput | tuple:
        """Predict the flow (noise - x0) of ``hidden_states``.

        Args:
            hidden_states: [B, C, F, H, W] noisy latents (with ``kv_cache``: the current block only).
            timestep: [B] or [B, F] on the 0..1000 scale.
            encoder_hidden_states: [B, Ltext, text_dim] prompt embeddings (zero-padded).
            attention_mode: "kv_cache" (default when ``kv_cache`` is given), "block_causal" or "bidirectional"
                (default otherwise).
            frames_per_block: block size of the "block_causal" mask (default: the config's).
            kv_cache: cache of the rollout; the block occupies frames [start_frame, start_frame + F).
            commit: make this block's keys/values context for later blocks (the clean-context pass).
            commit_frames: commit only the first ``commit_frames`` frames: the input is then a clean block being
                committed followed by the next block's noisy frames, computed in one forward (their queries see the
                clean block, the clean block's queries do not see them). Halves the forwards of one-step rollouts.
            hidden_states_at: indices of blocks whose output hidden states [B, L, dim] are returned too.
            attention_kwargs: diffusers' per-call attention options; none apply here, so a non-empty dict is refused
                (NotImplementedError) rather than ignored.
            prompt_key: identifies the prompt of ``encoder_hidden_states`` for the KV cache, which keeps its
                cross-attention keys/values while the key stays the same (e.g. ``PromptHandle.key``). Without it the
                embeddings tensor itself identifies the prompt (the same object, not modified in place).
        """
        if encoder_hidden_states_image is not None:
            raise ValueError("image conditioning is not supported by CausalWanTransformer3DModel")
        if attention_kwargs:
            raise NotImplementedError(
                f"attention_kwargs {sorted(attention_kwargs)} are not supported by CausalWanTransformer3DModel: its "
                "attention runs no diffusers processors (LoRA scales are set on the adapters themselves)"
            )
        options = _ForwardOptions(attention_mode or ("kv_cache" if kv_cache is not None else "bidirectional"),
                                  frames_per_block, kv_cache, start_frame, commit, commit_frames,
                                  frozenset(hidden_states_at), prompt_key)
        plan = self._plan(hidden_states, timestep, encoder_hidden_states, options)
        graphs = self._cuda_graphs
        if graphs is not None and graphs.takes(plan, hidden_states):
            sample, hidden = graphs.run(plan, hidden_states), ()
        else:
            sample, hidden = self.compute_planned(plan, hidden_states, plan.timestep, encoder_hidden_states)
        if kv_cache is not None and plan.commit_frames:
            kv_cache.commit(start_frame, plan.commit_frames)
        hidden = tuple(hidden) if hidden_states_at else None
        if not return_dict:
            return (sample, hidden) if hidden_states_at else (sample,)
        return CausalWanOutput(sample=sample, hidden_states=hidden)

    def _plan(self, hidden_states, timestep, encoder_hidden_states, options: _ForwardOptions) -> ForwardPlan:
        """The host side of a forward: checks, the KV cache's bookkeeping, rotary tables; no model arithmetic."""
        mode, kv_cache, commit_frames, wanted = options.mode, options.kv_cache, options.commit_frames, options.wanted
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention_mode {mode!r}; choose one of {ATTENTION_MODES}")
        if (mode == "kv_cache") != (kv_cache is not None):
            raise ValueError('attention_mode "kv_cache" needs kv_cache=..., and a kv_cache needs that mode')
        if hidden_states.ndim != 5 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be [B, {self.config.in_channels}, F, H, W], got {tuple(hidden_states.shape)}"
            )
        batch, _, frames, height, width = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        if pt != 1:
            raise ValueError("the causal transformer needs a temporal patch size of 1")
        self._check_spatial(height, width)
        grid_h, grid_w = height // ph, width // pw
        timestep = self._per_frame_timesteps(timestep, batch, frames, hidden_states.device)
        if commit_frames is None:
            commit_frames = frames if options.commit else 0
        if not 0 <= commit_frames <= frames or (commit_frames and mode != "kv_cache"):
            raise ValueError(f"commit_frames must be in 0..{frames} and needs a kv_cache, got {commit_frames}")
        if any(i < 0 or i >= len(self.blocks) for i in wanted):
            raise ValueError(f"hidden_states_at {sorted(wanted)} outside 0..{len(self.blocks) - 1}")
        frame_offset, cross_ready, mask = 0, False, None
        if mode == "kv_cache":
            frame_offset = kv_cache.begin_forward(options.start_frame, frames, batch, grid_h * grid_w, commit_frames)
            key = options.prompt_key if options.prompt_key is not None else _TensorIdentity(encoder_hidden_states)
            cross_ready = kv_cache.cross_attention_for(key)
        elif mode == "block_causal":
            layout = self.block_layout(options.frames_per_block, frames)
            mask = block_causal_mask(layout.block_sizes(), grid_h * grid_w, device=hidden_states.device)
        cos, sin = self.rotary.tables(frames, grid_h, grid_w, frame_offset, device=hidden_states.device)
        return ForwardPlan(mode, grid_h, grid_w, timestep, commit_frames, frame_offset, cross_ready, cos, sin, mask,
                           kv_cache, wanted, self.attention_backend)

    def compute_planned(self, plan: ForwardPlan, hidden_states, timestep, encoder_hidden_states):
        """The arithmetic of a forward, as planned by ``forward``: (sample [B, C, F, H, W], hidden states of the wanted
        blocks).

        The seam of replayed forwards (``cuda_graphs``): it reads no host state but ``plan`` and the KV cache's
        ``position``, so a recording of it stands for every forward with the same plan and position.
        """
        batch, _, frames = hidden_states.shape[:3]
        pt, ph, pw = self.config.patch_size
        temb, time_mod = self._time_embedding(timestep)  # [B, F, dim], [B, F, 6, dim] float32
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, L, dim]
        context = None if plan.cross_ready else self.condition_embedder.text_embedder(encoder_hidden_states)
        collected = []
        for index, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, index, context, time_mod, plan)
            else:
                x = block(x, index, context, time_mod, plan)
            if index in plan.hidden_states_at:
                collected.append(x)

        shift, scale = (self.scale_shift_table.float()[:, None] + temb[:, :, None]).unbind(2)  # [B, F, dim] each
        x = ops.adaln_modulate(x, shift, scale, self.config.eps)
        x = self.proj_out(x)
        x = x.reshape(batch, frames, plan.grid_h, plan.grid_w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        sample = x.reshape(batch, -1, frames * pt, plan.grid_h * ph, plan.grid_w * pw)
        return sample, collected

    # -- internals ----------------------------------------------------------------------------------------------------
    def _check_spatial(self, height: int, width: int) -> None:
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"latent size {height}x{width} is not a multiple of the patch size {ph}x{pw} "
                f"(video size must be a multiple of {8 * ph}x{8 * pw} with the Wan VAE)"
            )

    @staticmethod
    def _per_frame_timesteps(timestep: torch.Tensor, batch: int, frames: int, device) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.ndim == 1:
            if timestep.shape[0] != batch:
                raise ValueError(f"timestep has {timestep.shape[0]} entries for batch {batch}")
            return timestep[:, None].expand(batch, frames)
        if timestep.shape != (batch, frames):
            raise ValueError(f"timestep must be [B] or [B, F] = [{batch}, {frames}], got {tuple(timestep.shape)}")
        return timestep

    def _time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, F] timesteps -> temb [B, F, dim] and the six block modulations [B, F, 6, dim], float32.

        The sinusoid is taken in float64 (as the reference models do): at t = 1000 float32 angles lose ~1e-4.
        """
        batch, frames = timestep.shape
        half = self.config.freq_dim // 2
        wide = torch.float32 if timestep.device.type == "mps" else torch.float64
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=wide) / half)
        angles = timestep.reshape(-1).to(wide)[:, None] * freqs[None]
        sinusoid = torch.cat([angles.cos(), angles.sin()], dim=-1)
        embedder = self.condition_embedder
        temb = embedder.time_embedder(sinusoid.to(embedder.time_embedder.linear_1.weight.dtype))
        time_mod = embedder.time_proj(embedder.act_fn(temb.to(embedder.time_proj.weight.dtype)))
        return (
            temb.float().view(batch, frames, -1),
            time_mod.float().view(batch, frames, 6, -1),
        )

    def _rebuild_rope_buffers(self) -> None:
        """diffusers' rope buffers are non-persistent; after a meta-device build they must be recreated."""
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        self.rope = WanRotaryPosEmbed(
            self.config.attention_head_dim, self.config.patch_size, self.config.rope_max_seq_len
        ).to(self.proj_out.weight.device)

    def _cast_keeping_fp32_modules(self, dtype: torch.dtype) -> None:
        """Cast like diffusers' ``from_pretrained(dtype=...)``: norms, modulation tables, time embedder in float32
        (also when the file holds them narrower), fp8-stored weights in fp8, every other parameter in ``dtype``."""
        keep = tuple(self._keep_in_fp32_modules or ())
        for name, param in self.named_parameters():
            if param.dtype == torch.float8_e4m3fn:
                continue
            wide = any(k in name.split(".") for k in keep)
            param.data = param.data.to(torch.float32 if wide else dtype)
