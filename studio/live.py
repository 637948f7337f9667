"""One studio connection's video: a thread drives a :class:`~..pipelines.session.GenerationSession` block by block.

The session is the pipeline's own (``OneForcingPipeline.new_session``, what ``stream(num_frames=None)`` drives:
block-by-block noise from a CPU generator, a rolling KV cache), so a branch's frames are those of ``oneforcing
generate --num-frames endless`` with the branch's prompt schedule and seed. Control messages become commands the
thread applies between blocks; frames and events go out through ``emit`` (called from the thread). Generation waits
while the page is more than ``ahead_blocks`` blocks behind (back-pressure) or paused.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch

from ..pipelines.block_steps import PromptHandle
from ..pipelines.layout import video_frame_of_latent
from ..pipelines.pipeline_one_forcing import GenerationRequest
from ..pipelines.video_io import to_uint8_frames
from .export import reproduce_command
from .protocol import Control, frame_message
from .timeline import BlockRecord, SnapshotStore, Take


@dataclass(frozen=True)
class StudioSettings:
    """What every connection's video is made with. ``timesteps``: (denoising_timesteps, first_block_timesteps) of
    the CLI's preset ``timesteps_name``; ``ahead_blocks``: how far generation may run ahead of what the page has
    shown; ``snapshot_blocks`` / ``snapshot_mb``: the block boundaries kept for rewinding; ``history_mb``: frames
    kept for the mp4 download."""

    height: int
    width: int
    frames_per_block: int | None = None
    timesteps_name: str = "one-step"
    timesteps: tuple = ([1000], None)
    fps: int = 16
    ahead_blocks: int = 4
    snapshot_blocks: int = 32
    snapshot_mb: float = 512.0
    history_mb: float = 512.0
    max_prompt_chars: int = 400
    jpeg_quality: int = 90

    def cli_flags(self) -> list[str]:
        """The ``oneforcing generate`` flags that make the same video."""
        flags = [f"--fps {self.fps}", f"--timesteps {self.timesteps_name}"]
        return flags + ([f"--frames-per-block {self.frames_per_block}"] if self.frames_per_block else [])


class LiveSession:
    """The video of one connection. ``emit(item)`` receives events (dicts) and frame messages (bytes) from the
    generation thread; ``model_lock`` serialises model work between connections (they share the pipeline)."""

    def __init__(self, pipe, settings: StudioSettings, emit: Callable[[dict | bytes], None],
                 model_lock: threading.Lock):
        self.pipe, self.settings, self.emit, self.model_lock = pipe, settings, emit, model_lock
        self.store = SnapshotStore(settings.snapshot_blocks, int(settings.snapshot_mb * 2**20))
        self.take: Take | None = None
        self.session = self.decoder = None
        self._commands: deque[tuple[Control, float]] = deque()
        self._wake = threading.Condition()
        self._paused = self._stopped = self._stalled = False
        self._branch, self._played = None, 0  # the branch the page is shown and its frames shown (under _wake)
        self._switch_asked: float | None = None  # when the prompt change not yet seen in a frame was asked
        self._thread = threading.Thread(target=self._run, name="studio-session", daemon=True)
        self._made, self._started = 0, time.perf_counter()

    # -- from the event loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def command(self, control: Control) -> None:
        """Apply a control message: ``played``/``pause``/``resume`` at once, the others between two blocks."""
        with self._wake:
            if control.type == "played":
                if control.branch == self._branch:
                    self._played = max(self._played, control.frame + 1)
            elif control.type in ("pause", "resume"):
                self._paused = control.type == "pause"
                self.emit({"type": "paused", "paused": self._paused})
            else:
                self._commands.append((control, time.perf_counter()))
            self._wake.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread and drop the video's state (KV caches, snapshots, frames)."""
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.store.clear()
        self.take = self.session = self.decoder = None

    # -- the generation thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                control = self._next_work()
                if control is None:
                    return
                with self.model_lock, torch.no_grad():
                    if control is _MAKE_BLOCK:
                        self._make_block()
                    else:
                        self._apply(*control)
        except Exception as error:  # the page says what went wrong; the connection stays open
            self.emit({"type": "error", "code": "generation_failed", "message": f"generation stopped: {error}"})

    def _next_work(self):
        """The next command, or :data:`_MAKE_BLOCK` when a block may be made; None once stopped."""
        with self._wake:
            while True:
                if self._stopped:
                    return None
                if self._commands:
                    return self._commands.popleft()
                if self._may_generate():
                    return _MAKE_BLOCK
                self._wake.wait()

    def _may_generate(self) -> bool:
        if self.take is None or self._paused or self._stalled:
            return False
        ahead = self.take.current.frame_count - self._played
        return ahead < self.settings.ahead_blocks * self._frames_per_block()

    def _frames_per_block(self) -> int:
        size = self.settings.frames_per_block or self.pipe.transformer.config.frames_per_block
        return size * self.pipe.vae_scale_factor_temporal

    def _apply(self, control: Control, asked: float) -> None:
        if control.type == "restart":
            self._restart(control.seed, control.text)
        elif control.type == "prompt":
            self._switch_prompt(control.text, asked)
        elif control.type == "rewind":
            self._rewind(control.block, control.text, asked)
        elif control.type == "select":
            self._select(control.branch)

    def _restart(self, seed: int, prompt: str) -> None:
        s = self.settings
        self.session = self.decoder = None
        self.store.clear()
        request = GenerationRequest(prompt=prompt, num_frames=None, height=s.height, width=s.width,
                                    frames_per_block=s.frames_per_block, denoising_timesteps=s.timesteps[0],
                                    first_block_timesteps=s.timesteps[1],
                                    generator=torch.Generator("cpu").manual_seed(seed))
        self.session, self.decoder = self.pipe.new_session(request), self.pipe.streaming_decoder()
        self.take = Take(seed, prompt, int(s.history_mb * 2**20))
        self.store.put(self.take.root, self._state())
        self._follow(self.take.current)
        self._switch_asked = None
        self._made, self._started = 0, time.perf_counter()
        self.emit({"type": "take", "seed": seed, "prompt": prompt, "fps": s.fps, "height": s.height,
                   "width": s.width, "command": reproduce_command(seed, s.height, s.width, s.cli_flags())})
        self._emit_branch()

    def _follow(self, branch, stalled: bool = False) -> None:
        """The page now plays ``branch`` from its end (``stalled``: it cannot go on)."""
        with self._wake:
            self._branch, self._played, self._stalled = branch.id, branch.frame_count, stalled

    def _state(self):
        return self.session.snapshot(), self.decoder.snapshot()

    def _encode(self, text: str) -> PromptHandle:
        """The prompt's embeddings as ``stream`` encodes them (the model's prompt length, its dtype)."""
        return PromptHandle(self.pipe.encode_prompt(text, dtype=self.pipe.transformer.dtype))

    def _switch_prompt(self, text: str, asked: float | None) -> None:
        """``text`` drives the current branch from its next block on (nothing happens if it drives it already)."""
        if self.take is None:
            return self._refuse("bad_message", "start a video first (restart)")
        branch = self.take.current
        if text == branch.prompt_of(len(branch.records)):
            return
        self.session.set_prompt(self._encode(text))
        branch.switch_prompt(branch.frame_count, text)
        self._switch_asked = asked
        self._emit_branch()

    def _rewind(self, block: int, text: str | None, asked: float) -> None:
        """Back to the start of ``block`` of the current branch, continued as a new branch."""
        if self.take is None:
            return self._refuse("bad_message", "start a video first (restart)")
        branch = self.take.current
        if block > len(branch.records):
            return self._refuse("rewind_not_kept", f"block {block} has not been made yet (the branch has "
                                                   f"{len(branch.records)} blocks)")
        state = self.store.get(self.take.boundary_key(branch, block))
        if state is None:
            kept = self._kept_blocks()
            return self._refuse("rewind_not_kept", f"cannot rewind to block {block}: its state is no longer kept "
                                                   f"(the earliest kept is block {kept[0] if kept else '-'}; "
                                                   "the snapshot budget is shown under the timeline)")
        self.session.restore(state[0])
        self.decoder.restore(state[1])
        forked = self.take.fork(block)
        self._follow(forked)
        if text is not None and text != forked.prompt_of(block):
            self.session.set_prompt(self._encode(text))
            forked.switch_prompt(forked.frame_count, text)
            self._switch_asked = asked
        self._emit_branch()

    def _select(self, branch_id: int) -> None:
        """Continue an earlier branch from its end (if its end state is still kept)."""
        branch = None if self.take is None else self.take.branch(branch_id)
        if branch is None:
            return self._refuse("unknown_branch", f"there is no branch {branch_id}")
        self.take.current = branch
        state = self.store.get(self.take.boundary_key(branch, len(branch.records)))
        self._follow(branch, stalled=state is None)
        if state is not None:
            self.session.restore(state[0])
            self.decoder.restore(state[1])
        else:
            self._refuse("rewind_not_kept", f"branch {branch_id} cannot go on: its end state is no longer kept "
                                            "(rewind into it, or download it)")
        self._emit_branch()

    def _make_block(self) -> None:
        branch, started = self.take.current, time.perf_counter()
        block = self.session.next_block()
        video = self.decoder.decode_block(block.latents.to(self.pipe.decode_dtype))
        frames = to_uint8_frames(self.pipe.video_processor.postprocess_video(video.float(), output_type="np")[0])
        first = branch.frame_count
        record = BlockRecord(block.index, first, len(frames), branch.prompt_of(len(branch.records)), frames)
        self.take.add_block(record)
        self.store.put(record, self._state())
        seconds = time.perf_counter() - started
        self._made += len(frames)
        self.emit({"type": "block", "branch": branch.id, "index": block.index, "first_frame": first,
                   "frames": len(frames), "prompt": record.prompt,
                   "latent_frame": block.start_frame, "video_frame": video_frame_of_latent(block.start_frame)})
        for offset, frame in enumerate(frames):
            ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(frame[:, :, ::-1]),
                                    [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality])
            self.emit(frame_message(branch.id, first + offset, len(branch.records) - 1, jpeg.tobytes()))
        self._emit_stats(seconds)

    def _emit_stats(self, block_seconds: float) -> None:
        latency = None
        if self._switch_asked is not None:
            latency, self._switch_asked = time.perf_counter() - self._switch_asked, None
        made = self._made / max(time.perf_counter() - self._started, 1e-9)
        self.emit({"type": "stats", "frames_per_second": made, "block_ms": block_seconds * 1e3,
                   "prompt_latency_ms": None if latency is None else latency * 1e3})
        self._emit_snapshots()

    def _kept_blocks(self) -> list[int]:
        """The blocks of the current branch whose start can be rewound to."""
        branch = self.take.current
        return [b for b in range(len(branch.records) + 1) if self.take.boundary_key(branch, b) in self.store]

    def _emit_snapshots(self) -> None:
        first_kept = self.take.current.first_kept_frame
        self.emit({"type": "snapshots", "kept_blocks": self._kept_blocks(), "count": len(self.store),
                   "max_count": self.store.count, "bytes": self.store.bytes, "budget_bytes": self.store.budget,
                   "history_bytes": self.take.history_bytes, "history_budget_bytes": self.take.history_budget,
                   "first_kept_frame": first_kept})

    def _emit_branch(self) -> None:
        take, branch = self.take, self.take.current
        self.emit({"type": "branch", "id": branch.id, "parent": branch.parent, "fork_frame": branch.fork_frame,
                   "prompts": [{"frame": f, "prompt": t} for f, t in branch.prompts],
                   "blocks": [{"index": i, "first_frame": r.first_frame, "frames": r.frame_count}
                              for i, r in enumerate(branch.records)],
                   "branches": [{"id": b.id, "parent": b.parent, "fork_frame": b.fork_frame,
                                 "frames": b.frame_count} for b in take.branches]})
        self._emit_snapshots()

    def _refuse(self, code: str, message: str) -> None:
        self.emit({"type": "error", "code": code, "message": message})


_MAKE_BLOCK = object()
