"""A live session's page side (web/js/session_capture.js) under Node's own test runner
(tests/js/session_capture.test.mjs): resampling to 16 kHz, chunks with their offsets, the
sender's handling of the route's answers, a file played in real time, the status line. The
real browser run is tests/integration/test_browser.py (a fake microphone)."""
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
TEST = Path(__file__).parent / "js" / "session_capture.test.mjs"


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_session_capture_in_node():
    run = subprocess.run([NODE, "--test", str(TEST)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout
