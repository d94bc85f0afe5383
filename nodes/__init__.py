"""The pack's ComfyUI nodes (V3 schema). ComfyUI calls ``comfy_entrypoint`` and registers ``NODES``,
the concatenation of the node modules' own ``NODES`` lists.

Categories, under "causal counterfactuals":
    graph          write, check and draw causal graphs and interventions (no model needed)
    understanding  a VLM extracts the graph and proposes or propagates interventions
    abduction, prediction, sampling, baselines    the SDXL side (CSG)
    evaluation     score counterfactuals as the paper's Table 1 does: VLM effectiveness, LPIPS(VGG)

Local VLM folders live in ``models/LLM/<name>`` (registered here as the folder type "LLM").
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import baseline_nodes, csg_nodes, evaluation_nodes, graph_nodes, instruction_nodes, sampling_nodes, vlm_nodes
from .vlm_nodes import register_llm_folder
from .web_routes import register_routes

# Each node module lists its nodes in ``NODES``; the pack is their concatenation, in menu order.
NODES: list[type[io.ComfyNode]] = [
    *graph_nodes.NODES,
    *vlm_nodes.NODES,
    *csg_nodes.NODES,
    *sampling_nodes.NODES,
    *baseline_nodes.NODES,
    *evaluation_nodes.NODES,
    *instruction_nodes.NODES,
]


class CausalCounterfactualsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> CausalCounterfactualsExtension:
    register_llm_folder()
    register_routes()
    return CausalCounterfactualsExtension()
