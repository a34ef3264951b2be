"""ComfyUI entry point of the LiveAvatar node pack.

ComfyUI imports this folder as a package under a name of its own (the folder name, which
may hold a hyphen); the nodes reach the engine (`liveavatar/`) by package-relative imports,
so nothing is added to sys.path.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The browser extensions (plain JS, served by ComfyUI under /extensions/<pack folder>/): the live
# player on the LiveAvatar Live Video node, and old loader widget values put in their place.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
