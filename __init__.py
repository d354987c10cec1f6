"""ComfyUI entry point of the comfy-diffusionrig node pack.

ComfyUI imports this folder as a package; the library is imported relatively so the pack
works without being pip-installed, and nothing heavy happens at import time.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
