"""Write the Inputs and Outputs of each node's help page (web/docs/<node id>.md) from its V3 schema.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tools/build_node_docs.py

The schemas come from a running ComfyUI with this pack loaded (tools/comfyui_harness.py), as in
tools/build_workflows.py, so a tooltip, a default or a socket is written once, in the node, and the
page follows it. A page is

    # <display name>                         from the schema
    <what it does>                           hand-written, kept
    ## Inputs, ## Outputs                    from the schema: name, type, tooltip, optional, default
    ## Example ...                           hand-written, kept (everything from this heading on)

A new node gets a page with placeholders for the two hand-written parts. tests/comfyui/
test_node_docs.py checks that every page is what this script writes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
EXAMPLE_HEADING = "## Example"
TABLE_HEADINGS = ("## Inputs", "## Outputs")


def cell(text: str) -> str:
    """Text for one Markdown table cell: on one line, with its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def default_text(socket: Any) -> str:
    """The widget's default; none for a text box (its default is a sample to edit, not a setting)."""
    default = getattr(socket, "default", None)
    if default is None or getattr(socket, "multiline", False):
        return ""
    if default == "":
        return " Default: empty."
    return f" Default: `{default}`."


def input_row(socket: Any) -> str:
    optional = "Optional. " if socket.optional else ""
    about = f"{optional}{socket.tooltip or ''}{default_text(socket)}"
    return f"| `{socket.id}` | {socket.get_io_type()} | {cell(about)} |"


def output_row(socket: Any) -> str:
    return f"| `{socket.display_name or socket.id}` | {socket.get_io_type()} | {cell(socket.tooltip or '')} |"


def tables(schema: Any) -> str:
    """The generated part of a page: the Inputs and Outputs tables."""
    inputs = "\n".join(input_row(s) for s in schema.inputs) or "| (none) | | |"
    outputs = "\n".join(output_row(s) for s in schema.outputs) or "| (none) | | |"
    return (f"## Inputs\n\n| Input | Type | What it is |\n| --- | --- | --- |\n{inputs}\n\n"
            f"## Outputs\n\n| Output | Type | What it is |\n| --- | --- | --- |\n{outputs}\n")


def hand_written(page: str | None) -> tuple[str, str]:
    """The two hand-written parts of a page: what the node does (after the title, before the tables) and
    everything from the example heading on."""
    if page is None:
        return "TODO: what the node does, in a paragraph.", f"{EXAMPLE_HEADING}\n\nTODO: one example.\n"
    body = page.split("\n", 1)[1] if page.startswith("# ") else page
    about, _, rest = body.partition(EXAMPLE_HEADING)
    for heading in TABLE_HEADINGS:
        about = about.split(f"\n{heading}\n", 1)[0]
    return about.strip(), EXAMPLE_HEADING + rest if rest else f"{EXAMPLE_HEADING}\n\nTODO: one example.\n"


def render_page(schema: Any, page: str | None) -> str:
    """The page of ``schema``: its title and tables generated, the hand-written parts of ``page`` kept."""
    about, example = hand_written(page)
    return f"# {schema.display_name}\n\n{about}\n\n{tables(schema)}\n{example.rstrip()}\n"


def stale_pages(schemas: list[Any], docs: Path = DOCS) -> list[str]:
    """The node ids whose page is missing or differs from what this script writes."""
    stale = []
    for schema in schemas:
        path = docs / f"{schema.node_id}.md"
        page = path.read_text(encoding="utf-8") if path.exists() else None
        if page != render_page(schema, page):
            stale.append(schema.node_id)
    return stale


def main() -> None:
    if str(ROOT) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(ROOT))
    from tools.comfyui_harness import start_comfyui

    comfy = start_comfyui(Path(tempfile.mkdtemp(prefix="csg-node-docs-")))
    DOCS.mkdir(parents=True, exist_ok=True)
    for node in comfy.pack_module("nodes").NODES:
        schema = node.GET_SCHEMA()
        path = DOCS / f"{schema.node_id}.md"
        page = path.read_text(encoding="utf-8") if path.exists() else None
        written = render_page(schema, page)
        if written != page:
            path.write_text(written, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
