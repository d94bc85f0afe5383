"""CSG as ComfyUI sampling parts: a GUIDER, a SAMPLER and a NOISE, used by SamplerCustomAdvanced and by the
all-in-one Causal Counterfactual(s) nodes alike (``sample_counterfactual``), so both are one path.

* ``CSGGuider`` (a ``comfy.samplers.CFGGuider``) predicts with the core's ``csg.prediction.predict_step``
  through ``ComfySDXLHost``: on guided steps every row of the plan (uncond, [source], concept prompts,
  protected phrases) with attention capture, otherwise only the base rows. It returns x0_hat =
  x_k - sigma eps_hat, as every ComfyUI guider does, so any sampler can drive it; its step index
  comes from the sampler's sigmas. It keeps each step's masks (``edit_masks``).
* ``sample_edit_friendly_dpmpp`` is SDE-DPM-Solver++(2M) whose noise at step i is the inversion's
  stored map z_i, stepping with the core's ``csg.prediction.sde_dpmpp_2m_step`` in VP terms
  (x_vp = x_k / sqrt(1 + sigma^2)).
* ``InversionNoise`` is the NOISE that, with the inversion's LATENT and SIGMAS, makes a sampler
  start from the abducted x_T (ComfyUI starts at sigma_0 noise + latent).

Sampling goes through ``CFGGuider.sample``, so ComfyUI loads the model, runs the OUTER_SAMPLE,
SAMPLER_SAMPLE and PREDICT_NOISE wrappers of other nodes and calls the preview callback, as for any
sampler. A MODEL's CFG patches meet CSG's own combination of terms (see ``check_cfg_patches``):
post-CFG functions are replayed after it, as core Perp-Neg does; a ``sampler_cfg_function``, pre-CFG
functions and a ``sampler_calc_cond_batch_function`` are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..csg.abduction import Inversion
from ..csg.errors import InputError
from ..csg.guidance import EditSpec, GuidanceParams, GuidancePlan
from ..csg.prediction import MaskTally, PlanConditioning, plan_edit, predict_step, sde_dpmpp_2m_step
from .comfy_host import ComfySDXLHost

SIGMAS_HINT = "Connect the SIGMAS output of 'Inversion Sigmas & Noise' for this inversion."
# The edit-friendly sampler and the CSG guider swap VP values through the sampler's transformer_options:
# x_k = x_vp sqrt(1 + sigma^2) and eps = (x_k - x0_hat) / sigma each round the last bit, and exact mode's
# source guidance amplifies that to ~10% of the latent over 6 steps. Identity checks on the tensors
# make sure no wrapper's change to the input or the output is bypassed.
VP_EXCHANGE = "csg_vp_exchange"


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


# -- a MODEL's CFG patches ---------------------------------------------------------------------------------


def _patch_name(function) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def check_cfg_patches(model_options: dict) -> None:
    """Refuse the CFG patches CSG cannot honour; post-CFG functions are replayed (``CSGGuider.post_cfg``).

    CSG replaces classifier-free guidance by its own masked sum over concept rows, so a patch that
    rewrites the cond/uncond pair or their combination has nothing it could faithfully act on.
    """
    refused = []
    if "sampler_cfg_function" in model_options:
        refused.append(("sampler_cfg_function", [model_options["sampler_cfg_function"]],
                        "it replaces the cond/uncond combination, and CSG's combination is its own masked sum of "
                        "concept terms (e.g. RescaleCFG, Perp-Neg (deprecated), renorm CFG set one)"))
    if model_options.get("sampler_pre_cfg_function"):
        refused.append(("sampler_pre_cfg_function", model_options["sampler_pre_cfg_function"],
                        "it rewrites a [cond, uncond] pair, which CSG's rows are not (e.g. APG, TCFG, FreSca set one)"))
    if "sampler_calc_cond_batch_function" in model_options:
        refused.append(("sampler_calc_cond_batch_function", [model_options["sampler_calc_cond_batch_function"]],
                        "CSG evaluates its rows itself, one latent per row (e.g. Skip Layer Guidance DiT sets one)"))
    if refused:
        details = "; ".join(f"{kind} {', '.join(_patch_name(f) for f in functions)}: {why}"
                            for kind, functions, why in refused)
        raise InputError(f"The MODEL carries CFG patches that CSG cannot apply: {details}. Connect the MODEL from "
                         "before the node that added them (LoRAs and other weight patches are fine), or use a "
                         "post-CFG node instead, which CSG replays after its guidance.")


class PostCFGArgs(dict):
    """The arguments of a post-CFG function; asking for a cond CSG does not have fails clearly."""

    def __missing__(self, key):
        if key in ("cond", "uncond"):
            raise InputError(f"A post-CFG function on the MODEL asked for args[{key!r}], the conditioning to re-run "
                             "the model with (as Self-Attention or Perturbed-Attention Guidance do). CSG has no single "
                             "cond/uncond pair to give it; connect the MODEL from before that node.")
        raise KeyError(key)


# -- the guider ---------------------------------------------------------------------------------------------


class CSGGuider(comfy.samplers.CFGGuider):
    """Causal Semantic Guidance as a ComfyUI guider over K interventions (one latent each)."""

    def __init__(self, host: ComfySDXLHost, plan: GuidancePlan, inversion: Inversion) -> None:
        check_cfg_patches(host.model.model_options)
        super().__init__(host.model)
        self.host, self.plan, self.inversion = host, plan, inversion
        self.conditioning = PlanConditioning.encode(host, plan)
        self.masks: MaskTally | None = None

    @classmethod
    def for_edits(cls, host: ComfySDXLHost, inversion: Inversion, specs: Sequence[EditSpec],
                  params: GuidanceParams) -> CSGGuider:
        """The guider of ``specs`` (one per intervention) on this inversion's schedule."""
        return cls(host, plan_edit(host, inversion, specs, params), inversion)

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.masks = MaskTally(self.plan, tuple(noise.shape[-2:]), self.model_patcher.load_device)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def edit_masks(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per intervention, each term's mask averaged over its active steps and at its last one, (terms, h, w)."""
        return self.masks.per_intervention()

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
        exchange = model_options.get("transformer_options", {})
        offer = exchange.pop(VP_EXCHANGE, None)
        exact = offer is not None and offer["x"] is x  # the edit-friendly sampler's own latent, unchanged
        x_vp = offer["x_vp"] if exact else x.float() / (1.0 + sigma**2).sqrt()
        with self.host.bound(self.inner_model, model_options):
            prediction = predict_step(self.host, self.plan, self.conditioning, x_vp, t, step)
        self.masks.add(step, prediction.masks)
        denoised = (x.float() - sigma * prediction.eps).to(x.dtype)
        if exact:
            exchange[VP_EXCHANGE] = {"denoised": denoised, "eps": prediction.eps}
        return self.post_cfg(denoised, x, timestep, prediction.uncond, model_options)

    def post_cfg(self, denoised, x, timestep, eps_uncond, model_options: dict):
        """Replay the MODEL's post-CFG functions on CSG's result, as core Perp-Neg replays them on its own.

        CSG has no single prompt at a single scale, so its guided prediction stands for the
        conditional one: ``denoised`` and ``cond_denoised`` are CSG's result with ``cond_scale`` 1, and
        ``uncond_denoised`` is each intervention's unconditional row. Functions of ``denoised`` alone act
        as in any sampler; those that pull toward the conditional prediction see CFG at scale 1.
        """
        functions = model_options.get("sampler_post_cfg_function", [])
        if not functions:
            return denoised
        uncond_denoised = (x.float() - timestep.reshape(-1)[:1].float() * eps_uncond).to(x.dtype)
        for function in functions:
            denoised = function(PostCFGArgs(
                denoised=denoised, cond_denoised=denoised, uncond_denoised=uncond_denoised, cond_scale=1.0,
                input=x, sigma=timestep, model=self.inner_model, model_options=model_options))
        return denoised


@torch.no_grad()
def sample_edit_friendly_dpmpp(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None):
    """ComfyUI sampler function: the core's SDE-DPM-Solver++(2M) step with the inversion's noise maps.

    Its state is the VP latent, which starts at the inversion's x_T when the NOISE and LATENT are the
    inversion's, and it swaps VP values with the CSG guider (``VP_EXCHANGE``), so the chain is the
    inversion's arithmetic to the last bit, as exact reconstruction needs; with any other guider, or a
    wrapper that changes the model's input or output, it converts through sigma space.
    """
    check_sigmas(sigmas, inversion)
    extra_args = {} if extra_args is None else extra_args
    exchange = extra_args.get("model_options", {}).get("transformer_options", {})
    s_in = x.new_ones([x.shape[0]])
    noise_maps = inversion.noise_maps.to(x.device)
    x_vp = x / (1.0 + sigmas[0] ** 2).sqrt()
    x_T = inversion.x_T.to(x).expand_as(x)
    if torch.allclose(x_vp, x_T, rtol=1e-4, atol=1e-5):  # the inversion's start, up to sigma-space rounding
        x_vp = x_T.clone()
    prev_x0_pred = None
    for i, step in enumerate(inversion.schedule.steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = x_vp * (1.0 + sigma**2).sqrt()
        exchange[VP_EXCHANGE] = {"x": x, "x_vp": x_vp}
        denoised = model(x, sigma * s_in, **extra_args)
        answer = exchange.pop(VP_EXCHANGE, {})
        eps = answer["eps"] if answer.get("denoised") is denoised else (x - denoised) / sigma
        x_vp, prev_x0_pred = sde_dpmpp_2m_step(step, x_vp, eps, prev_x0_pred, noise_maps[i])
        if callback is not None:
            callback({"x": x_vp * (1.0 + sigma_next**2).sqrt(), "i": i, "sigma": sigma, "sigma_hat": sigma,
                      "denoised": denoised})
    return x_vp  # at sigma = 0, x_k = x_vp


def edit_friendly_sampler(inversion: Inversion) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_edit_friendly_dpmpp, extra_options={"inversion": inversion})


def inversion_latent(inversion: Inversion, latent_format, count: int = 1) -> dict:
    """The abducted image as a LATENT, ``count`` rows (one per intervention)."""
    return {"samples": latent_format.process_out(inversion.x0.float().cpu()).repeat(count, 1, 1, 1)}


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


def sample_counterfactual(guider: CSGGuider, inversion: Inversion) -> torch.Tensor:
    """The guider's counterfactual LATENT samples (K, C, h, w), sampled as SamplerCustomAdvanced samples the
    inversion's SIGMAS, NOISE and LATENT with the edit-friendly sampler: through ``guider.sample``, with
    ComfyUI's latent preview callback (the user's preview method) at every step."""
    latent_format = guider.model_patcher.model.latent_format
    latent = inversion_latent(inversion, latent_format, guider.plan.num_interventions)
    noise = InversionNoise(inversion, latent_format)
    sigmas = inversion_sigmas(inversion)
    callback = latent_preview.prepare_callback(guider.model_patcher, len(sigmas) - 1)
    samples = guider.sample(noise.generate_noise(latent), latent["samples"], edit_friendly_sampler(inversion), sigmas,
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=noise.seed)
    return samples.to(comfy.model_management.intermediate_device())
