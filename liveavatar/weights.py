"""Reading weight files: safetensors, or PyTorch state dicts through torch.load(weights_only=True).

Every unreadable file is reported as a CheckpointError (a ValueError) that names the file and
says what to do: the likeliest cause is an interrupted download of a multi-GB file."""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

REDOWNLOAD = "the file is damaged or incomplete (an interrupted download?): download it again"


class CheckpointError(ValueError):
    """A weights file that is not what it should be; the message says what and why."""


def open_safetensors(path):
    """safe_open(path), with a damaged / empty / non-safetensors file reported by name."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): {REDOWNLOAD}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"cannot read {path} as safetensors ({error}): {REDOWNLOAD}") from None


def read_state_dict(path, mmap: bool = False) -> dict:
    """safetensors, or .pth/.pt/.bin via torch.load(weights_only=True; `mmap` leaves the tensors
    on disk until used). A {"state_dict": ...} wrapper is opened. Unreadable files raise
    CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            try:
                return {key: f.get_tensor(key) for key in f.keys()}
            except Exception as error:  # header fine, data cut short
                raise CheckpointError(f"cannot read the tensors of {path} ({error}): {REDOWNLOAD}") from None
    state = _torch_load(path, mmap)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def _torch_load(path: Path, mmap: bool):
    # mmap needs torch's zip format; files from torch < 1.6 (legacy format) load fully instead.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, i.e. running the file's code: never
        # quoted; only the unpickler's own finding is kept.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise CheckpointError(f"{path} holds Python objects besides tensors (it refers to {found.group(1)}); "
                                  "LiveAvatar never runs code from weight files. Use the .safetensors version "
                                  "of this file.") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", str(error), re.S)
        raise _unreadable(path, detail.group(1) if detail else "not a PyTorch pickle") from None
    except Exception as error:
        raise _unreadable(path, f"{type(error).__name__}: {str(error)[:200]}") from None


def _unreadable(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"cannot read weights from {path} ({detail}); expected a .safetensors file or a PyTorch "
                           f"state dict (.pth, .bin). If it is one, {REDOWNLOAD}")


def safetensors_config(path) -> dict | None:
    """A JSON `config` stored in a safetensors header (our tiny test files); None otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        return None
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its 'config' metadata is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its 'config' metadata is not a JSON object")
    return config
