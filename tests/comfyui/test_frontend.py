"""The shipped workflows in ComfyUI's real frontend: a ComfyUI server with this pack, driven by a headless Chromium.

Each workflow must load with every node known, and the prompt the frontend would queue for it
(``app.graphToPrompt``) must be the one our harness executes in test_workflows.py. The server and
browser fixtures are in browser.py (Playwright and a Chromium; skipped without them).
"""

import io
import json
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.comfyui.browser import PACK_FOLDER, chromium_browser, frontend, server  # noqa: F401  (fixtures)
from tools.make_thumbnails import THUMBNAIL

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
MAX_THUMBNAIL_BYTES = 64 * 1024  # a few tens of KiB each
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}  # a display widget the frontend adds and sends along


def test_the_pack_offers_its_workflows_as_templates(server):
    with urllib.request.urlopen(f"{server}/api/workflow_templates") as answer:
        templates = json.load(answer)
    assert sorted(templates[PACK_FOLDER]) == [path.stem for path in WORKFLOWS]
    for path in WORKFLOWS:  # the card's picture, made by tools/make_thumbnails.py
        with urllib.request.urlopen(f"{server}/api/workflow_templates/{PACK_FOLDER}/{path.stem}.jpg") as answer:
            assert answer.headers["Content-Type"] == "image/jpeg"
            thumbnail = answer.read()
        assert len(thumbnail) <= MAX_THUMBNAIL_BYTES, f"{path.stem}.jpg: re-run tools/make_thumbnails.py"
        assert Image.open(io.BytesIO(thumbnail)).size == THUMBNAIL


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_the_frontend_loads_the_workflow_and_queues_what_the_harness_runs(frontend, path, comfyui):
    page, errors = frontend
    errors.clear()  # the app's own start-up is not ours to judge
    workflow = json.loads(path.read_text())
    loaded = page.evaluate("""async (workflow) => {
        await window.app.loadGraphData(workflow);
        const graph = window.app.graph;
        const unknown = graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
        const queued = await window.app.graphToPrompt();
        return {unknown, nodes: graph._nodes.length, links: Object.keys(graph.links).length,
                groups: graph._groups.length, prompt: queued.output};
    }""", workflow)
    assert loaded["unknown"] == [] and not errors
    assert (loaded["nodes"], loaded["links"], loaded["groups"]) == (len(workflow["nodes"]), len(workflow["links"]),
                                                                    len(workflow["groups"]))
    ours = comfyui.to_prompt(workflow)
    for node_id, node in loaded["prompt"].items():
        for name in FRONTEND_ONLY_INPUTS.get(node["class_type"], ()):
            node["inputs"].pop(name, None)
        node.pop("_meta", None)
        ours[node_id].pop("_meta", None)
    assert loaded["prompt"] == ours


def test_the_template_browser_lists_the_main_workflow_first(frontend):
    page, _ = frontend
    listed = page.evaluate("""async (pack) => {
        const { api } = await import("/scripts/api.js");  // the module the template browser asks
        return (await api.getWorkflowTemplates())[pack];
    }""", PACK_FOLDER)
    assert listed[0] == "counterfactual" and sorted(listed) == [path.stem for path in WORKFLOWS]
