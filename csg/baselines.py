"""The paper's Table 1 baselines: inversion + classifier-free guidance on the full target prompt.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

Entry points (latents in, latents out; ``csg.counterfactual`` wraps them for images)::

    invert_ddpm_edit_friendly(host, x0, source_prompt="", *, num_steps=100, skip=0.15,
                              source_guidance=3.5, generator=0) -> BaselineInversion
    invert_ddim(host, x0, source_prompt="", *, num_steps=100, skip=0.15,
                inversion_guidance=1.0) -> BaselineInversion
    sample_with_guidance(host, inversion, target_prompt, guidance_scale=7.5) -> Tensor (1, C, h, w)

Both samplers are DDIM's update over a subsequence of the training timesteps. With
abar = alphas_cumprod, a step from t down to its predecessor p (the next timestep in the list)
reads

    x0_hat  = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    sigma   = eta * sqrt((1 - abar_p) / (1 - abar_t)) * sqrt(1 - abar_t / abar_p)
    x_p     = sqrt(abar_p) x0_hat + sqrt(1 - abar_p - sigma^2) eps + sigma z

eta = 1 is the DDPM posterior step, eta = 0 is deterministic DDIM. The step below the smallest
kept timestep lands on abar_final = alphas_cumprod[0] (SDXL's ``set_alpha_to_one=False``), which
is what diffusers' DDIMScheduler does with SDXL's scheduler config, so it serves as a test oracle.

* DDPM edit-friendly inversion (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024): every kept
  x_t is drawn independently from the clean latent, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n_t,
  and each step's noise map is the residual z_t = (x_p - mean(x_t, eps_hat)) / sigma that makes
  the eta = 1 step land exactly on x_p. eps_hat is the source prompt's classifier-free guidance
  (scale 3.5, the paper's source scale). Sampling replays the maps with CFG on the target prompt.
  Fair to CSG by construction: the draws n_t come from ``csg.abduction.draw_noise``, the very
  sequence CSG's inversion uses (one (1, C, h, w) draw per kept step, lowest t first, as diffusers'
  LEDITS++ draws them, then reversed into sampling order), so with one seed both methods noise
  every timestep identically; and, as CSG's (``uses_source_guidance``) and diffusers', the source
  CFG applies only above scale 1, a scale at or below 1 meaning the unconditional prediction.
* DDIM inversion: run the eta = 0 update backwards from x0 up to the noisiest kept timestep, with
  the noise predicted at the destination timestep from the current latent (the usual
  approximation eps(x_t) ~ eps(x_p)). Inversion uses guidance 1, i.e. the source prompt's
  conditional prediction alone: any larger scale makes the backward update diverge, which is why
  DDIM inversion is customarily run unguided. Sampling is eta = 0 DDIM with CFG on the target.

Defaults shared with CSG so that Table 1 compares like with like: 100 kept steps of a "leading"
schedule of int(100 * (1 + 0.15)) = 114 steps (skip 0.15; the product is 114.99... in floating
point, as in the reference), the same source prompt, and target guidance 7.5 (the customary
classifier-free guidance scale of Stable Diffusion; SDXL pipelines default to 5-7.5).
The target prompt is the intervention's ``generation_prompt``: the whole scene with every changed
concept spelled out, guided everywhere in the image, which is what the baselines lack compared
with CSG's masked per-concept terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .abduction import cfg_epsilon, draw_noise, uses_source_guidance
from .errors import InputError
from .host import DiffusionHost

Method = Literal["ddpm", "ddim"]
DEFAULT_TARGET_GUIDANCE = 7.5


@dataclass(frozen=True)
class DDIMStep:
    t: int  # the training timestep this step starts from
    abar: float  # alphas_cumprod[t]
    abar_prev: float  # the level the step lands on
    sigma: float  # the step's noise scale; 0 for deterministic DDIM

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x - math.sqrt(1.0 - self.abar) * eps) / math.sqrt(self.abar)

    def mean(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The deterministic part of x_p: the clean estimate re-noised along eps."""
        direction = math.sqrt(max(1.0 - self.abar_prev - self.sigma**2, 0.0))
        return math.sqrt(self.abar_prev) * self.predict_x0(x, eps) + direction * eps


def ddim_timesteps(num_steps: int, skip: float, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """The last ``num_steps`` of M = int(num_steps * (1 + skip)) "leading" DDIM timesteps, descending.

    As diffusers' DDIMScheduler(set_timesteps(M)) with SDXL's ``steps_offset=1``: stride T // M,
    timesteps stride * k + offset for k = M-1 .. 0. Note DPM-Solver's leading spacing uses
    stride T // (M + 1) instead, so the two schedules differ by a few timesteps.
    """
    if num_steps < 1:
        raise InputError(f"num_steps must be at least 1, got {num_steps}.")
    if not 0.0 <= skip < 1.0:
        raise InputError(f"skip must be in [0, 1), got {skip}. It is the fraction of the noisiest steps left out.")
    total = int(num_steps * (1 + skip))
    stride = num_train_timesteps // total
    if stride < 1:
        raise InputError(f"{total} steps exceed the model's {num_train_timesteps} training timesteps; use fewer steps.")
    return [stride * k + steps_offset for k in range(total - 1, -1, -1)][-num_steps:]


def ddim_schedule(alphas_cumprod: torch.Tensor, timesteps: list[int], eta: float) -> tuple[DDIMStep, ...]:
    """One ``DDIMStep`` per timestep (descending); the last lands on abar_final = alphas_cumprod[0]."""
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    levels = [abar[t].item() for t in timesteps] + [abar[0].item()]
    steps = []
    for i, t in enumerate(timesteps):
        a_t, a_p = levels[i], levels[i + 1]
        sigma = eta * math.sqrt((1.0 - a_p) / (1.0 - a_t)) * math.sqrt(1.0 - a_t / a_p)
        steps.append(DDIMStep(t, a_t, a_p, sigma))
    return tuple(steps)


def ddim_step(step: DDIMStep, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x at the next (less noisy) level; ``noise`` is z, used only when sigma > 0."""
    out = step.mean(x, eps)
    if step.sigma > 0.0 and noise is not None:
        out = out + step.sigma * noise
    return out


def ddim_inversion_step(step: DDIMStep, x_prev: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The eta = 0 update run backwards: from x at level abar_prev up to level abar_t."""
    x0_pred = (x_prev - math.sqrt(1.0 - step.abar_prev) * eps) / math.sqrt(step.abar_prev)
    return math.sqrt(step.abar) * x0_pred + math.sqrt(1.0 - step.abar) * eps


def prompt_conditioning(host: DiffusionHost, prompt: str, guidance: float) -> tuple[object, float | None]:
    """Rows and scale for ``cfg_epsilon``: one row when guidance is 1 (the prompt alone) or the
    prompt is empty (unconditional), else [uncond, prompt] with CFG."""
    if prompt == "" or guidance == 1.0:
        return host.encode_prompts([prompt]), None
    return host.encode_prompts(["", prompt]), guidance


@dataclass(frozen=True)
class BaselineInversion:
    method: Method
    x0: torch.Tensor  # (1, C, h, w) float32, the image latent
    x_T: torch.Tensor  # (1, C, h, w) float32, where sampling starts
    noise_maps: torch.Tensor | None  # (N, 1, C, h, w) z per sampling step for DDPM; None for DDIM
    steps: tuple[DDIMStep, ...]  # in sampling order
    source_prompt: str
    source_guidance: float

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def _check_latent(host: DiffusionHost, x0: torch.Tensor) -> torch.Tensor:
    if x0.dim() != 4 or x0.shape[0] != 1:
        raise InputError(f"Expected one latent shaped (1, C, h, w), got {tuple(x0.shape)}.")
    if x0.shape[-2] % host.latent_multiple or x0.shape[-1] % host.latent_multiple:
        raise InputError(f"Latent sides {tuple(x0.shape[-2:])} must be divisible by {host.latent_multiple}.")
    return x0.to(host.device, torch.float32)


@torch.no_grad()
def invert_ddpm_edit_friendly(host: DiffusionHost, x0: torch.Tensor, source_prompt: str = "", *, num_steps: int = 100,
                              skip: float = 0.15, source_guidance: float = 3.5,
                              generator: torch.Generator | int = 0) -> BaselineInversion:
    """Edit-friendly DDPM noise maps of ``x0`` (see the module docstring)."""
    x0 = _check_latent(host, x0)
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    timesteps = ddim_timesteps(num_steps, skip)
    steps = ddim_schedule(host.alphas_cumprod, timesteps, eta=1.0)
    draws = draw_noise(generator, tuple(x0.shape), num_steps, host.device)
    chain = [math.sqrt(s.abar) * x0 + math.sqrt(1.0 - s.abar) * n for s, n in zip(steps, draws)] + [x0]
    if uses_source_guidance(source_prompt, source_guidance):
        conditioning, guidance = prompt_conditioning(host, source_prompt, source_guidance)
    else:
        conditioning, guidance = host.encode_prompts([""]), None
    device_timesteps = torch.tensor(timesteps).to(host.device)
    maps = torch.zeros((num_steps, *x0.shape), device=host.device)
    for i, step in enumerate(steps):
        eps = cfg_epsilon(host, chain[i], device_timesteps[i], conditioning, guidance)
        mean = step.mean(chain[i], eps)
        maps[i] = (chain[i + 1] - mean) / step.sigma
        chain[i + 1] = mean + step.sigma * maps[i]  # what the sampler will compute, to the last bit
    return BaselineInversion("ddpm", x0, chain[0], maps, steps, source_prompt, float(source_guidance))


@torch.no_grad()
def invert_ddim(host: DiffusionHost, x0: torch.Tensor, source_prompt: str = "", *, num_steps: int = 100,
                skip: float = 0.15, inversion_guidance: float = 1.0) -> BaselineInversion:
    """Deterministic DDIM inversion of ``x0`` up to the noisiest kept timestep (module docstring)."""
    x0 = _check_latent(host, x0)
    timesteps = ddim_timesteps(num_steps, skip)
    steps = ddim_schedule(host.alphas_cumprod, timesteps, eta=0.0)
    conditioning, guidance = prompt_conditioning(host, source_prompt, inversion_guidance)
    device_timesteps = torch.tensor(timesteps).to(host.device)
    x = x0
    for i in reversed(range(num_steps)):  # from the least noisy step up
        eps = cfg_epsilon(host, x, device_timesteps[i], conditioning, guidance)
        x = ddim_inversion_step(steps[i], x, eps)
    return BaselineInversion("ddim", x0, x, None, steps, source_prompt, float(inversion_guidance))


def check_guidance_scale(guidance_scale: float) -> None:
    if not math.isfinite(guidance_scale):
        raise InputError(f"guidance_scale must be a finite number, got {guidance_scale}.")


@torch.no_grad()
def sample_with_guidance(host: DiffusionHost, inversion: BaselineInversion, target_prompt: str,
                         guidance_scale: float = DEFAULT_TARGET_GUIDANCE) -> torch.Tensor:
    """Denoise from ``inversion.x_T`` with CFG on ``target_prompt``; DDPM replays the stored maps."""
    check_guidance_scale(guidance_scale)
    conditioning, guidance = prompt_conditioning(host, target_prompt, guidance_scale)
    device_timesteps = torch.tensor([s.t for s in inversion.steps]).to(host.device)
    x = inversion.x_T
    for i, step in enumerate(inversion.steps):
        eps = cfg_epsilon(host, x, device_timesteps[i], conditioning, guidance)
        noise = None if inversion.noise_maps is None else inversion.noise_maps[i]
        x = ddim_step(step, x, eps, noise)
    return x


def invert_baseline(host: DiffusionHost, method: Method, x0: torch.Tensor, source_prompt: str, *, num_steps: int,
                    skip: float, source_guidance: float, seed: int = 0) -> BaselineInversion:
    """Either baseline's inversion by name; ``source_guidance`` is ignored by DDIM (guidance 1)."""
    if method == "ddpm":
        return invert_ddpm_edit_friendly(host, x0, source_prompt, num_steps=num_steps, skip=skip,
                                         source_guidance=source_guidance, generator=seed)
    if method == "ddim":
        return invert_ddim(host, x0, source_prompt, num_steps=num_steps, skip=skip)
    raise InputError(f"Unknown baseline {method!r}; choose 'ddpm' or 'ddim'.")
