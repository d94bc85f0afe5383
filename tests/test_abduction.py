"""Abduction: the schedule, the sampler step against diffusers' scheduler, and exact reconstruction."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from csg.abduction import invert, invert_latents
from csg.diffusers_host import scaled_linear_alphas_cumprod
from csg.errors import InputError
from csg.prediction import reconstruct, sde_dpmpp_2m_step
from csg.schedule import leading_timesteps, sde_dpmpp_2m_schedule
from tests.sdxl_fixtures import sample_image


def sdxl_scheduler(total_steps: int) -> DPMSolverMultistepScheduler:
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, algorithm_type="sde-dpmsolver++", solver_order=2,
                                            timestep_spacing="leading")
    scheduler.set_timesteps(total_steps)
    return scheduler


def test_paper_schedule_starts_at_801():
    steps = leading_timesteps(100, 0.15)
    assert len(steps) == 100 and steps[0] == 801 and steps[-1] == 9
    assert all(a - b == 8 for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("num_steps, skip", [(100, 0.15), (50, 0.2), (20, 0.15), (30, 0.0)])
def test_timesteps_match_diffusers_leading_spacing(num_steps, skip):
    scheduler = sdxl_scheduler(int(num_steps * (1 + skip)))
    assert leading_timesteps(num_steps, skip) == scheduler.timesteps[-num_steps:].tolist()


def test_sampler_step_matches_diffusers_scheduler():
    """Same eps and noise in, same trajectory out, through first-order, second-order and final steps."""
    num_steps, skip = 12, 0.15
    scheduler = sdxl_scheduler(int(num_steps * (1 + skip)))
    timesteps = leading_timesteps(num_steps, skip)
    schedule = sde_dpmpp_2m_schedule(scaled_linear_alphas_cumprod(), timesteps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen) * schedule.steps[0].sigma / schedule.steps[0].alpha
    ours, prev = x.clone(), None
    for step in schedule.steps:
        eps, noise = torch.randn(2, 1, 4, 8, 8, generator=gen)
        x = scheduler.step(eps, step.t, x, variance_noise=noise, return_dict=False)[0]
        ours, prev = sde_dpmpp_2m_step(step, ours, eps, prev, noise)
        assert (ours - x).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())


def test_exact_mode_reconstructs_the_input_latent(tiny_host):
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    for source in ("", "a photo of a man"):
        inversion = invert_latents(tiny_host, x0, source, num_steps=20, exact=True)
        assert inversion.num_zero_noise_steps == 0
        assert (reconstruct(tiny_host, inversion) - x0).abs().max().item() <= 1e-5


def test_exact_mode_reconstructs_an_image(tiny_host):
    inversion = invert(tiny_host, sample_image(), "a photo", num_steps=20, exact=True)
    assert (reconstruct(tiny_host, inversion) - inversion.x0).abs().max().item() <= 1e-5


def test_reference_mode_does_not_reconstruct_exactly(tiny_host):
    """The reference returns x0_hat(x_tmin) at the end and zeroes the last maps: close, not equal."""
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    inversion = invert_latents(tiny_host, x0, "", num_steps=20)
    assert inversion.num_zero_noise_steps == 3 and inversion.noise_maps[-3:].abs().max() == 0
    assert (reconstruct(tiny_host, inversion) - x0).abs().max().item() > 1e-3


def test_inversion_is_reproducible_under_a_seed(tiny_host):
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    a = invert_latents(tiny_host, x0, num_steps=4, generator=7)
    b = invert_latents(tiny_host, x0, num_steps=4, generator=torch.Generator().manual_seed(7))
    c = invert_latents(tiny_host, x0, num_steps=4, generator=8)
    assert torch.equal(a.noise_maps, b.noise_maps) and torch.equal(a.x_T, b.x_T)
    assert not torch.equal(a.x_T, c.x_T)


def test_each_noisy_latent_is_drawn_from_x0_independently(tiny_host):
    """x_T = alpha_T x0 + sigma_T n: its noise part has unit variance around the scaled input."""
    x0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    inversion = invert_latents(tiny_host, x0, num_steps=10)
    first = inversion.schedule.steps[0]
    noise = (inversion.x_T - first.alpha * x0) / first.sigma
    assert abs(noise.std().item() - 1.0) < 0.05


def test_exact_mode_refuses_zeroed_noise_maps(tiny_host):
    with pytest.raises(InputError, match="num_zero_noise_steps=0"):
        invert_latents(tiny_host, torch.zeros(1, 4, 32, 32), num_steps=4, exact=True, num_zero_noise_steps=3)
