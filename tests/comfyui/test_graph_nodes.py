"""The graph nodes executed by ComfyUI's engine on hand-written JSON, no model involved."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.comfyui_harness import WorkflowFailed

EXAMPLES = Path(__file__).resolve().parents[2] / "csg" / "examples"
GRAPH_JSON = (EXAMPLES / "portrait_graph.json").read_text()
INTERVENTION = json.loads((EXAMPLES / "portrait_intervention.json").read_text())


@pytest.fixture(scope="module")
def core(comfyui):
    """The pack's own csg modules, as ComfyUI loaded them (so isinstance checks hold)."""
    return {name: comfyui.pack_module(f"csg.{name}") for name in ("graph", "render", "view")}


def graph_node(width=0):
    return {"class_type": "CSGCausalGraphFromJSON", "inputs": {"graph_json": GRAPH_JSON, "preview_width": width}}


def intervention_prompt(intervention: dict) -> dict:
    return {
        "1": graph_node(),
        "2": {"class_type": "CSGInterventionFromJSON",
              "inputs": {"causal_graph": ["1", 0], "intervention_json": json.dumps(intervention), "preview_width": 0}},
    }


def as_image(picture) -> torch.Tensor:
    """A PIL picture as a ComfyUI IMAGE, converted independently of the pack."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def test_graph_from_json_gives_the_graph_its_json_and_its_drawing(comfyui, core):
    run = comfyui.run({"1": graph_node()}, outputs=["1"])
    graph, graph_json, preview = run.outputs["1"]
    expected = core["graph"].CausalGraph.from_json(GRAPH_JSON)
    assert graph == expected
    assert core["graph"].CausalGraph.from_json(graph_json) == expected
    drawing = as_image(core["render"].render_graph(expected))
    assert preview.shape == drawing.shape and torch.allclose(preview.cpu(), drawing, atol=1 / 255)
    assert list(run.ui["1"]["causal_graph"]) == [core["view"].graph_view(expected)], "the node draws its graph"


def test_preview_width_scales_the_drawing(comfyui):
    preview = comfyui.run({"1": graph_node(width=320)}, outputs=["1"]).outputs["1"][2]
    assert preview.shape[2] == 320


@pytest.mark.parametrize("broken, fragment", [
    ('{"concepts": [', "not valid JSON"),
    (json.dumps({"concepts": [{"id": "c1", "name": "a", "current_value": "x"},
                              {"id": "c2", "name": "b", "current_value": "y"}],
                 "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2"},
                                   {"id": "r2", "cause_id": "c2", "effect_id": "c1"}]}), "cycle"),
    (json.dumps({"concepts": [{"id": "c1", "name": "a"}]}), "current_value"),
])
def test_a_broken_graph_fails_with_the_problem_named(comfyui, broken, fragment):
    prompt = {"1": {"class_type": "CSGCausalGraphFromJSON", "inputs": {"graph_json": broken, "preview_width": 0}}}
    with pytest.raises(WorkflowFailed, match=fragment) as failed:
        comfyui.run(prompt, outputs=["1"])
    assert failed.value.error["exception_type"].endswith("GraphError")


def test_intervention_from_json_is_checked_and_its_violation_shown(comfyui, core):
    rogue = dict(INTERVENTION)  # age may change hair and skin, not the facial expression (c4)
    rogue["propagated_changes"] = [*INTERVENTION["propagated_changes"],
                                   {"concept_id": "c4", "concept_name": "facial expression",
                                    "original_value": "smiling", "new_value": "frowning", "reason": "old people frown"}]
    run = comfyui.run(intervention_prompt(rogue), outputs=["2"])
    intervention, report, preview = run.outputs["2"]
    assert isinstance(intervention, core["graph"].Intervention)
    assert [c.concept_id for c in intervention.propagated_changes] == ["c2", "c3"]
    assert [(v.concept_id, v.new_value) for v in intervention.violations] == [("c4", "frowning")]
    assert "CAUSAL VIOLATIONS" in report and "c4" in report and "frowning" in report
    assert list(run.ui["2"]["text"]) == [report]  # the node shows its report
    shown = run.ui["2"]["causal_graph"][0]["intervention"]  # and draws the checked intervention, violation included
    assert shown == intervention.to_dict() and shown["violations"][0]["concept_id"] == "c4"
    clean = comfyui.run(intervention_prompt(INTERVENTION), outputs=["2"]).outputs["2"]
    assert not clean[0].violations and "VIOLATION" not in clean[1]
    assert clean[2].shape != preview.shape or not torch.equal(clean[2], preview)  # the violation is drawn


def test_an_intervention_on_an_unknown_concept_is_refused(comfyui):
    stray = dict(INTERVENTION, target_concept_id="c99")
    with pytest.raises(WorkflowFailed, match="c99.*not in the graph"):
        comfyui.run(intervention_prompt(stray), outputs=["2"])


def test_graph_preview_is_an_output_node_that_highlights_the_intervention(comfyui, core):
    prompt = intervention_prompt(INTERVENTION) | {
        "3": {"class_type": "CSGCausalGraphPreview",
              "inputs": {"causal_graph": ["1", 0], "intervention": ["2", 0], "preview_width": 0}},
        "4": {"class_type": "CSGCausalGraphPreview", "inputs": {"causal_graph": ["1", 0], "preview_width": 0}},
    }
    run = comfyui.run(prompt)  # no outputs requested: the preview nodes run because they are output nodes
    assert run.ui["3"]["causal_graph"][0]["intervention"]["target_concept_id"] == "c1"
    assert run.ui["4"]["causal_graph"][0]["intervention"] is None
    graph = core["graph"].CausalGraph.from_json(GRAPH_JSON)
    intervention = core["graph"].Intervention.from_dict(INTERVENTION)
    run = comfyui.run(prompt, outputs=["3", "4"])
    assert torch.allclose(run.outputs["3"][0].cpu(), as_image(core["render"].render_graph(graph, intervention)),
                          atol=1 / 255)
    assert torch.allclose(run.outputs["4"][0].cpu(), as_image(core["render"].render_graph(graph)), atol=1 / 255)


@pytest.mark.parametrize("target", ["c2", "Hair Color"])
def test_manual_intervention_without_a_vlm_edits_the_target_alone(comfyui, target):
    prompt = {"1": graph_node(), "2": {"class_type": "CSGManualIntervention", "inputs": {
        "causal_graph": ["1", 0], "target": target, "new_value": "black hair", "max_attempts": 3, "preview_width": 0}}}
    intervention, intervention_json, report, preview = comfyui.run(prompt, outputs=["2"]).outputs["2"]
    assert (intervention.target_concept_id, intervention.new_value, intervention.original_value) == (
        "c2", "black hair", "light brown")
    assert intervention.propagated_changes == () and dict(intervention.final_concept_states) == {"c2": "black hair"}
    assert json.loads(intervention_json)["target_concept_id"] == "c2"
    assert "none (the target alone is edited)" in report
    assert preview.dim() == 4 and preview.shape[-1] == 3


@pytest.mark.parametrize("target, value, fragment", [
    ("eye colour", "green", "No concept has the id or name 'eye colour'"),
    ("c2", "light brown", "already is 'light brown'"),
    ("c2", "  ", "new value is empty"),
])
def test_manual_intervention_names_what_is_wrong(comfyui, target, value, fragment):
    prompt = {"1": graph_node(), "2": {"class_type": "CSGManualIntervention", "inputs": {
        "causal_graph": ["1", 0], "target": target, "new_value": value, "max_attempts": 3, "preview_width": 0}}}
    with pytest.raises(WorkflowFailed, match=fragment):
        comfyui.run(prompt, outputs=["2"])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_the_nodes_convert_images_as_the_core_does(comfyui, channels):
    """A grey, grey-and-alpha, RGB or RGBA ComfyUI IMAGE reaches the VLM, the judge, LPIPS and the inversion as the
    picture on white that csg.images makes of it."""
    pixels = torch.rand(1, 16, 16, channels, generator=torch.Generator().manual_seed(channels))
    if channels in (2, 4):
        color, alpha = pixels[..., :-1], pixels[..., -1:]
        expected = (color * alpha + 1 - alpha).expand(1, 16, 16, 3)
    else:
        expected = pixels.expand(1, 16, 16, 3)
    graph_nodes = comfyui.pack_module("nodes.graph_nodes")
    picture = graph_nodes.image_to_pil(pixels, "test")
    assert picture.mode == "RGB"
    assert torch.allclose(as_image(picture), expected, atol=0.5 / 255 + 1e-6)
    lpips_input = comfyui.pack_module("nodes.evaluation_nodes")._channels_first(pixels, "test")
    assert torch.allclose(lpips_input, expected.movedim(-1, 1), atol=1e-6)
    single = comfyui.pack_module("nodes.csg_common").single_image(pixels)
    inverted = comfyui.pack_module("csg.images").image_to_tensor(single)
    assert torch.allclose(inverted, expected.movedim(-1, 1), atol=1e-6)
