"""The pack's ComfyUI nodes (V3 schema). ComfyUI calls ``comfy_entrypoint`` and registers ``NODES``.

Categories, under "causal counterfactuals":
    graph          write, check and draw causal graphs and interventions (no model needed)
    understanding  a VLM extracts the graph and proposes or propagates interventions
    abduction, prediction, sampling, baselines    the SDXL side (CSG)
    evaluation     score counterfactuals as the paper's Table 1 does: VLM effectiveness, LPIPS(VGG)

Local VLM folders live in ``models/LLM/<name>`` (registered here as the folder type "LLM").
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .baseline_nodes import BaselineEdit
from .csg_nodes import CausalCounterfactual, CausalCounterfactuals, CausalInversion
from .evaluation_nodes import EVALUATION_NODES
from .graph_nodes import GRAPH_NODES
from .sampling_nodes import CSGGuiderNode, EditFriendlySampler, InversionSigmasAndNoise
from .vlm_nodes import VLM_NODES, register_llm_folder
from .web_routes import register_routes


NODES: list[type[io.ComfyNode]] = [
    *GRAPH_NODES,
    *VLM_NODES,
    CausalInversion,
    CausalCounterfactual,
    CausalCounterfactuals,
    InversionSigmasAndNoise,
    CSGGuiderNode,
    EditFriendlySampler,
    BaselineEdit,
    *EVALUATION_NODES,
]


class CausalCounterfactualsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> CausalCounterfactualsExtension:
    register_llm_folder()
    register_routes()
    return CausalCounterfactualsExtension()
