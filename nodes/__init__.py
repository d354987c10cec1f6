"""ComfyUI nodes of comfy-diffusionrig: thin glue over the `comfy_diffusionrig` library.

Imported relatively by the pack's root `__init__.py` (inside ComfyUI, a bare `import nodes`
is ComfyUI's own module).
"""

from . import face_nodes, light_nodes, model_nodes, train_nodes, video_nodes
from .host import register_model_folders, serve_example_previews

register_model_folders()
serve_example_previews()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (face_nodes, light_nodes, model_nodes, train_nodes, video_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
