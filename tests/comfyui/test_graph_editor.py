"""The causal graph inside the nodes (web/causal_graph.js), in ComfyUI's real frontend: a ComfyUI server with this
pack and a headless Chromium clicking and typing as a user does.

The graph nodes draw their graph after a run; Causal Graph From JSON edits its graph in place (a cycle is
refused); Manual Intervention takes its target and value from a click; edits survive saving and reloading;
undo and redo work; the pack adds no error to the page; every node has a help page the help panel shows.
The server and browser fixtures are in browser.py (Playwright and a Chromium; skipped without them).
"""

import copy
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.comfyui.browser import (  # noqa: F401
    BROWSER_TIMEOUT_MS,
    PACK_FOLDER,
    ROOT,
    chromium_browser,
    open_frontend,
    require_browser,
    running_comfyui,
    server,
)

# Without Playwright the module is skipped (and fails where CSG_REQUIRE_COMFYUI forbids skips), not an import error
# that stops the collection of the whole core suite.
expect = pytest.importorskip("playwright.sync_api", reason="the frontend tests drive Chromium with Playwright").expect

HAND_WRITTEN = json.loads((ROOT / "workflows" / "hand_written_graph.json").read_text())
EDITOR, INTERVENTION, REPORT = 4, 6, 7  # in hand_written_graph: Causal Graph From JSON, Intervention From JSON,
                                        # Preview Any
PORTRAIT = json.loads(next(n for n in HAND_WRITTEN["nodes"] if n["id"] == EDITOR)["widgets_values"][0])


def graph_part(workflow):
    """A copy of the workflow's graph nodes alone (graph, intervention, report), with the links between them."""
    keep = {EDITOR, INTERVENTION, REPORT}
    workflow = copy.deepcopy(workflow)  # the tests edit their copy
    return {**workflow, "nodes": [n for n in workflow["nodes"] if n["id"] in keep],
            "links": [link for link in workflow["links"] if link[1] in keep and link[3] in keep], "groups": []}


def load(page, workflow):
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)


def graph_in(page, node_id):
    """The node's graph drawing, brought on screen at 100% so it can be clicked."""
    page.evaluate("""async (id) => {
        const node = app.graph.getNodeById(id);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [400 - node.pos[0], 250 - node.pos[1]];
        app.canvas.setDirty(true, true);
        // DOM widgets follow the canvas when it next draws; wait until they have moved
        for (let frame = 0; frame < 3; frame += 1) await new Promise(requestAnimationFrame);
    }""", node_id)
    return page.locator(f'.csg-graph[data-node-id="{node_id}"]')


def add_manual_intervention(page):
    """A Manual Intervention (no VLM) on the hand-written graph, its report into a Preview Any:
    (its id, the preview's)."""
    return page.evaluate("""([editor]) => {
        const manual = LiteGraph.createNode("CSGManualIntervention");
        manual.pos = [1200, 0];
        app.graph.add(manual);
        app.graph.getNodeById(editor).connect(0, manual, 0);
        const preview = LiteGraph.createNode("PreviewAny");
        preview.pos = [1200, 760];
        app.graph.add(preview);
        manual.connect(2, preview, 0);
        return [manual.id, preview.id];
    }""", [EDITOR])


def roles(graph):
    graph.locator(".csg-concept").first.wait_for()
    return {c.get_attribute("data-concept-id"): c.get_attribute("data-role")
            for c in graph.locator(".csg-concept").all()}


def widget(page, node_id, name):
    return page.evaluate("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value",
                         [node_id, name])


def history(url):
    with urllib.request.urlopen(f"{url}/api/history") as answer:
        return json.load(answer)


def queue_outputs(page, url, node_ids):
    """Queue the given output nodes as the user does (select them, "Queue Selected Output Nodes"); wait for the run."""
    before = set(history(url))
    page.evaluate("""async (ids) => {
        app.canvas.selectNodes(ids.map(id => app.graph.getNodeById(id)));
        await app.extensionManager.command.execute("Comfy.QueueSelectedOutputNodes");
    }""", node_ids)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = {key: run for key, run in history(url).items() if key not in before}
        if new and all(run["status"].get("completed") is not None for run in new.values()):
            (run,) = new.values()
            assert run["status"]["status_str"] == "success", run["status"]
            return run
        time.sleep(0.5)
    raise AssertionError("the queued run did not finish")


def click_concept(graph, concept_id):
    graph.locator(f'[data-concept-id="{concept_id}"]').click()


def type_into(locator, text):
    locator.fill(text)
    locator.press("Enter")


@pytest.fixture
def page(server, chromium_browser):
    with open_frontend(chromium_browser, server) as (tab, _):
        yield tab


def test_the_nodes_draw_the_graph_and_the_intervention_after_a_run(server, page):
    load(page, HAND_WRITTEN)  # no VLM in this workflow; the SDXL half is not queued
    preview_id = page.evaluate("""([graph, intervention]) => {
        const preview = LiteGraph.createNode("CSGCausalGraphPreview");
        preview.pos = [380, 1000];
        app.graph.add(preview);
        app.graph.getNodeById(graph).connect(0, preview, 0);
        app.graph.getNodeById(intervention).connect(0, preview, 1);
        return preview.id;
    }""", [EDITOR, INTERVENTION])
    graph = graph_in(page, INTERVENTION)
    assert graph.locator(".csg-concept").count() == 0  # nothing to draw before the run
    queue_outputs(page, server, [5, REPORT, preview_id])

    expected_roles = {"c1": "target", "c2": "changed", "c3": "changed", "c4": "unchanged", "c5": "unchanged",
                      "c6": "unchanged"}
    for node_id in (INTERVENTION, preview_id):
        graph = graph_in(page, node_id)
        graph.locator('.csg-concept[data-role="target"]').wait_for()
        assert roles(graph) == expected_roles
        assert graph.locator(".csg-edge").count() == len(PORTRAIT["relationships"]) == 2
        assert graph.locator(".csg-edge-active").count() == 2  # both carry the change from age
        assert graph.locator('[data-concept-id="c1"] .csg-value').text_content() == "middle-aged → old"
        assert graph.locator('[data-concept-id="c2"] .csg-value').text_content() == "light brown → gray"
        assert [item.get_attribute("data-role") for item in graph.locator(".csg-legend-item").all()] == [
            "target", "changed", "unchanged", "stripped"]
        assert ("How old the woman in the portrait looks."
                in graph.locator('[data-concept-id="c1"] > title').text_content())
        assert "Hair turns gray with age." in graph.locator('[data-edge-id="r1"] > title').text_content()
    editor = graph_in(page, EDITOR)
    assert set(roles(editor).values()) == {"plain"} and len(roles(editor)) == len(PORTRAIT["concepts"])

    # Wheel zooms and dragging pans; Fit brings the whole graph back.
    graph = graph_in(page, INTERVENTION)
    svg = graph.locator("svg")
    fitted = svg.get_attribute("viewBox")
    box = svg.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)
    expect(svg).not_to_have_attribute("viewBox", fitted)  # the wheel event is handled after wheel() returns
    zoomed = svg.get_attribute("viewBox")
    assert float(zoomed.split()[2]) < float(fitted.split()[2])  # zoomed in: a narrower view
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + 60, box["y"] + 40)
    page.mouse.up()
    expect(svg).not_to_have_attribute("viewBox", zoomed)
    assert svg.get_attribute("viewBox").split()[2:] == zoomed.split()[2:]  # panned, same zoom
    graph.get_by_role("button", name="Fit").click()
    expect(svg).to_have_attribute("viewBox", fitted)

    # A change to a non-descendant is stripped by the check, and drawn as such.
    rogue = json.loads(widget(page, INTERVENTION, "intervention_json"))
    rogue["propagated_changes"].append({"concept_id": "c4", "new_value": "frowning", "reason": "old people frown"})
    page.evaluate("([id, text]) => { app.graph.getNodeById(id).widgets[0].value = text; }",
                  [INTERVENTION, json.dumps(rogue)])
    queue_outputs(page, server, [REPORT])
    stripped = graph.locator('[data-concept-id="c4"].csg-has-stripped')
    stripped.wait_for()
    assert stripped.get_attribute("data-role") == "unchanged"
    assert stripped.locator(".csg-note").text_content() == "stripped → frowning"
    assert "not a descendant of the target" in stripped.locator("title").text_content()

    # The styles come from the theme: the text colour follows the colour palette.
    dark = graph.locator(".csg-name").first.evaluate("e => getComputedStyle(e).fill")
    page.evaluate("async () => { await app.extensionManager.setting.set('Comfy.ColorPalette', 'light'); }")
    light = graph.locator(".csg-name").first.evaluate("e => getComputedStyle(e).fill")
    assert dark != light


def test_clicking_a_concept_and_typing_a_value_is_the_intervention_that_runs(server, page):
    load(page, graph_part(HAND_WRITTEN))
    manual, report = add_manual_intervention(page)
    graph = graph_in(page, manual)
    assert set(roles(graph)) == {c["id"] for c in PORTRAIT["concepts"]}  # drawn from the upstream widget,
                                                                         # before any run
    click_concept(graph, "c1")
    assert roles(graph) == {"c1": "target", "c2": "may-change", "c3": "may-change", "c4": "unchanged",
                            "c5": "unchanged", "c6": "unchanged"}
    type_into(graph.locator(".csg-new-value"), "elderly")
    assert (widget(page, manual, "target"), widget(page, manual, "new_value")) == ("age", "elderly")
    saved = page.evaluate("(id) => app.graph.serialize().nodes.find(n => n.id === id).widgets_values", manual)
    assert saved[:2] == ["age", "elderly"]

    run = queue_outputs(page, server, [report])
    executed = run["outputs"][str(manual)]["causal_graph"][0]["intervention"]
    assert (executed["target_concept_id"], executed["new_value"]) == ("c1", "elderly")
    assert run["prompt"][2][str(manual)]["inputs"]["target"] == "age"
    graph.locator('[data-concept-id="c2"][data-role="unchanged"]').wait_for()  # no VLM: the target alone changed
    assert graph.locator('[data-concept-id="c1"] .csg-value').text_content() == "middle-aged → elderly"


def test_the_graph_is_edited_in_the_node_and_an_edge_that_closes_a_cycle_is_refused(page):
    load(page, graph_part(HAND_WRITTEN))
    graph = graph_in(page, EDITOR)
    roles(graph)
    before = widget(page, EDITOR, "graph_json")

    click_concept(graph, "c2")  # hair color; age -> hair color exists
    graph.get_by_role("button", name="+ Effect…").click()
    click_concept(graph, "c1")
    message = graph.locator(".csg-message")
    # the server's answer
    expect(message).to_have_text(re.compile(r"hair color → age refused: .*cycle: c1 -> c2 -> c1"))
    assert message.get_attribute("data-kind") == "error"
    assert widget(page, EDITOR, "graph_json") == before
    assert graph.locator(".csg-edge").count() == 2

    graph.get_by_role("button", name="+ Concept").click()
    graph.locator('.csg-concept[data-concept-id="c7"]').wait_for()
    type_into(graph.locator('input[data-field="name"]'), "glasses")
    graph.locator('[data-concept-id="c7"] .csg-name:text("glasses")').wait_for()
    click_concept(graph, "c1")
    graph.get_by_role("button", name="+ Effect…").click()
    click_concept(graph, "c7")
    graph.locator('[data-cause-id="c1"][data-effect-id="c7"]').wait_for()
    edited = json.loads(widget(page, EDITOR, "graph_json"))
    assert {"id": "c7", "name": "glasses", "current_value": "unknown", "description": ""} in edited["concepts"]
    assert {"id": "r3", "cause_id": "c1", "effect_id": "c7", "description": ""} in edited["relationships"]

    # Undo and redo are ComfyUI's own: each edit is one step.
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.Undo'); }")
    graph = graph_in(page, EDITOR)
    expect(graph.locator(".csg-edge")).to_have_count(2)
    assert "glasses" in widget(page, EDITOR, "graph_json") and "r3" not in widget(page, EDITOR, "graph_json")
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.Redo'); }")
    graph = graph_in(page, EDITOR)
    graph.locator('[data-edge-id="r3"]').wait_for()

    graph.locator('[data-edge-id="r2"] .csg-edge-hit').click(force=True)  # the invisible wide stroke takes the click
    graph.get_by_role("button", name="Delete edge").click()
    graph.locator('[data-edge-id="r2"]').wait_for(state="detached")
    click_concept(graph, "c6")
    graph.get_by_role("button", name="Delete concept").click()
    graph.locator('[data-concept-id="c6"]').wait_for(state="detached")
    edited = json.loads(widget(page, EDITOR, "graph_json"))
    assert [r["id"] for r in edited["relationships"]] == ["r1", "r3"]
    assert "c6" not in {c["id"] for c in edited["concepts"]}


def test_a_graph_of_thirty_concepts_fits_in_the_node(page):
    concepts = [{"id": f"c{k}", "name": f"concept {k}", "current_value": f"value {k}"} for k in range(1, 31)]
    edges = [(k, k + 1) for k in range(1, 30, 3)] + [(k, k + 5) for k in range(1, 25, 4)] + [(1, 30)]
    relationships = [{"id": f"r{n}", "cause_id": f"c{a}", "effect_id": f"c{b}"} for n, (a, b) in enumerate(edges, 1)]
    workflow = graph_part(HAND_WRITTEN)
    editor = next(n for n in workflow["nodes"] if n["id"] == EDITOR)
    editor["widgets_values"][0] = json.dumps({"concepts": concepts, "relationships": relationships})
    load(page, workflow)
    graph = graph_in(page, EDITOR)
    assert len(roles(graph)) == 30 and graph.locator(".csg-edge").count() == len(edges)
    x, y, width, height = (float(v) for v in graph.locator("svg").get_attribute("viewBox").split())
    for box in graph.locator(".csg-box").all():
        left, top = float(box.get_attribute("x")), float(box.get_attribute("y"))
        right, bottom = left + float(box.get_attribute("width")), top + float(box.get_attribute("height"))
        assert x <= left and right <= x + width and y <= top and bottom <= y + height


def test_saved_edits_come_back_after_a_reload(server, page):
    load(page, graph_part(HAND_WRITTEN))
    manual, _ = add_manual_intervention(page)
    graph = graph_in(page, EDITOR)
    graph.get_by_role("button", name="+ Concept").click()
    graph.locator('.csg-concept[data-concept-id="c7"]').wait_for()
    type_into(graph.locator('input[data-field="name"]'), "glasses")
    graph.locator('[data-concept-id="c7"] .csg-name:text("glasses")').wait_for()
    picker = graph_in(page, manual)
    picker.locator('[data-concept-id="c7"]').wait_for()  # the new concept reached the Manual Intervention
    click_concept(picker, "c7")
    type_into(picker.locator(".csg-new-value"), "round glasses")

    page.evaluate("() => { app.extensionManager.command.execute('Comfy.SaveWorkflow'); }")  # asks for a name
    name_box = page.locator(".p-dialog input")
    type_into(name_box, "edited graph")
    saved_path = urllib.parse.quote("workflows/edited graph.json", safe="")
    deadline = time.monotonic() + BROWSER_TIMEOUT_MS / 1000
    while True:
        try:
            with urllib.request.urlopen(f"{server}/api/userdata/{saved_path}") as answer:
                saved = json.load(answer)
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "the workflow was not saved"
            time.sleep(0.5)
    nodes = {node["id"]: node for node in saved["nodes"]}
    assert "glasses" in {c["name"] for c in json.loads(nodes[EDITOR]["widgets_values"][0])["concepts"]}
    assert nodes[manual]["widgets_values"][:2] == ["glasses", "round glasses"]

    page.reload(wait_until="networkidle")
    page.wait_for_function(f"window.app && window.app.graph && window.app.graph.getNodeById({manual})",
                           timeout=120_000)
    assert widget(page, manual, "target") == "glasses"
    editor = graph_in(page, EDITOR)
    editor.locator('[data-concept-id="c7"] .csg-name:text("glasses")').wait_for()
    picker = graph_in(page, manual)
    picker.locator('[data-concept-id="c7"][data-role="target"]').wait_for()
    assert picker.locator('[data-concept-id="c7"] .csg-value').text_content() == "unknown → round glasses"


def normalised(problems, url):
    """Problems as comparable text: the server's address (its port differs between servers) taken out."""
    return {problem.replace(url, "<server>") for problem in problems}


def test_the_pack_adds_no_error_to_the_page(server, chromium_browser, tmp_path):
    require_browser()
    with running_comfyui(tmp_path / "without-pack", with_pack=False) as bare:
        with open_frontend(chromium_browser, bare) as (tab, baseline):
            tab.wait_for_timeout(3000)  # late start-up requests
    assert baseline.page_errors or baseline.console_errors, "the baseline should show ComfyUI's own start-up errors"

    with open_frontend(chromium_browser, server) as (tab, ours):
        load(tab, graph_part(HAND_WRITTEN))
        manual, report = add_manual_intervention(tab)
        picker = graph_in(tab, manual)
        click_concept(picker, "c3")
        type_into(picker.locator(".csg-new-value"), "wrinkled")
        queue_outputs(tab, server, [report, REPORT])
        editor = graph_in(tab, EDITOR)
        click_concept(editor, "c3")
        editor.get_by_role("button", name="+ Effect…").click()
        click_concept(editor, "c1")  # refused: an answer, not a failed request
        editor.locator('.csg-message[data-kind="error"]').wait_for()
        tab.wait_for_timeout(3000)
    assert normalised(ours.page_errors, server) <= normalised(baseline.page_errors, bare)
    assert normalised(ours.console_errors, server) <= normalised(baseline.console_errors, bare)


def test_every_node_has_a_help_page_and_the_help_panel_shows_it(server, page):
    with urllib.request.urlopen(f"{server}/api/object_info") as answer:
        ours = [name for name, info in json.load(answer).items()
                if info["python_module"] == f"custom_nodes.{PACK_FOLDER}"]
    assert len(ours) == len(list((ROOT / "web" / "docs").glob("*.md")))
    for name in ours:
        with urllib.request.urlopen(f"{server}/extensions/{PACK_FOLDER}/docs/{name}.md") as answer:
            assert answer.read().decode().startswith("# ")

    page.evaluate("""() => {
        const node = LiteGraph.createNode("CSGManualIntervention");
        node.pos = [300, 100];
        app.graph.add(node);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [100, 300];
        app.canvas.selectNodes([node]);
        app.canvas.setDirty(true, true);
    }""")
    page.locator('[data-testid="info-button"]').click()
    help_page = page.locator(".markdown-content")
    help_page.locator("h1:text('Manual Intervention')").wait_for()
    assert "Click a concept to make it the target" in help_page.text_content()
    assert help_page.locator("code:text('new_value')").count() >= 1
