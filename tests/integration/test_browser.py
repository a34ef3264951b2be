"""The pack in the real ComfyUI frontend: Debian's chromium (/usr/bin/chromium, or
$LIVEAVATAR_CHROMIUM) driven by Playwright, headless, against the test ComfyUI.

1. Every shipped workflow, fetched from the template route as the template browser does, opens
   with no alert, error toast, dialog (missing nodes or models) or page error, with all its
   nodes; the frontend's own API prompt of it (app.graphToPrompt) is the one api_prompt.py
   makes, which the HTTP tests queue.
2. A workflow saved with the loader's former `compile` widget opens with every value in its own
   widget (web/js/loader_upgrade.js) and the new ones at auto.
3. The live workflow (the two loaders swapped for the test ones, the Live Video node set to
   custom 128*128, as in the HTTP tests), queued from the page: the player on the node starts
   playing before the run ends, and ends holding the whole video.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from .api_prompt import CPU_SIZE, TEST_LOADERS, to_api
from .comfyui_server import PACK_FOLDER
from .media import FPS, video_frames
from .model_files import SPEECH_SECONDS

CHROMIUM = os.environ.get("LIVEAVATAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]


def unavailable(reason: str):
    if os.environ.get("LIVEAVATAR_INTEGRATION") == "required":
        pytest.fail(reason)
    pytest.skip(reason)


class Page:
    """The ComfyUI page, with every alert, page error and console error it shows recorded."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.alerts, self.errors = [], []
        self.page.on("dialog", lambda d: (self.alerts.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(url)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120000)
        self.page.wait_for_timeout(1000)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def shown_problems(self) -> list[str]:
        """Alerts, error/warning toasts and dialogs on screen (the frontend reports schema
        errors, missing nodes and missing models so)."""
        shown = self.js("""() => [...document.querySelectorAll(
            '.p-toast-message-error, .p-toast-message-warn, .p-dialog')].map(e => e.innerText.trim())""")
        return self.alerts + [text for text in shown if text]

    def clear(self):
        self.alerts.clear()
        self.errors.clear()
        self.js("() => document.querySelectorAll('.p-toast-message-close-button, .p-dialog-close-button')"
                ".forEach(b => b.click())")

    def load(self, workflow: dict):
        self.js("async (w) => { await window.app.loadGraphData(w); }", workflow)
        self.page.wait_for_timeout(1000)

    def open_shipped(self, workflow: dict, node_type: str, settings: dict) -> int:
        """Load a shipped workflow with the test loaders (tiny models), set `settings` on the
        widgets of its `node_type` node and bring that node into view; its id."""
        workflow = json.loads(json.dumps(workflow))
        for node in workflow["nodes"]:
            node["type"] = TEST_LOADERS.get(node["type"], node["type"])
        self.load(workflow)
        assert self.shown_problems() == [], f"the workflow of {node_type} with the test loaders"
        node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == node_type)
        self.js("""([id, settings]) => {
            const node = window.app.graph.getNodeById(id);
            for (const w of node.widgets) if (w.name in settings) w.value = settings[w.name];
            window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [-node.pos[0] + 420, -node.pos[1] + 60];
            window.app.canvas.setDirty(true, true);
        }""", [node_id, settings])
        return node_id


@pytest.fixture(scope="module")
def page(comfyui):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("pip install -r tests/integration/requirements.txt (playwright)")
    if not Path(CHROMIUM).exists():
        unavailable(f"no chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield Page(browser, comfyui.url)
        finally:
            browser.close()


def ours(errors: list[str]) -> list[str]:
    """Console errors of the pack's code or of loading a graph (the frontend also logs failed
    requests to the internet, which this machine has not)."""
    return [e for e in errors if e.startswith("page error") or "liveavatar" in e.lower() or "live_view" in e]


def test_every_shipped_workflow_opens_in_the_frontend(comfyui, page, shipped):
    listed = comfyui.get("/api/workflow_templates")
    names = sorted(listed.get(PACK_FOLDER, []))
    assert names == sorted(f"liveavatar_{name}" for name in shipped)
    for name in names:
        page.clear()
        workflow = comfyui.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
        assert workflow == shipped[name.removeprefix("liveavatar_")]
        page.load(workflow)
        assert page.shown_problems() == [] and ours(page.errors) == [], name
        assert page.js("() => window.app.graph.nodes.length") == len(workflow["nodes"]), name
        assert page.js("() => window.app.graph.nodes.filter(n => n.has_errors).length") == 0, name
        output = page.js("async () => (await window.app.graphToPrompt()).output")
        assert {i: {"class_type": n["class_type"], "inputs": declared(n, comfyui.object_info())}
                for i, n in output.items()} == to_api(workflow, comfyui.object_info()), name


def test_a_loader_saved_with_the_compile_widget_opens_with_its_values_in_place(comfyui, page, shipped):
    workflow = json.loads(json.dumps(shipped["fast"]))
    loader = next(n for n in workflow["nodes"] if n["type"] == "LiveAvatarModelLoader")
    model, lora = loader["widgets_values"][:2]
    # the list a workflow saved before: ..., kv_cache, compile, memory_cap_gib, warm_up
    loader["widgets_values"] = [model, lora, 0.75, "fp16", "one GPU", 12, "fp8", True, 24.5, "off"]
    page.clear()
    page.load(workflow)
    assert page.shown_problems() == [] and ours(page.errors) == []
    widgets = page.js("""(id) => Object.fromEntries(window.app.graph.getNodeById(id).widgets
                          .map(w => [w.name, w.value]))""", loader["id"])
    assert widgets == {"model_name": model, "lora_name": lora, "lora_strength": 0.75, "weight_dtype": "fp16",
                       "placement": "one GPU", "offload_blocks": 12, "kv_cache": "fp8", "memory_cap_gib": 24.5,
                       "warm_up": "off", "kernels": "auto", "attention": "auto", "fp8_compute": "auto",
                       "cuda_graphs": "auto"}
    output = page.js("async () => (await window.app.graphToPrompt()).output")
    inputs = output[str(loader["id"])]["inputs"]
    assert "compile" not in inputs and inputs["memory_cap_gib"] == 24.5 and inputs["kernels"] == "auto"


def declared(node: dict, object_info: dict) -> dict:
    """A node's inputs that ComfyUI reads (the frontend also sends values of display-only
    widgets, e.g. LoadAudio's 'audioUI': '', which ComfyUI ignores)."""
    spec = object_info[node["class_type"]]["input"]
    names = set(spec.get("required", {})) | set(spec.get("optional", {}))
    return {k: v for k, v in node["inputs"].items() if k in names}


def test_live_view_plays_while_the_video_is_generated(comfyui, page, shipped):
    page.clear()
    page.open_shipped(shipped["live"], "LiveAvatarLiveVideo", CPU_SIZE)
    page.js("""() => {
        window.__live = {end: null, error: null, playingAt: null, messages: 0};
        window.app.api.addEventListener('execution_success', () => window.__live.end = performance.now());
        window.app.api.addEventListener('execution_error', (e) => {
            window.__live.error = JSON.stringify(e.detail); window.__live.end = performance.now(); });
        window.app.api.addEventListener('liveavatar.live', () => window.__live.messages += 1);
        const video = document.querySelector('video.liveavatar-live-video');
        video.addEventListener('timeupdate', () => {
            if (video.currentTime > 0 && !video.paused && window.__live.playingAt === null)
                window.__live.playingAt = performance.now(); });
    }""")
    assert page.js("() => !!document.querySelector('video.liveavatar-live-video')")
    page.js("async () => { await window.app.queuePrompt(0, 1); }")
    started = time.time()
    while time.time() - started < 1800 and page.js("() => window.__live.end") is None:
        page.page.wait_for_timeout(250)
    state = page.js("() => window.__live")
    assert state["end"] is not None and state["error"] is None, state
    assert state["messages"] >= 3
    assert state["playingAt"] is not None and state["playingAt"] < state["end"], state
    page.page.wait_for_timeout(2000)  # the last bytes appended, the stream ended
    frames = video_frames(SPEECH_SECONDS)
    status = page.js("() => document.querySelector('.liveavatar-live-status').innerText")
    assert status.startswith(f"{frames} frames ") and "generated" in status, status
    duration = page.js("() => document.querySelector('video.liveavatar-live-video').duration")
    assert abs(duration - frames / FPS) < 2 / FPS, duration
    assert ours(page.errors) == []
