"""Every node has a help page in web/docs/<node id>.md, the path ComfyUI's node help panel loads for a custom
node (/extensions/<pack folder>/docs/<node id>.md), and the page's title, Inputs and Outputs are the text
tools/build_node_docs.py writes from the node's V3 schema: each socket's name, type, tooltip, whether it is
optional and its default. The schema is read through ComfyUI's loader, so the pages follow the nodes as they
really are; after a node changes, re-run the script."""

import copy
from pathlib import Path

import pytest

from tools.build_node_docs import render_page, stale_pages

DOCS = Path(__file__).resolve().parents[2] / "web" / "docs"
FIX = "re-run COMFYUI_PATH=... python tools/build_node_docs.py"


@pytest.fixture(scope="module")
def schemas(comfyui):
    return [node.GET_SCHEMA() for node in comfyui.pack_module("nodes").NODES]


def test_every_node_has_a_help_page_and_no_page_is_left_over(schemas):
    assert sorted(path.stem for path in DOCS.glob("*.md")) == sorted(schema.node_id for schema in schemas)


def test_each_page_is_what_the_schema_writes(schemas):
    assert stale_pages(schemas, DOCS) == [], f"these pages differ from their nodes' schemas; {FIX}"
    for schema in schemas:
        page = (DOCS / f"{schema.node_id}.md").read_text(encoding="utf-8")
        assert "TODO" not in page and "\n## Example\n" in page, f"{schema.node_id}.md lacks its hand-written parts"


def test_a_tooltip_that_drifts_from_its_page_fails(schemas):
    schema = copy.deepcopy(next(s for s in schemas if s.node_id == "CSGCausalCounterfactual"))
    socket = next(s for s in schema.inputs if s.id == "concept_scales")
    socket.tooltip += " A sentence the help page does not have."
    assert stale_pages([schema], DOCS) == ["CSGCausalCounterfactual"]
    page = (DOCS / "CSGCausalCounterfactual.md").read_text(encoding="utf-8")
    rewritten = render_page(schema, page)
    assert "A sentence the help page does not have." in rewritten
    assert rewritten.split("## Example")[1] == page.split("## Example")[1], "the hand-written example is kept"
    output = schema.outputs[0]
    output.tooltip = "Another text."
    assert "| `image` | IMAGE | Another text. |" in render_page(schema, page)
