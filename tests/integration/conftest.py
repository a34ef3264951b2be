"""Fixtures of the integration tests: one real ComfyUI (CPU) for the session, started from
$COMFYUI_PATH with $COMFYUI_PYTHON (tests/integration/setup_comfyui.sh makes both), with the
pack and the test nodes in its custom_nodes and the test models in a temporary base directory.

Every test here is marked `integration` (deselected by the README test command, run by
.ci/run). Without a ComfyUI they skip, unless LIVEAVATAR_INTEGRATION=required (CI), where
that is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .comfyui_server import REPO, SETUP_HINT, ComfyUI, locate, prepare_base
from .model_files import write_inputs, write_models


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


def require_comfyui():
    found = locate()
    if found is None:
        if os.environ.get("LIVEAVATAR_INTEGRATION") == "required":
            pytest.fail(f"no ComfyUI to test in: {SETUP_HINT}")
        pytest.skip(SETUP_HINT)
    return found


@pytest.fixture(scope="session")
def comfyui():
    """The running ComfyUI. Its base directory is a folder of its own (not pytest's tmp_path,
    which other pytest runs of the same user may clean up), removed afterwards."""
    root, python = require_comfyui()
    base = Path(tempfile.mkdtemp(prefix="liveavatar-comfyui-base-"))
    try:
        prepare_base(base)
        write_models(base / "models", root, python)
        write_inputs(base / "input")
        server = ComfyUI(root, python, base).start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        if not os.environ.get("LIVEAVATAR_KEEP_COMFYUI_BASE"):  # set it to look at comfyui.log and the outputs
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def shipped():
    """The shipped UI workflows by name (fast, quality, live, continue, session)."""
    return {p.stem.removeprefix("liveavatar_"): json.loads(p.read_text())
            for p in sorted((REPO / "workflows").glob("*.json"))}
