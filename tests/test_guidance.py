"""Action: masks, locality, direction, warm-up/cool-down, protection and batched interventions."""

import pytest
import torch

from csg.abduction import invert_latents
from csg.graph import CausalGraph, Intervention
from csg.guidance import (
    ConceptTerm,
    EditSpec,
    GuidanceParams,
    guided_epsilon,
    plan_guidance,
    reference_gaussian_kernel,
    row_quantiles,
    smooth,
)
from csg.prediction import edit, plan_edit, reconstruct, sde_dpmpp_2m_step

LATENT = (4, 32, 32)
ATTENTION = (8, 8)


@pytest.fixture(scope="module")
def inversion(tiny_host):
    x0 = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(5))
    return invert_latents(tiny_host, x0, "a photo of a woman", num_steps=20, generator=3)


def random_step_inputs(plan, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(len(plan.prompts), *LATENT, generator=gen)
    rows = len(plan.attention.rows) if plan.attention else 0
    maps = torch.rand(rows, *ATTENTION, generator=gen)
    return eps, maps


def test_row_quantiles_equal_torch_quantile():
    values = torch.randn(5, 1024, generator=torch.Generator().manual_seed(0))
    levels = torch.tensor([0.0, 0.3, 0.7, 0.9, 1.0])
    expected = torch.stack([torch.quantile(values[i], levels[i].item()) for i in range(5)])
    assert torch.equal(row_quantiles(values, levels), expected)


def test_smoothing_kernel_is_the_reference_kernel():
    from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion_xl import LeditsGaussianSmoothing

    reference = LeditsGaussianSmoothing("cpu").weight
    assert torch.allclose(reference_gaussian_kernel(), reference, atol=1e-7)
    maps = torch.rand(3, 8, 8)
    assert smooth(maps).shape == maps.shape
    assert torch.allclose(smooth(torch.ones(2, 8, 8)), torch.ones(2, 8, 8))


@pytest.mark.parametrize("mode", ["intersect", "cross_attention", "noise"])
def test_guidance_is_exactly_zero_outside_the_mask(tiny_host, mode):
    terms = (ConceptTerm("black hair", warmup=0), ConceptTerm("smiling", warmup=0, reverse=True))
    for term in terms:
        plan = plan_guidance(tiny_host, [EditSpec((term,))], 20, source_prompt=None,
                             params=GuidanceParams(mask_mode=mode))
        eps, maps = random_step_inputs(plan)
        eps_hat, masks = guided_epsilon(plan, eps, maps, step=0)
        contribution = eps_hat[0] - eps[0]
        outside = (masks[0] == 0).expand_as(contribution)
        assert 0 < outside.float().mean() < 1
        assert torch.all(contribution[outside] == 0)
        sign = -1.0 if term.reverse else 1.0
        expected = sign * term.scale * (eps[plan.term_rows[0]] - eps[0])
        assert torch.allclose(contribution[~outside], expected[~outside], atol=1e-5)


def test_reverse_flips_the_direction(tiny_host):
    forward, backward = (plan_guidance(tiny_host, [EditSpec((ConceptTerm("black hair", warmup=0, reverse=r),))], 20,
                                       source_prompt=None, params=GuidanceParams(mask_mode="noise"))
                         for r in (False, True))
    eps, maps = random_step_inputs(forward)
    push, _ = guided_epsilon(forward, eps, maps, 0)
    pull, _ = guided_epsilon(backward, eps, maps, 0)
    assert torch.allclose(push - eps[0], -(pull - eps[0]), atol=1e-6)


def test_warmup_and_cooldown_bound_the_guided_steps(tiny_host):
    plan = plan_guidance(tiny_host, [EditSpec((ConceptTerm("black hair", warmup=4, cooldown=9),))], 20,
                         source_prompt=None)
    assert [i for i, on in enumerate(plan.active_steps) if on] == list(range(4, 9))
    eps, maps = random_step_inputs(plan)
    for step in (0, 3, 9, 19):
        eps_hat, masks = guided_epsilon(plan, eps, maps, step)
        assert masks is None and torch.equal(eps_hat[0], eps[0])
    eps_hat, masks = guided_epsilon(plan, eps, maps, 4)
    assert masks.sum() > 0 and not torch.equal(eps_hat[0], eps[0])


def test_protection_removes_claimed_regions_from_every_mask(tiny_host):
    spec = EditSpec((ConceptTerm("black hair", warmup=0), ConceptTerm("red dress", warmup=0)), protect=("blue eyes",))
    plan = plan_guidance(tiny_host, [spec], 20, source_prompt=None, params=GuidanceParams(protect_threshold=0.5))
    unprotected = plan_guidance(tiny_host, [EditSpec(spec.terms)], 20, source_prompt=None)
    eps, maps = random_step_inputs(plan)
    _, masks = guided_epsilon(plan, eps, maps, 0)
    keep = [i for i, r in enumerate(plan.prompts) if r != "blue eyes"]
    _, free_masks = guided_epsilon(unprotected, eps[keep], maps[:2], 0)
    smoothed = smooth(maps[2:3])
    region = (smoothed >= row_quantiles(smoothed.flatten(1), torch.tensor([0.5]))).float()
    claimed = torch.nn.functional.interpolate(region[:, None], size=LATENT[1:])[0, 0] > 0
    assert 0 < claimed.float().mean() < 1
    assert torch.all(masks[:, claimed] == 0)
    assert torch.equal(masks[:, ~claimed], free_masks[:, ~claimed])


def test_all_masks_empty_gives_the_unedited_result(tiny_host, inversion):
    """Protection at threshold 0 claims every pixel, so no term can act anywhere."""
    spec = EditSpec((ConceptTerm("black hair", warmup=2), ConceptTerm("smiling", warmup=2)), protect=("old man",))
    result = edit(tiny_host, inversion, [spec], GuidanceParams(protect_threshold=0.0))
    assert all(m.max() == 0 for m in result.masks)
    assert (result.latents - reconstruct(tiny_host, inversion)).abs().max().item() <= 1e-5


def test_batched_interventions_equal_separate_runs(tiny_host, inversion):
    specs = [
        EditSpec((ConceptTerm("black hair", warmup=5),)),
        EditSpec((ConceptTerm("smiling", warmup=3), ConceptTerm("red dress", warmup=5, scale=6.0, reverse=True))),
        EditSpec((ConceptTerm("blue eyes", warmup=2, cooldown=15, threshold=0.8),), protect=("old man",)),
    ]
    batched = edit(tiny_host, inversion, specs)
    assert batched.latents.shape == (3, *LATENT)
    for k, spec in enumerate(specs):
        alone = edit(tiny_host, inversion, [spec])
        # relative: batch-size-dependent kernels differ in the last bits of each value, whatever its size
        assert (batched.latents[k] - alone.latents[0]).abs().max() <= 1e-5 * alone.latents[0].abs().max()
        assert torch.allclose(batched.masks[k], alone.masks[0], atol=1e-6)
        assert batched.masks[k].shape == (len(spec.terms), *LATENT[1:])
        assert 0 < batched.masks[k].mean() < 1 and batched.last_masks[k].max() == 1


@pytest.mark.parametrize("exact", [False, True])
def test_unguided_steps_evaluate_only_the_base_rows_and_change_nothing(tiny_host, exact):
    """Warm-up and cool-down steps call the UNet on [uncond, (source)] per intervention only, and the
    result equals the loop that evaluates every row at every step."""
    x0 = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(7))
    inversion = invert_latents(tiny_host, x0, "a photo", num_steps=8, exact=exact)
    specs = [EditSpec((ConceptTerm("black hair", warmup=2, cooldown=6), ConceptTerm("smiling", warmup=3, cooldown=7))),
             EditSpec((ConceptTerm("blue eyes", warmup=2, cooldown=6),), protect=("old man",))]
    plan = plan_edit(tiny_host, inversion, specs)
    calls = []

    class Recording:
        def __getattr__(self, name):
            return getattr(tiny_host, name)

        def predict_noise(self, latents, timestep, conditioning, attention=None):
            calls.append((latents.shape[0], attention is not None))
            return tiny_host.predict_noise(latents, timestep, conditioning, attention)

    result = edit(Recording(), inversion, specs)
    # exact mode: one call per intervention, the inversion's own [uncond, source] batch
    base, full = ([(2, False)] * 2 if exact else [(2, False)]), len(plan.prompts)
    assert plan.base_prompts == (("", "a photo") if exact else ("",)) * 2
    assert calls == base * 2 + [(full, True)] * 5 + base  # steps 0-1, 2-6, 7

    # every row at every step, as the reference computes it
    conditioning = tiny_host.encode_prompts(plan.prompts)
    x, prev_x0_pred = inversion.x_T.expand(2, -1, -1, -1).clone(), None
    for i, step in enumerate(inversion.schedule.steps):
        eps, maps = tiny_host.predict_noise(x.index_select(0, plan.row_owner), step.t, conditioning, plan.attention)
        eps_hat, _ = guided_epsilon(plan, eps, maps, i)
        x, prev_x0_pred = sde_dpmpp_2m_step(step, x, eps_hat, prev_x0_pred, inversion.noise_maps[i])
    assert (result.latents - x).abs().max().item() <= 1e-4  # other batch sizes, other CPU kernels' rounding


def test_exact_mode_edit_uses_the_source_guided_base(tiny_host):
    x0 = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(6))
    inversion = invert_latents(tiny_host, x0, "a photo", num_steps=10, exact=True)
    spec = EditSpec((ConceptTerm("black hair", warmup=2),))
    plan = plan_guidance(tiny_host, [spec], 10, source_prompt="a photo", source_guidance=3.5)
    assert plan.prompts == ("", "a photo", "black hair")
    result = edit(tiny_host, inversion, [spec])
    assert (result.latents - x0).abs().max() > 1e-3  # it edits...
    protected = edit(tiny_host, inversion, [EditSpec(spec.terms, ("old man",))], GuidanceParams(protect_threshold=0.0))
    # ...and with every mask empty it reconstructs (to float rounding: more rows, other CPU kernels)
    assert (protected.latents - x0).abs().max().item() <= 1e-4


def test_edit_spec_from_intervention():
    graph = CausalGraph.from_dict({
        "scene_summary": "a man in a garden",
        "concepts": [
            {"id": "c1", "name": "season", "current_value": "summer", "description": "the season"},
            {"id": "c2", "name": "tree leaves", "current_value": "green", "description": "leaf color"},
            {"id": "c3", "name": "eye color", "current_value": "blue", "description": "the man's eyes"},
        ],
        "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2", "description": "autumn colors leaves"}],
    })
    intervention = Intervention.from_dict({
        "id": "i1", "target_concept_id": "c1", "new_value": "autumn", "original_value": "summer",
        "propagated_changes": [{"concept_id": "c2", "concept_name": "tree leaves", "original_value": "green leaves",
                                "new_value": "orange", "reason": "autumn"}],
        "final_concept_states": {"c1": "autumn season", "c2": "orange leaves"},
    })
    spec = EditSpec.from_intervention(intervention, graph, protect_non_descendants=True, scale=5.0)
    assert [t.prompt for t in spec.terms] == ["autumn season", "orange leaves"]
    assert all(t.scale == 5.0 for t in spec.terms) and spec.protect == ("blue eye color",)
    reverse = EditSpec.from_intervention(intervention, graph, reverse=True)
    assert [t.prompt for t in reverse.terms] == ["summer", "green leaves"] and reverse.protect == ()
