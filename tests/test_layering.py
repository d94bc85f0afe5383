"""The pack's layers, read from every module's AST (imports inside functions included): nothing in csg/
imports upward, and the command-line layer stays a set of short functions with one set of edit flags."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSG = ROOT / "csg"
# lowest first; a module may import its own layer and those below it. Everything else in csg/ is the core.
COMMAND_LINE = ("csg.commands", "csg.cli", "csg.evaluate")
EVALUATION = ("csg.evaluation", "csg.report")
MAX_FUNCTION_LINES = 50


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, resolved to absolute names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # "from . import vlm" imports csg.vlm
    return names


def layer(module: str) -> int:
    within = lambda prefixes: any(module == p or module.startswith(p + ".") for p in prefixes)  # noqa: E731
    return 2 if within(COMMAND_LINE) else 1 if within(EVALUATION) else 0


MODULES = sorted(CSG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_in_csg_imports_upward_or_comfyui(path):
    own = layer(module_name(path))
    csg_imports = {name for name in imported(path) if name == "csg" or name.startswith("csg.")}
    upward = sorted(name for name in csg_imports if layer(name) > own)
    assert upward == [], f"{path.relative_to(ROOT)} (layer {own}) imports upward: {upward}"
    foreign = sorted(name for name in imported(path) if name.split(".")[0] in ("comfy", "nodes", "comfy_extras"))
    assert foreign == [], f"{path.relative_to(ROOT)} imports ComfyUI or the nodes: {foreign}"


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    probe = CSG / "commands" / "options.py"
    assert "csg.evaluation.scoring" in imported(CSG / "commands" / "counterfactual.py")  # imported in a function
    assert "csg.vlm.OpenAICompatibleVLM" in imported(probe)


def test_no_function_in_the_command_line_layer_is_longer_than_50_lines():
    long = []
    for path in MODULES:
        if layer(module_name(path)) != 2:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_cli_py_is_no_longer_the_largest_file_in_csg():
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in CSG.glob("*.py")}
    assert max(sizes, key=sizes.get) != CSG / "cli.py"


def edit_flags(parser) -> dict[str, tuple]:
    """The editing group's flags with what they accept: type, default, choices and action."""
    group = next(g for g in parser._action_groups if g.title == "editing (defaults: the paper's)")
    return {flag: (type(action).__name__, action.type, action.default, action.choices)
            for action in group._group_actions for flag in action.option_strings}


def test_both_tools_take_the_same_edit_flags():
    from csg.cli import build_parser as counterfactual_parser
    from csg.evaluate import build_parser as evaluate_parser

    one, other = edit_flags(counterfactual_parser()), edit_flags(evaluate_parser())
    one.pop("--method")  # one method per photo, or the comma-separated --methods of a whole evaluation
    other.pop("--methods")
    assert one == other
    assert {"--cooldown", "--concept-scale", "--reverse", "--protect-non-descendants"} <= set(other)
