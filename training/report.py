"""Compact loss curves of a run: ``python -m oneforcing.training.report RUN_DIR [--points 6] [--json FILE]``.

For every stage folder of ``RUN_DIR`` with a ``log.jsonl``, prints the steps, the wall time, the throughput over the
second half of the run (steady state, after start-up), and each logged quantity averaged over ``points`` equal
windows of steps -- the curve in one line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STAGE_ORDER = ("latents", "teacher", "ode_pairs", "ode_init", "distill")
SKIP = {"stage", "step", "seconds"}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(rows: list[dict], key: str, points: int) -> list[float]:
    """Mean of ``key`` over ``points`` consecutive windows of the rows that log it."""
    values = [r[key] for r in rows if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    if not values:
        return []
    points = min(points, len(values))
    edges = [round(i * len(values) / points) for i in range(points + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]


def summarise(rows: list[dict], points: int = 6) -> dict:
    steps = [r["step"] for r in rows]
    keys = sorted({k for r in rows for k in r} - SKIP)
    half = rows[len(rows) // 2 :]
    rate = None
    if len(half) >= 2 and half[-1]["seconds"] > half[0]["seconds"]:
        rate = (half[-1]["step"] - half[0]["step"]) / (half[-1]["seconds"] - half[0]["seconds"])
    return {
        "steps": max(steps) if steps else 0,
        "seconds": rows[-1]["seconds"] if rows else 0.0,
        "steps_per_second": rate,
        "curves": {k: curve(rows, k, points) for k in keys},
    }


def format_summary(stage: str, summary: dict) -> str:
    rate = summary["steps_per_second"]
    head = f"{stage}: {summary['steps']} steps, {summary['seconds']:.1f} s" + (f", {rate:.2f} steps/s" if rate else "")
    lines = [head]
    for key, values in summary["curves"].items():
        lines.append(f"  {key:<22} " + " ".join(f"{v:.4g}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m oneforcing.training.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the recipe's output_dir")
    parser.add_argument("--points", type=int, default=6, help="points per curve")
    parser.add_argument("--json", help="also write the summaries to this file")
    args = parser.parse_args(argv)
    root = Path(args.run_dir)
    logs = {p.parent.name: p for p in root.glob("*/log.jsonl")}
    if not logs:
        raise SystemExit(f"error: no */log.jsonl under {root}")
    order = [s for s in STAGE_ORDER if s in logs] + sorted(set(logs) - set(STAGE_ORDER))
    out = {}
    for stage in order:
        out[stage] = summarise(read_log(logs[stage]), args.points)
        print(format_summary(stage, out[stage]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
