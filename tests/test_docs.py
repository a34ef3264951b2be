"""What the docs show is true: the Python API program runs as written, and every benchmark
figure in README.md and docs/benchmarks.md is the one recorded in docs/bench_results.json."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

RESULTS = {(r["size"], r["mode"]): r for r in json.loads((REPO / "docs" / "bench_results.json").read_text())}
# column header -> (result field, decimals); "-" in the table where the field is None
COLUMNS = {"s / block-step": ("block_step_s", 3), "FPS": ("fps4", 1), "FPS @4": ("fps4", 1),
           "FPS with decode": ("end_to_end_fps4", 1), "FPS @4 with decode": ("end_to_end_fps4", 1),
           "first block s": ("first_block_s", 2), "peak GiB": ("peak_gib", 1), "cap GiB": ("memory_cap_gib", 1)}


def python_block(markdown: Path) -> str:
    return re.search(r"```python\n(.*?)```", markdown.read_text(), re.S).group(1)


def test_python_api_program_runs_as_written(tmp_path):
    """In a fresh interpreter, with the pack's folder on PYTHONPATH as the page says."""
    program = tmp_path / "python_api.py"
    program.write_text(python_block(REPO / "docs" / "python_api.md"))
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))  # its work folder goes here
    result = subprocess.run([sys.executable, str(program)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    # 1 s at 16 kHz: wav2vec2's conv stack (receptive field 400, stride 320) gives 49 states
    # at 50 Hz -> int(49 / 50 * 30) = 29 at 30 Hz; video frame i takes state round(1.2 i),
    # inside the 29 for i <= 23: 24 frames carry speech, and the video is cut to them. The
    # "64*64" budget leaves the smallest size, one 64-pixel side each way.
    assert result.stdout.strip() == "24 frames of 64x64 for 24 spoken frames"
    assert not list(tmp_path.glob("liveavatar_api_*"))  # its work folder is removed


def result_tables(markdown: Path):
    """Rows of the tables with `size` and `mode` columns: dicts keyed by header."""
    lines = markdown.read_text().splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == ["size", "mode"]:
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                yield dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|"))))


@pytest.mark.parametrize("doc", ["README.md", "docs/benchmarks.md"])
def test_benchmark_figures_are_the_recorded_ones(doc):
    rows = list(result_tables(REPO / doc))
    assert rows, f"no results table in {doc}"
    for row in rows:
        result = RESULTS[(row["size"].replace("\\", ""), row["mode"])]
        for header, (field, decimals) in COLUMNS.items():
            if header in row:
                expected = "-" if result.get(field) is None else f"{result[field]:.{decimals}f}"
                assert row[header] == expected, (doc, row["size"], row["mode"], header)
        if "time vs original" in row:
            original = RESULTS[(row["size"].replace("\\", ""), "original bf16")]
            assert row["time vs original"] == f"{result['block_step_s'] / original['block_step_s']:.2f}"
