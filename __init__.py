"""ComfyUI entry point of the LiveAvatar node pack.

ComfyUI imports this folder as a package; the engine (`liveavatar`) and the nodes are
plain packages beside this file, so the folder goes on sys.path once.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
