"""The shipped workflows as files: what the frontend needs to load them, and what must never be in them.

Executing them needs ComfyUI; tests/comfyui/test_workflows.py does that. These checks run
everywhere, so a broken or leaky workflow fails CI even on a machine without ComfyUI.
"""

import json
import re
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
REQUIRED = {"counterfactual", "manual_intervention", "three_counterfactuals", "baselines_comparison"}
TITLE_BAR = 30  # canvas units the frontend draws above a node's position
SECRET_LIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}|Bearer\s+\S+|api[_-]?key\"?\s*[:=]\s*\"[^\"]+\"", re.IGNORECASE)


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def test_the_four_required_workflows_ship():
    assert REQUIRED <= {path.stem for path in workflow_files()}


@pytest.fixture(params=workflow_files(), ids=lambda path: path.stem)
def workflow(request) -> dict:
    return json.loads(request.param.read_text())


def test_saved_in_the_frontends_format(workflow):
    assert workflow["version"] == 0.4
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)) and workflow["last_node_id"] >= max(ids)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "mode", "inputs", "outputs", "widgets_values"} <= set(node)


def test_every_link_is_recorded_at_both_ends_with_matching_types(workflow):
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        output = nodes[origin]["outputs"][origin_slot]
        socket = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and socket["link"] == link_id
        assert output["type"] == kind and socket["type"] in (kind, "*")
    recorded = {link[0] for link in workflow["links"]}
    for node in workflow["nodes"]:
        assert {s["link"] for s in node["inputs"] if s["link"] is not None} <= recorded
        assert {i for s in node["outputs"] for i in s["links"] or []} <= recorded


def test_a_note_explains_the_graph_and_groups_frame_its_steps(workflow):
    notes = [node for node in workflow["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(note["widgets_values"][0]) > 300 for note in notes)
    assert len(workflow["groups"]) >= 3
    assert any(node["type"] == "CheckpointLoaderSimple" for node in workflow["nodes"])


def boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_nothing_is_drawn_over_anything_else(workflow):
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if boxes_overlap(a, b)]
    assert not overlapping
    frames = [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in workflow["groups"])]
    assert not [(a, b) for i, a in enumerate(frames) for b in frames[i + 1:] if boxes_overlap(a, b)]


def test_no_secret_and_no_local_path_is_saved(workflow):
    text = json.dumps(workflow)
    assert not SECRET_LIKE.search(text)
    assert "/home/" not in text and "/root/" not in text and "C:\\\\" not in text
    for node in workflow["nodes"]:
        if node["type"] == "CSGOpenAIVLM":
            api_key_env = node["widgets_values"][2]
            assert api_key_env == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env)
