"""The evaluation nodes: score counterfactuals the way the paper's Table 1 does.

    Counterfactual Judge   CSG_VLM, IMAGE (one per intervention), CSG_INTERVENTION or CSG_INTERVENTIONS,
                           CSG_CAUSAL_GRAPH                        -> effectiveness, report, judgements JSON
    LPIPS Distance         factual IMAGE, counterfactual IMAGE (+ weight paths, device)
                                                               -> mean LPIPS, per-image distances

Effectiveness (VLM-Eff) asks the VLM, per counterfactual, whether each concept the intervention
changes shows its new value (``csg.vlm.judge_counterfactual``) and averages the share of "yes" over
the images (``csg.metrics.vlm_effectiveness``). Minimality is LPIPS on a VGG16 backbone
(``csg.metrics``), from local weight files only; the loaded model is kept in a module-level cache,
since V3 nodes hold no state of their own, and goes to its device through ComfyUI's memory manager
(model_memory.py), which makes room for it there.
"""

from __future__ import annotations

import json
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..csg.errors import InputError
from ..csg.graph import CausalGraph, Intervention
from ..csg.images import rgb_channels
from ..csg.metrics import (
    LPIPS_HEADS_FILE,
    VERDICTS,
    VGG16_FILE,
    Judgement,
    load_lpips_vgg,
    lpips_distance,
    vlm_effectiveness,
    weights_dir,
)
from ..csg.vlm.judge import judge_counterfactual
from .csg_common import CATEGORY, CausalGraphType, Interventions, InterventionType
from .graph_nodes import image_to_pil
from .model_memory import held, load_for_use, managed, node_device
from .vlm_nodes import VLMHandle, VLMType, asking, attempts_input

EVALUATION_CATEGORY = f"{CATEGORY}/evaluation"


# -- Counterfactual Judge ---------------------------------------------------------------------------


def judged_interventions(intervention: Intervention | None, interventions: list[Intervention] | None
                         ) -> list[Intervention]:
    """The interventions to judge: exactly one of the two inputs, as a list."""
    if intervention is None and interventions is None:
        raise InputError("Counterfactual Judge needs the intervention(s) the images were made with: connect a "
                         "CSG_INTERVENTION (for one image) or a CSG_INTERVENTIONS list (one image per intervention, in "
                         "order).")
    if intervention is not None and interventions is not None:
        raise InputError("Counterfactual Judge has both a CSG_INTERVENTION and a CSG_INTERVENTIONS list connected; "
                         "connect one of them, so it is clear which intervention each image was made with.")
    chosen = [intervention] if intervention is not None else list(interventions)
    if not chosen:
        raise InputError("The CSG_INTERVENTIONS list is empty; connect the list the counterfactuals were made from.")
    for k, item in enumerate(chosen, start=1):
        if not isinstance(item, Intervention):
            raise InputError(f"Intervention {k} is a {type(item).__name__}, not a CSG_INTERVENTION.")
    return chosen


def judgement_report(judgements: list[Judgement], interventions: list[Intervention], effectiveness: float) -> str:
    """The score, the verdicts, then per image: the intervention and, per changed concept, whether it shows."""
    items = sum(len(j.concept_checks) for j in judgements)
    present = sum(c.present for j in judgements for c in j.concept_checks)
    counts = ", ".join(f"{sum(j.verdict == v for j in judgements)} {v}" for v in VERDICTS)
    images = "1 counterfactual" if len(judgements) == 1 else f"{len(judgements)} counterfactuals"
    lines = [f"VLM effectiveness: {effectiveness:.3f} over {images} ({present} of {items} changed concepts shown "
             f"as intended); verdicts: {counts}"]
    for k, (judgement, intervention) in enumerate(zip(judgements, interventions), start=1):
        shown = sum(c.present for c in judgement.concept_checks)
        lines += ["", f"[{k}] {intervention.id}: do({intervention.target_concept_id} "
                      f"{intervention.target_concept_name} = {intervention.new_value})   verdict: {judgement.verdict}, "
                      f"{shown}/{len(judgement.concept_checks)} shown"]
        lines += [f"    {'changed as intended' if c.present else 'NOT changed        '}  {c.concept_name}: "
                  f"{c.expected_value}" for c in judgement.concept_checks]
        if judgement.reasoning:
            lines.append(f"    reasoning: {judgement.reasoning}")
    return "\n".join(lines)


class CounterfactualJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCounterfactualJudge",
            display_name="Counterfactual Judge",
            category=EVALUATION_CATEGORY,
            description="The paper's VLM effectiveness (Table 1): for each counterfactual the VLM answers, per "
                        "concept the intervention changes (the target and its changed descendants), whether the "
                        "image shows the new value, and gives a verdict (success, partial, failure). The score is "
                        "the share of concepts shown, averaged over the images.",
            inputs=[
                VLMType.Input("vlm", tooltip="From 'VLM (Local)' or 'VLM (OpenAI-compatible)'."),
                io.Image.Input("image", tooltip="The counterfactual image(s): one per intervention, in the same "
                                                "order, e.g. the output of 'Causal Counterfactuals (batched)'."),
                CausalGraphType.Input("causal_graph", tooltip="The graph the interventions act on; it decides "
                                                              "which concepts each one changes."),
                InterventionType.Input("intervention", optional=True,
                                       tooltip="The intervention one image was made with. Connect this or "
                                               "'interventions', not both."),
                Interventions.Input("interventions", optional=True,
                                    tooltip="The interventions a batch was made with; image k is judged against "
                                            "intervention k. Connect this or 'intervention', not both."),
                attempts_input(),
            ],
            outputs=[
                io.Float.Output(display_name="effectiveness",
                                tooltip="VLM effectiveness in [0, 1]: per image the share of changed concepts "
                                        "shown, averaged over the images."),
                io.String.Output(display_name="report", tooltip="Per intervention, per changed concept: changed as "
                                                                "intended or not, and the verdict."),
                io.String.Output(display_name="judgements_json",
                                 tooltip="The judgements as a JSON list, one per image in order."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vlm: VLMHandle, image: torch.Tensor, causal_graph: CausalGraph, max_attempts: int,
                intervention: Intervention | None = None, interventions: list[Intervention] | None = None
                ) -> io.NodeOutput:
        chosen = judged_interventions(intervention, interventions)
        if not isinstance(causal_graph, CausalGraph):
            raise InputError(f"Expected a CSG_CAUSAL_GRAPH, got {type(causal_graph).__name__}.")
        if image.dim() != 4:
            raise InputError(f"Expected a ComfyUI IMAGE batch (B, H, W, C), got shape {tuple(image.shape)}.")
        if image.shape[0] != len(chosen):
            made = "1 intervention is" if len(chosen) == 1 else f"{len(chosen)} interventions are"
            raise InputError(f"The image batch holds {image.shape[0]} image(s) but {made} connected. The judge "
                             "pairs them in order (image k with intervention k): give one image per intervention, "
                             "e.g. the output of 'Causal Counterfactuals (batched)' made from the same list.")
        pictures = [image_to_pil(image[k:k + 1], "Counterfactual Judge") for k in range(len(chosen))]
        with asking(vlm, questions=len(chosen)) as backend:
            judgements = [judge_counterfactual(backend, picture, item, causal_graph, max_attempts=max_attempts)
                          for picture, item in zip(pictures, chosen)]
        effectiveness = float(vlm_effectiveness(judgements))
        report = judgement_report(judgements, chosen, effectiveness)
        as_json = json.dumps([{"image": k, **j.to_dict()} for k, j in enumerate(judgements, start=1)], indent=2,
                             ensure_ascii=False)
        return io.NodeOutput(effectiveness, report, as_json, ui=ui.PreviewText(report))


# -- LPIPS Distance ---------------------------------------------------------------------------------


# (vgg path, heads path, device, weights dir) -> the model, under ComfyUI's memory manager
_LPIPS_MODELS: dict[tuple[str, str, str, str], comfy.model_patcher.ModelPatcher] = {}
# Memory to compare one pair of images with, per pixel of one image: twice the float32 peak of about
# 2 KB, which is the first image's five taps (122 channels per input pixel over VGG16's pyramid) kept
# while the second runs through VGG16's widest layers at full size (64 channels in, 64 out, one tap).
LPIPS_BYTES_PER_PIXEL = 4096


def _path_field(value: str | None) -> str | None:
    """A path typed into a widget: surrounding spaces and quotes (from "copy as path") removed; empty is None."""
    value = (value or "").strip().strip('"').strip("'").strip()
    return str(Path(value).expanduser()) if value else None


def shared_lpips(vgg_weights: str | None, lpips_weights: str | None, device: torch.device
                 ) -> comfy.model_patcher.ModelPatcher:
    """LPIPS(VGG) read once per weight files and device, reused by every later execution; ComfyUI's memory
    manager moves it to ``device`` (``load_for_use``) and may offload it between uses."""
    key = (vgg_weights or "", lpips_weights or "", str(device), str(weights_dir()))
    if key not in _LPIPS_MODELS:
        _LPIPS_MODELS[key] = managed(load_lpips_vgg(vgg_weights, lpips_weights), device)
    return _LPIPS_MODELS[key]


def _channels_first(image: torch.Tensor, name: str) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) in [0, 1] as (B, 3, H, W) float32 RGB on the CPU (``csg.images``: alpha onto
    white)."""
    if image.dim() != 4 or image.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{name} must be a ComfyUI IMAGE (B, H, W, C), got shape {tuple(image.shape)}.")
    return rgb_channels(image.float().clamp(0.0, 1.0), dim=-1).movedim(-1, 1).cpu()


def check_pairs(factual: torch.Tensor, counterfactual: torch.Tensor) -> None:
    (n_f, _, h_f, w_f), (n_c, _, h_c, w_c) = factual.shape, counterfactual.shape
    if (h_f, w_f) != (h_c, w_c):
        raise InputError(f"LPIPS compares images of one size, but the factual image is {w_f}x{h_f} and the "
                         f"counterfactual {w_c}x{h_c} (width x height). Resize one to the other's size first "
                         "(e.g. with 'Upscale Image').")
    if n_f not in (1, n_c):
        raise InputError(f"factual holds {n_f} images and counterfactual {n_c}: give one factual image (compared "
                         "with every counterfactual) or one per counterfactual, in the same order.")


def distances_report(distances: list[float]) -> str:
    lines = ["LPIPS(VGG) per counterfactual, lower is closer (0 = identical):"]
    lines += [f"  image {k}: {d:.6f}" for k, d in enumerate(distances, start=1)]
    images = "1 image" if len(distances) == 1 else f"{len(distances)} images"
    lines.append(f"mean: {sum(distances) / len(distances):.6f} over {images}")
    return "\n".join(lines)


class LPIPSDistance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGLPIPSDistance",
            display_name="LPIPS Distance",
            category=EVALUATION_CATEGORY,
            description="The paper's minimality metric (Table 1): LPIPS v0.1 on a VGG16 backbone between the factual "
                        "image and each counterfactual; lower means a more minimal edit. Weights are never "
                        f"downloaded: put torchvision's {VGG16_FILE} and the LPIPS heads {LPIPS_HEADS_FILE} in "
                        "$TORCH_HOME/hub/checkpoints, or give their paths.",
            inputs=[
                io.Image.Input("factual", tooltip="The factual (original) image: one, compared with every "
                                                  "counterfactual, or one per counterfactual in the same order."),
                io.Image.Input("counterfactual", tooltip="The counterfactual image(s), the same size as the factual."),
                io.String.Input("vgg_weights", default="", optional=True,
                                tooltip=f"Path of torchvision's ImageNet VGG16 checkpoint {VGG16_FILE}. Empty: "
                                        f"$TORCH_HOME/hub/checkpoints/{VGG16_FILE} (default ~/.cache/torch)."),
                io.String.Input("lpips_weights", default="", optional=True,
                                tooltip=f"Path of the LPIPS v0.1 VGG heads (lpips/weights/v0.1/vgg.pth from the "
                                        f"lpips package). Empty: $TORCH_HOME/hub/checkpoints/{LPIPS_HEADS_FILE}, "
                                        "then the copy inside an installed lpips package."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="Where VGG16 runs; auto: ComfyUI's device. The loaded model is kept for "
                                       "later runs."),
            ],
            outputs=[
                io.Float.Output(display_name="lpips", tooltip="The mean LPIPS over the counterfactuals."),
                io.String.Output(display_name="distances", tooltip="LPIPS of each counterfactual, in order."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, factual: torch.Tensor, counterfactual: torch.Tensor, device: str, vgg_weights: str | None = None,
                lpips_weights: str | None = None) -> io.NodeOutput:
        a, b = _channels_first(factual, "factual"), _channels_first(counterfactual, "counterfactual")
        check_pairs(a, b)
        patcher = shared_lpips(_path_field(vgg_weights), _path_field(lpips_weights), node_device(device))
        load_for_use(patcher, LPIPS_BYTES_PER_PIXEL * a.shape[-2] * a.shape[-1])
        model = held(patcher)
        bar = comfy.utils.ProgressBar(b.shape[0])
        distances = []
        for k in range(b.shape[0]):
            comfy.model_management.throw_exception_if_processing_interrupted()
            distances.append(float(lpips_distance(model, a[k if a.shape[0] > 1 else 0], b[k])[0]))
            bar.update(1)
        report = distances_report(distances)
        return io.NodeOutput(sum(distances) / len(distances), report, ui=ui.PreviewText(report))


NODES = [CounterfactualJudge, LPIPSDistance]
