"""ComfyUI entry point of the LiveAvatar node pack.

ComfyUI imports this folder as a package under a name of its own (the folder name, which
may hold a hyphen); the nodes reach the engine (`liveavatar/`) by package-relative imports,
so nothing is added to sys.path.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.session_route import register_routes

# The browser extensions (plain JS, served by ComfyUI under /extensions/<pack folder>/): the live
# player on the LiveAvatar Live Video node, the live session's controls and player, and old loader
# widget values put back in their place.
WEB_DIRECTORY = "./web"

# The live session's audio routes on ComfyUI's server (nothing outside ComfyUI).
register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
