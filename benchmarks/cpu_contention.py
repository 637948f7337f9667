"""ComfyUI's text-to-video workflow on the CPU while other processes keep cores busy: the node layer's thread policy
(``nodes.runtime.cpu_threads``: as many torch threads as idle CPUs) against torch's default (one per core).

Each row runs the shipped text-to-video graph's nodes (bundled demo model, 81 frames at its 128 x 128: the loader and
text encoder once, then rollout + decode timed) with ``--busy`` 0, 1, ... spinning processes beside it.

    python benchmarks/cpu_contention.py --busy 0 1 --repeats 2 --json contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from oneforcing.nodes import definitions, runtime
from oneforcing.nodes.folders import BUNDLED_DEMO

SPIN = "while True: pass"


def run_once(model, conditioning, seed: int) -> float:
    start = time.perf_counter()
    latent, = definitions.OneForcingRollout.execute(model, conditioning, seed, 0, 0, 81, 0, "one step")
    definitions.OneForcingDecode.execute(latent, BUNDLED_DEMO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="spinning processes beside the run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model, = definitions.OneForcingModelLoader.execute(BUNDLED_DEMO, "default", "auto")
    conditioning, = definitions.OneForcingTextEncode.execute(
        BUNDLED_DEMO, "a yellow circle moves right on a dark blue striped background", "default")
    measure_idle = runtime.idle_cpus
    policies = {"torch default (one thread per core)": lambda window_s=0.05: torch.get_num_threads(),
                "idle CPUs (the nodes' policy)": measure_idle}
    run_once(model, conditioning, 0)  # warm-up
    rows = []
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            time.sleep(1.0)
            for name, policy in policies.items():
                runtime.idle_cpus = policy
                times = [run_once(model, conditioning, seed) for seed in range(args.repeats)]
                threads = min(torch.get_num_threads(), policy())
                rows.append({"busy_processes": busy, "policy": name, "threads": threads,
                             "seconds": [round(t, 2) for t in times], "best_s": round(min(times), 2)})
                print(f"busy {busy}  {name:40s} threads {threads}  best {min(times):6.2f} s  all {rows[-1]['seconds']}")
        finally:
            runtime.idle_cpus = measure_idle
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    report = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
