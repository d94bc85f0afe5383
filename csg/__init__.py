"""FM-CGM with Causal Semantic Guidance: the host-agnostic core.

The counterfactual path reads as the paper does: extract (``csg.vlm``) -> manipulate
(``csg.graph`` + ``csg.vlm``) -> invert (abduction) -> guide (action) -> sample (prediction).

The public API is what ``__all__`` names, importable from ``csg`` itself::

    from csg import CausalGraph, CSGParams, DiffusersSDXLHost, counterfactual

Everything else (the submodules' other names) is internal and may change. The names load lazily,
so ``import csg`` stays cheap until one of them (and with it torch) is used.
"""

import importlib as _importlib
import sys as _sys
import types as _types
from typing import Any as _Any

__version__ = "0.1.0"

_EXPORTS = {
    "counterfactual": ["CSGParams", "CounterfactualResult", "BaselineResult", "counterfactual", "counterfactuals",
                       "baseline_counterfactual", "baseline_counterfactuals", "load_image", "parse_concept_scales"],
    "graph": ["CausalGraph", "Concept", "Relationship", "Intervention", "PropagatedChange", "check_intervention"],
    "render": ["render_graph"],
    "diffusers_host": ["DiffusersSDXLHost"],
    "vlm": ["TransformersVLM", "OpenAICompatibleVLM", "CachedVLM", "describe_scene", "extract_graph",
            "propose_interventions", "propagate_intervention", "manual_intervention", "judge_counterfactual",
            "VLMOutputError"],
    "metrics": ["load_lpips_vgg", "lpips_distance", "vlm_effectiveness"],
    "errors": ["CSGError", "GraphError", "InputError", "VLMError", "WeightsMissingError"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> _Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'csg' has no attribute {name!r}; the public API is csg.__all__.")
    value = getattr(_importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(_types.ModuleType):
    """``csg.counterfactual`` is the API's function, though a submodule has that name too: importing the
    submodule (``from csg.counterfactual import ...``) does not replace the function on the package."""

    def __setattr__(self, name: str, value: _Any) -> None:
        if not (name in _MODULE_OF and isinstance(value, _types.ModuleType)):
            super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
