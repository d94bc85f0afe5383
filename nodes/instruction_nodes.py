"""The instruction node: the causal plan written as an instruction for an instruction editor.

    Causal Edit Instruction    CSG_CAUSAL_GRAPH, CSG_INTERVENTION or CSG_INTERVENTIONS (+ CSG_VLM, IMAGE)
                               -> instruction, changed_concepts, kept_concepts (one each per intervention)

The text is ``csg.instruction``'s; an optional VLM rewrite is used only when it keeps every fact. The
outputs are lists, so a batch of interventions runs the editor's nodes downstream once per instruction.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..csg.errors import InputError
from ..csg.graph import CausalGraph, Intervention
from ..csg.instruction import (
    DEFAULT_MAX_KEPT,
    EDITOR_STYLES,
    MAX_KEPT_LIMIT,
    EditInstruction,
    edit_instructions,
    rewrite_instruction,
)
from .csg_common import CATEGORY, CausalGraphType, Interventions, InterventionType
from .graph_nodes import image_to_pil
from .vlm_nodes import VLMHandle, VLMType, asking

INSTRUCTION_CATEGORY = f"{CATEGORY}/instruction editors"


def instruction_report(instructions: list[EditInstruction]) -> str:
    """What the user reads in the node: each instruction, and any rewrite that was not used."""
    blocks = []
    for instruction in instructions:
        lines = [f"{instruction.intervention_id} ({instruction.style}): {instruction.text}"]
        if instruction.note:
            lines.append(f"NOTE: {instruction.note}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


class CausalEditInstruction(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCausalEditInstruction",
            display_name="Causal Edit Instruction",
            category=INSTRUCTION_CATEGORY,
            description="Writes an intervention as an edit instruction for an instruction editor (Qwen-Image-Edit, "
                        "FLUX.1 Kontext): the target's change and each changed descendant's new value in causal "
                        "order, then the non-descendants that must keep their values. Nothing the causal check "
                        "stripped is ever named.",
            inputs=[
                CausalGraphType.Input("causal_graph", tooltip="The graph the intervention acts on."),
                InterventionType.Input("intervention", optional=True,
                                       tooltip="One intervention; give this or interventions."),
                Interventions.Input("interventions", optional=True,
                                    tooltip="A batch of interventions (e.g. the Intervention Proposer's): one "
                                            "instruction each, in their order."),
                io.Combo.Input("editor", options=list(EDITOR_STYLES), default="qwen-image-edit",
                               tooltip="Whose prompting advice the wording follows: qwen-image-edit (short 'Change X "
                                       "to Y' clauses), flux-kontext (subjects named, what stays listed), or "
                                       "generic."),
                io.Int.Input("max_kept", default=DEFAULT_MAX_KEPT, min=0, max=MAX_KEPT_LIMIT,
                             tooltip="At most this many unchanged concepts are named as kept, in the graph's order; "
                                     "0 names none."),
                VLMType.Input("vlm", optional=True,
                              tooltip="A VLM rewrites the instruction. The rewrite is used only when it "
                                      "still names every changed and every kept value; else the deterministic "
                                      "text stays and the node says why."),
                io.Image.Input("image", optional=True,
                               tooltip="The image to edit, shown to the VLM for the rewrite."),
            ],
            outputs=[
                io.String.Output(display_name="instruction", is_output_list=True,
                                 tooltip="The edit instruction, one per intervention; connect it to the editor's "
                                         "text encoder (TextEncodeQwenImageEdit, CLIP Text Encode)."),
                io.String.Output(display_name="changed_concepts", is_output_list=True,
                                 tooltip="The changed concepts, one line each: 'name: old -> new', in causal order."),
                io.String.Output(display_name="kept_concepts", is_output_list=True,
                                 tooltip="The concepts that must keep their values, one line each: 'name: value'."),
            ],
        )

    @classmethod
    def execute(cls, causal_graph: CausalGraph, editor: str, max_kept: int, intervention: Intervention | None = None,
                interventions: list[Intervention] | None = None, vlm: VLMHandle | None = None,
                image: torch.Tensor | None = None) -> io.NodeOutput:
        if (intervention is None) == (interventions is None):
            raise InputError("Connect either intervention (one) or interventions (a batch) to Causal Edit "
                             "Instruction, not both and not neither.")
        batch = [intervention] if intervention is not None else list(interventions)
        instructions = edit_instructions(causal_graph, batch, editor, max_kept=max_kept)
        if vlm is not None:
            picture = image_to_pil(image, "Causal Edit Instruction") if image is not None else None
            with asking(vlm, questions=len(instructions)) as backend:
                instructions = [rewrite_instruction(backend, i, picture) for i in instructions]
        return io.NodeOutput([i.text for i in instructions], [i.changed_text() for i in instructions],
                             [i.kept_text() for i in instructions],
                             ui=ui.PreviewText(instruction_report(instructions)))


NODES = [CausalEditInstruction]
