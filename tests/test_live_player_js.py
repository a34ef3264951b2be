"""The live view's player logic (web/js/live_player.js) under Node's own test runner, with a
stand-in browser (tests/js/live_player.test.mjs): object URLs revoked, the old video cleared
at a new run's start, the status line for finished, cancelled and failed runs. The real
browser run is tests/browser/run_live_view.py."""
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
TEST = Path(__file__).parent / "js" / "live_player.test.mjs"


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_live_player_in_node():
    run = subprocess.run([NODE, "--test", str(TEST)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout
