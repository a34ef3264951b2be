"""The pack imports as ComfyUI's custom-node loader imports it: a package named after its
folder (any name, a hyphen included), nothing added to sys.path, no top-level modules."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

NODES = {"LiveAvatarModelLoader", "LiveAvatarAudioEncode", "LiveAvatarSampler", "LiveAvatarDecode", "LiveAvatarLiveVideo",
         "LiveAvatarSession"}


@pytest.mark.parametrize("folder", ["ComfyUI-LiveAvatar", "ComfyUI_LiveAvatar", "comfyui.liveavatar"])
def test_pack_imports_like_comfyui(tmp_path, folder):
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / folder).symlink_to(REPO, target_is_directory=True)
    # What ComfyUI's load_custom_node does: module name from the path (dots replaced),
    # spec from the folder's __init__.py, registered in sys.modules, executed.
    script = textwrap.dedent(f"""
        import importlib.util, json, os, sys
        path = {str(custom_nodes / folder)!r}
        before = list(sys.path)
        name = path.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        print(json.dumps({{"nodes": sorted(module.NODE_CLASS_MAPPINGS),
                           "names": sorted(module.NODE_DISPLAY_NAME_MAPPINGS),
                           "sys_path_changed": sys.path != before,
                           "top_level": [m for m in ("liveavatar", "nodes", "demo", "bench") if m in sys.modules]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["nodes"]) == NODES
    assert report["names"] == report["nodes"]
    assert report["sys_path_changed"] is False
    assert report["top_level"] == []
