"""The public Python API: ``csg.__all__`` names exactly what ``csg`` offers, lazily, each name documented."""

import inspect
import subprocess
import sys

import pytest

import csg

RESULT_TYPES = {"CounterfactualResult", "BaselineResult"}  # returned, never built by users: they list Attributes


def test_all_names_exactly_what_is_importable_and_nothing_twice():
    assert len(csg.__all__) == len(set(csg.__all__))
    for name in csg.__all__:
        value = getattr(csg, name)
        assert getattr(value, "__module__", "").startswith("csg."), name
    public = {name for name in dir(csg) if not name.startswith("_") and not inspect.ismodule(getattr(csg, name))}
    assert public == set(csg.__all__)  # nothing else public (submodules aside)
    with pytest.raises(AttributeError, match="the public API is csg.__all__"):
        csg.edit_spec  # noqa: B018  (internal: reached through its module only)


def test_the_entry_points_are_there():
    for name in ("counterfactual", "counterfactuals", "baseline_counterfactual", "CSGParams", "CausalGraph",
                 "Intervention", "DiffusersSDXLHost", "OpenAICompatibleVLM", "TransformersVLM", "extract_graph",
                 "lpips_distance", "vlm_effectiveness", "CSGError", "InputError", "GraphError"):
        assert name in csg.__all__


def test_the_counterfactual_function_wins_over_the_submodule_of_that_name():
    import csg.counterfactual  # noqa: F401  (the submodule, imported the usual way)

    assert inspect.isfunction(csg.counterfactual)
    from csg.counterfactual import CSGParams

    assert csg.CSGParams is CSGParams


def test_each_exported_callable_documents_args_and_raises():
    for name in csg.__all__:
        value = getattr(csg, name)
        doc = inspect.getdoc(value) or ""
        if inspect.isclass(value) and issubclass(value, Exception):
            assert doc, f"{name} has no docstring"
        elif name in RESULT_TYPES:
            assert "\nAttributes:\n" in doc, f"{name} does not list its Attributes"
        else:
            for section in ("Args:", "Raises:"):
                assert f"\n{section}\n" in doc, f"csg.{name} has no {section} section in its docstring"
            if inspect.isfunction(value):
                assert "\nReturns:\n" in doc, f"csg.{name} has no Returns: section"


def test_importing_csg_does_not_import_torch():
    code = "import sys, csg; assert 'torch' not in sys.modules; csg.CausalGraph; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
