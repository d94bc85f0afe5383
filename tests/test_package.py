"""Packaging invariants: how ComfyUI and pip see the pack."""

import ast
import re
from pathlib import Path

import tomllib

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
            assert not (level == 0 and top == "csg"), (
                f"{path.relative_to(ROOT)} imports '{module}' absolutely; use a relative import")


def _absolute_imports(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved from the repository root (itself a package)."""
    package = list(path.relative_to(ROOT).parent.parts)
    resolved = []
    for module, level in _imports(path):
        base = package[:len(package) - (level - 1)] if level else []
        resolved.append(".".join([*base, *filter(None, module.split("."))]))
    return resolved


def test_nothing_shipped_imports_the_tests_and_the_pack_imports_no_tools():
    """Tests import tools, never the reverse; csg/ and nodes/ (the pack) need neither tests/ nor tools/."""
    for folder, forbidden in (("csg", {"tests", "tools"}), ("nodes", {"tests", "tools"}), ("tools", {"tests"})):
        for path in (ROOT / folder).rglob("*.py"):
            for module in _absolute_imports(path):
                assert module.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {module}"


def test_pyproject_has_a_semver_version_and_csg_reports_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    assert "test" in project["project"]["optional-dependencies"]
    import csg

    assert csg.__version__ == project["project"]["version"]


def test_registry_metadata_passes_the_registrys_rules():
    """What comfy-cli's `comfy node validate` (run in CI) and the registry read from pyproject.toml."""
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    info, comfy = project["project"], project["tool"]["comfy"]
    for key in ("name", "version", "description"):
        assert isinstance(info.get(key), str) and info[key].strip(), f"[project].{key} is empty"
    assert info["license"].get("text") or info["license"].get("file"), "[project].license needs text or file"
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"]), "PublisherId: lowercase letters, digits, '-'"
    assert comfy["DisplayName"].strip()
    repository = info["urls"]["Repository"].removeprefix("https://github.com/")
    icon = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(repository)}/main/(.+)", comfy["Icon"])
    assert icon, f"Icon must be a raw URL of a file on this repository's main branch, got {comfy['Icon']!r}"
    from PIL import Image

    with Image.open(ROOT / icon.group(1)) as image:  # the file exists, is an image, and is small
        assert max(image.size) <= 400 and image.width == image.height
    SpecifierSet(comfy["requires-comfyui"])  # raises InvalidSpecifier when it is not a version specifier
    assert all((ROOT / path).exists() for path in comfy["includes"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    top = readme.split("\n## What it does", 1)[0]  # installation in ComfyUI first, then the CLI and the tests
    assert command.strip() in top, "the README's top must give the test command .ci/run runs"
    assert top.index("\n## Installation\n") < top.index(command.strip()), "the README opens with installation"


# -- requirements.txt: what ComfyUI-Manager installs for a git-cloned pack ----------------------------


def _requirement_name(requirement: str) -> str:
    """The project name of a PEP 508 requirement, normalised as PEP 503 does."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert name, f"unreadable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _requirements_txt() -> list[str]:
    lines = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def test_requirements_txt_is_pyproject_dependencies_without_torch():
    # ComfyUI brings its own torch; every other runtime dependency must be installable from requirements.txt.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = _requirements_txt()
    assert "torch" in {_requirement_name(d) for d in declared}
    assert "torch" not in {_requirement_name(r) for r in listed}, "requirements.txt must not install torch"
    assert len(set(listed)) == len(listed), "requirements.txt lists a dependency twice"
    normalise = lambda requirements: sorted("".join(r.split()) for r in requirements)  # noqa: E731
    assert normalise(listed) == normalise(d for d in declared if _requirement_name(d) != "torch")


# -- Documentation: README.md (for node users), docs/*.md and CONTRIBUTING.md name what exists ----------

README_MAX_BYTES = 15 * 1024


def _section(path: Path, heading: str) -> str:
    """Text of the Markdown file ``path`` from ``heading`` (a whole heading line) to the next heading of
    the same or higher level; lines inside code fences (shell comments start with "#") are never headings."""
    level = len(heading.split(" ", 1)[0])
    lines, inside, fenced = [], False, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            if inside:
                break
            inside = line == heading
        if inside:
            lines.append(line)
    assert lines, f"{path.relative_to(ROOT)} has no heading {heading!r}"
    return "\n".join(lines)


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def _declared_nodes() -> set[str]:
    declared = set()
    for path in (ROOT / "nodes").glob("*.py"):
        declared |= set(re.findall(r"node_id=\"([A-Za-z0-9_]+)\"", path.read_text()))
    assert declared, "no node ids found in nodes/"
    return declared


def _table_node_ids(text: str) -> set[str]:
    """Node ids in the second column of a Markdown table: | Display name | `CSG...` | ..."""
    return set(re.findall(r"^\| [^|]+ \| `(CSG[A-Za-z0-9_]+)` \|", text, re.MULTILINE))


def test_readme_and_node_reference_document_every_node_and_name_no_other():
    declared = _declared_nodes()
    for path, heading in ((ROOT / "README.md", "## Nodes"), (ROOT / "docs" / "nodes.md", "## The nodes")):
        named = _table_node_ids(_section(path, heading))
        where = f"{path.relative_to(ROOT)} ({heading})"
        assert declared - named == set(), f"{where} does not document these nodes: {sorted(declared - named)}"
        assert named - declared == set(), f"{where} names nodes that do not exist: {sorted(named - declared)}"


def _cli_options() -> set[str]:
    from csg.cli import build_parser

    return {flag for action in build_parser()._actions for flag in action.option_strings}


OTHER_TOOLS_FLAGS = {"--include", "--local-dir"}  # hf, quoted in the weights instructions


def test_cli_doc_documents_exactly_the_cli_options():
    options = _cli_options()
    mentioned = _flags((ROOT / "docs" / "cli.md").read_text())
    assert mentioned, "docs/cli.md mentions no options"
    assert mentioned - options - OTHER_TOOLS_FLAGS == set(), (
        f"docs/cli.md mentions unknown CLI options: {sorted(mentioned - options)}")
    undocumented = {o for o in options if o.startswith("--")} - mentioned
    assert undocumented == set(), f"docs/cli.md does not document: {sorted(undocumented)}"


def test_evaluation_doc_documents_every_csg_evaluate_option():
    from csg.evaluate import build_parser

    options = {flag for action in build_parser()._actions for flag in action.option_strings if flag.startswith("--")}
    undocumented = options - {"--help"} - _flags((ROOT / "docs" / "evaluation.md").read_text())
    assert undocumented == set(), f"docs/evaluation.md does not document: {sorted(undocumented)}"


def test_readme_mentions_only_existing_cli_options():
    mentioned = _flags((ROOT / "README.md").read_text())
    unknown = mentioned - _cli_options() - OTHER_TOOLS_FLAGS
    assert unknown == set(), f"README mentions unknown CLI options: {sorted(unknown)}"


def test_benchmark_doc_options_exist():
    options = set()
    for script in ("benchmark.py", "memory_model.py", "comfy_benchmark.py", "gpu/run.py"):
        tree = ast.parse((ROOT / "benchmarks" / script).read_text())
        found = {arg.value for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
                 for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}
        assert found, f"no add_argument options found in benchmarks/{script}"
        options |= found
    text = (ROOT / "docs" / "benchmark.md").read_text()
    pip_lines = r"pip3? (?:install|download)\b[^`\n]*"  # a pip command line's options are pip's
    mentioned = _flags(re.sub(pip_lines, "", text))
    assert mentioned, "docs/benchmark.md mentions no options"
    assert mentioned - options == set(), (
        f"docs/benchmark.md mentions unknown benchmark options: {sorted(mentioned - options)}")


def test_readme_is_at_most_15_kib():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: it is for node users; move detail into docs/")


def _documentation_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 2, "no docs/*.md found"
    return files


def _outside_code(text: str) -> str:
    """Markdown text without fenced code blocks and inline code spans."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation other than "-" and
    "_" dropped, spaces as "-", a repeated anchor numbered -1, -2, ..."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6} (.*)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_documentation_links_point_to_existing_files_and_headings():
    broken = []
    for doc in _documentation_files():
        text = _outside_code(doc.read_text())  # a link whose text is code keeps its target: [](target)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not checked here
                continue
            path_part, _, anchor = target.partition("#")
            linked = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{where}: {linked.name} has no heading with anchor #{anchor}")
    assert broken == [], "broken links:\n" + "\n".join(broken)
