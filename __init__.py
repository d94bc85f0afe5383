"""ComfyUI entry point. ComfyUI imports this folder from custom_nodes/ as a package and calls
``comfy_entrypoint`` to get the pack's nodes (V3 schema). The core lives in ``csg/`` and never
imports ComfyUI; ``nodes/`` translates ComfyUI types and calls it.

Outside ComfyUI (pytest collects this folder as a package, pip tooling inspects it) there is
nothing to register, so the nodes are only imported when ComfyUI's API is importable.
ComfyUI serves ``WEB_DIRECTORY`` at /extensions/<this folder's name>/ and loads every .js file in it.
"""

import importlib.util

WEB_DIRECTORY = "./web"  # the frontend extension (plain ES modules) and the node help pages (web/docs)

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
