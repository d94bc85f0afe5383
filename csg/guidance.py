"""Action: Causal Semantic Guidance (the paper's eqs. 9-12), one denoising step at a time.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

For every changed concept c in E (the target and its changed descendants) with its own prompt
and batch row, at each step

    eps_hat = eps_base + sum_c  s_c * M_c * (eps_c - eps_uncond)

* eps_base is eps_uncond (the reference, LEDITS++), or in exact-reconstruction mode the
  prediction the inversion used (source-prompt guidance when a source prompt was given).
* s_c is the concept's scale, negated for ``reverse`` terms (push away from the prompt).
* M_c = M1_c * M2_c by default ("intersect"), or M1_c alone ("cross_attention"), or M2_c alone
  ("noise"):
  - M1_c: the current step's cross-attention probabilities of c's row over c's real tokens
    (summed over the tokens; averaged over heads and over the latent/4 cross-attention layers of
    the down and up blocks), smoothed with the reference's 3x3 Gaussian (reflect padding), kept
    where >= its lambda-quantile, nearest-upsampled to the latent.
  - M2_c: sum over channels of |s_c (eps_c - eps_uncond)|, kept where >= its lambda-quantile.
* Non-descendant protection (ours, off by default): each protected phrase (a non-descendant's
  current value) gets an attention-only row; its smoothed map's top region (>= the
  ``protect_threshold`` quantile) is removed from every edit mask of that intervention.
* A term acts only on steps warmup <= i < cooldown (no guidance during warm-up). A step where no
  term acts needs only the base prediction, so it evaluates only the base rows
  (``GuidancePlan.base_prompts``, ``unguided_epsilon``): at the paper's settings (warm-up 10 of 100
  steps) a 3-concept edit evaluates 370 UNet rows instead of 400.

Where M_c is 0 the term contributes exactly 0 (``torch.where``, not a product). Everything runs on
the device with no host syncs: which terms are active at a step is known from Python integers.

Reverse semantics: ``ConceptTerm.reverse`` negates the term's direction. Built from an
``EditConcept`` with ``reverse=True``, the term's prompt is the concept's ORIGINAL value phrase
("blond hair"), so the edit removes the original value where it is, rather than painting the new
value in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import InputError
from .graph import CausalGraph, EditConcept, Intervention
from .host import AttentionRequest, DiffusionHost

MaskMode = Literal["intersect", "cross_attention", "noise"]
MASK_MODES = ("intersect", "cross_attention", "noise")


@dataclass(frozen=True)
class ConceptTerm:
    """One guidance term: a prompt and how strongly, where and when it steers."""

    prompt: str
    scale: float = 8.0
    threshold: float = 0.7  # lambda: the quantile above which a pixel belongs to the mask
    warmup: int = 10  # first step (0-based) with guidance
    cooldown: int | None = None  # first step without guidance again; None: guide to the end
    reverse: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        where = f"The concept term {self.label or self.prompt!r}"
        if not self.prompt.strip():
            raise InputError(f"{where} has an empty prompt. Give the concept's value phrase, e.g. 'black hair'.")
        check_term_settings(where, scale=self.scale, threshold=self.threshold, warmup=self.warmup,
                            cooldown=self.cooldown)

    @classmethod
    def from_edit_concept(cls, concept: EditConcept, *, reverse: bool = False, **settings) -> ConceptTerm:
        prompt = concept.original_prompt if reverse else concept.prompt
        return cls(prompt=prompt, reverse=reverse, label=concept.concept_id, **settings)

    def active_steps(self, num_steps: int) -> range:
        """The steps it guides. A zero-scale term adds nothing on any step, so it guides none and its rows
        are never evaluated: a zero-strength edit then runs the inversion's own rows (exact mode's x0)."""
        return range(0) if self.scale == 0 else guided_steps(self.warmup, self.cooldown, num_steps)


def guided_steps(warmup: int, cooldown: int | None, num_steps: int) -> range:
    return range(warmup, num_steps if cooldown is None else min(cooldown, num_steps))


def check_term_settings(where: str, *, scale: float, threshold: float, warmup: int, cooldown: int | None,
                        num_steps: int | None = None) -> None:
    """Refuse settings a guidance term cannot work with; given ``num_steps``, also a term that would never guide."""
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"{where}: threshold must be in [0, 1], got {threshold}.")
    if not math.isfinite(scale):
        raise InputError(f"{where}: scale must be a finite number, got {scale}.")
    if warmup < 0 or (cooldown is not None and cooldown < 0):
        raise InputError(f"{where}: warmup and cooldown must be non-negative step indices.")
    if num_steps is not None and not guided_steps(warmup, cooldown, num_steps):
        end = f"the end ({num_steps} steps)" if cooldown is None else f"the cool-down (step {cooldown})"
        raise InputError(f"{where}: no step would be guided, as the warm-up ({warmup} steps) is not before {end}. "
                         "Lower the warm-up or use more steps.")


@dataclass(frozen=True)
class EditSpec:
    """One intervention to predict: its guidance terms and the phrases to protect from editing."""

    terms: tuple[ConceptTerm, ...]
    protect: tuple[str, ...] = ()

    @classmethod
    def from_intervention(cls, intervention: Intervention, graph: CausalGraph, *, protect_non_descendants: bool = False,
                          **settings) -> EditSpec:
        """The terms of ``intervention.edit_concepts(graph)``; with protection, the non-descendants'
        current values ("<value> <name>", e.g. "blue eye color") become protected phrases."""
        terms = tuple(ConceptTerm.from_edit_concept(c, **settings) for c in intervention.edit_concepts(graph))
        protect = ()
        if protect_non_descendants:
            concepts = (graph.concept(cid) for cid in graph.non_descendants(intervention.target_concept_id))
            protect = tuple(f"{c.current_value} {c.name}" for c in concepts)
        return cls(terms, protect)


@dataclass(frozen=True)
class GuidanceParams:
    mask_mode: MaskMode = "intersect"
    protect_threshold: float = 0.9  # a protected phrase claims the top 10% of its attention map

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise InputError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {self.mask_mode!r}.")
        if not 0.0 <= self.protect_threshold <= 1.0:
            raise InputError(f"protect_threshold must be in [0, 1], got {self.protect_threshold}.")


# -- masks -------------------------------------------------------------------------------------------


def reference_gaussian_kernel() -> torch.Tensor:
    """LEDITS++'s 3x3 smoothing kernel, (1, 1, 3, 3).

    The reference nominally uses sigma = 0.5 but evaluates exp(-((d - mean) / (2 sigma))^2), which
    is a Gaussian with sigma = 0.5 * sqrt(2) ~ 0.71: per axis weights [e^-1, 1, e^-1], normalised.
    We keep its weights so our masks match it.
    """
    axis = torch.tensor([math.exp(-1.0), 1.0, math.exp(-1.0)], dtype=torch.float32)
    kernel = axis[:, None] * axis[None, :]
    return (kernel / kernel.sum()).view(1, 1, 3, 3)


@functools.cache
def _device_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The kernel on ``device``, made once: a fresh host-to-device copy every step would be a host sync."""
    return reference_gaussian_kernel().to(device, dtype)


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """(R, a, b) maps smoothed with the reference kernel, reflect-padded so the size is kept."""
    padded = F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, _device_kernel(maps.device, maps.dtype))[:, 0]


@functools.cache
def quantile_rank_dtype() -> torch.dtype:
    """The precision in which the installed torch.quantile computes the rank q (n - 1).

    The reference thresholds its masks with torch.quantile, which computed the rank in the values'
    dtype up to torch 2.13 and computes it in float64 from 2.14 on. On a 0/1 step right after order
    statistic 716 of 1024, the quantile at 0.7 is the rank's fractional part, which tells the two apart.
    """
    step = (torch.arange(1024) > 716).float()
    in_float32 = torch.tensor(0.7) * 1023 - 716
    return torch.float32 if torch.quantile(step, 0.7) == in_float32 else torch.float64


def row_quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row quantile of (R, n) ``values`` at per-row levels ``q`` (R,), linear interpolation.

    Same arithmetic as the installed torch.quantile (the rank q (n - 1) in its precision, then a lerp
    between the neighbouring order statistics), without its host-side range check.
    """
    n = values.shape[1]
    ordered = values.sort(dim=1).values
    rank_dtype = values.dtype if values.device.type == "mps" else quantile_rank_dtype()  # MPS has no float64
    rank = q.to(rank_dtype) * (n - 1)
    below = rank.floor().long()
    above = (below + 1).clamp(max=n - 1)
    low, high = ordered.gather(1, below[:, None]), ordered.gather(1, above[:, None])
    return torch.lerp(low, high, (rank - below.to(rank_dtype)).to(values.dtype)[:, None])[:, 0]


def top_region(maps: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """1.0 where each of the (R, h, w) maps reaches its row's quantile, else 0.0."""
    levels = row_quantiles(maps.flatten(1), thresholds)
    return (maps >= levels[:, None, None]).to(maps.dtype)


def cross_attention_masks(maps: torch.Tensor, thresholds: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """M1: smoothed attention maps (R, h/4, w/4) thresholded, then nearest-upsampled to (R, h, w)."""
    region = top_region(smooth(maps), thresholds)
    return F.interpolate(region[:, None], size=latent_size, mode="nearest")[:, 0]


def noise_masks(terms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """M2: where the channel-summed magnitude of each scaled term (T, C, h, w) is in its top quantile."""
    return top_region(terms.abs().sum(dim=1), thresholds)


# -- the plan: rows, per-term constants, all on the device ----------------------------------------------


@dataclass(frozen=True)
class GuidancePlan:
    """Batch layout and constants for guiding K interventions in one UNet call per step.

    Rows, per intervention k: [uncond, source (exact mode with a source prompt), its terms...,
    its protected phrases...]. Each row is computed on intervention k's latent. A step where no
    term guides evaluates only the base rows: per intervention k, [uncond, source].
    """

    prompts: tuple[str, ...]  # one per UNet row
    row_owner: torch.Tensor  # (B,) intervention of each row
    base_prompts: tuple[str, ...]  # the rows of a step where no term guides
    base_row_owner: torch.Tensor  # (K or 2K,) intervention of each base row
    base_call_rows: int  # base rows per UNet call: all of them, or in exact mode one intervention's
    uncond_rows: torch.Tensor  # (K,)
    source_rows: torch.Tensor | None  # (K,) or None
    source_guidance: float
    term_rows: torch.Tensor  # (T,)
    term_owner: torch.Tensor  # (T,)
    signed_scales: torch.Tensor  # (T,) float32, negative for reverse terms
    thresholds: torch.Tensor  # (T,) float32
    active: torch.Tensor  # (N, T) bool: term t guides at step i
    active_steps: tuple[bool, ...]  # (N,) whether any term guides at step i, as Python values
    terms_per_intervention: tuple[int, ...]
    protect_owner: torch.Tensor  # (P,)
    protect_threshold: float
    mask_mode: MaskMode
    attention: AttentionRequest | None  # term rows (if M1 is used), then protected rows

    @property
    def num_interventions(self) -> int:
        return len(self.terms_per_intervention)

    @property
    def uses_cross_attention(self) -> bool:
        return self.mask_mode != "noise"


def check_specs(specs: Sequence[EditSpec], num_steps: int, *, allow_empty: bool = False,
                host: DiffusionHost | None = None) -> None:
    """Refuse what ``plan_guidance`` would refuse, and with ``host`` also a prompt its tokenizer
    truncates. Settings of one term are checked when it is made; this adds what needs the step
    count and the tokenizer. Call it before an inversion, so that bad settings fail in
    milliseconds rather than after the abduction."""
    if not specs:
        raise InputError("No intervention to predict: pass at least one EditSpec.")
    for k, spec in enumerate(specs):
        if not spec.terms and not allow_empty:
            raise InputError(f"Intervention {k} has no concept to guide. Give at least one ConceptTerm "
                             "(the target concept's new value).")
        for j, term in enumerate(spec.terms):
            check_term_settings(f"Intervention {k}, term {j} ({term.label or term.prompt!r})", scale=term.scale,
                                threshold=term.threshold, warmup=term.warmup, cooldown=term.cooldown,
                                num_steps=num_steps)
        if any(not phrase.strip() for phrase in spec.protect):
            raise InputError(f"Intervention {k} has an empty protected phrase.")
        if host is not None:
            for prompt in (*(t.prompt for t in spec.terms), *spec.protect):
                host.token_indices(prompt)


def plan_guidance(host: DiffusionHost, specs: Sequence[EditSpec], num_steps: int, *, source_prompt: str | None,
                  source_guidance: float = 0.0, params: GuidanceParams = GuidanceParams(),
                  allow_empty: bool = False, exact: bool = False) -> GuidancePlan:
    """Validate ``specs`` and lay out their rows. ``source_prompt`` adds a source row per intervention
    (exact mode's base prediction). ``allow_empty`` permits specs without terms (reconstruction).
    ``exact`` evaluates the base rows of unguided steps one intervention per UNet call."""
    check_specs(specs, num_steps, allow_empty=allow_empty)
    prompts: list[str] = []
    owner, uncond, source, term_rows, term_owner, protect_rows, protect_owner = [], [], [], [], [], [], []
    terms: list[ConceptTerm] = []
    columns: dict[int, tuple[int, ...]] = {}

    def add_row(prompt: str, intervention: int) -> int:
        prompts.append(prompt)
        owner.append(intervention)
        return len(prompts) - 1

    base = ("",) if source_prompt is None else ("", source_prompt)
    for k, spec in enumerate(specs):
        uncond.append(add_row("", k))
        if source_prompt is not None:
            source.append(add_row(source_prompt, k))
        for term in spec.terms:
            row = add_row(term.prompt, k)
            columns[row] = tuple(host.token_indices(term.prompt))
            term_rows.append(row)
            term_owner.append(k)
            terms.append(term)
        for phrase in spec.protect:
            row = add_row(phrase, k)
            columns[row] = tuple(host.token_indices(phrase))
            protect_rows.append(row)
            protect_owner.append(k)

    attention_rows = (term_rows if params.mask_mode != "noise" else []) + protect_rows
    attention = (AttentionRequest(tuple(attention_rows), tuple(columns[r] for r in attention_rows))
                 if attention_rows else None)
    active = [[i in t.active_steps(num_steps) for t in terms] for i in range(num_steps)]
    device = host.device
    index = lambda values: torch.tensor(values, dtype=torch.long).to(device)  # noqa: E731
    return GuidancePlan(
        prompts=tuple(prompts),
        row_owner=index(owner),
        base_prompts=base * len(specs),
        base_row_owner=index([k for k in range(len(specs)) for _ in base]),
        base_call_rows=len(base) if exact else len(base) * len(specs),
        uncond_rows=index(uncond),
        source_rows=index(source) if source_prompt is not None else None,
        source_guidance=source_guidance,
        term_rows=index(term_rows),
        term_owner=index(term_owner),
        signed_scales=torch.tensor([-t.scale if t.reverse else t.scale for t in terms], dtype=torch.float32).to(device),
        thresholds=torch.tensor([t.threshold for t in terms], dtype=torch.float32).to(device),
        active=torch.tensor(active, dtype=torch.bool).view(num_steps, len(terms)).to(device),
        active_steps=tuple(any(row) for row in active),
        terms_per_intervention=tuple(len(s.terms) for s in specs),
        protect_owner=index(protect_owner),
        protect_threshold=params.protect_threshold,
        mask_mode=params.mask_mode,
        attention=attention,
    )


# -- one step ----------------------------------------------------------------------------------------


def source_guided(plan: GuidancePlan, uncond: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    return uncond if source is None else uncond + plan.source_guidance * (source - uncond)


def base_epsilon(plan: GuidancePlan, eps: torch.Tensor) -> torch.Tensor:
    """(K, C, h, w) from all rows: eps_uncond, or the source-guided prediction in exact mode."""
    source = None if plan.source_rows is None else eps.index_select(0, plan.source_rows)
    return source_guided(plan, eps.index_select(0, plan.uncond_rows), source)


def unguided_epsilon(plan: GuidancePlan, eps: torch.Tensor) -> torch.Tensor:
    """eps_hat (K, C, h, w) for a step where no term guides, from the rows of ``plan.base_prompts``."""
    if plan.source_rows is None:
        return eps
    return source_guided(plan, eps[0::2], eps[1::2])


def edit_masks(plan: GuidancePlan, terms: torch.Tensor, attention_maps: torch.Tensor | None, step: int) -> torch.Tensor:
    """The combined mask M_c (T, h, w), 0/1, for the scaled terms (T, C, h, w) at ``step``.

    ``attention_maps`` holds the rows of ``plan.attention``: the terms' maps first (unless the
    mode is "noise"), then the protected phrases' maps.
    """
    latent_size = tuple(terms.shape[-2:])
    num_attended = terms.shape[0] if plan.uses_cross_attention else 0
    if plan.mask_mode == "noise":
        masks = noise_masks(terms, plan.thresholds)
    else:
        masks = cross_attention_masks(attention_maps[:num_attended], plan.thresholds, latent_size)
        if plan.mask_mode == "intersect":
            masks = masks * noise_masks(terms, plan.thresholds)
    if len(plan.protect_owner):
        protect_maps = attention_maps[num_attended:]
        levels = torch.full((protect_maps.shape[0],), plan.protect_threshold, device=terms.device)
        claimed = cross_attention_masks(protect_maps, levels, latent_size)
        protected = torch.zeros((plan.num_interventions, *latent_size), device=terms.device)
        protected = protected.index_add_(0, plan.protect_owner, claimed).clamp_(max=1.0)
        masks = masks * (1.0 - protected.index_select(0, plan.term_owner))
    return masks * plan.active[step][:, None, None]


def guided_epsilon(plan: GuidancePlan, eps: torch.Tensor, attention_maps: torch.Tensor | None,
                   step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps_hat (K, C, h, w) for one step, and the step's masks (T, h, w) (None when no term is active)."""
    base = base_epsilon(plan, eps)
    if not plan.active_steps[step]:
        return base, None
    uncond = eps.index_select(0, plan.uncond_rows).index_select(0, plan.term_owner)
    terms = (eps.index_select(0, plan.term_rows) - uncond) * plan.signed_scales[:, None, None, None]
    masks = edit_masks(plan, terms, attention_maps, step)
    masked = torch.where(masks[:, None] > 0, terms, torch.zeros_like(terms))
    guidance = torch.zeros_like(base).index_add_(0, plan.term_owner, masked)
    return base + guidance, masks
