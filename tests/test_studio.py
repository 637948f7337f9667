"""The live studio's server over a real loopback socket (aiohttp's client), with the bundled demo model.

Frames arrive and change; a prompt changes the frames after its block and not before (against a run without the
switch, same seed); a rewind branches with the frames before it shared; downloads open in OpenCV and the schedule
reproduces the branch through ``oneforcing generate`` (decoded mp4 frames equal, and the server's uncompressed frames
equal an endless ``stream`` bit for bit) and through the ComfyUI nodes fed the schedule JSON; bad control messages
get clear errors while the stream goes on; back-pressure, the session limit and the release of a closed page's state.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

aiohttp = pytest.importorskip("aiohttp", reason="the studio needs aiohttp (the 'studio' extra)")
from aiohttp import web  # noqa: E402

from oneforcing import DEMO_MODEL_DIR, OneForcingPipeline  # noqa: E402
from oneforcing.pipelines.video_io import read_video_frames  # noqa: E402
from oneforcing.studio.export import read_comment, with_comment  # noqa: E402
from oneforcing.studio.live import StudioSettings  # noqa: E402
from oneforcing.studio.protocol import ControlError, parse_control, read_frame_message  # noqa: E402
from oneforcing.studio.server import Studio, is_loopback  # noqa: E402
from oneforcing.studio.timeline import Branch, SnapshotStore  # noqa: E402

# the demo model's recorded (trained) size: smaller frames hold too little of the object to show a prompt switch
SIZE = OneForcingPipeline.load_config(DEMO_MODEL_DIR)["default_video_size"]["height"]
SETTINGS = StudioSettings(height=SIZE, width=SIZE, ahead_blocks=3)
CAT, DOG = "a yellow circle moves right on a black background", "a red square moves left"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    pipe = OneForcingPipeline.from_pretrained(DEMO_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Running:
    """A studio served on a free loopback port by its own event loop in a thread."""

    def __init__(self, studio: Studio):
        self.studio, self.loop = studio, asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(30)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.studio.app())
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/"
        started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(pipe):
    running = Running(Studio(pipe, SETTINGS, max_sessions=3))
    yield running
    running.stop()


class Page:
    """A page's side of the socket: control messages out, events and frames in, frames acknowledged as shown."""

    def __init__(self, ws, ack: bool = True):
        self.ws, self.ack = ws, ack
        self.events: list[dict] = []
        self.frames: dict[int, dict[int, bytes]] = {}  # branch -> video frame -> JPEG
        self.branch = None

    async def send(self, **message) -> None:
        await self.ws.send_json(message)

    async def receive(self, timeout: float = 60) -> dict | tuple:
        message = await self.ws.receive(timeout=timeout)
        if message.type == aiohttp.WSMsgType.BINARY:
            branch, frame, _, jpeg = read_frame_message(message.data)
            self.frames.setdefault(branch, {})[frame] = jpeg
            if self.ack and branch == self.branch:
                await self.send(type="played", branch=branch, frame=frame)
            return branch, frame
        assert message.type == aiohttp.WSMsgType.TEXT, message
        event = json.loads(message.data)
        self.events.append(event)
        if event["type"] == "branch":
            self.branch = event["id"]
        return event

    async def until(self, check, timeout: float = 120) -> dict | tuple:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = await self.receive(deadline - time.monotonic())
            if check(item):
                return item
        raise AssertionError("timed out")

    async def frames_of(self, branch: int, count: int) -> list[bytes]:
        """The branch's frames 0 .. count - 1 (waiting for them)."""
        def arrived(_) -> bool:
            return all(f in self.frames.get(branch, {}) for f in range(count))

        if not arrived(None):
            await self.until(arrived)
        return [self.frames[branch][f] for f in range(count)]

    async def quiet(self, seconds: float = 2.0) -> None:
        """Take what arrives until nothing has for ``seconds`` (a paused or held-back stream)."""
        while True:
            try:
                await self.receive(timeout=seconds)
            except asyncio.TimeoutError:
                return

    async def error(self) -> dict:
        return await self.until(lambda e: isinstance(e, dict) and e["type"] == "error", timeout=60)

    def last(self, kind: str) -> dict:
        return [e for e in self.events if e["type"] == kind][-1]


def on_page(server, scenario, ack: bool = True):
    """Run ``scenario(page, http, hello)`` against a new page of ``server``."""
    async def run():
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "ws") as ws:
            page = Page(ws, ack)
            hello = await page.receive()
            return await scenario(page, http, hello)

    return asyncio.run(run())


def decode(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


def test_frames_arrive_and_change(server):
    async def scenario(page, http, hello):
        assert hello["type"] == "hello" and (hello["height"], hello["width"], hello["fps"]) == (SIZE, SIZE, 16)
        await page.send(type="restart", seed=1, prompt=CAT)
        frames = [decode(f) for f in await page.frames_of(0, 13)]
        assert all(f.shape == (SIZE, SIZE, 3) for f in frames)
        assert len({f.tobytes() for f in frames}) > 6  # the video moves
        stats = page.last("stats")
        assert stats["frames_per_second"] > 0 and stats["block_ms"] > 0
        page_html = await (await http.get(server.url)).text()
        assert "studio.js" in page_html and (await http.get(server.url + "static/studio.js")).status == 200

    on_page(server, scenario)


def run_video(server, seed, frames, switch_after=None):
    """The JPEG frames 0 .. frames - 1 of a video from ``seed`` (prompt CAT), switched to DOG once ``switch_after``
    frames have arrived; returns (frames, the frame the switch took effect at)."""
    async def scenario(page, http, hello):
        await page.send(type="restart", seed=seed, prompt=CAT)
        if switch_after is not None:
            await page.frames_of(0, switch_after)
            await page.send(type="prompt", text=DOG)
        shown = await page.frames_of(0, frames)
        switches = [p["frame"] for p in page.last("branch")["prompts"] if p["prompt"] == DOG]
        return shown, (switches[0] if switches else None)

    return on_page(server, scenario)


def test_a_prompt_changes_the_frames_after_its_block_and_not_before(server):
    plain, _ = run_video(server, seed=7, frames=29)
    switched, at = run_video(server, seed=7, frames=29, switch_after=9)
    assert at is not None and 9 <= at < 29 and (at - 1) % 4 == 0  # a block start (frame-wise demo: 1 + 4k)
    assert switched[:at] == plain[:at]  # identical bytes before the switch
    differences = [np.abs(decode(a).astype(int) - decode(b).astype(int)).mean()
                   for a, b in zip(switched[at:], plain[at:])]
    assert min(differences) > 0 and max(differences) > 2


def test_rewind_branches_with_the_frames_before_it_shared(server):
    async def scenario(page, http, hello):
        await page.send(type="restart", seed=4, prompt=CAT)
        original = await page.frames_of(0, 25)
        await page.send(type="rewind", block=3, prompt=DOG)  # block 3 starts at frame 9
        await page.until(lambda e: isinstance(e, dict) and e["type"] == "branch" and e["id"] == 1)
        branch = page.last("branch")
        assert branch["parent"] == 0 and branch["fork_frame"] == 9
        assert [p["frame"] for p in branch["prompts"]] == [0, 9]
        assert [b["id"] for b in branch["branches"]] == [0, 1]
        await page.until(lambda item: isinstance(item, tuple) and item == (1, 20))
        take = server.studio.sessions[hello["token"]].take
        first, kept = take.branches[1].kept_frames()
        _, parent = take.branches[0].kept_frames()
        assert first == 0 and np.array_equal(kept[:9], parent[:9])  # shared before the rewind point
        assert not np.array_equal(kept[9:17], parent[9:17])  # another prompt after it
        new = [page.frames[1][f] for f in range(9, 21)]
        assert new != original[9:21]
        # rewinding again with the prompt in force there gives the original frames back: the state is exact
        await page.send(type="rewind", block=3, prompt=CAT)
        await page.until(lambda item: isinstance(item, tuple) and item == (2, 24))
        assert [page.frames[2][f] for f in range(9, 25)] == original[9:25]
        # an earlier branch stays selectable, and goes on from its end
        await page.send(type="select", branch=1)
        selected = await page.until(lambda e: isinstance(e, dict) and e["type"] == "branch" and e["id"] == 1)
        end = sum(block["frames"] for block in selected["blocks"])
        await page.until(lambda item: item == (1, end))  # its next frame

    on_page(server, scenario)


def test_downloads_and_the_schedule_reproduce_the_branch_through_the_cli(server, pipe, tmp_path):
    async def scenario(page, http, hello):
        await page.send(type="restart", seed=11, prompt=CAT)
        await page.frames_of(0, 13)
        await page.send(type="rewind", block=2, prompt=DOG)  # block 2 starts at frame 5
        await page.until(lambda item: isinstance(item, tuple) and item[0] == 1 and item[1] >= 20)
        await page.send(type="pause")
        await page.until(lambda e: isinstance(e, dict) and e["type"] == "paused")
        await page.quiet()  # a block under way when the pause came finishes
        base = f"{server.url}download/{hello['token']}/1/"
        mp4, schedule = [await (await http.get(base + name)).read() for name in ("branch.mp4", "schedule.json")]
        missing = await http.get(f"{server.url}download/{hello['token']}/9/branch.mp4")
        assert missing.status == 404
        take = server.studio.sessions[hello["token"]].take
        return mp4, schedule, take.branches[1].kept_frames()[1], page.last("take")["command"]

    mp4, schedule, raw, command = on_page(server, scenario)
    (tmp_path / "studio.mp4").write_bytes(mp4)
    (tmp_path / "schedule.json").write_bytes(schedule)
    ranges = json.loads(schedule)
    assert [(r["start"], r["prompt"]) for r in ranges] == [(0, CAT), (5, DOG)] and ranges[-1]["end"] == len(raw)
    studio_frames = read_video_frames(tmp_path / "studio.mp4")
    assert len(studio_frames) == len(raw)  # the frames shown, all of them
    metadata = json.loads(read_comment(mp4))
    assert metadata["prompt_schedule"] == ranges and metadata["seed"] == 11

    # the command the page shows, run as a user would (from the folder holding schedule.json)
    assert command.startswith("oneforcing generate ")
    arguments = command.split()[1:]
    subprocess.run([sys.executable, "-m", "oneforcing", *arguments], cwd=tmp_path, check=True, capture_output=True,
                   timeout=300, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    cli_frames = read_video_frames(tmp_path / "branch.mp4")
    assert len(cli_frames) == len(raw) and np.array_equal(cli_frames, studio_frames)

    # uncompressed: the server's frames are those of the endless stream the CLI runs, bit for bit
    stream = pipe.stream(num_frames=None, height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(11),
                         prompt_schedule=[(0, CAT), (5, DOG)], denoising_timesteps=[1000])
    made = []
    for frames in stream:
        made.append((frames[0] * 255).round().clip(0, 255).astype("uint8"))
        if sum(len(m) for m in made) >= len(raw):
            break
    stream.close()
    assert np.array_equal(np.concatenate(made)[: len(raw)], raw)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes' CPU policy and the stream below on the same thread count: one sum order
    try:
        comfyui_nodes_reproduce_the_branch(pipe, schedule, raw)
    finally:
        torch.set_num_threads(before)


def comfyui_nodes_reproduce_the_branch(pipe, schedule: bytes, raw: np.ndarray) -> None:
    """The ComfyUI graph fed the downloaded schedule JSON (rollout noise per block, length = the schedule's end) makes
    the endless stream's latents bit for bit, and its decode is the branch's frames (to one level of 255: the studio
    made them on another thread count, which changes the float sums' order)."""
    from oneforcing.nodes.definitions import OneForcingDecode, OneForcingModelLoader, OneForcingPromptSchedule
    from oneforcing.nodes.definitions import OneForcingRollout
    from oneforcing.nodes.folders import BUNDLED_DEMO
    from oneforcing.nodes.latents import to_raw
    from oneforcing.nodes.sampling import BLOCK_NOISE

    model, = OneForcingModelLoader.execute(BUNDLED_DEMO, "default", "auto")
    cond, = OneForcingPromptSchedule.execute(BUNDLED_DEMO, schedule.decode(), "default")
    latent, = OneForcingRollout.execute(model, cond, 11, SIZE, SIZE, len(raw), 0, "one step", noise=BLOCK_NOISE)
    stream = pipe.stream(num_frames=None, height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(11),
                         prompt_schedule=[(0, CAT), (5, DOG)], denoising_timesteps=[1000], output_type="latent")
    made = []
    for latents in stream:
        made.append(latents)
        if sum(m.shape[2] for m in made) >= latent["samples"].shape[2]:
            break
    stream.close()
    expected = torch.cat(made, dim=2)[:, :, : latent["samples"].shape[2]]
    assert torch.equal(latent["samples"], to_raw(expected, model.latents_mean, model.latents_std))
    images, = OneForcingDecode.execute(latent, BUNDLED_DEMO)
    frames = (images.numpy() * 255).round().clip(0, 255).astype("uint8")
    assert frames.shape == raw.shape and np.abs(frames.astype(int) - raw.astype(int)).max() <= 1


def test_bad_control_messages_get_clear_errors_and_the_stream_goes_on(server):
    async def scenario(page, http, hello):
        await page.send(type="restart", seed=2, prompt=CAT)
        await page.frames_of(0, 5)
        codes = []
        for raw in ["not json", json.dumps({"type": "fly"}), json.dumps({"type": "prompt", "text": "   "}),
                    json.dumps({"type": "prompt", "text": "x" * 1000}), json.dumps({"type": "rewind", "block": -1}),
                    json.dumps({"type": "rewind", "block": 500}), json.dumps({"type": "select", "branch": 7}),
                    json.dumps({"type": "prompt", "text": "a", "extra": 1})]:
            await page.ws.send_str(raw)
            error = await page.error()
            codes.append(error["code"])
            assert error["message"]
        await page.ws.send_bytes(b"\x00")
        codes.append((await page.error())["code"])
        assert codes == ["bad_message", "bad_message", "empty_prompt", "prompt_too_long", "bad_message",
                         "rewind_not_kept", "unknown_branch", "bad_message", "bad_message"]
        seen = len(page.frames[0])
        await page.until(lambda item: isinstance(item, tuple) and len(page.frames[0]) > seen + 4)  # still running

    on_page(server, scenario)


def test_generation_waits_for_a_page_that_falls_behind(server):
    async def scenario(page, http, hello):
        await page.send(type="restart", seed=3, prompt=CAT)
        await page.frames_of(0, 1)
        await page.quiet()
        held = len(page.frames[0])
        assert held <= 1 + 4 * SETTINGS.ahead_blocks  # the first block plus at most ahead_blocks more
        await page.send(type="played", branch=0, frame=held - 1)  # the page catches up: generation goes on
        await page.until(lambda item: isinstance(item, tuple) and item[1] >= held)

    on_page(server, scenario, ack=False)


def test_session_limit_rewind_budget_and_release_on_close(pipe):
    settings = StudioSettings(height=SIZE, width=SIZE, ahead_blocks=2, snapshot_blocks=3)
    running = Running(Studio(pipe, settings, max_sessions=1))
    try:
        async def run():
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(running.url + "ws")
                page = Page(ws)
                hello = await page.receive()
                await page.send(type="restart", seed=5, prompt=CAT)
                await page.frames_of(0, 21)
                async with http.ws_connect(running.url + "ws") as second:  # one page too many
                    refused = await second.receive_json(timeout=30)
                    assert refused["code"] == "too_many_sessions" and "--max-sessions" in refused["message"]
                    assert (await second.receive(timeout=30)).type == aiohttp.WSMsgType.CLOSE
                await page.send(type="rewind", block=1)
                error = await page.error()
                assert error["code"] == "rewind_not_kept" and "no longer kept" in error["message"]
                snapshots = page.last("snapshots")
                assert snapshots["count"] <= 3 and snapshots["bytes"] <= snapshots["budget_bytes"]
                live = running.studio.sessions[hello["token"]]
                watched = weakref.ref(live.session.kv_cache), weakref.ref(live.take)
                await ws.close()
                return watched

        cache, take = asyncio.run(run())
        deadline = time.monotonic() + 30
        while running.studio.sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        gc.collect()
        assert not running.studio.sessions and cache() is None and take() is None  # the page's memory is freed
    finally:
        running.stop()


def test_control_messages_are_validated():
    message = parse_control(json.dumps({"type": "rewind", "block": 2, "prompt": "  a dog "}), 40)
    assert (message.type, message.block, message.text) == ("rewind", 2, "a dog")
    assert parse_control('{"type": "restart", "seed": 18446744073709551615, "prompt": "x"}', 40).seed == 2**64 - 1
    for bad, code in [('{"type": "restart", "seed": true, "prompt": "x"}', "bad_message"),
                      ('{"type": "restart", "prompt": "x"}', "bad_message"), ("[1]", "bad_message"),
                      ('{"type": "prompt", "text": 3}', "empty_prompt"),
                      ('{"type": "played", "branch": 0, "frame": 1.5}', "bad_message")]:
        with pytest.raises(ControlError) as error:
            parse_control(bad, 40)
        assert error.value.code == code


def test_branch_schedule_and_snapshot_budget():
    branch = Branch(0, None, 0, prompts=[(0, "a")])
    branch.switch_prompt(5, "b")
    branch.switch_prompt(5, "c")  # a later switch at the same frame replaces it
    branch.switch_prompt(9, "c")  # the prompt in force: no switch
    assert branch.prompts == [(0, "a"), (5, "c")]
    store = SnapshotStore(count=3, budget=3 * 4096)
    for key in range(5):
        store.put(key, [torch.zeros(1024)])  # 4096 bytes each
    assert len(store) == 3 and 0 not in store and 4 in store and store.bytes == 3 * 4096
    store.put("big", [torch.zeros(10_000)])  # alone over the budget: not kept
    assert "big" not in store and store.bytes <= store.budget


def test_mp4_comment_round_trip(tmp_path):
    from oneforcing.studio.export import branch_mp4

    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    data = branch_mp4(frames, 16, '{"prompt": "a cat ✓"}')
    assert read_comment(data) == '{"prompt": "a cat ✓"}'
    assert read_comment(with_comment(data, "again")) == "again"  # replaced, not added twice
    (tmp_path / "x.mp4").write_bytes(data)
    assert len(read_video_frames(tmp_path / "x.mp4")) == 5


def test_the_command_serves_on_loopback_and_warns_otherwise():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    process = subprocess.Popen([sys.executable, "-m", "oneforcing", "studio", "--host", "0.0.0.0", "--port", "0",
                                "--height", "32", "--width", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT.parent)
    try:
        line = process.stdout.readline()
        assert line.startswith("studio: open http://0.0.0.0:")
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
    assert "warning: listening on 0.0.0.0, not loopback" in errors


def test_the_page_ships_with_a_regular_install():
    """pyproject's package data covers every file of the page, so a non-editable install serves it too."""
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "oneforcing.studio" in config["packages"]
    patterns = config["package-data"]["oneforcing.studio"]
    files = [p.relative_to(ROOT / "studio").as_posix() for p in (ROOT / "studio" / "static").iterdir()]
    assert {"static/index.html", "static/studio.js", "static/studio.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
