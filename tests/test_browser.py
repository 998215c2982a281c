"""The real ComfyUI frontend in headless Chromium (Debian's package, driven by Playwright): each
UI workflow loads, converts to exactly its API-format twin, queues and produces an image; the
Distri panel shows the workers and the run; the config node previews the split. Screenshots go
to tests/artifacts/."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import workflow_runs

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(comfy_server):
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's package (apt-get install chromium) for the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [test] extra)")
    ARTIFACTS.mkdir(exist_ok=True)
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(comfy_server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
        page.wait_for_timeout(1000)
        page.errors = errors
        yield page
        browser.close()
    # The session's server stays up for the headless tests; its workers, holding the last model, are
    # stopped meanwhile (the next run restarts them), so that the tests in between, one of which
    # runs a second ComfyUI with a 2 GB checkpoint, do not run this 24 GiB box out of memory.
    comfy_server.post("/distri/stop", {})


def _queue_and_wait(server, page, timeout=600):
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(server.get("/history")) - before
        for pid in new:
            entry = server.get(f"/history/{pid}")[pid]
            if entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.5)
    raise TimeoutError("the queued workflow did not finish")


@pytest.mark.parametrize("name", workflow_runs.names())
def test_ui_workflow_loads_converts_and_runs(comfy_server, page, name):
    ui = workflow_runs.small_ui(name)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
    page.wait_for_timeout(500)
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert prompt == workflow_runs.small_api(name), "the frontend's conversion differs from the API twin"
    if name in workflow_runs.NOT_RUN:  # loaded and converted; it cannot run here (the reason says why)
        page.screenshot(path=str(ARTIFACTS / f"workflow_{name}.png"))
        return
    entry = _queue_and_wait(comfy_server, page)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert comfy_server.images(entry)
    page.screenshot(path=str(ARTIFACTS / f"workflow_{name}.png"))
    assert not [e for e in page.errors if "distri" in e.lower()], page.errors


def test_panel_shows_workers_and_the_last_run(comfy_server, page):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow_runs.small_ui("sdxl_txt2img_2048"))
    _queue_and_wait(comfy_server, page)
    page.locator(".distri-patch-parallel-tab-button").first.click()
    panel = page.locator(".distri-panel")
    panel.wait_for(timeout=20_000)
    page.wait_for_function("() => document.querySelector('.distri-panel')?.innerText.includes('alive')", timeout=20_000)
    text = panel.inner_text()
    assert "ready" in text and "cpu" in text and "alive" in text, text
    assert "last run" in text and "s/step" in text, text
    # the per-step chart of the run: one bar per step (2 steps in the small workflow)
    bars = page.evaluate("() => document.querySelectorAll('.distri-panel svg.distri-chart rect.distri-bar').length")
    assert bars == 2, bars
    page.screenshot(path=str(ARTIFACTS / "panel.png"))


def test_config_node_previews_the_split(page):
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow_runs.small_ui("sdxl_txt2img_2048"))
    page.wait_for_function(
        "() => [...document.querySelectorAll('.distri-split-preview')].some(e => e.textContent.includes('rows'))",
        timeout=20_000)
    text = page.evaluate("() => document.querySelector('.distri-split-preview').textContent")
    assert "128x128" in text and "2 rank(s)" in text and "CFG split" in text, text
    # the picture: one band per rank per CFG half, drawn (coloured pixels on the canvas)
    drawn = page.evaluate("""() => { const c = document.querySelector('canvas.distri-split-picture');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0) n++; return [Number(c.dataset.bands), n]; }""")
    assert drawn[0] == 2 and drawn[1] > 2000, drawn
    page.screenshot(path=str(ARTIFACTS / "config_preview.png"))
