"""Table 1 baselines: DDIM step math against diffusers' DDIMScheduler, edit-friendly DDPM
reconstruction, DDIM inversion round trip, and target-prompt guidance actually editing."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from csg.baselines import (
    ddim_inversion_step,
    ddim_schedule,
    ddim_step,
    ddim_timesteps,
    invert_baseline,
    invert_ddim,
    invert_ddpm_edit_friendly,
    sample_with_guidance,
)
from csg.diffusers_host import scaled_linear_alphas_cumprod
from csg.errors import InputError


def sdxl_ddim_scheduler(total_steps: int) -> DDIMScheduler:
    """SDXL's scheduler settings on diffusers' DDIM scheduler (the oracle)."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    scheduler.set_timesteps(total_steps)
    return scheduler


def latent(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_steps, skip", [(100, 0.15), (20, 0.15), (10, 0.0), (50, 0.3)])
def test_timesteps_match_diffusers_ddim(num_steps, skip):
    total = int(num_steps * (1 + skip))
    assert ddim_timesteps(num_steps, skip) == sdxl_ddim_scheduler(total).timesteps[-num_steps:].tolist()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_matches_diffusers_ddim_scheduler(eta):
    """Same eps and noise in, same x out, for every step down to the final level."""
    num_steps, skip = 6, 0.15
    scheduler = sdxl_ddim_scheduler(int(num_steps * (1 + skip)))
    timesteps = ddim_timesteps(num_steps, skip)
    steps = ddim_schedule(scaled_linear_alphas_cumprod(), timesteps, eta=eta)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ours = x.clone()
    for step in steps:
        eps, noise = torch.randn(2, 1, 4, 8, 8, generator=gen)
        x = scheduler.step(eps, step.t, x, eta=eta, variance_noise=noise, return_dict=False)[0]
        ours = ddim_step(step, ours, eps, noise)
        assert (ours - x).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())


@pytest.mark.parametrize("source", ["", "a photo of a man"])
def test_ddpm_edit_friendly_reconstructs_the_input(tiny_host, source):
    x0 = latent(1)
    inversion = invert_ddpm_edit_friendly(tiny_host, x0, source, num_steps=12, source_guidance=3.5)
    assert inversion.noise_maps.shape == (12, 1, 4, 32, 32)
    out = sample_with_guidance(tiny_host, inversion, source, guidance_scale=3.5)
    assert (out - x0).abs().max().item() <= 1e-5


def test_ddpm_target_prompt_edits_deterministically(tiny_host):
    """A different target prompt changes the latent; replaying the same maps gives the same edit."""
    x0 = latent(2)
    inversion = invert_ddpm_edit_friendly(tiny_host, x0, "a photo of a man", num_steps=12)
    edited = sample_with_guidance(tiny_host, inversion, "a photo of a woman with red hair", guidance_scale=7.5)
    assert torch.isfinite(edited).all() and (edited - x0).abs().mean().item() > 1e-3
    again = sample_with_guidance(tiny_host, inversion, "a photo of a woman with red hair", guidance_scale=7.5)
    assert torch.equal(edited, again)


def test_ddim_inversion_round_trip_converges_with_steps(tiny_host):
    """Unguided DDIM inversion + sampling returns close to the input, and closer with more steps
    (its only error is the eps(x_t) ~ eps(x_p) approximation, first order in the step size)."""
    x0 = latent(4)

    def round_trip_error(num_steps: int) -> tuple[float, float]:
        inversion = invert_ddim(tiny_host, x0, "a photo of a dog", num_steps=num_steps)
        assert inversion.noise_maps is None
        out = sample_with_guidance(tiny_host, inversion, "a photo of a dog", guidance_scale=1.0)
        return (out - x0).abs().mean().item(), (inversion.x_T - x0).abs().mean().item()

    coarse, _ = round_trip_error(8)
    fine, travelled = round_trip_error(32)
    assert fine < 0.6 * coarse
    assert fine < 0.25 * travelled  # far closer to x0 than the inverted noise is


def test_ddim_step_inverts_its_own_inversion_step_exactly():
    """With the same eps, the backward update is the exact inverse of the forward one."""
    steps = ddim_schedule(scaled_linear_alphas_cumprod(), ddim_timesteps(10, 0.15), eta=0.0)
    gen = torch.Generator().manual_seed(5)
    for step in steps:
        x_prev, eps = torch.randn(2, 1, 4, 8, 8, generator=gen, dtype=torch.float64)
        assert torch.allclose(ddim_step(step, ddim_inversion_step(step, x_prev, eps), eps), x_prev, atol=1e-10)


def test_invert_baseline_by_name_and_bad_inputs(tiny_host):
    x0 = latent(6)
    assert invert_baseline(tiny_host, "ddim", x0, "", num_steps=3, skip=0.15, source_guidance=3.5).method == "ddim"
    with pytest.raises(InputError, match="ddpm"):
        invert_baseline(tiny_host, "sdedit", x0, "", num_steps=3, skip=0.15, source_guidance=3.5)
    with pytest.raises(InputError, match="one latent"):
        invert_ddim(tiny_host, torch.zeros(2, 4, 32, 32), num_steps=3)
    with pytest.raises(InputError, match="divisible"):
        invert_ddim(tiny_host, torch.zeros(1, 4, 30, 32), num_steps=3)
    with pytest.raises(InputError, match="skip"):
        ddim_timesteps(10, 1.0)


def test_ddpm_baseline_draws_the_same_noise_per_timestep_as_the_csg_inversion(tiny_host):
    """One seed, two methods: every kept x_t is noised with the same draw (CSG's order, draw_noise)."""
    from csg.abduction import invert_latents
    from csg.baselines import invert_ddpm_edit_friendly

    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    csg = invert_latents(tiny_host, x0, "", num_steps=6, generator=3)
    ddpm = invert_ddpm_edit_friendly(tiny_host, x0, "", num_steps=6, generator=3)
    first_csg, first_ddpm = csg.schedule.steps[0], ddpm.steps[0]
    noise_csg = (csg.x_T - first_csg.alpha * x0) / first_csg.sigma
    noise_ddpm = (ddpm.x_T - math.sqrt(first_ddpm.abar) * x0) / math.sqrt(1 - first_ddpm.abar)
    assert torch.allclose(noise_csg, noise_ddpm, atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_source_guidance_at_or_below_one_is_unconditional_as_in_diffusers(tiny_host, scale):
    from csg.abduction import invert_latents
    from csg.baselines import invert_ddpm_edit_friendly

    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    for invert in (lambda p, g: invert_latents(tiny_host, x0, p, num_steps=4, source_guidance=g).noise_maps,
                   lambda p, g: invert_ddpm_edit_friendly(tiny_host, x0, p, num_steps=4, source_guidance=g).noise_maps):
        assert torch.equal(invert("a red car", scale), invert("", 3.5))
        assert not torch.allclose(invert("a red car", 1.01), invert("", 3.5))
