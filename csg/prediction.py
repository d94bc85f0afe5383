"""Prediction: sample the counterfactual from the abducted noise under CSG.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

Entry points::

    edit(host, inversion, specs: list[EditSpec], params=GuidanceParams()) -> EditResult
    reconstruct(host, inversion) -> Tensor (1, C, h, w)        # the same chain with no edit
    plan_edit(host, inversion, specs, params) -> GuidancePlan    # the rows; ComfyUI's CSG guider plans with it too
    predict_step(host, plan, conditioning, x, timestep, step)  # one step's eps_hat; ComfyUI's CSG guider calls it too

The sampler is SDE-DPM-Solver++(2M) whose noise at step i is the stored map z_i of the inversion
(``sde_dpmpp_2m_step``). K interventions share one ``Inversion`` and run in ONE loop: each has its
own latent and its own rows (uncond, [source], its terms, its protected phrases), and every step
makes one UNet call over all rows. Rows are independent, so a batched result equals K separate
runs up to float rounding; the gain is fewer, larger launches, not fewer FLOPs. Steps where no
term guides (warm-up, cool-down) evaluate only the base rows (uncond, [source]), in exact mode one
intervention per call: the inversion's own batch, so a zero-strength edit gives back x0 bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass(frozen=True)
class PlanConditioning:
    """A plan's encoded prompts: every row (guided steps) and the base rows of one UNet call (unguided
    steps); None where no step needs them."""

    rows: object | None
    base_rows: object | None

    @classmethod
    def encode(cls, host: DiffusionHost, plan: GuidancePlan) -> PlanConditioning:
        return cls(host.encode_prompts(plan.prompts) if any(plan.active_steps) else None,
                   None if all(plan.active_steps) else host.encode_prompts(plan.base_prompts[:plan.base_call_rows]))


class StepPrediction(NamedTuple):
    eps: torch.Tensor  # (K, C, h, w) the guided eps_hat of each intervention
    masks: torch.Tensor | None  # (T, h, w) the step's edit masks; None on a step where no term guides
    uncond: torch.Tensor  # (K, C, h, w) each intervention's unconditional eps


def predict_step(host: DiffusionHost, plan: GuidancePlan, conditioning: PlanConditioning, x: torch.Tensor,
                 timestep: int | torch.Tensor, step: int) -> StepPrediction:
    """CSG's eps_hat for the K latents ``x`` (VP, at training ``timestep``) at sampling step ``step``.

    A step where a term guides evaluates every row of the plan (with attention capture); any other
    step evaluates only the base rows, since only the base prediction is used there.
    """
    if plan.active_steps[step]:
        eps, maps = host.predict_noise(x.index_select(0, plan.row_owner), timestep, conditioning.rows, plan.attention)
        eps_hat, masks = guided_epsilon(plan, eps, maps, step)
        return StepPrediction(eps_hat, masks, eps.index_select(0, plan.uncond_rows))
    rows = x.index_select(0, plan.base_row_owner).split(plan.base_call_rows)
    eps = torch.cat([host.predict_noise(chunk, timestep, conditioning.base_rows)[0] for chunk in rows])
    return StepPrediction(unguided_epsilon(plan, eps), None, eps if plan.source_rows is None else eps[0::2])


class MaskTally:
    """Each term's mask averaged over its active steps, and its mask at its last active step.

    A step counts once, even where a sampler evaluates the guider twice in it (second-order samplers).
    """

    def __init__(self, plan: GuidancePlan, latent_size: tuple[int, int], device: torch.device) -> None:
        self.plan = plan
        self.sum = torch.zeros((len(plan.term_rows), *latent_size), device=device)
        self.last = torch.zeros_like(self.sum)
        self.steps: set[int] = set()

    def add(self, step: int, masks: torch.Tensor | None) -> None:
        if masks is not None and step not in self.steps:
            self.steps.add(step)
            self.sum += masks
            self.last = torch.where(self.plan.active[step][:, None, None], masks, self.last)

    def per_intervention(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(mean masks, last masks), each one (terms, h, w) tensor per intervention."""
        mean = self.sum / self.plan.active.sum(dim=0).clamp(min=1)[:, None, None]
        split = list(self.plan.terms_per_intervention)
        return tuple(mean.split(split)), tuple(self.last.split(split))


@torch.no_grad()
def run_chain(host: DiffusionHost, inversion: Inversion, plan: GuidancePlan) -> EditResult:
    """The denoising loop from x_T with the inversion's noise maps and ``plan``'s guidance."""
    x = inversion.x_T.expand(plan.num_interventions, -1, -1, -1).clone()
    conditioning = PlanConditioning.encode(host, plan)
    timesteps = torch.tensor(inversion.schedule.timesteps).to(host.device)
    tally = MaskTally(plan, tuple(x.shape[-2:]), x.device)
    prev_x0_pred = None
    for i, step in enumerate(inversion.schedule.steps):
        prediction = predict_step(host, plan, conditioning, x, timesteps[i], i)
        x, prev_x0_pred = sde_dpmpp_2m_step(step, x, prediction.eps, prev_x0_pred, inversion.noise_maps[i])
        tally.add(i, prediction.masks)
    masks, last_masks = tally.per_intervention()
    return EditResult(latents=x, masks=masks, last_masks=last_masks)


def source_row_prompt(inversion: Inversion) -> str | None:
    """Exact mode predicts with what the inversion used, which needs the source prompt's row."""
    return inversion.source_prompt if inversion.exact and inversion.uses_source_guidance else None


def plan_edit(host: DiffusionHost, inversion: Inversion, specs: Sequence[EditSpec],
              params: GuidanceParams = GuidanceParams(), *, allow_empty: bool = False) -> GuidancePlan:  # noqa: B008
    """The guidance plan of ``specs`` on ``inversion``: its steps, and in exact mode its base rows."""
    return plan_guidance(host, specs, inversion.num_steps, source_prompt=source_row_prompt(inversion),
                         source_guidance=inversion.source_guidance, params=params, allow_empty=allow_empty,
                         exact=inversion.exact)


def edit(host: DiffusionHost, inversion: Inversion, specs: Sequence[EditSpec],
         params: GuidanceParams = GuidanceParams()) -> EditResult:  # noqa: B008  (frozen)
    """Counterfactual latents for every intervention in ``specs`` (one batched loop).

    Raises ``InputError`` for an empty list, an intervention without terms, a term whose prompt is
    empty or too long for the tokenizer, a threshold outside [0, 1], or a term whose warm-up leaves
    no step to guide (e.g. fewer steps than the warm-up).
    """
    return run_chain(host, inversion, plan_edit(host, inversion, specs, params))


def reconstruct(host: DiffusionHost, inversion: Inversion) -> torch.Tensor:
    """The unedited sample (1, C, h, w): equal to ``inversion.x0`` in exact mode, close to it otherwise."""
    return run_chain(host, inversion, plan_edit(host, inversion, [EditSpec(())], allow_empty=True)).latents
