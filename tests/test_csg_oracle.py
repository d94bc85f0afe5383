"""Our CSG against diffusers' LEditsPPPipelineStableDiffusionXL on the same tiny random SDXL.

The pipeline is the oracle: same components, same seed, same settings, square image (it swaps H
and W in SDXL's time_ids, which only matters for non-square images). Its tokenizers report the real
token count as ``length`` (see tests.sdxl_fixtures.RealLengthCLIPTokenizer).
"""

import pytest
import torch

from csg.abduction import invert
from csg.guidance import ConceptTerm, EditSpec, GuidanceParams
from csg.prediction import edit, reconstruct
from tests.sdxl_fixtures import reference_pipeline, restored_attention_processors, sample_image

STEPS, SKIP, SOURCE, SOURCE_GUIDANCE, SEED = 20, 0.15, "a photo of a man", 3.5, 0
REFERENCE_MASK_FLAGS = {
    "intersect": dict(use_intersect_mask=True),
    "cross_attention": dict(use_cross_attn_mask=True),
    "noise": dict(),
}
ONE_CONCEPT = [ConceptTerm("black hair", scale=8.0, threshold=0.7, warmup=5)]
TWO_CONCEPTS = [ConceptTerm("black hair", scale=8.0, threshold=0.7, warmup=5),
                ConceptTerm("red dress", scale=6.0, threshold=0.8, warmup=3, cooldown=15, reverse=True)]


@pytest.fixture(scope="module")
def inverted(tiny_components, tiny_host):
    image = sample_image()
    pipe = reference_pipeline(tiny_components)
    with restored_attention_processors(tiny_components.unet):
        pipe.invert(image, source_prompt=SOURCE, source_guidance_scale=SOURCE_GUIDANCE, num_inversion_steps=STEPS,
                    skip=SKIP, generator=torch.Generator().manual_seed(SEED))
    ours = invert(tiny_host, image, SOURCE, num_steps=STEPS, skip=SKIP, source_guidance=SOURCE_GUIDANCE, generator=SEED)
    return pipe, ours


def run_reference(pipe, unet, terms=None, **flags):
    with restored_attention_processors(unet):
        if terms is None:
            return pipe(output_type="latent").images
        return pipe(
            editing_prompt=[t.prompt for t in terms],
            edit_guidance_scale=[t.scale for t in terms],
            edit_threshold=[t.threshold for t in terms],
            edit_warmup_steps=[t.warmup for t in terms],
            edit_cooldown_steps=[STEPS if t.cooldown is None else t.cooldown for t in terms],
            reverse_editing_direction=[t.reverse for t in terms],
            output_type="latent",
            **flags,
        ).images


def test_inversion_matches_reference(inverted):
    pipe, ours = inverted
    assert ours.schedule.timesteps == pipe.inversion_steps.tolist()
    assert ours.noise_maps.shape == pipe.zs.shape
    assert (ours.noise_maps - pipe.zs).abs().max().item() <= 1e-4
    assert (ours.x_T - pipe.init_latents).abs().max().item() <= 1e-4
    assert ours.noise_maps[:-3].abs().amax(dim=(1, 2, 3, 4)).min() > 0.1  # real maps, not zeros
    assert ours.noise_maps[-3:].abs().max() == 0  # num_zero_noise_steps=3, as the reference


def test_unedited_sample_matches_reference(inverted, tiny_components, tiny_host):
    pipe, ours = inverted
    expected = run_reference(pipe, tiny_components.unet)
    assert (reconstruct(tiny_host, ours) - expected).abs().max().item() <= 1e-3


@pytest.mark.parametrize("terms", [ONE_CONCEPT, TWO_CONCEPTS], ids=["one_concept", "two_concepts"])
@pytest.mark.parametrize("mode", list(REFERENCE_MASK_FLAGS))
def test_edit_matches_reference(inverted, tiny_components, tiny_host, terms, mode):
    pipe, ours = inverted
    expected = run_reference(pipe, tiny_components.unet, terms, **REFERENCE_MASK_FLAGS[mode])
    unedited = reconstruct(tiny_host, ours)
    result = edit(tiny_host, ours, [EditSpec(tuple(terms))], GuidanceParams(mask_mode=mode))
    error = (result.latents - expected).abs().max().item()
    assert error <= 1e-3
    assert (expected - unedited).abs().max().item() > 100 * 1e-3  # the guidance really changed the result
