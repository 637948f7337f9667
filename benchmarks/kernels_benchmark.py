"""Micro-benchmark of the fused elementwise kernels at Wan2.1-1.3B shapes: reference vs torch.compile vs Triton.

For every kernel, token count (1560 = one 480x832 latent frame, 4680 = three) and backend it prints the largest
difference from the reference, the eager time per call (what a Python loop of calls costs, launch overhead
included), the GPU time per call (replayed from a CUDA graph, so without launch overhead) and the bandwidth that GPU
time implies; then the totals for one forward of the 30-block model (per block: q and k norm+rope, two adaptive
LayerNorm modulations, two gated residuals), and the backend the package's dispatch selects (``active_kernels()``).

    python benchmarks/kernels_benchmark.py --json kernels.json
    python benchmarks/kernels_benchmark.py --device cpu --tokens 64   # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from oneforcing.kernels import ops
from oneforcing.kernels import reference

DIM, HEADS, HEAD_DIM, BLOCKS, EPS = 1536, 12, 128, 30, 1e-6
TOKENS_PER_FRAME = 1560
CALLS_PER_BLOCK = {"qk_norm_rope_pair": 1, "adaln_modulate": 2, "gated_residual": 2}


def make_inputs(tokens: int, device: str, dtype: torch.dtype) -> dict:
    """1.3B-sized inputs; per-frame modulation as strided [B, F, C] float32 views, like the transformer's."""
    frames = max(1, tokens // TOKENS_PER_FRAME) if tokens % TOKENS_PER_FRAME == 0 else 1
    g = torch.Generator(device="cpu").manual_seed(0)
    x, y, q, k = (torch.randn(1, tokens, DIM, generator=g).to(device, dtype) for _ in range(4))
    shift, scale, gate = torch.randn(1, frames, 3, DIM, generator=g).to(device).unbind(2)
    weight_q, weight_k = ((torch.rand(DIM, generator=g) + 0.5).to(device, dtype) for _ in range(2))
    angles = (torch.rand(tokens, HEAD_DIM // 2, generator=g) * 6.3).to(device)
    cos, sin = angles.cos(), angles.sin()
    return {
        "qk_norm_rope": (q, weight_q, cos, sin, HEADS, EPS),
        "qk_norm_rope_pair": (q, k, weight_q, weight_k, cos, sin, HEADS, EPS),
        "adaln_modulate": (x, shift, scale, EPS),
        "gated_residual": (x, y, gate),
    }


def bytes_moved(name: str, args) -> int:
    """Activation bytes read + written (tables, gains and modulation vectors are small and left out)."""
    act = args[0].numel() * args[0].element_size()
    moved = {"qk_norm_rope": 2, "qk_norm_rope_pair": 4, "adaln_modulate": 2, "gated_residual": 3}
    return moved[name] * act


def implementations(device: str) -> dict[str, object]:
    """backend -> module-like object with the kernel functions; only those that run here."""
    impls: dict[str, object] = {"reference": reference}

    class Compiled:
        def __init__(self):
            self._fns = {}

        def __getattr__(self, name):
            if name.startswith("_"):
                raise AttributeError(name)
            if name not in self._fns:
                self._fns[name] = torch.compile(getattr(reference, name), dynamic=False)
            return self._fns[name]

    impls["compile"] = Compiled()
    if device == "cuda":
        try:
            from oneforcing.kernels import triton_kernels

            impls["triton"] = triton_kernels
        except ImportError as err:
            print(f"triton kernels unavailable: {err}")
        impls["dispatch"] = kernels  # the package entry points: shows the dispatch's own overhead
    return impls


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eager_time(fn, device: str, calls: int, repeat: int) -> float:
    """Median seconds per call over ``repeat`` loops of ``calls`` back-to-back calls."""
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / calls)
    return sorted(times)[len(times) // 2]


def graph_time(fn, calls: int, repeat: int) -> float | None:
    """Median GPU seconds per call, replaying ``calls`` calls captured in one CUDA graph; None if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception as err:  # e.g. a backend that synchronises inside the call
        print(f"  (no CUDA graph: {type(err).__name__}: {err})")
        return None
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return sorted(times)[len(times) // 2]


def max_error(got, want) -> float:
    if isinstance(want, tuple):
        return max(max_error(g, w) for g, w in zip(got, want))
    return (got.float() - want.float()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1560, 4680], help="tokens per forward")
    parser.add_argument("--calls", type=int, default=100, help="calls per timed loop / CUDA graph")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --device cpu for a smoke run)")
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    ops.set_kernel_backend("auto")
    active = ops.active_kernels(device if device == "cuda" else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"dtype {str(dtype).removeprefix('torch.')}; active_kernels(): {active}")
    impls = implementations(device)
    rows = []
    header = f"{'kernel':<18} {'tokens':>6} {'backend':<9} {'max err':>9} {'eager us':>9} {'gpu us':>8} {'GB/s':>7}"
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        inputs = make_inputs(tokens, device, dtype)
        for name, call_args in inputs.items():
            want = getattr(reference, name)(*call_args)
            for backend, impl in impls.items():
                fn = getattr(impl, name)
                try:
                    err = max_error(fn(*call_args), want)
                except Exception as exc:
                    print(f"{name:<18} {tokens:>6} {backend:<9} failed: {type(exc).__name__}: {exc}")
                    continue
                eager = eager_time(lambda: fn(*call_args), device, args.calls, args.repeat)
                gpu = graph_time(lambda: fn(*call_args), args.calls, args.repeat) if device == "cuda" else None
                bandwidth = bytes_moved(name, call_args) / (gpu or eager) / 1e9
                rows.append(dict(kernel=name, tokens=tokens, backend=backend, max_error=err, eager_us=eager * 1e6,
                                 gpu_us=None if gpu is None else gpu * 1e6, gb_per_s=bandwidth))
                gpu_text = "-" if gpu is None else f"{gpu * 1e6:8.1f}"
                print(f"{name:<18} {tokens:>6} {backend:<9} {err:9.2e} {eager * 1e6:9.1f} {gpu_text:>8} "
                      f"{bandwidth:7.0f}")

    print(f"\nper {BLOCKS}-block forward (q+k pair x1, modulation x2, gated residual x2 per block), ms:")
    totals = []
    for tokens in args.tokens:
        for backend in impls:
            picked = [r for r in rows if r["tokens"] == tokens and r["backend"] == backend]
            by_name = {r["kernel"]: r for r in picked}
            if not all(n in by_name for n in CALLS_PER_BLOCK):
                continue
            total = {}
            for key in ("eager_us", "gpu_us"):
                if all(by_name[n][key] is not None for n in CALLS_PER_BLOCK):
                    total[key] = BLOCKS * sum(c * by_name[n][key] for n, c in CALLS_PER_BLOCK.items()) / 1e3
            totals.append(dict(tokens=tokens, backend=backend, eager_ms=total.get("eager_us"),
                               gpu_ms=total.get("gpu_us")))
            gpu_text = f"{total['gpu_us']:.2f}" if "gpu_us" in total else "-"
            print(f"  tokens {tokens:>5}  {backend:<9} eager {total['eager_us']:7.2f}   gpu {gpu_text}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                           dtype=str(dtype), active_kernels=active, shapes=dict(dim=DIM, heads=HEADS,
                           head_dim=HEAD_DIM, blocks=BLOCKS), rows=rows, forward_totals=totals), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
