"""Reading weight files: safetensors, or PyTorch state dicts through torch.load(weights_only=True)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def read_state_dict(path, mmap: bool = False) -> dict:
    """safetensors, or .pth/.pt/.bin via torch.load(weights_only=True; `mmap` leaves the tensors
    on disk until used). A {"state_dict": ...} wrapper is opened. Unreadable files raise
    ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise ValueError(f"cannot read weights from {path} ({type(error).__name__}: {str(error)[:200]}); "
                         "expected a .safetensors file or a PyTorch state dict (.pth, .bin)") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def safetensors_config(path) -> dict | None:
    """A JSON `config` stored in a safetensors header (our tiny test files); None otherwise."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:
        return None  # read_state_dict reports unreadable files
    return json.loads(metadata["config"]) if "config" in metadata else None
