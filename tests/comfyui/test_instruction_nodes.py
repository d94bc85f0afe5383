"""Causal Edit Instruction executed by ComfyUI's engine: the core's text, one per intervention, and the checked rewrite
through a real 127.0.0.1 VLM server."""

import json
from pathlib import Path

import pytest

from tests.vlm_server import VLMServer, completion
from tools.comfyui_harness import WorkflowFailed

EXAMPLES = Path(__file__).resolve().parents[2] / "csg" / "examples"
GRAPH_JSON = (EXAMPLES / "portrait_graph.json").read_text()
INTERVENTION = json.loads((EXAMPLES / "portrait_intervention.json").read_text())


def prompt(editor: str, **extra) -> dict:
    return {
        "1": {"class_type": "CSGCausalGraphFromJSON", "inputs": {"graph_json": GRAPH_JSON, "preview_width": 0}},
        "2": {"class_type": "CSGInterventionFromJSON",
              "inputs": {"causal_graph": ["1", 0], "intervention_json": json.dumps(INTERVENTION), "preview_width": 0}},
        "3": {"class_type": "CSGCausalEditInstruction",
              "inputs": {"causal_graph": ["1", 0], "intervention": ["2", 0], "editor": editor, "max_kept": 12,
                         **extra}},
    }


@pytest.mark.parametrize("editor", ["generic", "qwen-image-edit", "flux-kontext"])
def test_the_node_gives_the_cores_instruction_and_concept_lists(comfyui, editor):
    core = comfyui.pack_module("csg.instruction")
    graph = comfyui.pack_module("csg.graph")
    expected = core.edit_instruction(graph.CausalGraph.from_json(GRAPH_JSON),
                                     graph.Intervention.from_dict(INTERVENTION), editor)
    run = comfyui.run(prompt(editor), outputs=["3"])
    instruction, changed, kept = run.outputs["3"]  # one intervention: the harness gives each list's one value
    assert (instruction, changed, kept) == (expected.text, expected.changed_text(), expected.kept_text())
    assert changed.splitlines() == ["age: middle-aged -> old", "hair color: light brown -> gray",
                                       "skin texture: smooth -> wrinkled"]
    assert kept.splitlines() == ["facial expression: smiling", "outfit: orange spacesuit",
                                    "background: flag and shuttle"]


def test_a_rewrite_that_drops_a_kept_value_is_not_used_and_the_node_says_so(comfyui):
    lossy = "Make the woman old with gray hair and wrinkled skin, still smiling in her orange spacesuit."
    with VLMServer(lambda request: completion(lossy)) as server:
        vlm = {"class_type": "CSGOpenAIVLM", "inputs": {"base_url": server.base_url, "model": "fixture-vlm",
                                                        "api_key_env": "", "timeout": 10.0, "retries": 0,
                                                        "cache_answers": False}}
        run = comfyui.run({**prompt("flux-kontext", vlm=["9", 0]), "9": vlm}, outputs=["3"])
    instruction = run.outputs["3"][0]
    assert "flag and shuttle" in instruction and instruction != lossy
    assert "not used" in json.dumps(run.ui["3"]) and "flag and shuttle" in json.dumps(run.ui["3"])


def test_neither_or_both_interventions_is_refused(comfyui):
    broken = prompt("generic")
    del broken["3"]["inputs"]["intervention"]
    with pytest.raises(WorkflowFailed, match="either intervention"):
        comfyui.run(broken, outputs=["3"])
