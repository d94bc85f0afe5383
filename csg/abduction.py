"""Abduction: recover the noise of one factual image by edit-friendly SDE-DPM-Solver++ inversion.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

Entry points::

    invert(host, image, source_prompt="", *, num_steps=100, skip=0.15, source_guidance=3.5,
           exact=False, num_zero_noise_steps=None, generator=0) -> Inversion
    invert_latents(host, x0, source_prompt="", ...same keywords...) -> Inversion

The schedule keeps the last N of M = int(N (1 + skip)) "leading" timesteps. Every kept x_t is drawn
independently from the clean latent, x_t = alpha_t x0 + sigma_t n_t (so the noise is not a
trajectory of the model, which is what makes it "edit friendly"). Going down the schedule, each
step's noise map is the residual z_t = (x_{t-1} - mean(x_t, eps_hat)) / noise_std that makes the
sampler land exactly on x_{t-1}; eps_hat is the source prompt's classifier-free guidance (scale
``source_guidance``), so the maps carry it. One ``Inversion`` serves any number of edits.

Two modes:

* reference (``exact=False``): as diffusers' LEDITS++ SDXL pipeline. The last
  ``num_zero_noise_steps`` maps (default 3) are zeroed, which suppresses SDXL's noise artifacts,
  and the last step returns x0_hat(x_{t_min}); an unedited sample is close to, not equal to, x0.
* exact (``exact=True``): no map is zeroed, the last step stores the residual x0 - x0_hat so the
  chain lands on x0, and the sampler's base prediction is the very prediction the inversion used
  (source-guided when a source prompt is given). With no edit the output equals the input latent
  to float precision.

Input policy (what a bad image gets): images are converted by ``csg.images.image_to_tensor``
(grayscale to RGB, transparency composited onto white, 16-bit scaled to 8 bits); sides not
divisible by vae_scale_factor x latent_multiple (32 for SDXL) raise ``InputError`` naming the
nearest valid size; batches of several images raise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .errors import InputError
from .host import DiffusionHost
from .images import image_to_tensor
from .schedule import Schedule, leading_timesteps, sde_dpmpp_2m_schedule


@dataclass(frozen=True)
class Inversion:
    x0: torch.Tensor  # (1, C, h, w) float32, the abducted image latent
    x_T: torch.Tensor  # (1, C, h, w) float32, where sampling starts (at schedule.steps[0].t)
    noise_maps: torch.Tensor  # (N, 1, C, h, w) float32, z for each sampling step, in sampling order
    schedule: Schedule
    source_prompt: str
    source_guidance: float
    exact: bool
    num_zero_noise_steps: int
    image_size: tuple[int, int]  # (H, W) in pixels

    @property
    def uses_source_guidance(self) -> bool:
        return uses_source_guidance(self.source_prompt, self.source_guidance)

    @property
    def num_steps(self) -> int:
        return len(self.schedule)


def uses_source_guidance(source_prompt: str, source_guidance: float) -> bool:
    """Whether the inversion applies the source prompt's CFG. As in diffusers' LEDITS++ (``invert``:
    ``do_classifier_free_guidance = source_guidance_scale > 1.0``), only a scale above 1 does; the
    empty prompt or a scale at or below 1 means plain unconditional prediction."""
    return source_prompt != "" and source_guidance > 1.0


def check_image_size(host: DiffusionHost, height: int, width: int) -> None:
    multiple = host.vae_scale_factor * host.latent_multiple
    if height % multiple or width % multiple:
        near_h, near_w = max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)
        raise InputError(f"The image is {width}x{height} (WxH); this model needs both sides divisible by {multiple}. "
                         f"Resize or crop it, e.g. to {near_w}x{near_h}.")


def cfg_epsilon(host: DiffusionHost, x: torch.Tensor, timestep: torch.Tensor, conditioning: object,
                guidance: float | None) -> torch.Tensor:
    """eps of one row (``guidance`` None), or classifier-free guidance eps_u + g (eps_c - eps_u) over
    [uncond, prompt] rows; the source prompt's guidance here, the baselines' prompts too."""
    if guidance is None:
        return host.predict_noise(x, timestep, conditioning)[0]
    eps = host.predict_noise(torch.cat([x, x]), timestep, conditioning)[0]
    return eps[:1] + guidance * (eps[1:] - eps[:1])


def draw_noise(generator: torch.Generator, shape: tuple[int, ...], count: int, device: torch.device) -> torch.Tensor:
    """``count`` standard normal tensors in the order diffusers' LEDITS++ draws them (lowest t first),
    returned in sampling order (highest t first)."""
    draws = [torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
             for _ in range(count)]
    return torch.stack(draws[::-1]).to(device)


@torch.no_grad()
def invert_latents(host: DiffusionHost, x0: torch.Tensor, source_prompt: str = "", *, num_steps: int = 100,
                   skip: float = 0.15, source_guidance: float = 3.5, exact: bool = False,
                   num_zero_noise_steps: int | None = None, generator: torch.Generator | int = 0,
                   on_step: Callable[[int, torch.Tensor], None] | None = None) -> Inversion:
    """Invert a scaled image latent ``x0`` of shape (1, C, h, w). See the module docstring.

    ``on_step(i, x0_hat)`` is called after each step with the step's prediction of the clean latent
    (progress and previews)."""
    if x0.dim() != 4 or x0.shape[0] != 1:
        raise InputError(f"Expected one latent shaped (1, C, h, w), got {tuple(x0.shape)}.")
    height, width = x0.shape[-2:]
    check_image_size(host, height * host.vae_scale_factor, width * host.vae_scale_factor)
    timesteps = leading_timesteps(num_steps, skip)
    if num_zero_noise_steps is None:
        num_zero_noise_steps = 0 if exact else 3
    if exact and num_zero_noise_steps:
        raise InputError("Exact reconstruction needs every noise map; use num_zero_noise_steps=0 with exact=True.")
    if not 0 <= num_zero_noise_steps <= num_steps:
        raise InputError(f"num_zero_noise_steps must be in [0, {num_steps}], got {num_zero_noise_steps}.")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)

    schedule = sde_dpmpp_2m_schedule(host.alphas_cumprod, timesteps, final_noise_std=1.0 if exact else 0.0)
    x0 = x0.to(host.device, torch.float32)
    noise = draw_noise(generator, tuple(x0.shape), num_steps, host.device)
    # x_i for every kept step, independently noised from x0, then x0 itself as the final target.
    chain = [step.alpha * x0 + step.sigma * n for step, n in zip(schedule.steps, noise)] + [x0]

    guided = uses_source_guidance(source_prompt, source_guidance)
    conditioning = host.encode_prompts(["", source_prompt] if guided else [""])
    guidance = source_guidance if guided else None
    device_timesteps = torch.tensor(timesteps).to(host.device)
    maps = torch.zeros((num_steps, *x0.shape), device=host.device)
    prev_x0_pred = None
    for i, step in enumerate(schedule.steps):
        eps = cfg_epsilon(host, chain[i], device_timesteps[i], conditioning, guidance)
        x0_pred = step.predict_x0(chain[i], eps)
        mean = step.mean(chain[i], x0_pred, prev_x0_pred)
        if step.noise_std > 0.0:
            maps[i] = (chain[i + 1] - mean) / step.noise_std
            chain[i + 1] = mean + step.noise_std * maps[i]  # what the sampler will compute, to the last bit
        prev_x0_pred = x0_pred
        if on_step is not None:
            on_step(i, x0_pred)
    if num_zero_noise_steps:
        maps[num_steps - num_zero_noise_steps:] = 0.0
    return Inversion(x0=x0, x_T=chain[0], noise_maps=maps, schedule=schedule, source_prompt=source_prompt,
                     source_guidance=float(source_guidance), exact=exact, num_zero_noise_steps=num_zero_noise_steps,
                     image_size=(height * host.vae_scale_factor, width * host.vae_scale_factor))


@torch.no_grad()
def invert(host: DiffusionHost, image: Image.Image | torch.Tensor, source_prompt: str = "", **options) -> Inversion:
    """Encode ``image`` (PIL, or (C, H, W) in [0, 1]) with the host's VAE and invert it; keywords as
    ``invert_latents``. Bad images get the treatment described in the module docstring."""
    pixels = image_to_tensor(image)
    check_image_size(host, *pixels.shape[-2:])
    return invert_latents(host, host.encode_image(pixels.to(host.device)), source_prompt, **options)
