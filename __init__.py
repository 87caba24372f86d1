"""Zero-shot video editing with diffusion models: a ComfyUI custom-node pack on diffusers.

ComfyUI imports this folder as a package (under a name derived from its path); everything inside
is imported relatively. The same folder is the `comfyui_video_edit` package when pip-installed.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web_ext"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
