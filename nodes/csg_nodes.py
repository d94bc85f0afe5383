"""The counterfactual nodes: abduction once, then any number of CSG predictions from it.

    Causal Inversion          MODEL, CLIP, VAE, IMAGE, source prompt              -> CSG_INVERSION
    Causal Counterfactual     MODEL, CLIP, VAE, CSG_INVERSION, CSG_INTERVENTION   -> IMAGE, LATENT, MASK, IMAGE
    Causal Counterfactuals    MODEL, CLIP, VAE, CSG_INVERSION, CSG_INTERVENTIONS  -> the same, one batch row each

The inversion is its own node so ComfyUI's cache keeps it: changing an edit setting re-runs only
the prediction. The inversion runs the core's ``csg.abduction.invert_latents`` on ``ComfySDXLHost``,
previewing each step's x0_hat through ComfyUI's latent preview.
A prediction builds the CSG GUIDER, the edit-friendly SAMPLER and the inversion's NOISE and samples
them through ComfyUI's ``guider.sample`` with the latent preview (``comfy_sampling.sample_counterfactual``),
exactly as SamplerCustomAdvanced does with the sampling nodes; the guider steps with the core's
``csg.prediction.predict_step``, the math the diffusers host is tested against.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..csg.abduction import check_image_size, invert_latents
from ..csg.errors import InputError
from ..csg.images import image_to_tensor
from .comfy_host import ComfySDXLHost
from .comfy_sampling import CSGGuider, sample_counterfactual
from .csg_common import (
    CATEGORY,
    CausalGraphType,
    Interventions,
    InterventionType,
    Inversion,
    decode_images,
    edit_inputs,
    edit_settings,
    mask_preview,
    masks_at,
    previewing_progress,
    single_image,
    spec_for,
)


def model_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="An SDXL epsilon-prediction model (LoRAs and model patches applied before "
                                        "this node act on the result)."),
        io.Clip.Input("clip", tooltip="The SDXL checkpoint's CLIP (both text encoders)."),
        io.Vae.Input("vae", tooltip="The SDXL VAE, to encode the image and decode the result."),
    ]


class CausalInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCausalInversion",
            display_name="Causal Inversion (abduction)",
            category=f"{CATEGORY}/abduction",
            description="Recovers the noise of the factual image by edit-friendly SDE-DPM-Solver++ inversion: x_T "
                        "and one noise map per step. One inversion serves any number of counterfactual edits, and "
                        "ComfyUI's cache keeps it while only edit settings change.",
            inputs=[
                *model_inputs(),
                io.Image.Input("image",
                               tooltip="The factual image; both sides must be multiples of 32 pixels for SDXL."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="A caption of the image (e.g. the graph's scene summary). Its guidance is "
                                        "baked into the noise maps; empty inverts unconditionally."),
                io.Int.Input("steps", default=100, min=2, max=1000,
                             tooltip="Kept inversion/sampling steps (paper: 100)."),
                io.Float.Input("skip", default=0.15, min=0.0, max=0.95, step=0.01,
                               tooltip="Fraction of the noisiest steps left out; higher keeps more of the image "
                                       "(paper: 0.15)."),
                io.Float.Input("source_guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance of the source prompt during inversion (paper: 3.5)."),
                io.Boolean.Input("exact_reconstruction", default=False,
                                 tooltip="Store every noise map and the last residual, so an unedited run returns "
                                         "the input latent exactly. Off: the reference (LEDITS++) behaviour."),
                io.Int.Input("num_zero_noise_steps", default=3, min=0, max=1000,
                             tooltip="Reference mode only: zero the last noise maps, which suppresses SDXL noise "
                                     "artifacts (reference: 3). Ignored with exact reconstruction."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the independent noise drawn for every kept step."),
            ],
            outputs=[Inversion.Output(display_name="inversion", tooltip="x_T, the noise maps and the schedule, "
                                                                        "for Causal Counterfactual(s), CSG "
                                                                        "Guider, Inversion Sigmas & Noise and "
                                                                        "Edit-Friendly DPM++ Sampler.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, steps, skip, source_guidance, exact_reconstruction,
                num_zero_noise_steps, seed) -> io.NodeOutput:
        host = ComfySDXLHost(model, clip, vae)
        pixels = image_to_tensor(single_image(image))
        check_image_size(host, *pixels.shape[-2:])
        x0 = host.encode_image(pixels)
        with host.loaded((2, *x0.shape[1:])):
            inversion = invert_latents(host, x0, source_prompt.strip(), num_steps=steps, skip=skip,
                                       source_guidance=source_guidance, exact=exact_reconstruction,
                                       num_zero_noise_steps=0 if exact_reconstruction else num_zero_noise_steps,
                                       generator=seed, on_step=previewing_progress(model, steps))
        return io.NodeOutput(inversion)


def predict(model, clip, vae, inversion, interventions: list, graph, scale, threshold, warmup, mask_mode, reverse,
            protect_non_descendants, cooldown, concept_scales) -> io.NodeOutput:
    """Counterfactual images, latents, masks and mask previews for one batched CSG run."""
    if not interventions:
        raise InputError("No intervention given; connect a CSG_INTERVENTION (or a non-empty CSG_INTERVENTIONS list).")
    settings = edit_settings(scale, threshold, warmup, mask_mode, protect_non_descendants, cooldown,
                             concept_scales)
    specs = [spec_for(i, graph, settings, reverse) for i in interventions]
    guider = CSGGuider.for_edits(ComfySDXLHost(model, clip, vae), inversion, specs, settings.guidance_params())
    samples = sample_counterfactual(guider, inversion)
    mean_masks, _ = guider.edit_masks()
    images = decode_images(vae, samples)
    masks = masks_at(torch.cat(mean_masks), tuple(images.shape[1:3]))
    owner = [k for k, m in enumerate(mean_masks) for _ in range(m.shape[0])]
    previews = torch.cat([mask_preview(images[k], masks[j:j + 1]) for j, k in enumerate(owner)])
    return io.NodeOutput(images, {"samples": samples}, masks, previews)


def prediction_outputs() -> list:
    return [
        io.Image.Output(display_name="image", tooltip="The counterfactual image(s): one per intervention, in order."),
        io.Latent.Output(display_name="latent", tooltip="The counterfactual latent(s), in the same order (decode "
                                                        "them or refine them further)."),
        io.Mask.Output(display_name="masks", tooltip="Per changed concept, the share of guided steps that edited "
                                                     "each pixel."),
        io.Image.Output(display_name="mask_preview", tooltip="Each concept's mask over its counterfactual."),
    ]


def prediction_inputs() -> list:
    return [
        *model_inputs(),
        Inversion.Input("inversion", tooltip="The abducted noise from 'Causal Inversion' of the factual image."),
    ]


class CausalCounterfactual(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCausalCounterfactual",
            display_name="Causal Counterfactual (CSG)",
            category=f"{CATEGORY}/prediction",
            description="Samples the counterfactual image under do(concept = value) with Causal Semantic Guidance: "
                        "one masked guidance term per changed concept (the target and its changed descendants), "
                        "replaying the inversion's noise so the rest of the image stays.",
            inputs=[
                *prediction_inputs(),
                InterventionType.Input("intervention", tooltip="The intervention and its propagated changes."),
                CausalGraphType.Input("causal_graph", optional=True,
                                      tooltip="The image's causal graph: enforces that only descendants of the "
                                              "target change, and enables non-descendant protection."),
                *edit_inputs(),
            ],
            outputs=prediction_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, vae, inversion, intervention, scale, threshold, warmup, mask_mode, reverse,
                protect_non_descendants, causal_graph=None, cooldown=0, concept_scales="") -> io.NodeOutput:
        return predict(model, clip, vae, inversion, [intervention], causal_graph, scale, threshold, warmup, mask_mode,
                       reverse, protect_non_descendants, cooldown, concept_scales)


class CausalCounterfactuals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGCausalCounterfactuals",
            display_name="Causal Counterfactuals (batched)",
            category=f"{CATEGORY}/prediction",
            description="Every intervention of a list (e.g. the three proposals) from ONE inversion in ONE batched "
                        "sampling loop; outputs one image per intervention, in order.",
            inputs=[
                *prediction_inputs(),
                Interventions.Input("interventions", tooltip="The interventions to predict, e.g. all proposals."),
                CausalGraphType.Input("causal_graph", optional=True,
                                      tooltip="The image's causal graph (causal checks and protection)."),
                *edit_inputs(),
            ],
            outputs=prediction_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, vae, inversion, interventions, scale, threshold, warmup, mask_mode, reverse,
                protect_non_descendants, causal_graph=None, cooldown=0, concept_scales="") -> io.NodeOutput:
        return predict(model, clip, vae, inversion, list(interventions), causal_graph, scale, threshold, warmup,
                       mask_mode, reverse, protect_non_descendants, cooldown, concept_scales)


NODES = [CausalInversion, CausalCounterfactual, CausalCounterfactuals]
