"""Shared test helpers: where the parity fixture sets live and how to open them.

A *fixture set* is a folder of manifests (`<name>.json`) with tensors beside them
(`<name>.safetensors`), made by running the original LiveAvatar/Wan2.2 code. Sets are
found in `$LIVEAVATAR_FIXTURES` (one or more folders, os.pathsep-separated; each is a set
or holds sets as subfolders), else in `../shared/fixtures/reference`, plus the sets we
generated ourselves under `tests/fixtures/`.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _set_dirs(root: Path):
    if not root.is_dir():
        return []
    if any(root.glob("*.json")):
        yield root
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        yield from _set_dirs(sub)


def fixture_roots():
    env = os.environ.get("LIVEAVATAR_FIXTURES")
    roots = [Path(p) for p in env.split(os.pathsep) if p] if env else [REPO.parent / "shared" / "fixtures" / "reference"]
    return roots + [REPO / "tests" / "fixtures"]


def fixture_sets(manifest: str):
    """pytest params, one per fixture set holding `<manifest>.json`; ids name the set."""
    params = []
    for root in fixture_roots():
        for d in _set_dirs(root):
            if (d / f"{manifest}.json").exists():
                set_id = f"{root.name}/{d.relative_to(root)}".rstrip("/.").replace("/", "-")
                params.append(pytest.param(d, id=set_id))
    if not params:
        raise RuntimeError(f"no fixture set with {manifest}.json under {fixture_roots()}")
    return params


def load_manifest(set_dir: Path, name: str) -> dict:
    return json.loads((set_dir / f"{name}.json").read_text())


def load_tensors(set_dir: Path, name: str, prefix: str = "") -> dict:
    """Tensors of `<name>.safetensors`; with a prefix, only those keys, prefix removed."""
    tensors = load_file(str(set_dir / f"{name}.safetensors"))
    if not prefix:
        return tensors
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
