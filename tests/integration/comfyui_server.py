"""The real ComfyUI, started for the tests: where it is, how it is started, and a small client
for its HTTP API and websocket (POST /prompt, /interrupt, /free; GET /history, /view,
/object_info; the messages of a run)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-LiveAvatar"  # the name the pack has in custom_nodes, as users install it
TEST_NODES = Path(__file__).with_name("comfyui_test_nodes")
SETUP_HINT = ("set COMFYUI_PATH to a ComfyUI checkout and COMFYUI_PYTHON to its Python "
              "(tests/integration/setup_comfyui.sh DIR makes both from ../shared/comfyui)")


def locate() -> tuple[Path, str] | None:
    """(ComfyUI root, its Python) from $COMFYUI_PATH / $COMFYUI_PYTHON; None when not set up."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "main.py").exists() or not (Path(root) / "comfy").is_dir():
        return None
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(root).parent / "venv" / "bin" / "python")
    return (Path(root), python) if Path(python).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path):
    """A --base-directory with the pack and the test nodes in custom_nodes (links), and the
    frontend's first-run dialogs off."""
    nodes = base / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    (nodes / "liveavatar_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True}))


@dataclass
class Run:
    """What the websocket said about one queued prompt."""

    prompt_id: str
    messages: list = field(default_factory=list)  # (type, data) in arrival order, binary ones skipped
    seconds: float = 0.0

    def of(self, kind: str) -> list[dict]:
        return [data for t, data in self.messages if t == kind]

    @property
    def outcome(self) -> str:
        for kind in ("execution_success", "execution_error", "execution_interrupted"):
            if self.of(kind):
                return kind
        return "unfinished"


class ComfyUI:
    def __init__(self, root: Path, python: str, base: Path, port: int | None = None):
        self.root, self.python, self.base = root, python, base
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.process = None

    # ---- process ----------------------------------------------------------------------------
    def start(self, timeout: float = 600):
        self.log_path = self.base / "comfyui.log"
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
             "--disable-auto-launch"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.process.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer in {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- HTTP -------------------------------------------------------------------------------
    def request(self, path: str, body=None, headers=None, method=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        return urllib.request.urlopen(request, timeout=60)

    def get(self, path: str):
        with self.request(path) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        with self.request(path, body) as response:
            text = response.read()
            return json.loads(text) if text.strip() else None

    def object_info(self) -> dict:
        if not hasattr(self, "_object_info"):
            self._object_info = self.get("/object_info")
        return self._object_info

    def history(self, prompt_id: str) -> dict:
        """The prompt's history entry, once ComfyUI has written its status (it may come a moment
        after the websocket's last message)."""
        deadline = time.monotonic() + 30
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id, {})
            if "status" in entry or time.monotonic() > deadline:
                return entry
            time.sleep(0.2)

    def output_file(self, file: dict) -> Path:
        return self.base / "output" / file.get("subfolder", "") / file["filename"]

    def memory(self) -> dict:
        return self.get("/liveavatar_test/memory")

    # ---- runs -------------------------------------------------------------------------------
    def websocket(self):
        import websocket
        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=600)

    def websocket_for(self, client_id: str) -> "Listener":
        """Another page's websocket (its own client id), to see what it is sent."""
        import websocket
        return Listener(websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=60))

    def queue(self, prompt: dict) -> str:
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as error:  # 400: ComfyUI's validation says why
            raise AssertionError(f"/prompt refused the prompt: {error.read().decode()[:3000]}") from None
        return answer["prompt_id"]

    def run(self, prompt: dict, timeout: float = 1800, on_message=None) -> Run:
        """Queue `prompt`, collect its websocket messages until it ends (success, error or
        interrupt); on_message(run, type, data) may act while it runs (e.g. POST /interrupt)."""
        ws = self.websocket()
        try:
            started = time.time()
            run = Run(self.queue(prompt))
            ws.settimeout(timeout)
            while run.outcome == "unfinished":
                if time.time() - started > timeout:
                    raise AssertionError(f"the run did not end in {timeout} s; messages: {run.messages[-10:]}")
                raw = ws.recv()
                if isinstance(raw, bytes):
                    continue  # preview images
                message = json.loads(raw)
                data = message.get("data", {})
                if data.get("prompt_id", run.prompt_id) != run.prompt_id:
                    continue
                run.messages.append((message["type"], data))
                if on_message is not None:
                    on_message(run, message["type"], data)
            run.seconds = time.time() - started
            return run
        finally:
            ws.close()


class Listener:
    """A websocket whose messages are read when asked (drain: every message it has now)."""

    def __init__(self, ws):
        self.ws = ws

    def drain(self, wait: float = 0.5) -> list[dict]:
        messages = []
        self.ws.settimeout(wait)
        while True:
            try:
                raw = self.ws.recv()
            except Exception:  # the timeout: nothing more now
                return messages
            if not isinstance(raw, bytes):
                messages.append(json.loads(raw))

    def close(self):
        self.ws.close()

