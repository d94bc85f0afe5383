"""ComfyUI entry point. ComfyUI imports this folder from custom_nodes/ as a package and calls
``comfy_entrypoint`` to get the pack's nodes (V3 schema). The core lives in ``csg/`` and never
imports ComfyUI; ``nodes/`` translates ComfyUI types and calls it."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
