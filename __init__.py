"""ComfyUI entry point. ComfyUI imports this folder from custom_nodes/ as a package and calls
``comfy_entrypoint`` to get the pack's nodes (V3 schema). The core lives in ``csg/`` and never
imports ComfyUI; ``nodes/`` translates ComfyUI types and calls it.

Outside ComfyUI (pytest collects this folder as a package, pip tooling inspects it) there is
nothing to register, so the nodes are only imported when ComfyUI's API is importable.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
