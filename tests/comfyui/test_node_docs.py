"""Every node has a help page in web/docs/<node id>.md, the path ComfyUI's node help panel loads for a custom
node (/extensions/<pack folder>/docs/<node id>.md), and the page names each input and output of the node's
schema. The schema is read through ComfyUI's loader, so the pages follow the nodes as they really are."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "web" / "docs"


@pytest.fixture(scope="module")
def schemas(comfyui):
    return [node.GET_SCHEMA() for node in comfyui.pack_module("nodes").NODES]


def test_every_node_has_a_help_page_and_no_page_is_left_over(schemas):
    assert sorted(path.stem for path in DOCS.glob("*.md")) == sorted(schema.node_id for schema in schemas)


def test_each_page_names_the_node_and_every_input_and_output(schemas):
    for schema in schemas:
        page = (DOCS / f"{schema.node_id}.md").read_text(encoding="utf-8")
        assert page.startswith(f"# {schema.display_name}\n"), schema.node_id
        named = set(re.findall(r"`([^`]+)`", page))
        for socket in schema.inputs:
            assert socket.id in named, f"{schema.node_id}.md does not describe the input {socket.id}"
        for socket in schema.outputs:
            name = socket.display_name or socket.id
            assert name in named, f"{schema.node_id}.md does not describe the output {name}"
        assert "## Example" in page, f"{schema.node_id}.md has no example"
