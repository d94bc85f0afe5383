"""CSG for SamplerCustomAdvanced: the inversion's SIGMAS/NOISE/LATENT, a CSG GUIDER and an edit-friendly SAMPLER.

    Inversion Sigmas & Noise ─ SIGMAS, NOISE, LATENT ┐
    CSG Guider ─ GUIDER ─────────────────────────────┼─► SamplerCustomAdvanced ─► LATENT
    Edit-Friendly DPM++ Sampler ─ SAMPLER ───────────┘

Any part can be swapped for another node (e.g. a different sampler with the CSG guider). The
all-in-one Causal Counterfactual node samples these very parts the same way, so with the same
settings both give the same latent, bit for bit.
"""

from __future__ import annotations

from comfy_api.latest import io

from .comfy_host import ComfySDXLHost, check_sdxl_epsilon
from .comfy_sampling import CSGGuider, InversionNoise, edit_friendly_sampler, inversion_latent, inversion_sigmas
from .csg_common import CATEGORY, CausalGraphType, InterventionType, Inversion, edit_inputs, edit_settings, spec_for


class InversionSigmasAndNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGInversionSigmasAndNoise",
            display_name="Inversion Sigmas & Noise",
            category=f"{CATEGORY}/sampling",
            description="The inversion's schedule as SIGMAS, a NOISE that starts sampling exactly at its x_T, and "
                        "the abducted image LATENT, for SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model the inversion was made with (for its latent format)."),
                Inversion.Input("inversion", tooltip="From 'Causal Inversion'."),
            ],
            outputs=[
                io.Sigmas.Output(display_name="sigmas", tooltip="The inversion's schedule, for "
                                                                "SamplerCustomAdvanced's sigmas."),
                io.Noise.Output(display_name="noise", tooltip="A NOISE that makes sampling start exactly at the "
                                                              "inversion's x_T."),
                io.Latent.Output(display_name="latent", tooltip="The image latent, for SamplerCustomAdvanced's "
                                                                "latent_image."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion) -> io.NodeOutput:
        check_sdxl_epsilon(model)
        latent_format = model.model.latent_format
        return io.NodeOutput(inversion_sigmas(inversion), InversionNoise(inversion, latent_format),
                             inversion_latent(inversion, latent_format))


class CSGGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGGuider",
            display_name="CSG Guider",
            category=f"{CATEGORY}/sampling",
            description="Causal Semantic Guidance as a GUIDER: per step, the unconditional prediction plus one "
                        "masked term per changed concept. Use it with the inversion's SIGMAS (its step count).",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL epsilon-prediction model."),
                io.Clip.Input("clip", tooltip="The SDXL checkpoint's CLIP (both text encoders)."),
                Inversion.Input("inversion", tooltip="From 'Causal Inversion': fixes the step count and, in exact "
                                                     "mode, the source prompt's base prediction."),
                InterventionType.Input("intervention", tooltip="The intervention to guide toward."),
                CausalGraphType.Input("causal_graph", optional=True, tooltip="The image's causal graph."),
                *edit_inputs(),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="CSG as a GUIDER for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, clip, inversion, intervention, scale, threshold, warmup, mask_mode, reverse,
                protect_non_descendants, causal_graph=None, cooldown=0, concept_scales="") -> io.NodeOutput:
        settings = edit_settings(scale, threshold, warmup, mask_mode, protect_non_descendants, cooldown,
                                 concept_scales)
        spec = spec_for(intervention, causal_graph, settings, reverse)
        return io.NodeOutput(CSGGuider.for_edits(ComfySDXLHost(model, clip), inversion, [spec],
                                                 settings.guidance_params()))


class EditFriendlySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGEditFriendlySampler",
            display_name="Edit-Friendly DPM++ Sampler",
            category=f"{CATEGORY}/sampling",
            description="SDE-DPM-Solver++(2M) whose noise at each step is the inversion's stored noise map, so an "
                        "unguided run retraces the factual image. Needs the inversion's SIGMAS.",
            inputs=[Inversion.Input("inversion", tooltip="From 'Causal Inversion': the noise maps to replay.")],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="A SAMPLER that replays the inversion's "
                                                                       "noise maps, for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, inversion) -> io.NodeOutput:
        return io.NodeOutput(edit_friendly_sampler(inversion))


NODES = [InversionSigmasAndNoise, CSGGuiderNode, EditFriendlySampler]
