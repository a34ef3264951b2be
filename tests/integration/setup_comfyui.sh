#!/usr/bin/env bash
# Makes a ComfyUI to run the integration tests in, as a user installs one:
#   DIR/ComfyUI  ComfyUI 0.3.64, unpacked from ../shared/comfyui (or $COMFYUI_TARBALL)
#   DIR/venv     its own Python environment: torch + torchvision + torchaudio, ComfyUI's
#                requirements (the frontend is a package), the pack's requirements
# Then: COMFYUI_PATH=DIR/ComfyUI COMFYUI_PYTHON=DIR/venv/bin/python python -m pytest -q -m integration tests
#
# Why this torch: ComfyUI imports torchvision at start (comfy/sd.py) and torchaudio for the
# audio nodes. The torch 2.13.0 CPU build on this machine's disk takes neither: PyPI's
# torchvision and torchaudio wheels are built against CUDA torch ('operator torchvision::nms
# does not exist', 'libc10_cuda.so: cannot open shared object file'). torch 2.14.1 with
# torchvision 0.29.1 (both on disk here, else from PyPI) and torchaudio 2.11.1 (PyPI) import
# together and run on the CPU (ComfyUI is started with --cpu).
set -euo pipefail
dir=${1:?usage: tests/integration/setup_comfyui.sh DIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)
tarball=${COMFYUI_TARBALL:-$repo/../shared/comfyui/ComfyUI-0.3.64.tar.gz}
mkdir -p "$dir"
tar xzf "$tarball" -C "$dir"
python3 -m venv "$dir/venv"
pip() { "$dir/venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q torchaudio==2.11.1
pip install -q -r "$dir/ComfyUI/requirements.txt" -r "$repo/requirements.txt"
"$dir/venv/bin/python" -c "import torch, torchvision, torchaudio, comfyui_frontend_package; print('ComfyUI venv: torch', torch.__version__, 'torchvision', torchvision.__version__, 'torchaudio', torchaudio.__version__)"
