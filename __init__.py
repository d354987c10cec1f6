"""ComfyUI entry point of the comfy-diffusionrig node pack.

ComfyUI imports this folder as a package but does not put it on sys.path, so the library
(`comfy_diffusionrig/`, next to this file) is made importable by appending this folder to
sys.path when it is not installed. Appending (not prepending) keeps ComfyUI's own `nodes`
module first; our `nodes/` package is imported relatively. Nothing heavy runs at import.

pytest (8+) also imports this file, as a plain module named `__init__` with no parent
package, when the repository folder is not a valid module name (`comfy-diffusionrig/`, as
`git clone` makes it). Then there is nothing to register and the relative import is skipped.
"""

import importlib.util
import os
import sys

# ComfyUI serves this folder at /extensions/<pack folder>/: its .js files are frontend extensions, and
# docs/<NodeClassName>.md are the node help pages of the node library (written by tools/make_docs.py)
WEB_DIRECTORY = "./web"

if __package__:  # imported as a package: ComfyUI (or any importer that gives it a parent package)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if importlib.util.find_spec("comfy_diffusionrig") is None:
        sys.path.append(_HERE)

    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
