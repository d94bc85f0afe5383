"""Prediction: sample the counterfactual from the abducted noise under CSG.

Entry points::

    edit(host, inversion, specs: list[EditSpec], params=GuidanceParams()) -> EditResult
    reconstruct(host, inversion) -> Tensor (1, C, h, w)        # the same chain with no edit

The sampler is SDE-DPM-Solver++(2M) whose noise at step i is the stored map z_i of the inversion
(``sde_dpmpp_2m_step``). K interventions share one ``Inversion`` and run in ONE loop: each has its
own latent and its own rows (uncond, [source], its terms, its protected phrases), and every step
makes one UNet call over all rows. Rows are independent, so a batched result equals K separate
runs up to float rounding; the gain is fewer, larger launches, not fewer FLOPs. Steps where no
term guides (warm-up, cool-down) evaluate only the base rows (uncond, [source]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .abduction import Inversion
from .guidance import EditSpec, GuidanceParams, GuidancePlan, guided_epsilon, plan_guidance, unguided_epsilon
from .host import DiffusionHost
from .schedule import SolverStep


@dataclass(frozen=True)
class EditResult:
    latents: torch.Tensor  # (K, C, h, w) float32, one counterfactual latent per intervention
    masks: tuple[torch.Tensor, ...]  # per intervention, (terms, h, w): each term's mask averaged over its active steps
    last_masks: tuple[torch.Tensor, ...]  # per intervention, (terms, h, w): each term's mask at its last active step


def sde_dpmpp_2m_step(step: SolverStep, x: torch.Tensor, eps: torch.Tensor, prev_x0_pred: torch.Tensor | None,
                      noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step: (x at the next timestep, x0_hat at this one, which the next step needs)."""
    x0_pred = step.predict_x0(x, eps)
    x_next = step.mean(x, x0_pred, prev_x0_pred)
    if step.noise_std != 0.0:
        x_next = x_next + step.noise_std * noise
    return x_next, x0_pred


@torch.no_grad()
def run_chain(host: DiffusionHost, inversion: Inversion, plan: GuidancePlan) -> EditResult:
    """The denoising loop from x_T with the inversion's noise maps and ``plan``'s guidance."""
    steps = inversion.schedule.steps
    x = inversion.x_T.expand(plan.num_interventions, -1, -1, -1).clone()
    conditioning = host.encode_prompts(plan.prompts) if any(plan.active_steps) else None
    base_conditioning = None if all(plan.active_steps) else host.encode_prompts(plan.base_prompts)
    timesteps = torch.tensor([s.t for s in steps]).to(host.device)
    num_terms = len(plan.term_rows)
    mask_sum = torch.zeros((num_terms, *x.shape[-2:]), device=x.device)
    last_masks = torch.zeros_like(mask_sum)
    prev_x0_pred = None
    for i, step in enumerate(steps):
        if plan.active_steps[i]:
            rows = x.index_select(0, plan.row_owner)
            eps, attention_maps = host.predict_noise(rows, timesteps[i], conditioning, plan.attention)
            eps_hat, masks = guided_epsilon(plan, eps, attention_maps, i)
        else:  # only the base prediction is used, so only its rows are evaluated
            eps, _ = host.predict_noise(x.index_select(0, plan.base_row_owner), timesteps[i], base_conditioning)
            eps_hat, masks = unguided_epsilon(plan, eps), None
        x, prev_x0_pred = sde_dpmpp_2m_step(step, x, eps_hat, prev_x0_pred, inversion.noise_maps[i])
        if masks is not None:
            mask_sum += masks
            last_masks = torch.where(plan.active[i][:, None, None], masks, last_masks)
    active_counts = plan.active.sum(dim=0).clamp(min=1)
    mean_masks = mask_sum / active_counts[:, None, None]
    split = list(plan.terms_per_intervention)
    return EditResult(latents=x, masks=tuple(mean_masks.split(split)), last_masks=tuple(last_masks.split(split)))


def source_row_prompt(inversion: Inversion) -> str | None:
    """Exact mode predicts with what the inversion used, which needs the source prompt's row."""
    return inversion.source_prompt if inversion.exact and inversion.uses_source_guidance else None


def edit(host: DiffusionHost, inversion: Inversion, specs: Sequence[EditSpec],
         params: GuidanceParams = GuidanceParams()) -> EditResult:
    """Counterfactual latents for every intervention in ``specs`` (one batched loop).

    Raises ``InputError`` for an empty list, an intervention without terms, a term whose prompt is
    empty or too long for the tokenizer, a threshold outside [0, 1], or a term whose warm-up leaves
    no step to guide (e.g. fewer steps than the warm-up).
    """
    plan = plan_guidance(host, specs, inversion.num_steps, source_prompt=source_row_prompt(inversion),
                         source_guidance=inversion.source_guidance, params=params)
    return run_chain(host, inversion, plan)


def reconstruct(host: DiffusionHost, inversion: Inversion) -> torch.Tensor:
    """The unedited sample (1, C, h, w): equal to ``inversion.x0`` in exact mode, close to it otherwise."""
    plan = plan_guidance(host, [EditSpec(())], inversion.num_steps, source_prompt=source_row_prompt(inversion),
                         source_guidance=inversion.source_guidance, allow_empty=True)
    return run_chain(host, inversion, plan).latents
