"""The live studio as a person uses it: headless Chromium (Playwright) on ``oneforcing studio`` with the demo model.

The page loads and plays frames that change; a typed prompt changes the video after its block and not before (the
mp4 downloads of a run with the switch and of a restart with the same seed and no switch); clicking a block boundary
rewinds and branches, sharing the frames before it; the mp4 download opens in OpenCV with every frame of the branch;
bad input and a page too many get clear messages. Screenshots of each step go to ``STUDIO_SCREENSHOTS`` (default: a
temporary folder). Skipped when there is no Chromium (``CHROMIUM``, default ``/usr/bin/chromium``; Playwright drives
it and never downloads one) or no aiohttp.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oneforcing.pipelines.video_io import read_video_frames

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (set CHROMIUM)")
pytest.importorskip("aiohttp", reason="the studio needs aiohttp (the 'studio' extra)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST, SECOND = "a yellow circle moves right on a black background", "a red square moves left"


@pytest.fixture(scope="module")
def studio_url():
    process = subprocess.Popen([sys.executable, "-m", "oneforcing", "studio", "--port", "0", "--max-sessions", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("studio: open http://127.0.0.1:"), line
        yield line.split("open ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("studio_screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def frames_shown(tab, count: int) -> None:
    tab.wait_for_function(f"window.studio.shown >= {count}", timeout=120_000)


def canvas(tab) -> str:
    return tab.evaluate("document.getElementById('video').toDataURL('image/png')")


def settle(tab) -> int:
    """Pause, wait until no block arrives any more, and return the branch's frame count."""
    if not tab.evaluate("window.studio.paused"):
        tab.click("#pause")
        tab.wait_for_function("window.studio.paused")
    count = -1
    while True:
        tab.wait_for_timeout(1500)
        now = tab.evaluate("window.studio.blocks.reduce((n, b) => n + b.frames, 0)")
        if now == count:
            return count
        count = now


def download(tab, selector: str, path: Path) -> Path:
    with tab.expect_download() as info:
        tab.click(selector)
    info.value.save_as(path)
    return path


def test_watch_steer_rewind_and_download(studio_url, browser, shots, tmp_path):
    tab = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    tab.goto(studio_url)
    frames_shown(tab, 8)
    first = canvas(tab)
    frames_shown(tab, 16)
    assert canvas(tab) != first  # the picture moves
    tab.screenshot(path=shots / "01-playing.png")

    # a typed prompt: marked on the timeline where it starts, with its latency
    tab.fill("#prompt", SECOND)
    tab.click("#send-prompt")
    tab.wait_for_function("window.studio.prompts.length === 2", timeout=60_000)
    switch = tab.evaluate("window.studio.prompts[1].frame")
    tab.wait_for_function(f"window.studio.lastFrame >= {switch + 8}", timeout=120_000)
    assert tab.locator("#timeline .prompt-mark").count() == 2
    assert tab.locator("#latency-ms").inner_text() != "–"
    tab.screenshot(path=shots / "02-prompt-changed.png")
    length = settle(tab)
    switched = read_video_frames(download(tab, "#download-mp4", tmp_path / "switched.mp4"))
    assert len(switched) == length  # every frame of the branch

    # rewind: click the boundary of block 3 (frame 9) with another prompt -> branch 1
    tab.click("#pause")
    tab.fill("#prompt", FIRST + " fast")
    tab.click('#timeline .tick[data-block="3"]')
    tab.wait_for_function("window.studio.branch === 1", timeout=60_000)
    tab.wait_for_function("window.studio.lastFrame >= 24", timeout=120_000)
    assert tab.locator("#branch option").count() == 2
    tab.screenshot(path=shots / "03-branched.png")
    settle(tab)
    branch = read_video_frames(download(tab, "#download-mp4", tmp_path / "branch.mp4"))
    assert np.array_equal(branch[:9], switched[:9]) and not np.array_equal(branch[9:13], switched[9:13])

    # the same seed without the switch: the frames before the switch are the same, those after are not
    tab.fill("#prompt", FIRST)
    tab.click("#pause")  # resume, then restart with seed 0
    tab.click("#restart")
    tab.wait_for_function(f"window.studio.branch === 0 && window.studio.lastFrame >= {switch + 8}",
                          timeout=120_000)
    settle(tab)
    plain = read_video_frames(download(tab, "#download-mp4", tmp_path / "plain.mp4"))
    assert np.array_equal(plain[:switch], switched[:switch])
    assert not np.array_equal(plain[switch:switch + 4], switched[switch:switch + 4])

    # bad input: a clear message, and the video goes on
    tab.click("#pause")
    tab.fill("#prompt", "   ")
    tab.click("#send-prompt")
    tab.wait_for_selector("#message:not([hidden])")
    assert "prompt is empty" in tab.inner_text("#message")
    tab.screenshot(path=shots / "04-empty-prompt.png")
    tab.fill("#prompt", "a" * 1000)
    tab.click("#send-prompt")
    tab.wait_for_function("document.getElementById('message').textContent.includes('at most')")
    shown = tab.evaluate("window.studio.shown")
    frames_shown(tab, shown + 8)

    # a second page beyond --max-sessions 1 is told so
    extra = browser.new_page(viewport={"width": 1280, "height": 800})
    extra.goto(studio_url)
    extra.wait_for_selector("#message:not([hidden])", timeout=30_000)
    assert "already serves 1 pages" in extra.inner_text("#message")
    extra.screenshot(path=shots / "05-too-many-sessions.png")
    extra.close()
    tab.close()
