"""The live studio under a long session: frames/s delivered to a client, prompt -> first changed frame latency, and
the server's memory (RSS) over time with prompt changes and rewinds spread over the session.

Starts ``python -m oneforcing studio`` (the demo model unless ``--model``) on a free loopback port and plays a page
that shows every frame at once (so the figure is what the server can deliver, not the video's 16 fps). ``--prompts``
prompt changes and ``--rewinds`` rewinds (each to the middle of what is kept, with a new prompt) come at even
intervals; the latency of each is measured from the control message sent to the first frame made under it.

    python benchmarks/studio_benchmark.py --duration 600 --json benchmarks/results/studio_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import aiohttp

from oneforcing.studio.protocol import read_frame_message  # imported before any timing (the package is heavy)

PROMPTS = ["a yellow circle moves right on a black background", "a red square moves left", "a blue circle grows",
           "a green triangle moves up", "a white square moves down on a black background"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


class Client:
    """A page that shows every frame at once, acknowledging it, and times the control messages it sends."""

    def __init__(self, ws, pid: int):
        self.ws, self.pid = ws, pid
        self.branch, self.frames, self.delivered = 0, 0, []  # (time, frames so far)
        self.kept, self.block_ms, self.latencies, self.rss = [], [], [], []
        self.waiting: tuple[str, float, int | None] | None = None  # (kind, sent at, first frame made under it)
        self.errors = []

    async def send(self, kind: str, **message) -> None:
        self.waiting = (kind, time.perf_counter(), None)
        await self.ws.send_json({"type": kind, **message})

    def on_event(self, event: dict) -> None:
        if event["type"] == "branch":
            self.branch = event["id"]
            if self.waiting is not None:  # the switch (or the fork) lands at the branch's next frame
                start = sum(b["frames"] for b in event["blocks"])
                self.waiting = (*self.waiting[:2], start)
        elif event["type"] == "snapshots":
            self.kept = event["kept_blocks"]
        elif event["type"] == "stats":
            self.block_ms.append(event["block_ms"])
        elif event["type"] == "error":
            self.errors.append(event)

    async def on_frame(self, branch: int, frame: int) -> None:
        self.frames += 1
        await self.ws.send_json({"type": "played", "branch": branch, "frame": frame})
        if self.waiting and self.waiting[2] is not None and branch == self.branch and frame >= self.waiting[2]:
            kind, sent, _ = self.waiting
            self.latencies.append({"kind": kind, "ms": (time.perf_counter() - sent) * 1e3})
            self.waiting = None

    async def pump(self, until: float) -> None:
        while time.perf_counter() < until:
            try:
                message = await self.ws.receive(timeout=max(until - time.perf_counter(), 0.01))
            except asyncio.TimeoutError:
                return
            if message.type == aiohttp.WSMsgType.BINARY:
                branch, frame, _, _ = read_frame_message(message.data)
                await self.on_frame(branch, frame)
            elif message.type == aiohttp.WSMsgType.TEXT:
                self.on_event(json.loads(message.data))
            else:
                raise RuntimeError(f"the studio closed the connection: {message}")


async def session(url: str, pid: int, args) -> Client:
    actions = args.prompts + args.rewinds
    every = max(actions // max(args.rewinds, 1), 1)
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws", max_msg_size=0) as ws:
        client = Client(ws, pid)
        start = time.perf_counter()
        await client.send("restart", seed=0, prompt=PROMPTS[0])
        next_sample, action = start, 0
        while time.perf_counter() - start < args.duration:
            now = time.perf_counter()
            if now >= next_sample:
                client.rss.append({"s": round(now - start, 1), "rss_mb": round(rss_mb(pid), 1)})
                client.delivered.append((now - start, client.frames))
                next_sample += args.sample_every
            due = start + args.duration * (action + 1) / (actions + 1)
            if action < actions and now >= due and client.waiting is None:
                prompt = PROMPTS[(action + 1) % len(PROMPTS)] + f" ({action})"
                if (action + 1) % every == 0 and client.kept and action // every < args.rewinds:
                    await client.send("rewind", block=client.kept[len(client.kept) // 2], prompt=prompt)
                else:
                    await client.send("prompt", text=prompt)
                action += 1
            until = min(next_sample, due if action < actions else next_sample, start + args.duration)
            await client.pump(max(until, time.perf_counter() + 0.05))  # an action held back still lets frames in
        return client


def summary(client: Client, args, seconds: float) -> dict:
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(client.delivered, client.delivered[1:])]
    rss = [r["rss_mb"] for r in client.rss]
    latencies = {kind: [round(x["ms"], 1) for x in client.latencies if x["kind"] == kind] for kind in
                 ("prompt", "rewind")}
    tail = rss[len(rss) // 4:]
    return {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "python": platform.python_version(), "torch": _version("torch")},
        "settings": {"duration_s": args.duration, "prompts": args.prompts, "rewinds": args.rewinds,
                     "studio_args": args.studio_args},
        "frames_delivered": client.frames,
        "frames_per_s_delivered": round(client.frames / seconds, 2),
        "frames_per_s_per_interval": [round(r, 2) for r in rates],
        "block_ms_median": round(statistics.median(client.block_ms), 1) if client.block_ms else None,
        "latency_ms": latencies,
        "latency_ms_median": {k: (round(statistics.median(v), 1) if v else None) for k, v in latencies.items()},
        "rss_mb": client.rss,
        "rss_mb_after_first_quarter": {"min": min(tail), "max": max(tail)} if tail else None,
        "errors": client.errors,
    }


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of session")
    parser.add_argument("--prompts", type=int, default=20, help="prompt changes over the session")
    parser.add_argument("--rewinds", type=int, default=5, help="rewinds over the session")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between RSS / throughput samples")
    parser.add_argument("--studio-args", default="--history-mb 64 --snapshot-mb 256",
                        help="arguments of `oneforcing studio` (model, size, budgets)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, "-m", "oneforcing", "studio", "--port", "0", *args.studio_args.split()],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("studio: open "):
            raise SystemExit(f"the studio did not start: {line!r}")
        started = time.perf_counter()
        client = asyncio.run(session(line.split("open ", 1)[1].strip(), server.pid, args))
        result = summary(client, args, time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(60)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_mb", "frames_per_s_per_interval")},
                     indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
