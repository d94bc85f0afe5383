"""The graph nodes: write or inspect a causal graph and an intervention without any model.

    Causal Graph From JSON    JSON                                   -> CSG_CAUSAL_GRAPH, JSON, preview
    Intervention From JSON    CSG_CAUSAL_GRAPH, JSON                 -> CSG_INTERVENTION (checked), report, preview
    Causal Graph Preview      CSG_CAUSAL_GRAPH (+ CSG_INTERVENTION)  -> IMAGE
    Select Intervention       CSG_INTERVENTIONS, number              -> CSG_INTERVENTION, JSON

Every intervention that leaves a node here has passed ``csg.graph.check_intervention``: a change
to a concept that is not a descendant of the target is stripped, and the node says so in its
report, in its UI text and in red in the preview.

In the frontend these nodes (and the Concept Extractor and Manual Intervention) draw the graph in
their own body: their UI output carries ``graph_view_ui`` (``csg.view``'s JSON) instead of the
preview picture, which stays available on the ``preview`` socket. web/causal_graph.js draws it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..csg.counterfactual import to_pil
from ..csg.errors import InputError
from ..csg.graph import CausalGraph, Intervention, check_intervention
from ..csg.images import image_to_tensor, rgb_channels
from ..csg.render import MIN_WIDTH, render_graph
from ..csg.view import graph_view
from .csg_common import CATEGORY, CausalGraphType, Interventions, InterventionType, to_comfy_images

GRAPH_CATEGORY = f"{CATEGORY}/graph"
EXAMPLES = Path(__file__).resolve().parents[1] / "csg" / "examples"


# -- ComfyUI images <-> PIL ---------------------------------------------------------------------------


def pil_to_image(picture: Image.Image) -> torch.Tensor:
    """A PIL picture as a one-image ComfyUI IMAGE (1, H, W, 3) in [0, 1]."""
    return to_comfy_images(image_to_tensor(picture))


def image_to_pil(image: torch.Tensor, what: str) -> Image.Image:
    """The single picture in a ComfyUI IMAGE (1, H, W, C) in [0, 1], as PIL RGB (``csg.images``: alpha onto white)."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise InputError(f"{what} takes one image, got a batch of shape {tuple(image.shape)}. Pick one image "
                         "(e.g. with 'Image From Batch').")
    return to_pil(rgb_channels(image[0].float(), dim=-1).movedim(-1, 0))


def graph_preview(graph: CausalGraph, intervention: Intervention | None = None, width: int = 0) -> torch.Tensor:
    return pil_to_image(render_graph(graph, intervention, width=width or None))


GRAPH_VIEW_KEY = "causal_graph"  # the UI output key web/causal_graph.js reads


def graph_view_ui(graph: CausalGraph, intervention: Intervention | None = None) -> dict[str, list]:
    """A node's UI output that makes the frontend draw ``graph`` (with ``intervention``) in the node."""
    return {GRAPH_VIEW_KEY: [graph_view(graph, intervention)]}


# -- text a user reads --------------------------------------------------------------------------------


def intervention_report(intervention: Intervention) -> str:
    """do(target = value), what follows from it, and every change the causal check stripped."""
    lines = [f"{intervention.id}: do({intervention.target_concept_id} {intervention.target_concept_name} = "
             f"{intervention.new_value})   (was: {intervention.original_value})"]
    if intervention.intervention_description:
        lines.append(intervention.intervention_description)
    if intervention.propagated_changes:
        lines.append("changes downstream:")
        lines += [f"  {c.concept_id} {c.concept_name}: {c.original_value} -> {c.new_value}"
                  + (f"   ({c.reason})" if c.reason else "") for c in intervention.propagated_changes]
    else:
        lines.append("changes downstream: none (the target alone is edited)")
    if intervention.violations:
        lines.append(f"CAUSAL VIOLATIONS, stripped ({len(intervention.violations)}):")
        lines += [f"  {v.concept_id} -> '{v.new_value}': {v.problem}" for v in intervention.violations]
    if intervention.generation_prompt:
        lines.append(f"generation prompt: {intervention.generation_prompt}")
    return "\n".join(lines)


def interventions_json(interventions: list[Intervention]) -> str:
    return json.dumps([i.to_dict() for i in interventions], indent=2, ensure_ascii=False)


def example_text(name: str) -> str:
    return (EXAMPLES / name).read_text(encoding="utf-8")


def preview_width_input() -> io.Int.Input:
    return io.Int.Input("preview_width", default=0, min=0, max=4096, step=8,
                        tooltip=f"Width of the preview picture in pixels (at least {MIN_WIDTH}); 0 sizes it so "
                                "the text reads comfortably.")


# -- nodes --------------------------------------------------------------------------------------------


class CausalGraphFromJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCausalGraphFromJSON",
            display_name="Causal Graph From JSON",
            category=GRAPH_CATEGORY,
            description="A causal graph written by hand (or edited from an extractor's JSON): concepts with their "
                        "current values and the cause -> effect relationships between them, which must form a DAG. "
                        "Errors name the field to fix.",
            inputs=[
                io.String.Input("graph_json", multiline=True, default=example_text("portrait_graph.json"),
                                tooltip='{"scene_summary": ..., "concepts": [{"id", "name", "current_value", '
                                        '"description"}], "relationships": [{"id", "cause_id", "effect_id", '
                                        '"description"}]}'),
                preview_width_input(),
            ],
            outputs=[
                CausalGraphType.Output(display_name="causal_graph", tooltip="The validated graph, for the "
                                                                            "Intervention, Manual Intervention, "
                                                                            "Causal Counterfactual and preview "
                                                                            "nodes."),
                io.String.Output(display_name="graph_json", tooltip="The graph as normalised JSON."),
                io.Image.Output(display_name="preview", tooltip="The graph drawn cause above effect."),
            ],
        )

    @classmethod
    def execute(cls, graph_json: str, preview_width: int) -> io.NodeOutput:
        graph = CausalGraph.from_json(graph_json)
        preview = graph_preview(graph, width=preview_width)
        return io.NodeOutput(graph, graph.to_json(), preview, ui=graph_view_ui(graph))


class InterventionFromJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGInterventionFromJSON",
            display_name="Intervention From JSON",
            category=GRAPH_CATEGORY,
            description="An intervention do(C_i = c') written by hand, checked against the causal graph: changes to "
                        "concepts that are not descendants of the target are stripped and listed as causal "
                        "violations in the report and, in red, in the preview.",
            inputs=[
                CausalGraphType.Input("causal_graph", tooltip="The graph the intervention acts on."),
                io.String.Input("intervention_json", multiline=True, default=example_text("portrait_intervention.json"),
                                tooltip='{"id", "target_concept_id", "new_value", "propagated_changes": '
                                        '[{"concept_id", "new_value", "reason"}], "final_concept_states": '
                                        '{id: "value phrase"}, "generation_prompt"}'),
                preview_width_input(),
            ],
            outputs=[
                InterventionType.Output(display_name="intervention",
                                        tooltip="The intervention as the graph allows it."),
                io.String.Output(display_name="report", tooltip="What changes, and every causal violation stripped; "
                                                                "read it with a Preview Any node."),
                io.Image.Output(display_name="preview", tooltip="The graph with the target and its changes marked."),
            ],
        )

    @classmethod
    def execute(cls, causal_graph: CausalGraph, intervention_json: str, preview_width: int) -> io.NodeOutput:
        checked = check_intervention(causal_graph, Intervention.from_json(intervention_json))
        report = intervention_report(checked)
        preview = graph_preview(causal_graph, checked, preview_width)
        shown = graph_view_ui(causal_graph, checked) | ui.PreviewText(report).as_dict()
        return io.NodeOutput(checked, report, preview, ui=shown)


class CausalGraphPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCausalGraphPreview",
            display_name="Causal Graph Preview",
            category=GRAPH_CATEGORY,
            description="Draws a causal graph, cause above effect. With an intervention, the target is amber "
                        "(old -> new), its changed descendants blue, and stripped violations red.",
            inputs=[
                CausalGraphType.Input("causal_graph", tooltip="The graph to draw."),
                InterventionType.Input("intervention", optional=True,
                                       tooltip="An intervention to highlight on the graph."),
                preview_width_input(),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The drawing as an IMAGE (the same picture the "
                                                                   "other graph nodes give on their preview "
                                                                   "socket); connect Save Image to keep it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, causal_graph: CausalGraph, preview_width: int, intervention: Intervention | None = None
                ) -> io.NodeOutput:
        preview = graph_preview(causal_graph, intervention, preview_width)
        return io.NodeOutput(preview, ui=graph_view_ui(causal_graph, intervention))


class SelectIntervention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGSelectIntervention",
            display_name="Select Intervention",
            category=GRAPH_CATEGORY,
            description="Picks one intervention from a list (e.g. the Intervention Proposer's three proposals).",
            inputs=[
                Interventions.Input("interventions", tooltip="A list of interventions."),
                io.Int.Input("number", default=1, min=1, max=64,
                             tooltip="Which one: 1 is the first. The proposer orders its proposals as it was asked: "
                                     "one that changes many concepts, one that changes few, one that changes none."),
            ],
            outputs=[
                InterventionType.Output(display_name="intervention", tooltip="The chosen intervention, already "
                                                                             "checked against the graph."),
                io.String.Output(display_name="intervention_json", tooltip="The chosen intervention as JSON; paste "
                                                                           "it into Intervention From JSON to edit "
                                                                           "it."),
            ],
        )

    @classmethod
    def execute(cls, interventions: list[Intervention], number: int) -> io.NodeOutput:
        if not interventions:
            raise InputError("The intervention list is empty; connect the Intervention Proposer's output.")
        if not 1 <= number <= len(interventions):
            raise InputError(f"number is {number}, but there are {len(interventions)} interventions; choose 1 to "
                             f"{len(interventions)}.")
        chosen = interventions[number - 1]
        return io.NodeOutput(chosen, chosen.to_json(), ui=ui.PreviewText(intervention_report(chosen)))


NODES = [CausalGraphFromJSON, InterventionFromJSON, CausalGraphPreview, SelectIntervention]
