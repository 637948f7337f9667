"""CUDA graphs of the causal transformer's KV-cached forwards: captured once per block position, replayed after.

A one-step rollout is a string of small forwards (frame-wise at 480x832: 21 forwards of about 900 kernel launches
each), and at those sizes the GPU waits for the host to launch work. For a given block position, a forward with a KV
cache runs the same kernels on the same buffers every time, so it can be captured as a CUDA graph and replayed as one
launch.

A graph bakes in host decisions and memory addresses; whatever it bakes in selects it:
- the key: the forward's plan (frames, committed frames, the cache slot and cached frames, the rotary position),
  the input shapes and dtypes, the attention and kernel backends;
- the binding: the addresses of the model's parameters and buffers and the state of its LoRA adapters (active,
  merged, scales: see ``lora.adapter_state``), read when a video begins, and the addresses of the KV cache's
  buffers (the cache keeps its cross-attention tensors across prompts for this). A different binding (another cache,
  the model moved or reloaded between videos) drops every graph. The rotary tables a graph reads are held by the graph.
Inputs (latents, timesteps) are copied into the graph's own tensors before a replay and the output is copied out
after it, so graphs can share one memory pool. The host bookkeeping of a forward (``KVCache.begin_forward`` and
``commit``) stays outside the graph and runs as usual.

Graphed are forwards under ``no_grad``/inference mode with a KV cache whose prompt cross-attention is already cached
(the first forward of a prompt computes it without a graph) and that return no hidden states. A key runs eagerly
``warmup`` times before it is captured (library set-up, Triton compiles and cuDNN plans happen outside the capture).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import ops
from .lora import adapter_state

CAPTURE_MODES = ("cuda", "eager")


@dataclass
class _Graph:
    """One captured forward: its input tensors, the call that fills its output, and what it must keep alive."""

    replay_fn: Callable[[object], torch.Tensor]  # (the KV cache of the call) -> output
    hidden_states: torch.Tensor
    timestep: torch.Tensor
    tables: tuple  # the rotary tables the graph reads (not the plan: a graph must not keep its KV cache alive)

    def replay(self, hidden_states: torch.Tensor, timestep: torch.Tensor, kv_cache) -> torch.Tensor:
        self.hidden_states.copy_(hidden_states)
        self.timestep.copy_(timestep)
        return self.replay_fn(kv_cache).clone()  # the next replay of any graph of the pool may overwrite the output


class CudaGraphForwards:
    """The graphs of one :class:`CausalWanTransformer3DModel` (``model.enable_cuda_graphs()`` makes one).

    Args:
        model: the transformer.
        warmup: eager runs of a key before its graph is captured.
        max_graphs: graphs kept at most; further keys run eagerly.
        capture: ``"cuda"`` (real CUDA graphs) or ``"eager"``: a "replay" re-runs the recorded call on the recorded
            input tensors, which checks the keying, copying and bookkeeping on any device (tests on CPU).
    """

    def __init__(self, model, warmup: int = 1, max_graphs: int = 256, capture: str = "cuda"):
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        if warmup < 0 or max_graphs < 1:
            raise ValueError(f"warmup must be >= 0 and max_graphs >= 1, got {warmup}, {max_graphs}")
        self.model = model
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.capture = capture
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: Counter = Counter()
        self._binding: tuple | None = None
        self._weights: tuple | None = None  # the model's addresses, read during each video's first block
        self._pool = None
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph (and its memory pool)."""
        self._graphs.clear()
        self._seen.clear()
        self._binding = None
        self._pool = None

    def takes(self, plan, hidden_states: torch.Tensor) -> bool:
        """Whether this forward is one a graph can stand for (see the module docstring)."""
        if plan.mode != "kv_cache" or not plan.cross_ready or plan.hidden_states_at or torch.is_grad_enabled():
            return False
        if self.capture == "eager":
            return True
        return hidden_states.is_cuda and not torch.cuda.is_current_stream_capturing()

    def run(self, plan, hidden_states: torch.Tensor) -> torch.Tensor:
        """The forward's sample [B, C, F, H, W]: replayed, captured now, or computed eagerly (warm-up)."""
        self._check_binding(plan.kv_cache)
        timestep = plan.timestep
        key = self._key(plan, hidden_states)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._seen) > 4 * self.max_graphs:  # keys that never come back (an endless absolute-position video)
                self._seen.clear()
            self._seen[key] += 1
            if self._seen[key] <= self.warmup or len(self._graphs) >= self.max_graphs:
                return self.model.compute_planned(plan, hidden_states, timestep, None)[0]
            graph = self._graphs[key] = self._capture(plan, hidden_states, timestep)
            self.captures += 1
        self.replays += 1
        return graph.replay(hidden_states, timestep, plan.kv_cache)

    def _check_binding(self, kv_cache) -> None:
        """Drop every graph if the cache's buffers moved, or the weights did since the video began.

        The cache's addresses are read on every forward (a few dozen pointers); the model's (about 800 parameters at
        Wan2.1-1.3B size, milliseconds to walk) only while nothing is committed yet (the first block of a video),
        since nothing moves the weights in the middle of a rollout."""
        if self._weights is None or kv_cache.committed_frames == 0:
            model = self.model
            self._weights = (tuple(p.data_ptr() for p in model.parameters()),
                             tuple(b.data_ptr() for b in model.buffers()), adapter_state(model))
        binding = (self._weights, kv_cache.buffer_addresses())
        if binding != self._binding:
            self.reset()
            self._binding = binding

    def _key(self, plan, hidden_states: torch.Tensor) -> tuple:
        cache = plan.kv_cache
        return (
            *cache.position, plan.frame_offset, plan.commit_frames,
            plan.grid_h, plan.grid_w,
            tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device,
            tuple(plan.timestep.shape), plan.timestep.dtype,
            self.model.attention_backend, ops.active_kernels(hidden_states.device),
            ops.fused_kernels_enabled(), torch.is_inference_mode_enabled(),
        )

    def _capture(self, plan, hidden_states: torch.Tensor, timestep: torch.Tensor) -> _Graph:
        static_x, static_t = hidden_states.clone(), timestep.clone()
        tables = (plan.cos, plan.sin, plan.mask)
        if self.capture == "eager":  # the call as recorded, on the cache of the replay (the same buffers)
            recorded = dataclasses.replace(plan, kv_cache=None)
            model = self.model
            return _Graph(
                lambda cache: model.compute_planned(dataclasses.replace(recorded, kv_cache=cache), static_x, static_t,
                                             None)[0],
                static_x, static_t, tables,
            )
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self.model.compute_planned(plan, static_x, static_t, None)[0]

        def replay(_) -> torch.Tensor:
            graph.replay()
            return output

        return _Graph(replay, static_x, static_t, tables)
