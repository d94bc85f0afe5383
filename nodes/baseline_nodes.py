"""The paper's Table 1 baselines as a node: inversion + classifier-free guidance on the full target prompt."""

from __future__ import annotations

from comfy_api.latest import io

from ..csg.abduction import check_image_size
from ..csg.baselines import DEFAULT_TARGET_GUIDANCE, invert_baseline, sample_with_guidance
from ..csg.errors import InputError
from ..csg.images import image_to_tensor
from .comfy_host import ComfySDXLHost
from .csg_common import CATEGORY, InterventionType, progress, single_image, to_comfy_images
from .csg_nodes import model_inputs

METHODS = {"DDPM inversion (edit-friendly)": "ddpm", "DDIM inversion": "ddim"}


class BaselineEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGBaselineEdit",
            display_name="Baseline Edit (inversion + CFG)",
            category=f"{CATEGORY}/baselines",
            description="The paper's baselines: invert the image (edit-friendly DDPM or DDIM), then sample with "
                        "classifier-free guidance on the intervention's full generation prompt, unmasked. For "
                        "comparison with Causal Counterfactual.",
            inputs=[
                *model_inputs(),
                io.Image.Input("image", tooltip="The factual image; both sides multiples of 32 pixels."),
                InterventionType.Input("intervention", tooltip="Its generation_prompt (the scene with the changed "
                                                               "values) is the target prompt."),
                io.Combo.Input("method", options=list(METHODS), default="DDPM inversion (edit-friendly)",
                               tooltip="Edit-friendly DDPM inversion (noise maps replayed) or deterministic DDIM "
                                       "inversion."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="A caption of the image; guides the DDPM inversion (DDIM inverts with it "
                                        "at guidance 1)."),
                io.Int.Input("steps", default=100, min=2, max=1000, tooltip="Kept inversion/sampling steps."),
                io.Float.Input("skip", default=0.15, min=0.0, max=0.95, step=0.01,
                               tooltip="Fraction of the noisiest steps left out."),
                io.Float.Input("source_guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the source prompt during DDPM inversion."),
                io.Float.Input("target_guidance", default=DEFAULT_TARGET_GUIDANCE, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the target prompt while sampling."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the DDPM inversion's independent noise."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The baseline's edited image."),
                     io.Latent.Output(display_name="latent", tooltip="Its latent.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, intervention, method, source_prompt, steps, skip, source_guidance,
                target_guidance, seed) -> io.NodeOutput:
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
        target = intervention.generation_prompt.strip()
        if not target:
            raise InputError(f"Intervention '{intervention.id}' has no generation_prompt; the baselines guide with "
                             "the full target prompt. Write one (the source caption with the changed values).")
        host = ComfySDXLHost(model, clip, vae, on_prediction=progress(2 * steps))
        pixels = image_to_tensor(single_image(image))
        check_image_size(host, *pixels.shape[-2:])
        x0 = host.encode_image(pixels)
        with host.loaded((2, *x0.shape[1:])):
            inversion = invert_baseline(host, METHODS[method], x0, source_prompt.strip(), num_steps=steps, skip=skip,
                                        source_guidance=source_guidance, seed=seed)
            latent = sample_with_guidance(host, inversion, target, target_guidance)
        return io.NodeOutput(to_comfy_images(host.decode_latents(latent)), host.comfy_latent(latent))


NODES = [BaselineEdit]
