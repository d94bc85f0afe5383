"""Every score of one counterfactual, computed the same way by ``csg-evaluate`` and
``csg-counterfactual --metrics`` (definitions in ``csg.metrics``)."""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image

from ..graph import CausalGraph, Intervention
from ..metrics import (
    LPIPS,
    causal_consistency_score,
    effectiveness_score,
    lpips_distance,
    masked_lpips_distance,
    preservation_score,
)


def edit_region(masks: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
    """The union of a CSG result's concept masks at image ``size`` (W, H); None without masks."""
    if not masks:
        return None
    union = torch.stack(list(masks.values())).amax(dim=0).float()
    return torch.nn.functional.interpolate(union[None, None], size=size[::-1], mode="nearest")[0, 0].clamp(0, 1)


def image_scores(lpips: LPIPS, source: Image.Image, image: Image.Image, region: torch.Tensor | None) -> dict[str, Any]:
    """LPIPS(VGG) to the source, and LPIPS outside the edit region (None without one)."""
    return {"lpips": float(lpips_distance(lpips, source, image)[0]),
            "masked_lpips": None if region is None else masked_lpips_distance(lpips, source, image, region)}


def judge_scores(vlm: Any, image: Image.Image, intervention: Intervention, graph: CausalGraph) -> dict[str, Any]:
    """The judge's two questions about one counterfactual (the changed concepts; the non-descendants),
    the scores they give, and the judgements themselves."""
    from ..vlm import judge_counterfactual, judge_preservation

    started = time.monotonic()
    effect = judge_counterfactual(vlm, image, intervention, graph)
    kept = judge_preservation(vlm, image, intervention, graph)
    is_target = [c.is_target for c in intervention.edit_concepts(graph)]
    return {"vlm_effectiveness": effectiveness_score(effect), "verdict": effect.verdict,
            "causal_consistency": causal_consistency_score(effect, is_target),
            "preservation": None if kept is None else preservation_score(kept),
            "judgement": effect.to_dict(), "preservation_judgement": None if kept is None else kept.to_dict(),
            "judge_seconds": time.monotonic() - started}
