"""Browser test of the pack in a real ComfyUI (CPU) and headless Chromium, driven by Playwright.

    python tests/browser/run_live_view.py --comfyui /path/to/ComfyUI [--screenshot docs/live_view.png]

Run it with the Python of ComfyUI's environment with `playwright` installed; Chromium is the
system one (--chromium, default /usr/bin/chromium). ComfyUI runs from its checkout, unchanged,
with --base-directory pointing at a work folder that holds the pack (linked into custom_nodes),
the model files (tests/browser/make_models.py: real-size random VAE / wav2vec2 / umt5-xxl,
tiny DiT; made once, ~6.5 GB) and the inputs. Checks, in order:
1. every shipped workflow, fetched from the template route as the template browser does,
   loads with no alert, error toast or missing-node dialog, with all its nodes; each template
   has its thumbnail;
2. the live workflow, set to a CPU-sized run, is queued; the player on the Live Video node
   starts playing before the run ends, and ends with every frame.
Exit status 0 when all hold. Prints what it saw; saves a screenshot of the playing node.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
MODULE = "ComfyUI-LiveAvatar"  # the pack's folder name in custom_nodes
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]
# A run a CPU can do (most of it is the real-size VAE and umt5): the smallest area, 2 steps,
# 2 clips of 24 frames for the 1.6 s of speech: 4 blocks, the player starts after the second.
CPU_SETTINGS = {"size": "custom", "width": 128, "height": 128, "infer_frames": 24, "sample_steps": 2}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="ComfyUI checkout")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/liveavatar-browser"),
                        help="ComfyUI base directory for this test (models are kept between runs)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--screenshot", type=Path, default=None, help="where to save the live view screenshot")
    parser.add_argument("--thumbnails", action="store_true",
                        help="also write workflows/<name>.jpg template thumbnails from the loaded graphs")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds for the live run")
    return parser.parse_args()


# ---- ComfyUI ------------------------------------------------------------------------------------
def prepare_base(base: Path, comfyui: Path):
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / MODULE
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(PACK, target_is_directory=True)
    subprocess.run([sys.executable, str(PACK / "tests" / "browser" / "make_models.py"), str(base / "models"),
                    str(base / "input")], cwd=comfyui, check=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    # no first-run template dialog over the canvas; keep the frontend's workflow validation on
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True}))
    shutil.rmtree(base / "output", ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, base: Path, port: int) -> subprocess.Popen:
    log = open(base / "comfyui.log", "w")
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--base-directory", str(base), "--disable-auto-launch"],
                              cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"ComfyUI exited early; see {base / 'comfyui.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit("ComfyUI did not start in 5 minutes")


# ---- the page -----------------------------------------------------------------------------------
class Page:
    """The ComfyUI page, with every alert, error toast and console error it shows recorded."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.alerts, self.console_errors = [], []
        self.page.on("dialog", lambda d: (self.alerts.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.goto(url)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120000)
        self.page.wait_for_timeout(2000)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def problems(self) -> list[str]:
        """Alerts, error toasts and dialogs on screen (the frontend reports schema errors so)."""
        shown = self.js("""() => [...document.querySelectorAll(
            '.p-toast-message-error, .p-toast-message-warn, .p-dialog')].map(e => e.innerText.trim())""")
        return self.alerts + [text for text in shown if text]

    def clear(self):
        self.alerts.clear()
        self.js("() => document.querySelectorAll('.p-toast-message-close-button, .p-dialog-close-button')"
                ".forEach(b => b.click())")


def check_templates(page: Page, base_url: str, thumbnails: bool) -> list[str]:
    failures = []
    listed = json.loads(urllib.request.urlopen(f"{base_url}/api/workflow_templates").read())
    names = sorted(listed.get(MODULE, []))
    shipped = sorted(p.stem for p in (PACK / "workflows").glob("*.json"))
    report(names == shipped, f"template browser lists {names}", failures)
    for name in names:
        page.clear()
        workflow = json.loads(urllib.request.urlopen(f"{base_url}/api/workflow_templates/{MODULE}/{name}.json").read())
        page.js("async (w) => { await window.app.loadGraphData(w); }", workflow)
        page.page.wait_for_timeout(1500)
        problems = page.problems()
        count = page.js("() => window.app.graph.nodes.length")
        saved = page.js("() => window.app.graph.serialize().nodes.map(n => [n.id, (n.widgets_values || []).length])")
        shipped_widgets = {n["id"]: len(n.get("widgets_values", [])) for n in workflow["nodes"]}
        report(all(shipped_widgets[i] == length for i, length in saved),
               f"{name}: saving it again gives the same widget values per node (the player is not saved)", failures)
        report(not problems and count == len(workflow["nodes"]),
               f"{name}: loaded, {count} nodes, alerts/toasts/dialogs: {problems or 'none'}", failures)
        if thumbnails:
            save_thumbnail(page, PACK / "workflows" / f"{name}.jpg")
        thumb = urllib.request.urlopen(f"{base_url}/api/workflow_templates/{MODULE}/{name}.jpg")
        report(thumb.status == 200 and thumb.headers["Content-Type"] == "image/jpeg",
               f"{name}: thumbnail {name}.jpg served ({thumb.headers['Content-Type']})", failures)
    return failures


def save_thumbnail(page: Page, path: Path):
    """The whole graph, scaled to fill the picture, as a small jpg."""
    from PIL import Image
    box = page.js("""() => {
        const nodes = window.app.graph.nodes, c = window.app.canvas, title = 30;
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const scale = Math.min(1300 / (x1 - x0), 780 / (y1 - y0));
        c.ds.scale = scale; c.ds.offset = [60 / scale - x0, 80 / scale - y0]; c.setDirty(true, true);
        return {x: 60, y: 80, width: (x1 - x0) * scale, height: (y1 - y0) * scale};
    }""")
    page.page.wait_for_timeout(800)
    png = path.with_suffix(".png")
    page.page.screenshot(path=str(png), clip=box)
    image = Image.open(png).convert("RGB")
    image.thumbnail((640, 400))
    image.save(path, quality=82)
    png.unlink()


def run_live_workflow(page: Page, timeout: float, screenshot: Path | None) -> list[str]:
    failures = []
    page.clear()
    workflow = json.loads((PACK / "workflows" / "liveavatar_live.json").read_text())
    page.js("async (w) => { await window.app.loadGraphData(w); }", workflow)
    page.page.wait_for_timeout(1000)
    node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "LiveAvatarLiveVideo")
    page.js("""([id, settings]) => {
        const node = window.app.graph.getNodeById(id);
        for (const w of node.widgets) if (w.name in settings) w.value = settings[w.name];
        window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [-node.pos[0] + 420, -node.pos[1] + 60];
        window.app.canvas.setDirty(true, true);
        window.__live = {end: null, error: null, playingAt: null};
        window.app.api.addEventListener('execution_success', () => window.__live.end = performance.now());
        window.app.api.addEventListener('execution_error', (e) => { window.__live.error = JSON.stringify(e.detail); window.__live.end = performance.now(); });
        const video = document.querySelector('video.liveavatar-live-video');
        video.addEventListener('timeupdate', () => { if (video.currentTime > 0 && !video.paused && window.__live.playingAt === null) window.__live.playingAt = performance.now(); });
    }""", [node_id, CPU_SETTINGS])
    report(page.js("() => !!document.querySelector('video.liveavatar-live-video')"), "the player is on the node", failures)
    page.js("async () => { await window.app.queuePrompt(0, 1); }")
    started = time.time()
    shot = False
    while time.time() - started < timeout:
        state = page.js("() => window.__live")
        if state["playingAt"] is not None and not shot and screenshot is not None:
            page.page.wait_for_timeout(1500)  # a moment of playback in the picture
            save_screenshot(page, screenshot)
            shot = True
        if state["end"] is not None:
            break
        page.page.wait_for_timeout(500)
    state = page.js("() => window.__live")
    status = page.js("() => document.querySelector('.liveavatar-live-status').innerText")
    report(state["end"] is not None and state["error"] is None,
           f"run ended in {time.time() - started:.0f} s, error: {state['error']}", failures)
    report(state["playingAt"] is not None and state["end"] is not None and state["playingAt"] < state["end"],
           f"player started playing {(state['end'] or 0) - (state['playingAt'] or 0):.0f} ms before the run ended", failures)
    page.page.wait_for_timeout(2000)
    status = page.js("() => document.querySelector('.liveavatar-live-status').innerText")
    report("generated" in status, f"status at the end: {status!r}", failures)
    duration = page.js("() => document.querySelector('video.liveavatar-live-video').duration")
    report(duration and duration > 1, f"the finished video lasts {duration} s", failures)
    return failures


def save_screenshot(page: Page, path: Path):
    """The live node and its surroundings while it plays."""
    from PIL import Image
    box = page.js("""() => { const r = document.querySelector('.liveavatar-live').getBoundingClientRect();
                             return {x: r.x, y: r.y, width: r.width, height: r.height}; }""")
    x, y = max(box["x"] - 420, 0), max(box["y"] - 120, 0)
    png = path.with_suffix(".full.png")
    page.page.screenshot(path=str(png), clip={"x": x, "y": y, "width": min(1400 - x, box["width"] + 460),
                                              "height": min(900 - y, box["height"] + 160)})
    image = Image.open(png)
    image.convert("RGB").quantize(colors=128).save(path, optimize=True)
    png.unlink()
    print(f"screenshot: {path} ({path.stat().st_size // 1024} KB)")


def report(ok: bool, fact: str, failures: list):
    print(("ok: " if ok else "FAILED: ") + fact, flush=True)
    if not ok:
        failures.append(fact)


def main():
    args = parse_args()
    from playwright.sync_api import sync_playwright
    base = args.workdir.resolve()
    prepare_base(base, args.comfyui.resolve())
    port = args.port or free_port()
    server = start_comfyui(args.comfyui.resolve(), base, port)
    failures = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = Page(browser, f"http://127.0.0.1:{port}")
            failures += check_templates(page, f"http://127.0.0.1:{port}", args.thumbnails)
            failures += run_live_workflow(page, args.timeout, args.screenshot)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print("ALL OK" if not failures else f"{len(failures)} FAILED")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
