"""The counterfactual API, in the paper's order: abduction, action, prediction.

    counterfactual(host, image, graph, intervention, *, source_prompt=None, params=CSGParams())
        -> CounterfactualResult
    counterfactuals(host, image, graph, interventions, *, source_prompt=None, params=CSGParams())
        -> list[CounterfactualResult]          # K interventions, ONE inversion, ONE batched loop
    baseline_counterfactual(host, image, intervention, *, method="ddpm", source_prompt="",
                            params=CSGParams(), guidance_scale=7.5) -> BaselineResult

Per intervention: ``check_intervention`` strips changes the graph forbids (recorded in
``violations``), ``edit_concepts`` gives the set E (the target and its changed descendants, or the
target alone), abduction inverts the image once (``csg.abduction.invert``), and prediction samples
every intervention under its CSG terms (``csg.prediction.edit``) before the VAE decodes.

The source prompt (the caption the inversion is guided by) defaults to the graph's scene summary.

Images: a PIL image or a file path. EXIF orientation is applied, grayscale and palette images
become RGB, and transparent pixels are composited onto white. SDXL's UNet needs both sides to be
multiples of 32 pixels (vae_scale_factor x latent_multiple); we **center-crop** to the largest such
multiple (at most 31 pixels per side are lost) rather than resample, because resampling would
soften every pixel and count against the edit's minimality. Images whose longer side exceeds
``params.max_side`` (1024, SDXL's native size) are first downscaled with Lanczos, keeping their
aspect ratio. The result carries the image actually edited (``result.source_image``) so
comparisons use the same pixels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from .abduction import Inversion, invert
from .baselines import (
    DEFAULT_TARGET_GUIDANCE,
    BaselineInversion,
    Method,
    check_guidance_scale,
    invert_baseline,
    sample_with_guidance,
)
from .errors import GraphError, InputError
from .files import open_image
from .graph import CausalGraph, EditConcept, Intervention, check_intervention
from .guidance import ConceptTerm, EditSpec, GuidanceParams, MaskMode, check_specs, check_term_settings
from .host import DiffusionHost
from .images import image_to_tensor, to_rgb
from .prediction import edit


@dataclass(frozen=True)
class CSGParams:
    """Every knob of one run. Defaults are the paper's settings (§6); bad values fail at construction.

    Args:
        num_steps: kept inversion/sampling steps.
        skip: fraction of the noisiest steps left out, in [0, 1).
        source_guidance: CFG scale of the source prompt during inversion.
        scale: edit guidance scale s_c of every changed concept ...
        concept_scales: ... unless set here: concept id or name -> scale (see ``parse_concept_scales``).
        threshold: lambda, the mask quantile in [0, 1].
        warmup: steps without guidance at the start.
        cooldown: first step without guidance again; None guides to the end.
        mask_mode: "intersect" (M1 * M2), "cross_attention" (M1) or "noise" (M2).
        reverse: concepts (id or name) pushed away from their original value instead.
        non_descendant_protection: ours: keep edit masks off the non-descendants' regions.
        protect_threshold: the attention quantile a protected concept claims.
        exact: exact-reconstruction inversion (see ``csg.abduction``) instead of the reference's.
        num_zero_noise_steps: None: 3 (the reference) or 0 in exact mode.
        seed: draws the inversion's independent noise.
        max_side: longer image side beyond which the input is downscaled; None: never.

    Raises:
        InputError: a setting is out of range (the message names it and the valid range).
    """

    num_steps: int = 100  # kept inversion/sampling steps
    skip: float = 0.15  # fraction of the noisiest steps left out
    source_guidance: float = 3.5  # CFG of the source prompt during inversion
    scale: float = 8.0  # edit guidance scale s_c of every concept ...
    concept_scales: Mapping[str, float] = field(default_factory=dict, hash=False)  # ... unless set here (id or name)
    threshold: float = 0.7  # lambda, the mask quantile
    warmup: int = 10  # steps without guidance at the start
    cooldown: int | None = None  # first step without guidance again; None guides to the end
    mask_mode: MaskMode = "intersect"  # "intersect" (M1 * M2), "cross_attention" (M1) or "noise" (M2)
    reverse: tuple[str, ...] = ()  # concepts (id or name) pushed away from their original value instead
    non_descendant_protection: bool = False  # ours: keep edit masks off the non-descendants' regions
    protect_threshold: float = 0.9  # a protected concept claims the top 10% of its attention map
    exact: bool = False  # exact-reconstruction inversion (see csg.abduction) instead of the reference's
    num_zero_noise_steps: int | None = None  # None: 3 (the reference) or 0 in exact mode
    seed: int = 0  # draws the inversion's independent noise
    max_side: int | None = 1024  # longer image side beyond which the input is downscaled; None: never

    def __post_init__(self) -> None:
        self.check_guidance()  # bad settings fail here, before a VLM or an inversion runs, not after
        if self.max_side is not None and self.max_side < 1:
            raise InputError(f"max_side must be positive or None, got {self.max_side}.")
        object.__setattr__(self, "concept_scales", dict(self.concept_scales))
        object.__setattr__(self, "reverse", tuple(self.reverse))

    def check_guidance(self, num_steps: int | None = None) -> None:
        """Refuse guidance settings CSG cannot work with; given ``num_steps``, also a warm-up that
        leaves no step to guide (the baselines have no warm-up, so it is not checked by default)."""
        self.guidance_params()
        for where, scale in [("The edit settings", self.scale),
                             *((f"The scale of {concept!r}", scale) for concept, scale in self.concept_scales.items())]:
            check_term_settings(where, scale=scale, threshold=self.threshold, warmup=self.warmup,
                                cooldown=self.cooldown, num_steps=num_steps)

    def guidance_params(self) -> GuidanceParams:
        return GuidanceParams(mask_mode=self.mask_mode, protect_threshold=self.protect_threshold)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["concept_scales"], out["reverse"] = dict(self.concept_scales), list(self.reverse)
        return out


@dataclass(frozen=True)
class CounterfactualResult:
    """One counterfactual image and how it was made (returned by ``counterfactual(s)``).

    Attributes:
        image: the counterfactual, the size of ``source_image``.
        latent: (1, C, h, w) float32 latent of the image.
        masks: concept id -> (h, w) in [0, 1]: the share of guided steps that edited each latent pixel.
        inversion: the abducted noise, shared by every intervention of one call (pass it back to skip abduction).
        edit_concepts: the edited concepts E, in guidance order.
        intervention: the intervention after ``check_intervention``; stripped changes are in ``violations``.
        source_prompt: the prompt the image was inverted with.
        source_image: the RGB input as edited (after any downscale and crop).
    """

    image: Image.Image  # the counterfactual, same size as ``source_image``
    latent: torch.Tensor  # (1, C, h, w) float32
    masks: dict[str, torch.Tensor]  # concept id -> (h, w) in [0, 1]: share of guided steps that edited each
                                    # latent pixel
    inversion: Inversion  # shared by every intervention of one call
    edit_concepts: tuple[EditConcept, ...]  # E, in guidance order
    intervention: Intervention  # after check_intervention: stripped changes are in ``violations``
    source_prompt: str
    source_image: Image.Image  # the RGB input as edited (after any downscale and crop)

    def mask_image(self, concept_id: str) -> Image.Image:
        """The concept's mask as a grayscale image at the counterfactual's size (nearest upsampling)."""
        if concept_id not in self.masks:
            raise InputError(f"No mask for {concept_id!r}; this result has masks for {', '.join(self.masks)}.")
        pixels = (self.masks[concept_id].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(pixels).resize(self.image.size, Image.Resampling.NEAREST)


@dataclass(frozen=True)
class BaselineResult:
    """One baseline edit (returned by ``baseline_counterfactual``).

    Attributes:
        image: the edited image, the size of ``source_image``.
        latent: its latent.
        inversion: the DDPM or DDIM inversion it was sampled from.
        target_prompt: the full prompt CFG guided toward (the intervention's ``generation_prompt``).
        source_image: the RGB input as edited (after any downscale and crop).
    """

    image: Image.Image
    latent: torch.Tensor
    inversion: BaselineInversion
    target_prompt: str
    source_image: Image.Image


# -- images ----------------------------------------------------------------------------------------


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (EXIF rotation applied, transparency on white).

    Args:
        image: a PIL image or the path of an image file.

    Returns:
        The RGB image.

    Raises:
        InputError: the file is missing or not an image.
    """
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image or an image path, got {type(image).__name__}.")
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as exc:  # a broken EXIF block
        raise InputError(f"The image's EXIF orientation cannot be read ({type(exc).__name__}: {exc}). Save it "
                         "again as an 8-bit RGB PNG or JPEG.") from exc
    return to_rgb(image)


def fit_to_model(image: Image.Image, multiple: int, max_side: int | None) -> Image.Image:
    """Downscale past ``max_side``, then center-crop both sides to a multiple of ``multiple``."""
    width, height = image.size
    if max_side is not None and max(width, height) > max_side:
        factor = max_side / max(width, height)
        width, height = max(1, round(width * factor)), max(1, round(height * factor))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    new_w, new_h = width // multiple * multiple, height // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise InputError(f"The image is {width}x{height} (WxH); this model needs at least {multiple} pixels per side. "
                         "Use a larger image.")
    if (new_w, new_h) == (width, height):
        return image
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def prepare_image(host: DiffusionHost, image: Image.Image | str | Path, params: CSGParams) -> Image.Image:
    return fit_to_model(load_image(image), host.vae_scale_factor * host.latent_multiple, params.max_side)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) RGB in [0, 1] to an 8-bit PIL image."""
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def parse_concept_scales(items: str | Sequence[str], where: str = "concept scales") -> dict[str, float]:
    """Per-concept edit scales from ``"concept=number"`` items, for ``CSGParams.concept_scales``.

    Args:
        items: the items, or one string of them separated by commas or new lines
            (``"c2=6.0, hair color=5"``); a concept is an id or a name, checked against the graph later.
        where: how the error names the setting (``"--concept-scale"``, ``"concept_scales"``).

    Returns:
        The scale of each named concept; empty for no items.

    Raises:
        InputError: an item is not ``concept=number``.
    """
    if isinstance(items, str):
        items = [item for item in re.split(r"[,\n]", items) if item.strip()]
    scales = {}
    for item in items:
        concept, sep, value = item.partition("=")
        try:
            scales[concept.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not concept.strip():
            raise InputError(f'{where} expects "concept=number", e.g. "hair color=6"; got {item!r}.')
    return scales


# -- the action: interventions to guidance terms ---------------------------------------------------


def _concept_ids(graph: CausalGraph, keys: Sequence[str], what: str) -> list[str]:
    try:
        return [graph.find_concept(key).id for key in keys]
    except GraphError as exc:
        raise InputError(f"{what}: {exc}") from None


def edit_spec(graph: CausalGraph, intervention: Intervention, params: CSGParams) -> EditSpec:
    """CSG's terms for one (checked) intervention: one per edit concept with its own scale and direction."""
    scales = dict(zip(_concept_ids(graph, list(params.concept_scales), "concept_scales"),
                      params.concept_scales.values()))
    reverse = set(_concept_ids(graph, params.reverse, "reverse"))
    terms = tuple(
        ConceptTerm.from_edit_concept(concept, reverse=concept.concept_id in reverse,
                                      scale=scales.get(concept.concept_id, params.scale), threshold=params.threshold,
                                      warmup=params.warmup, cooldown=params.cooldown)
        for concept in intervention.edit_concepts(graph)
    )
    spec = EditSpec.from_intervention(intervention, graph, protect_non_descendants=params.non_descendant_protection)
    return replace(spec, terms=terms)


def _invert(host: DiffusionHost, image: Image.Image, source_prompt: str, params: CSGParams) -> Inversion:
    return invert(host, image, source_prompt, num_steps=params.num_steps, skip=params.skip,
                  source_guidance=params.source_guidance, exact=params.exact,
                  num_zero_noise_steps=params.num_zero_noise_steps, generator=params.seed)


# -- the API ---------------------------------------------------------------------------------------


def counterfactuals(host: DiffusionHost, image: Image.Image | str | Path, graph: CausalGraph,
                    interventions: Sequence[Intervention], *, source_prompt: str | None = None,
                    params: CSGParams = CSGParams(), inversion: Inversion | None = None) -> list[CounterfactualResult]:
    """One counterfactual per intervention: a single inversion, then one batched sampling loop.

    Args:
        host: the diffusion model, e.g. ``DiffusersSDXLHost.from_pretrained(...)``.
        image: the factual image, a PIL image or a path.
        graph: the image's causal graph.
        interventions: the interventions; each is checked against ``graph`` first.
        source_prompt: the inversion's prompt; None uses ``graph.scene_summary``.
        params: the settings (paper defaults).
        inversion: an earlier result's ``inversion`` of the same image and settings, to skip abduction.

    Returns:
        One ``CounterfactualResult`` per intervention, in order.

    Raises:
        InputError: no intervention, an unusable image, a setting naming an unknown concept, or an
            ``inversion`` of another image size.
        GraphError: an intervention's target is not in the graph or is set to the value it has.
    """
    if not interventions:
        raise InputError("No intervention given. Pass at least one Intervention (e.g. from propose_interventions).")
    checked = [check_intervention(graph, i) for i in interventions]
    concepts = [tuple(i.edit_concepts(graph)) for i in checked]
    specs = [edit_spec(graph, i, params) for i in checked]
    source = graph.scene_summary if source_prompt is None else source_prompt
    picture = prepare_image(host, image, params)
    check_specs(specs, params.num_steps if inversion is None else inversion.num_steps, host=host)
    if inversion is None:
        inversion = _invert(host, picture, source, params)
    elif inversion.image_size != (picture.height, picture.width):
        raise InputError(f"The given inversion is of a {inversion.image_size[1]}x{inversion.image_size[0]} image, "
                         f"not this {picture.width}x{picture.height} one. Invert this image instead.")
    result = edit(host, inversion, specs, params.guidance_params())
    outputs = []
    for k, intervention in enumerate(checked):
        latent = result.latents[k:k + 1]
        pixels = host.decode_latents(latent)[0]  # one at a time: full-size VAE decodes are memory hungry
        masks = {c.concept_id: m for c, m in zip(concepts[k], result.masks[k])}
        outputs.append(CounterfactualResult(to_pil(pixels), latent, masks, inversion, concepts[k], intervention,
                                            source, picture))
    return outputs


def counterfactual(host: DiffusionHost, image: Image.Image | str | Path, graph: CausalGraph,
                   intervention: Intervention, *, source_prompt: str | None = None,
                   params: CSGParams = CSGParams(), inversion: Inversion | None = None) -> CounterfactualResult:
    """The counterfactual image of ``image`` under ``intervention``.

    Args:
        host: the diffusion model, e.g. ``DiffusersSDXLHost.from_pretrained(...)``.
        image: the factual image, a PIL image or a path.
        graph: the image's causal graph.
        intervention: the intervention, checked against ``graph`` first.
        source_prompt: the inversion's prompt; None uses ``graph.scene_summary``.
        params: the settings (paper defaults).
        inversion: an earlier result's ``inversion`` of the same image and settings, to skip abduction.

    Returns:
        The ``CounterfactualResult``.

    Raises:
        InputError: as ``counterfactuals``.
        GraphError: as ``counterfactuals``.
    """
    return counterfactuals(host, image, graph, [intervention], source_prompt=source_prompt, params=params,
                           inversion=inversion)[0]


def baseline_counterfactuals(host: DiffusionHost, image: Image.Image | str | Path,
                             interventions: Sequence[Intervention],
                             *, method: Method = "ddpm", source_prompt: str = "", params: CSGParams = CSGParams(),
                             guidance_scale: float = DEFAULT_TARGET_GUIDANCE) -> list[BaselineResult]:
    """Table 1's baselines: invert once with ``method``, then sample each intervention with CFG on its full prompt.

    Args:
        host: the diffusion model.
        image: the factual image, a PIL image or a path.
        interventions: each one's ``generation_prompt`` (the scene with the changed values) is its target prompt.
        method: "ddpm" (edit-friendly DDPM inversion) or "ddim".
        source_prompt: the inversion's prompt.
        params: only its steps, skip, source guidance, seed and image fitting are used.
        guidance_scale: the target prompt's CFG scale.

    Returns:
        One ``BaselineResult`` per intervention, in order.

    Raises:
        InputError: an intervention has no generation_prompt, or an image or setting is unusable.
    """
    targets = [intervention.generation_prompt.strip() for intervention in interventions]
    for intervention, target in zip(interventions, targets):
        if not target:
            raise InputError(f"Intervention '{intervention.id}' has no generation_prompt; the baselines guide with the "
                             "full target prompt. Write one (the source caption with the changed values).")
    check_guidance_scale(guidance_scale)  # before the inversion, not after it
    picture = prepare_image(host, image, params)
    x0 = host.encode_image(image_to_tensor(picture).to(host.device))
    inversion = invert_baseline(host, method, x0, source_prompt, num_steps=params.num_steps, skip=params.skip,
                                source_guidance=params.source_guidance, seed=params.seed)
    results = []
    for target in targets:
        latent = sample_with_guidance(host, inversion, target, guidance_scale)
        results.append(BaselineResult(to_pil(host.decode_latents(latent)[0]), latent, inversion, target, picture))
    return results


def baseline_counterfactual(host: DiffusionHost, image: Image.Image | str | Path, intervention: Intervention, *,
                            method: Method = "ddpm", source_prompt: str = "", params: CSGParams = CSGParams(),
                            guidance_scale: float = DEFAULT_TARGET_GUIDANCE) -> BaselineResult:
    """One baseline counterfactual: ``baseline_counterfactuals`` for a single intervention.

    Args:
        host: the diffusion model.
        image: the factual image, a PIL image or a path.
        intervention: its ``generation_prompt`` (the scene with the changed values) is the target prompt.
        method: "ddpm" (edit-friendly DDPM inversion) or "ddim".
        source_prompt: the inversion's prompt.
        params: only its steps, skip, source guidance, seed and image fitting are used.
        guidance_scale: the target prompt's CFG scale.

    Returns:
        The ``BaselineResult``.

    Raises:
        InputError: the intervention has no generation_prompt, or an image or setting is unusable.
    """
    return baseline_counterfactuals(host, image, [intervention], method=method, source_prompt=source_prompt,
                                    params=params, guidance_scale=guidance_scale)[0]


__all__ = ["CSGParams", "CounterfactualResult", "BaselineResult", "counterfactual", "counterfactuals",
           "baseline_counterfactual", "baseline_counterfactuals", "load_image", "fit_to_model", "prepare_image",
           "edit_spec"]
