"""What the CSG nodes share: socket types, ComfyUI image/mask conversion, progress, the edit settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import comfy.model_management
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..csg.counterfactual import CSGParams, edit_spec, parse_concept_scales
from ..csg.errors import InputError
from ..csg.graph import CausalGraph, Concept, Intervention, Relationship, check_intervention
from ..csg.guidance import MASK_MODES, EditSpec

CATEGORY = "causal counterfactuals"

Inversion = io.Custom("CSG_INVERSION")  # csg.abduction.Inversion
CausalGraphType = io.Custom("CSG_CAUSAL_GRAPH")  # csg.graph.CausalGraph
InterventionType = io.Custom("CSG_INTERVENTION")  # csg.graph.Intervention
Interventions = io.Custom("CSG_INTERVENTIONS")  # list[csg.graph.Intervention]


# -- images ----------------------------------------------------------------------------------------------


def single_image(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (1, H, W, C) in [0, 1] to (C, H, W), for ``csg.images.image_to_tensor``."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise InputError(f"Expected one image, got a batch of {image.shape[0]}. Pick one image "
                         "(e.g. with 'Image From Batch') before inverting.")
    return image[0].movedim(-1, 0).float()


def to_comfy_images(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] to a ComfyUI IMAGE (B, H, W, 3) on the intermediate device."""
    return pixels.movedim(1, -1).float().clamp(0.0, 1.0).to(comfy.model_management.intermediate_device())


def decode_images(vae, samples: torch.Tensor) -> torch.Tensor:
    """A ComfyUI LATENT's samples to an IMAGE (B, H, W, 3), as VAE Decode does."""
    if vae is None:
        raise InputError("The VAE input is missing; connect the VAE output of the SDXL checkpoint loader.")
    return vae.decode(samples)[..., :3].float().clamp(0.0, 1.0).to(comfy.model_management.intermediate_device())


def masks_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, h, w) latent masks in [0, 1] to a ComfyUI MASK (T, H, W), nearest upsampling."""
    upsampled = F.interpolate(masks.float()[:, None], size=size, mode="nearest")[:, 0]
    return upsampled.clamp(0.0, 1.0).to(comfy.model_management.intermediate_device())


def mask_preview(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per mask, the image (H, W, 3) darkened outside the mask and tinted red inside it: (T, H, W, 3)."""
    tint = torch.tensor([1.0, 0.15, 0.15], device=image.device)
    m = masks.to(image.device)[..., None]
    return (image[None] * (0.35 + 0.65 * m) * (1 - 0.5 * m) + 0.5 * m * tint).clamp(0.0, 1.0)


# -- progress ---------------------------------------------------------------------------------------------


def progress(total: int) -> Callable[[], None]:
    """Called after each UNet evaluation: honour Cancel, advance ComfyUI's progress bar."""
    bar = comfy.utils.ProgressBar(total)

    def step() -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return step


def previewing_progress(model, total: int) -> Callable[[int, torch.Tensor], None]:
    """Called after each of ``total`` steps with its x0_hat (the model's latent space): honour Cancel and
    advance the progress bar with ComfyUI's latent preview (the user's preview method), as a sampler's
    callback does."""
    callback = latent_preview.prepare_callback(model, total)

    def step(i: int, x0: torch.Tensor) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        callback(i, x0, None, total)

    return step


# -- edits ------------------------------------------------------------------------------------------------


def implied_graph(intervention: Intervention) -> CausalGraph:
    """Without a causal graph, the intervention's own claim: the target causes each change it lists.

    A target without an original value gets an empty one, so the intervention still changes it.
    """
    target = Concept(intervention.target_concept_id, intervention.target_concept_name or intervention.target_concept_id,
                     intervention.original_value)
    changed = [Concept(c.concept_id, c.concept_name or c.concept_id, c.original_value or c.new_value)
               for c in intervention.propagated_changes if c.concept_id != target.id]
    edges = [Relationship(f"r{i}", target.id, c.id) for i, c in enumerate(changed, start=1)]
    return CausalGraph((target, *changed), tuple(edges))


def edit_settings(scale: float, threshold: float, warmup: int, mask_mode: str, protect: bool, cooldown: int = 0,
                  concept_scales: str = "") -> CSGParams:
    """The edit widgets as CSGParams; a cooldown of 0 guides to the end (the API's None)."""
    return CSGParams(scale=scale, threshold=threshold, warmup=warmup, mask_mode=mask_mode,
                     non_descendant_protection=protect, cooldown=cooldown or None,
                     concept_scales=parse_concept_scales(concept_scales, "concept_scales"))


def spec_for(intervention: Intervention, graph: CausalGraph | None, settings: CSGParams, reverse: bool) -> EditSpec:
    """CSG's terms for one intervention, its causal semantics enforced against ``graph`` when given;
    ``reverse`` turns every term away from its concept's original value."""
    if not isinstance(intervention, Intervention):
        raise InputError(f"Expected a CSG_INTERVENTION, got {type(intervention).__name__}.")
    if graph is None:
        if settings.non_descendant_protection:
            raise InputError("Non-descendant protection needs the causal graph: connect a CSG_CAUSAL_GRAPH, "
                             "or turn protection off.")
        graph = implied_graph(intervention)
    checked = check_intervention(graph, intervention)
    if reverse:
        settings = replace(settings, reverse=tuple(c.concept_id for c in checked.edit_concepts(graph)))
    return edit_spec(graph, checked, settings)


def edit_inputs() -> list:
    """The guidance widgets shared by the guider and the counterfactual nodes (paper defaults)."""
    return [
        io.Float.Input("scale", default=8.0, min=0.0, max=50.0, step=0.1,
                       tooltip="Edit guidance scale s_c of every changed concept (paper: 8)."),
        io.Float.Input("threshold", default=0.7, min=0.0, max=1.0, step=0.01,
                       tooltip="Mask quantile lambda: a pixel is edited where its attention/noise map reaches this "
                               "quantile (paper: 0.7, i.e. the top 30%)."),
        io.Int.Input("warmup", default=10, min=0, max=1000,
                     tooltip="Steps without guidance at the start, so the layout settles first (paper: 10)."),
        io.Combo.Input("mask_mode", options=list(MASK_MODES), default="intersect",
                       tooltip="intersect: cross-attention mask AND noise mask (paper); cross_attention or noise: "
                               "one of them alone."),
        io.Boolean.Input("reverse", default=False,
                         tooltip="Push away from each concept's original value instead of toward its new value."),
        io.Boolean.Input("protect_non_descendants", default=False,
                         tooltip="Ours, off by default: keep edit masks off the regions of concepts that are not "
                                 "descendants of the target (needs the causal graph)."),
        io.Int.Input("cooldown", default=0, min=0, max=1000, optional=True,
                     tooltip="First step without guidance again, so the last steps only refine details; 0: guide "
                             "to the end (the paper)."),
        io.String.Input("concept_scales", default="", optional=True,
                        tooltip="Per-concept scales instead of 'scale', e.g. 'c2=6.0, hair color=5' (concept id or "
                                "name, comma separated). Empty: every concept uses 'scale'."),
    ]
