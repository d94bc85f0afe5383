"""Packaging invariants: how ComfyUI and pip see the pack."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) for every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_core_never_imports_comfyui_and_imports_itself_relatively():
    # ComfyUI loads the pack folder as a package, so `csg` is not a top-level module there.
    for path in (ROOT / "csg").rglob("*.py"):
        for module, level in _imports(path):
            top = module.split(".")[0]
            assert not (level == 0 and top in {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes"}), (
                f"{path.relative_to(ROOT)} imports ComfyUI module {module}")
            assert not (level == 0 and top == "csg"), f"{path.relative_to(ROOT)} imports '{module}' absolutely; use a relative import"


def test_pyproject_declares_the_registry_metadata_and_a_semver_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    comfy = project["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in comfy
    assert "test" in project["project"]["optional-dependencies"]
    import csg

    assert csg.__version__ == project["project"]["version"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in readme
