"""The counterfactual benchmark's axes beyond the paper: composition, reversibility and minimality.

From Melistas et al. 2024 ("Benchmarking counterfactual image generation") and the work FM-CGM cites:

* **composition**: the null intervention. A method asked to change nothing should give back the
  original; LPIPS(original, reconstruction) is reported beside LPIPS(original, VAE round trip), the
  floor every latent method sits on. ``excess`` is what the method adds above that floor.
* **reversibility**: edit with do(C_i = c'), then edit the result with the inverse intervention
  (every changed concept set back to its value before), and measure LPIPS to the original.
* **minimality (VLM judge)**: shown the original and the counterfactual, does the VLM see anything
  differ other than the changed concepts? The score is 1 when nothing else differs, else 0.

A *method* here is any callable ``(image, graph, intervention) -> image``, so CSG, its baselines and
instruction editors are scored alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from .abduction import image_to_tensor, invert
from .graph import CausalGraph, Intervention, PropagatedChange, check_intervention
from .host import DiffusionHost
from .metrics import LPIPS, lpips_distance
from .prediction import reconstruct
from .vlm.asking import DEFAULT_ATTEMPTS, ask_until_valid
from .vlm.parsing import VLMOutputError, extract_json_object
from .vlm.prompts import JSON_ONLY, Stage
from .vlm.protocol import VLM

Method = Callable[[Image.Image, CausalGraph, Intervention], Image.Image]


# -- composition ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Composition:
    lpips: float  # LPIPS(original, the method's reconstruction)
    floor: float  # LPIPS(original, the VAE round trip)

    @property
    def excess(self) -> float:
        """What the method adds above the VAE's own loss (0 for a method that only round-trips the VAE). It can be
        negative: a method whose last step smooths the image may land nearer the original than the VAE does."""
        return self.lpips - self.floor


@torch.inference_mode()
def vae_round_trip(host: DiffusionHost, image: Image.Image | torch.Tensor) -> torch.Tensor:
    """decode(encode(image)) as (1, 3, H, W) in [0, 1]: the floor of every latent-space method."""
    pixels = image_to_tensor(image).to(host.device)
    return host.decode_latents(host.encode_image(pixels)).float().cpu()


@torch.inference_mode()
def csg_reconstruction(host: DiffusionHost, image: Image.Image | torch.Tensor, source_prompt: str = "",
                       **inversion_options: Any) -> torch.Tensor:
    """CSG under the null intervention: invert, then sample the stored chain with no edit term; (1, 3, H, W)."""
    inversion = invert(host, image, source_prompt, **inversion_options)
    return host.decode_latents(reconstruct(host, inversion)).float().cpu()


def composition(model: LPIPS, original: Any, reconstruction: Any, round_trip: Any) -> Composition:
    """The composition axis: LPIPS of the null intervention's output beside the VAE round trip's.

    Args:
        model: LPIPS, from ``csg.metrics.load_lpips_vgg``.
        original: the factual image (PIL or (1, 3, H, W) in [0, 1]).
        reconstruction: the method's output when asked to change nothing.
        round_trip: ``vae_round_trip`` of the original.
    """
    return Composition(float(lpips_distance(model, original, reconstruction)[0]),
                       float(lpips_distance(model, original, round_trip)[0]))


# -- reversibility ----------------------------------------------------------------------------------------

def counterfactual_graph(graph: CausalGraph, intervention: Intervention) -> CausalGraph:
    """The graph of the counterfactual world: the target and each changed descendant at its new value."""
    checked = check_intervention(graph, intervention)
    new = {checked.target_concept_id: checked.new_value} | {c.concept_id: c.new_value
                                                            for c in checked.propagated_changes}
    concepts = tuple(replace(c, current_value=new[c.id]) if c.id in new else c for c in graph.concepts)
    return replace(graph, concepts=concepts)


def inverse_intervention(graph: CausalGraph, intervention: Intervention) -> tuple[CausalGraph, Intervention]:
    """The counterfactual world's graph and the intervention that undoes ``intervention`` in it.

    The inverse sets the target back to its value before and sets each changed descendant back too, so
    a perfect method would return the original exactly.
    """
    checked = check_intervention(graph, intervention)
    world = counterfactual_graph(graph, checked)
    back = tuple(PropagatedChange(c.concept_id, c.concept_name, c.new_value, c.original_value,
                                  f"undoes {checked.id}") for c in checked.propagated_changes)
    states = {checked.target_concept_id: checked.original_value} | {c.concept_id: c.new_value for c in back}
    inverse = Intervention(f"{checked.id}_inverse", checked.target_concept_id, checked.target_concept_name,
                           f"Undo {checked.id}: set {checked.target_concept_name} back to {checked.original_value}.",
                           checked.new_value, checked.original_value, back, states)
    return world, check_intervention(world, inverse)


@dataclass(frozen=True)
class Reversibility:
    distance: float  # LPIPS(original, the edit of the edit back)
    edited: Image.Image
    restored: Image.Image


def reversibility(model: LPIPS, method: Method, image: Image.Image, graph: CausalGraph,
                  intervention: Intervention) -> Reversibility:
    """The reversibility axis: edit with ``intervention``, edit the result with its inverse, compare to ``image``.

    0 for a method that gives back its input unchanged; a method that edits and undoes perfectly scores
    its own round-trip loss twice over at most.
    """
    edited = method(image, graph, check_intervention(graph, intervention))
    world, inverse = inverse_intervention(graph, intervention)
    restored = method(edited, world, inverse)
    return Reversibility(float(lpips_distance(model, image, restored)[0]), edited, restored)


# -- minimality, judged by a VLM -------------------------------------------------------------------------

@dataclass(frozen=True)
class MinimalityJudgement:
    intervention_id: str
    other_changes: tuple[str, ...]  # what the VLM saw differ beyond the changed concepts
    reasoning: str = ""

    @property
    def score(self) -> float:
        """1 when nothing but the changed concepts differs, else 0."""
        return 0.0 if self.other_changes else 1.0


MINIMALITY = Stage(
    name="minimality judgement",
    system=("You compare two images: the first is the original, the second an edit of it. You are told which "
            "concepts the edit was meant to change. List every other visible difference between the two "
            "images (objects, colours, identity, layout, background, style), each in a few words; an empty "
            "list when nothing else differs. " + JSON_ONLY),
    temperature=0.1,
    max_tokens=1024,
)


def _minimality_user(graph: CausalGraph, intervention: Intervention) -> str:
    changed = "\n".join(f"- {term.concept_name}: now {term.prompt}" for term in intervention.edit_concepts(graph))
    return ("The edit was meant to change only these concepts:\n" + changed + "\n\n"
            'Answer {"other_changes": ["..."], "reasoning": "one sentence"}.')


def parse_minimality(intervention_id: str, answer: str) -> MinimalityJudgement:
    data: Mapping[str, Any] = extract_json_object(answer)
    changes = data.get("other_changes")
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        raise VLMOutputError('"other_changes" must be a list of short strings (empty when nothing else differs).')
    reasoning = data.get("reasoning")
    return MinimalityJudgement(intervention_id, tuple(c.strip() for c in changes if c.strip()),
                               reasoning.strip() if isinstance(reasoning, str) else "")


def judge_minimality(vlm: VLM, original: Image.Image, counterfactual: Image.Image, graph: CausalGraph,
                     intervention: Intervention, *, max_attempts: int = DEFAULT_ATTEMPTS) -> MinimalityJudgement:
    """Ask the VLM whether anything other than the intervention's changed concepts differs between the images.

    Raises:
        GraphError: the intervention does not fit the graph.
        VLMError: the backend failed.
        VLMOutputError: no valid answer within ``max_attempts``.
    """
    checked = check_intervention(graph, intervention)
    return ask_until_valid(vlm, MINIMALITY, _minimality_user(graph, checked), [original, counterfactual],
                           lambda answer: parse_minimality(checked.id, answer), max_attempts=max_attempts)
