"""ComfyUI services, imported lazily, with standalone fallbacks.

Inside ComfyUI: folder_paths for model folders and the output folder, model_management
for the device, memory and cancel, comfy.utils.ProgressBar for progress. Outside
(tests, demo.py): model folders under $LIVEAVATAR_MODELS (default ./models), CUDA if
present, progress printed to stderr, cancel never requested.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..liveavatar.placement import same_device

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SHARDED_INDEX_SUFFIX = ".safetensors.index.json"
NAME_MAX = 255  # bytes in a file name on every common file system
WINDOWS_RESERVED = '<>:"|?*'
log = logging.getLogger("LiveAvatar")


def _comfy(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


# ---- model folders ------------------------------------------------------------------------
def model_roots(folder: str) -> list[Path]:
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(folder)]
        except KeyError:
            return []
    return [Path(os.environ.get("LIVEAVATAR_MODELS", "models")) / folder]


def list_models(folder: str, sharded: bool = False) -> list[str]:
    """Weight files under the folder (relative names); with `sharded`, also official sharded
    checkpoints, listed by their `*.safetensors.index.json`."""
    names = set()
    for root in model_roots(folder):
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            name = path.relative_to(root).as_posix()
            if path.is_file() and (name.endswith(WEIGHT_SUFFIXES) or (sharded and name.endswith(SHARDED_INDEX_SUFFIX))):
                names.add(name)
    return sorted(names)


def model_path(folder: str, name: str, input_name: str = "model name") -> Path:
    """Full path of a listed model, found as ComfyUI's folder_paths.get_full_path finds it: a
    file at `name` under one of the folder's roots; a sharded index json resolves to its
    folder. Names that leave the model folders ('..', absolute paths) are refused: ComfyUI's
    prompt validation stops them, but a script or another pack calling the node does not
    pass through it."""
    check_model_name(folder, name, input_name)
    for root in model_roots(folder):
        path = root / name
        if path.is_file():
            return path.parent if name.endswith(SHARDED_INDEX_SUFFIX) else path
    raise FileNotFoundError(f"{input_name} {name!r} is not in the {folder} model folder "
                            f"({', '.join(map(str, model_roots(folder)))}): put the file there, or pick one listed "
                            "(press R in ComfyUI to refresh the lists)")


def check_model_name(folder: str, name, input_name: str = "model name"):
    """A ValueError unless `name` is a weights file name relative to the model folder."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{input_name} {name!r} is not a file name: pick a file listed for the {folder} folder")
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts:
        raise ValueError(f"{input_name} {name!r} leads outside the {folder} model folder: give the name of a "
                         f"file inside it (as listed, e.g. 'x.safetensors' or 'sub/x.safetensors')")
    if not name.endswith((*WEIGHT_SUFFIXES, SHARDED_INDEX_SUFFIX)):
        raise ValueError(f"{input_name} {name!r} is not a weights file: pick a .safetensors (or .pth, .pt, .bin) "
                         f"file of the {folder} folder, or a sharded checkpoint's .safetensors.index.json")


def output_directory() -> Path:
    """ComfyUI's output folder, or $LIVEAVATAR_OUTPUT (default ./output) standalone; absolute."""
    folder_paths = _comfy("folder_paths")
    path = folder_paths.get_output_directory() if folder_paths else os.environ.get("LIVEAVATAR_OUTPUT", "output")
    return Path(os.path.abspath(path))


def save_path(prefix: str, extension: str, width: int = 0, height: int = 0) -> Path:
    """A new file `<subfolders>/<name>_00001.<extension>` inside the output folder for a
    filename_prefix, by ComfyUI's rules (its folder_paths.get_save_image_path inside ComfyUI,
    the same rules standalone): subfolders in the prefix are created; a prefix that leads
    outside the output folder ('../x', an absolute path), holds characters no file name can
    (a NUL byte, control characters), or has no file name at all is refused; the folder is
    checked to take a file now, before any long work."""
    check_prefix_characters(prefix)
    root = output_directory()
    _writable_folder(root, prefix)
    folder_paths = _comfy("folder_paths")
    try:
        if folder_paths is not None:
            folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(root), width, height)
        else:
            (folder, name), counter = _inside_output(prefix, root), 1
    except OSError as error:
        raise PermissionError(f"cannot write into the output folder {root} (for filename_prefix {prefix!r}): "
                              f"{error}. Make it writable, or start ComfyUI with another --output-directory.") from None
    except Exception:  # ComfyUI refuses paths outside the output folder with a bare Exception
        raise ValueError(f"filename_prefix {prefix!r} points outside the output folder {root}: use a name, "
                         "optionally with subfolders inside it, such as 'LiveAvatar' or 'videos/LiveAvatar'") from None
    check_file_name(prefix, name, f"_00001.{extension}")
    folder = _writable_folder(Path(folder), prefix)
    while (folder / f"{name}_{counter:05d}.{extension}").exists():
        counter += 1
    return folder / f"{name}_{counter:05d}.{extension}"


def check_prefix_characters(prefix):
    """A ValueError for a filename_prefix no file name can hold: not text, a NUL byte (which
    would silently cut the name short) or other control characters, and on Windows its
    reserved characters."""
    if not isinstance(prefix, str):
        raise ValueError(f"filename_prefix must be text, got {type(prefix).__name__}")
    bad = sorted({c for c in prefix if ord(c) < 32 or ord(c) == 127 or (os.name == "nt" and c in WINDOWS_RESERVED)})
    if bad:
        raise ValueError(f"filename_prefix {prefix!r} holds characters a file name cannot ({', '.join(map(repr, bad))}; "
                         "a NUL byte would cut the name short): remove them")


def check_file_name(prefix: str, name: str, suffix: str):
    """The file-name part of a prefix must exist and fit a file system's 255-byte limit."""
    if name in ("", ".", ".."):
        raise ValueError(f"filename_prefix {prefix!r} has no file name: end it with a name, such as "
                         "'LiveAvatar' or 'videos/LiveAvatar'")
    if len((name + suffix).encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise ValueError(f"filename_prefix {prefix!r} makes a file name longer than {NAME_MAX} bytes: shorten it")


def _inside_output(prefix: str, root: Path) -> tuple[Path, str]:
    """(folder, file name) for a prefix, as ComfyUI splits it; raises if outside `root`."""
    normal = os.path.normpath(prefix)
    folder = os.path.abspath(os.path.join(root, os.path.dirname(normal)))
    if os.path.commonpath((str(root), folder)) != str(root):
        raise ValueError(prefix)
    return Path(folder), os.path.basename(normal)


SPACE_ERRORS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)  # disk full, quota, size limit
PROBE_BYTES = 1 << 16  # written (and dropped) to prove the disk has room, not only a free name


def _writable_folder(folder: Path, prefix: str) -> Path:
    """Create the folder if needed and prove it takes a file with data in it (a read-only or
    full disk, a file in the way, missing permissions), with an error that says where and
    what to do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        kind = OSError if error.errno in SPACE_ERRORS else PermissionError
        raise kind(f"cannot write into the output folder {folder} (for filename_prefix {prefix!r}): "
                   f"{error.strerror or error}. {write_advice(error)}") from None
    return folder


def write_advice(error: OSError) -> str:
    """What to do about a failed write, by its cause."""
    if error.errno in SPACE_ERRORS:
        return "Free space on that disk, or start ComfyUI with an --output-directory on another one."
    return ("Make it writable, or start ComfyUI with another --output-directory (standalone: set "
            "LIVEAVATAR_OUTPUT).")


# ---- devices and memory -----------------------------------------------------------------
def torch_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def release_memory():
    """Return cached GPU memory (after a run, an error or a cancel)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- ComfyUI model management ------------------------------------------------------------
def initial_device(nbytes: int, device) -> torch.device | None:
    """Where to build a diffusion model of `nbytes` that runs on `device`, as ComfyUI decides
    for its own (comfy.model_management.unet_inital_load_device): straight on the GPU when it
    has more free memory than the CPU and the model fits, else on its offload device (the
    CPU), from where its model management loads it. None outside ComfyUI: nothing is managed,
    weights go straight where they run."""
    mm = _comfy("comfy.model_management")
    if mm is None or _comfy("comfy.model_patcher") is None:
        return None
    if not same_device(device, mm.get_torch_device()):
        return mm.unet_offload_device()
    return torch.device(mm.unet_inital_load_device(nbytes, torch.uint8))  # nbytes one-byte "parameters"


class ResidentWeights(torch.nn.Module):
    """The modules ComfyUI manages, gathered under one module (the DiT keeps owning them:
    moving these moves the DiT's own parameters). `device`: where they are, which ComfyUI
    reads and updates as it loads and offloads them (as its own models carry it)."""

    def __init__(self, modules, device):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self.device = torch.device(device)


def manage(modules, device, built_on, on_unload=None):
    """A ComfyUI ModelPatcher for modules built on `built_on` that `device` runs (None outside
    ComfyUI). Nothing is set by hand: load_models() loads them as ComfyUI loads its own
    models, and ComfyUI offloads them (module by module, or whole) and accounts their memory
    itself. `on_unload()` runs when ComfyUI unloads them (free memory)."""
    patcher_module, mm = _comfy("comfy.model_patcher"), _comfy("comfy.model_management")
    if patcher_module is None or mm is None:
        return None
    patcher = patcher_module.ModelPatcher(ResidentWeights(list(modules), built_on), load_device=torch.device(device),
                                          offload_device=mm.unet_offload_device())
    extension = _comfy("comfy.patcher_extension")
    if on_unload is not None and extension is not None and hasattr(extension, "CallbacksMP"):
        patcher.add_callback(extension.CallbacksMP.ON_DETACH, lambda *_: on_unload())
    return patcher


def load_models(patchers):
    """Before running: these ComfyUI-managed models fully on their devices, in one request (so
    that making room for one never offloads another); ComfyUI frees other models for them.
    Our networks run only fully loaded (they have no per-layer weight casting)."""
    mm = _comfy("comfy.model_management")
    patchers = [p for p in patchers if p is not None]
    if patchers and mm is not None:
        mm.load_models_gpu(patchers, force_full_load=True)


# ---- messages to the browser -----------------------------------------------------------------
def prompt_server():
    """ComfyUI's running PromptServer; None outside ComfyUI. Only a server ComfyUI already started
    is used: importing its `server` module here would start nothing but could clash with another
    module of that name."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def client_id() -> str | None:
    """The websocket client id of the page that queued the prompt running now (None: a prompt
    queued without one, or outside ComfyUI)."""
    return getattr(prompt_server(), "client_id", None)


def send_to_browser(event: str, data: dict):
    """Send a websocket message to the browser that queued the prompt (ComfyUI's PromptServer;
    every page when the prompt came without a client id); nothing outside ComfyUI."""
    instance = prompt_server()
    if instance is not None:
        instance.send_sync(event, data, instance.client_id)


def send_to_client(event: str, data: dict) -> bool:
    """Send a message to the page that queued the prompt and to no other (never broadcast: for
    what only that page may know, e.g. a session's token). False when there is no such page."""
    instance, client = prompt_server(), client_id()
    if instance is None or client is None:
        return False
    instance.send_sync(event, data, client)
    return True


class NodeNotes:
    """What the user should know about this run of a node (an input adjusted, what an output
    holds): logged, and shown on the running node the way ComfyUI's own nodes show text
    (PromptServer.send_progress_text, ComfyUI 0.3.4x and later). Each showing replaces the
    node's text, so all notes of the run are shown together."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, *lines: str):
        for line in lines:
            log.warning("LiveAvatar: %s", line)
        self.lines += lines
        if lines:
            show_text("\n".join(self.lines))


def show_text(text: str):
    """Text under the node ComfyUI is running (its progress-text message); nothing outside
    ComfyUI or where the server lacks it."""
    instance = prompt_server()
    node_id = executing_node_id()
    if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id, instance.client_id)


def executing_node_id() -> str | None:
    """Id of the node ComfyUI is running now (the browser finds the node by it); None outside."""
    utils = _comfy("comfy_execution.utils")
    context = utils.get_executing_context() if utils is not None and hasattr(utils, "get_executing_context") else None
    return None if context is None else str(context.node_id)


# ---- progress and cancel ----------------------------------------------------------------
def check_interrupted():
    """Raise ComfyUI's interruption exception if the user pressed cancel."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def is_cancel(error: BaseException) -> bool:
    """Whether `error` is the user's cancel (ComfyUI's interruption exception; standalone, Ctrl+C)."""
    mm = _comfy("comfy.model_management")
    interrupted = getattr(mm, "InterruptProcessingException", None)
    return isinstance(error, KeyboardInterrupt) or (interrupted is not None and isinstance(error, interrupted))


class Progress:
    """ComfyUI's ProgressBar inside ComfyUI; a one-line counter on stderr outside."""

    def __init__(self, total: int, label: str = "LiveAvatar"):
        utils = _comfy("comfy.utils")
        self.bar = utils.ProgressBar(total) if utils is not None else None
        self.total, self.done, self.label = total, 0, label
        self._line_open = False  # standalone: a counter line printed without its newline yet

    def show(self, preview):
        """Attach a preview image to the current position (ComfyUI only)."""
        if self.bar is not None:
            self.bar.update_absolute(self.done, self.total, preview)

    def step(self):
        if self.done >= self.total:  # already shown complete: a late extra step changes nothing
            return
        self.done += 1
        if self.bar is not None:
            self.bar.update_absolute(self.done, self.total)
        elif self.done == self.total or self.done % max(1, self.total // 20) == 0:
            self._print()

    def finish(self):
        """The work is done, whatever the count says (a loop that ended early, e.g. at the end
        of the speech): show total/total."""
        if self.done < self.total:
            self.done = self.total - 1
            self.step()

    def close(self):
        """End the standalone counter's line (also after an error or cancel) so the next log
        line starts on a line of its own."""
        if self.bar is None and self._line_open:
            print(file=sys.stderr, flush=True)
            self._line_open = False

    def _print(self):
        last = self.done == self.total
        print(f"\r{self.label}: {self.done}/{self.total}", end="\n" if last else "", file=sys.stderr, flush=True)
        self._line_open = not last


def latent_previewer():
    """A function: latents [16, F, h, w] (any device) -> ComfyUI preview tuple of the first
    frame, or None outside ComfyUI / with previews off. The cheap latent->RGB projection runs
    where the latents are (the sampler hands it CPU copies); a network previewer (TAESD) on
    ComfyUI's device."""
    latent_preview, formats = _comfy("latent_preview"), _comfy("comfy.latent_formats")
    if latent_preview is None or formats is None:
        return None
    previewer = latent_preview.get_previewer(torch_device(), formats.Wan21())
    if previewer is None:
        return None
    projection = getattr(latent_preview, "Latent2RGBPreviewer", ())
    device = None if isinstance(previewer, projection) else torch_device()
    return lambda latents: previewer.decode_latent_to_preview_image(
        "JPEG", latents[None, :, :1].to(device or latents.device, torch.float32))
