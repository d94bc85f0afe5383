"""The shipped workflows in ComfyUI's real frontend: a ComfyUI server with this pack, driven by a headless Chromium.

Each workflow must load with every node known, and the prompt the frontend would queue for it
(``app.graphToPrompt``) must be the one our harness executes in test_workflows.py. Needs Playwright
and a Chromium (Debian: ``apt-get install chromium``; or set CSG_CHROMIUM); skipped otherwise.
The server runs from a temporary base directory, so nothing is written into the ComfyUI checkout.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.comfyui.csg_fixtures import comfyui_path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview"}}  # a display widget the frontend adds and sends along
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}


def chromium() -> str | None:
    return os.environ.get("CSG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="the frontend test drives Chromium with Playwright")
    if chromium() is None:
        pytest.skip("no Chromium found: apt-get install chromium, or set CSG_CHROMIUM")
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-causal-counterfactuals").symlink_to(ROOT, target_is_directory=True)
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(QUIET_SETTINGS))
    port = free_port()
    log = (base / "server.log").open("w")
    process = subprocess.Popen([sys.executable, str(comfyui_path() / "main.py"), "--cpu", "--listen", "127.0.0.1",
                                "--port", str(port), "--base-directory", str(base), "--disable-auto-launch"],
                               cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/system_stats", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{(base / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def frontend(server):
    """(the app's page, the page errors seen so far)"""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        tab = browser.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(server, wait_until="networkidle")
        tab.wait_for_function("window.app && window.app.graph", timeout=120_000)
        yield tab, errors
        browser.close()


def test_the_pack_offers_its_workflows_as_templates(server):
    with urllib.request.urlopen(f"{server}/api/workflow_templates") as answer:
        templates = json.load(answer)
    assert sorted(templates["comfyui-causal-counterfactuals"]) == [path.stem for path in WORKFLOWS]


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
