"""The shipped workflows as a ComfyUI user meets them: headless Chromium on ComfyUI's own frontend.

Runs when ``COMFYUI_ROOT`` points at a ComfyUI checkout (started as in ``test_comfyui_server.py``, with none of the
downloads in its model folders) and a Chromium is installed (``CHROMIUM``, default ``/usr/bin/chromium``; Playwright
drives it and never downloads a browser). For each workflow it opens the Templates browser, checks the card's title and
thumbnail, loads the workflow from it, checks that no two nodes overlap as the frontend lays them out, presses Run and
waits for the video in Save Video (and checks the overlaps again: nodes showing previews grow). The workflow that needs downloads must instead raise the Missing Models dialog
listing every model, and Run must be refused naming them. Screenshots (loaded, after Run) go to
``COMFYUI_SCREENSHOTS`` (default: a temporary folder); the committed thumbnails ``workflows/<title>.jpg`` come from
there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_comfyui_server import COMFYUI_ROOT, Server, build_base
from test_workflows import UI_FILES, declared_models, overlapping

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not COMFYUI_ROOT or not CHROMIUM.is_file(),
                                reason="set COMFYUI_ROOT to a ComfyUI checkout and install Chromium to run")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}
PACKAGE = "oneforcing"  # the folder name in custom_nodes/: the Templates browser's category


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    server = Server(build_base(tmp_path_factory.mktemp("comfyui_browser")), python)
    shots = Path(os.environ.get("COMFYUI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            tab = browser.new_page(viewport=VIEWPORT)
            tab.goto(server.url)
            tab.wait_for_function("window.app && window.app.graph && window.app.graph._nodes", timeout=120_000)
            try:  # a first visit opens the templates dialog by itself: let it come, so as to close it
                tab.locator('[data-testid="template-workflows-content"]').wait_for(timeout=10_000)
            except sync_api.TimeoutError:
                pass
            tab.shots = shots
            yield tab
            browser.close()
    finally:
        server.stop()


def close_dialogs(page) -> None:
    """Close what covers the canvas (the templates dialog a first visit opens, an error dialog): Escape, as a user."""
    masks = page.locator(".p-dialog-mask")
    for _ in range(5):
        if masks.count() == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert masks.count() == 0, "a dialog stays open"


def open_template(page, title: str) -> None:
    """Templates (side bar) -> this package's category -> the card ``title``; returns once the graph is loaded."""
    close_dialogs(page)
    page.get_by_text("Templates", exact=True).first.click()
    page.get_by_text(PACKAGE, exact=True).first.click()
    card = page.locator(f'[data-testid="template-workflow-{title}"]')
    card.wait_for()
    assert card.get_by_text(title, exact=True).count() == 1  # the card's title: the file name
    thumbnail = card.locator("img").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    card.click()
    page.wait_for_function("title => window.app.graph.extra && window.app.graph.extra.title === title", arg=title)


def node_boxes(page) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(type and id, (left, top, right, bottom)) of every node as the frontend lays it out, title bar included."""
    boxes = page.evaluate("""() => window.app.graph._nodes.map(n => {
        const [x, y, w, h] = n.getBounding();
        return [`${n.type} ${n.id}`, [x, y, x + w, y + h]];
    })""")
    return [(label, tuple(box)) for label, box in boxes]


def screenshot(page, name: str) -> None:
    page.screenshot(path=str(page.shots / f"{name}.jpg"), type="jpeg", quality=70)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_opens_from_the_templates_browser_and_runs(page, path):
    title = path.stem
    workflow = json.loads(path.read_text())
    models = declared_models(workflow)
    open_template(page, title)
    boxes = node_boxes(page)
    assert len(boxes) == len(workflow["nodes"])
    assert overlapping(boxes) == []
    if models:
        dialog = page.locator(".comfy-missing-models")
        dialog.wait_for()
        for model in models:  # each listed, with where it goes
            assert dialog.get_by_text(f"{model['directory']} / {model['name']}").count() == 1, model
        screenshot(page, f"{title}.missing-models")
        page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    screenshot(page, f"{title}.loaded")
    page.locator('[data-testid="queue-button"]').click()
    if models:  # refused when queued: the error names every missing model
        page.get_by_text("Prompt outputs failed validation").first.wait_for()
        text = page.locator("body").inner_text()
        for model in models:
            assert model["name"] in text, model
    else:
        save = next(n for n in workflow["nodes"] if n["type"] == "SaveVideo")
        prefix = save["widgets_values"][0].split("/")[-1]
        page.wait_for_function(
            """prefix => [...document.querySelectorAll('video')].some(
                   v => (v.currentSrc || v.src).includes(prefix) && v.readyState >= 1)""",
            arg=prefix, timeout=600_000)
        page.wait_for_timeout(1000)
        # the rollout now shows its last block's preview and has grown to hold it: still no overlap
        assert overlapping(node_boxes(page)) == []
    screenshot(page, f"{title}.run")
