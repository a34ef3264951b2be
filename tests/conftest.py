"""Shared test helpers: the pack imported as ComfyUI imports it, where the parity fixture
sets live and how to open them.

A *fixture set* is a folder of manifests (`<name>.json`) with tensors beside them
(`<name>.safetensors`), made by running the original LiveAvatar/Wan2.2 code. Sets are
found under `tests/fixtures/` (the reference set copied from the team's shared folder, and
sets we generated), in `../shared/fixtures/reference` when it is there, and in the folders of
`$LIVEAVATAR_FIXTURES` (os.pathsep-separated; each is a set or holds sets as subfolders).
A set found twice with the same content runs once.
"""
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
PACK = "liveavatar_pack"


def import_pack(name: str, folder: Path):
    """Import the pack folder as a package called `name`, as ComfyUI's custom-node loader does
    (spec from its __init__.py; the folder name may be no valid identifier)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _alias_pack_modules():
    """Tests say `import liveavatar` / `import nodes`: make those the very modules the pack
    uses (one copy of every class), not a second import from the repo folder."""
    pack = import_pack(PACK, REPO)
    for sub in ("liveavatar", "nodes"):
        package = importlib.import_module(f"{PACK}.{sub}")
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{PACK}.{sub}."):
            importlib.import_module(info.name)
    for name in [n for n in sys.modules if n.startswith(PACK + ".")]:
        sys.modules[name[len(PACK) + 1:]] = sys.modules[name]
    return pack


if not torch.cuda.is_available():
    # No GPU: Triton (if installed) can only run interpreted, and the interpreter must be
    # chosen before triton is first imported (importing the pack below imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
_alias_pack_modules()


def kernels_switched_on():
    """A Kernels with mode "on": compiled on a GPU; without one, run by Triton's interpreter
    (selected above); the test skips where neither is there."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter not selected (see conftest.py)")
    from liveavatar.kernels import Kernels
    return Kernels("on")


def _set_dirs(root: Path):
    if not root.is_dir():
        return
    if any(root.glob("*.json")):
        yield root
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        yield from _set_dirs(sub)


def fixture_roots() -> list[Path]:
    roots = [REPO / "tests" / "fixtures", REPO.parent / "shared" / "fixtures" / "reference"]
    env = os.environ.get("LIVEAVATAR_FIXTURES", "")
    return roots + [Path(p) for p in env.split(os.pathsep) if p]


def _content_digest(set_dir: Path, manifest: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(set_dir.glob(f"{manifest}.*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fixture_sets(manifest: str):
    """pytest params, one per distinct fixture set holding `<manifest>.json`; ids name the set."""
    params, seen = [], set()
    for root in fixture_roots():
        for d in _set_dirs(root):
            if not (d / f"{manifest}.json").exists():
                continue
            digest = _content_digest(d, manifest)
            if digest in seen:
                continue
            seen.add(digest)
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
