"""CSG as composable ComfyUI sampling parts: a GUIDER, a SAMPLER and a NOISE for SamplerCustomAdvanced.

* ``CSGGuider`` (a ``comfy.samplers.CFGGuider``) evaluates one intervention's rows (uncond, its
  concept prompts, protected phrases) through ``ComfySDXLHost`` and combines them with the core's
  ``csg.guidance.guided_epsilon``. It returns x0_hat = x_k - sigma eps_hat, as every ComfyUI
  guider does, so any sampler can drive it; its step index comes from the sampler's sigmas. On
  steps where no term guides it evaluates only the base rows, as the core's loop does.
* ``sample_edit_friendly_dpmpp`` is SDE-DPM-Solver++(2M) whose noise at step i is the inversion's
  stored map z_i, stepping with the core's ``csg.prediction.sde_dpmpp_2m_step`` in VP terms
  (x_vp = x_k / sqrt(1 + sigma^2)).
* ``InversionNoise`` is the NOISE that, with the inversion's LATENT and SIGMAS, makes a sampler
  start from the abducted x_T (ComfyUI starts at sigma_0 noise + latent).

With the three plus the inversion's SIGMAS, SamplerCustomAdvanced reproduces the all-in-one
Causal Counterfactual node up to float rounding.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.samplers

from ..csg.abduction import Inversion
from ..csg.errors import InputError
from ..csg.guidance import GuidancePlan, guided_epsilon, unguided_epsilon
from ..csg.prediction import sde_dpmpp_2m_step
from .comfy_host import ComfySDXLHost

SIGMAS_HINT = "Connect the SIGMAS output of 'Inversion Sigmas & Noise' for this inversion."


def inversion_sigmas(inversion: Inversion) -> torch.Tensor:
    """The k-diffusion sigmas of the inversion's schedule, sigma = sqrt(1 - abar) / sqrt(abar), then 0."""
    return torch.tensor([s.sigma / s.alpha for s in inversion.schedule.steps] + [0.0], dtype=torch.float32)


def check_sigmas(sigmas: torch.Tensor, inversion: Inversion) -> None:
    expected = inversion_sigmas(inversion)
    if sigmas.shape != expected.shape or not torch.allclose(sigmas.float().cpu(), expected, rtol=1e-4, atol=1e-6):
        raise InputError(f"The sigmas ({len(sigmas) - 1} steps) are not this inversion's schedule "
                         f"({inversion.num_steps} steps); its stored noise only fits its own schedule. " + SIGMAS_HINT)


def step_index(sample_sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """Which step of ``sample_sigmas`` the sampler is evaluating (the nearest sigma)."""
    return int((sample_sigmas[:-1].to(sigma.device) - sigma.reshape(-1)[0]).abs().argmin())


class CSGGuider(comfy.samplers.CFGGuider):
    def __init__(self, host: ComfySDXLHost, plan: GuidancePlan, inversion: Inversion) -> None:
        super().__init__(host.model)
        self.host, self.plan, self.inversion = host, plan, inversion
        self.conditioning = host.encode_prompts(plan.prompts)
        self.base_conditioning = host.encode_prompts(plan.base_prompts)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is None or len(sample_sigmas) - 1 != self.plan.active.shape[0]:
            raise InputError(f"The CSG Guider was built for {self.plan.active.shape[0]} steps. " + SIGMAS_HINT)
        if x.shape[0] != self.plan.num_interventions:
            raise InputError(f"The CSG Guider predicts {self.plan.num_interventions} latent(s) but got a batch of "
                             f"{x.shape[0]}. Use the inversion's LATENT, not a batch.")
        step = step_index(sample_sigmas, timestep)
        sigma = timestep.reshape(-1)[:1].float()
        t = self.inner_model.model_sampling.timestep(sigma)[0]
        x_vp = x.float() / (1.0 + sigma**2).sqrt()
        with self.host.bound(self.inner_model, model_options):
            if self.plan.active_steps[step]:
                rows = x_vp.index_select(0, self.plan.row_owner)
                eps, maps = self.host.predict_noise(rows, t, self.conditioning, self.plan.attention)
                eps_hat, _ = guided_epsilon(self.plan, eps, maps, step)
            else:
                rows = x_vp.index_select(0, self.plan.base_row_owner)
                eps, _ = self.host.predict_noise(rows, t, self.base_conditioning)
                eps_hat = unguided_epsilon(self.plan, eps)
        return (x.float() - sigma * eps_hat).to(x.dtype)


@torch.no_grad()
def sample_edit_friendly_dpmpp(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None):
    """ComfyUI sampler function: the core's SDE-DPM-Solver++(2M) step with the inversion's noise maps."""
    check_sigmas(sigmas, inversion)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    noise_maps = inversion.noise_maps.to(x.device)
    prev_x0_pred = None
    for i, step in enumerate(inversion.schedule.steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        eps = (x - denoised) / sigma
        x_vp, prev_x0_pred = sde_dpmpp_2m_step(step, x / (1.0 + sigma**2).sqrt(), eps, prev_x0_pred, noise_maps[i])
        x = x_vp * (1.0 + sigma_next**2).sqrt()
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


def edit_friendly_sampler(inversion: Inversion) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_edit_friendly_dpmpp, extra_options={"inversion": inversion})


class InversionNoise:
    """NOISE whose ``sigma_0 * noise + latent`` is the inversion's x_T in ComfyUI's sigma space."""

    def __init__(self, inversion: Inversion, latent_format) -> None:
        first = inversion.schedule.steps[0]
        x_T_k = inversion.x_T.float().cpu() / first.alpha
        # What ComfyUI's guider will add the noise to: the LATENT we output, scaled back in.
        x0_k = latent_format.process_in(latent_format.process_out(inversion.x0.float().cpu()))
        self.noise = (x_T_k - x0_k) / (first.sigma / first.alpha)
        self.seed = 0

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if tuple(samples.shape[-3:]) != tuple(self.noise.shape[-3:]):
            raise InputError(f"The latent is {tuple(samples.shape[-2:])} but the inversion's noise is "
                             f"{tuple(self.noise.shape[-2:])}; use the inversion's LATENT.")
        return self.noise.expand(samples.shape[0], -1, -1, -1).clone()
