"""Evaluation metrics of the paper: LPIPS(VGG16) for minimality and VLM effectiveness.

LPIPS (Zhang et al., 2018, v0.1) compares two images through five ReLU taps of an ImageNet VGG16
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3). Each tap is unit-normalised over channels, the
squared difference is weighted per channel by a learned non-negative 1x1 convolution (the
"linear head"), averaged over space, and the five layers are summed:

    d(x, y) = Σ_l mean_hw( w_l · (f̂_l(x) − f̂_l(y))² ),   f̂ = f / (‖f‖_channels + 1e-10)

Inputs are first mapped to [-1, 1] and shifted/scaled per channel by LPIPS's constants.

No weights are ever downloaded. VGG16 comes from torchvision's ImageNet checkpoint and the heads
from the ``lpips`` package; both are looked for at user-given paths or under TORCH_HOME, and a
missing one raises WeightsMissingError saying exactly what to put where. torchvision itself is
not needed: its ``vgg16().features`` stack is rebuilt here with the same layer indices, so its
state dict loads unchanged.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import InputError, WeightsMissingError
from .images import rgb_channels, to_rgb

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_HEADS_FILE = "lpips_vgg_v0.1.pth"  # a copy of lpips/weights/v0.1/vgg.pth from the lpips package

# torchvision's VGG16 "D" configuration: channel counts, "M" for a 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices in ``features`` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 16  # four 2x2 pools happen before relu5_3, so each side needs at least 16 pixels


# -- the network --------------------------------------------------------------------------------------

def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional stack, randomly initialised, indexed exactly like torchvision's."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in VGG16_CONFIG:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, entry, kernel_size=3, padding=1), nn.ReLU()]
            channels = entry
    return nn.Sequential(*layers)


def lpips_heads() -> nn.ModuleList:
    """The five linear heads, randomly initialised: one 1x1 convolution per tap, no bias."""
    return nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)


class LPIPS(nn.Module):
    """LPIPS v0.1 over a VGG16 backbone. ``forward`` takes (N, 3, H, W) images in [-1, 1]."""

    def __init__(self, features: nn.Sequential, heads: nn.ModuleList):
        super().__init__()
        if len(features) <= LPIPS_TAPS[-1] or len(heads) != len(LPIPS_TAPS):
            raise InputError("LPIPS needs VGG16's features stack (see vgg16_features()) and five heads "
                             "(see lpips_heads()).")
        self.features = features
        self.heads = heads
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalised feature maps of ``x``."""
        h = (x - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features[: LPIPS_TAPS[-1] + 1]):
            h = layer(h)
            if index in LPIPS_TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_layer = [head((fx - fy).pow(2)).mean(dim=(1, 2, 3))
                     for head, fx, fy in zip(self.heads, self.taps(x), self.taps(y))]
        return torch.stack(per_layer).sum(dim=0)


# -- finding and loading weights ------------------------------------------------------------------------

def weights_dir() -> Path:
    """Where torch keeps downloaded checkpoints: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _installed_lpips_heads() -> Path | None:
    """The heads shipped inside an installed ``lpips`` package, found without importing it
    (importing it would import torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


def _find(given: str | Path | None, candidates: Iterable[Path | None]) -> Path | None:
    if given is not None:
        path = Path(given).expanduser()
        return path if path.is_file() else None
    return next((p for p in candidates if p is not None and p.is_file()), None)


def _missing_message(vgg_missing: bool, heads_missing: bool, vgg_given: Any, heads_given: Any) -> str:
    home = weights_dir()
    parts = ["LPIPS(VGG) needs pretrained weights that this pack never downloads."]
    if vgg_missing:
        where = (f"No file at vgg_weights={str(vgg_given)!r}." if vgg_given is not None
                 else f"Not found at {home / VGG16_FILE}.")
        parts.append(f"VGG16 backbone: {where} Get torchvision's ImageNet VGG16 checkpoint {VGG16_FILE} ({VGG16_URL}) "
                     f"and put it at {home / VGG16_FILE}, or pass its path as vgg_weights.")
    if heads_missing:
        where = (f"No file at lpips_weights={str(heads_given)!r}." if heads_given is not None
                 else f"Not found at {home / LPIPS_HEADS_FILE}.")
        parts.append(f"LPIPS linear heads: {where} Copy lpips/weights/v0.1/vgg.pth from the 'lpips' PyPI package "
                     f"(github.com/richzhang/PerceptualSimilarity) to {home / LPIPS_HEADS_FILE}, "
                     "or pass its path as lpips_weights.")
    return " ".join(parts)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets the same clear answer
        raise InputError(f"Could not read weights from {path}: {exc}. "
                         "Give a PyTorch (.pth) or .safetensors state dict.") from None
    if not isinstance(state, Mapping):
        raise InputError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return dict(state)


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        details = " ".join(line.strip() for line in str(exc).splitlines()[1:3])  # line 0 only names the class
        raise InputError(f"{path} is not {what}: {details[:400]}") from None


def _vgg_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a full torchvision VGG16 state dict (``features.N.*`` and ``classifier.*``) or its
    ``features`` part alone."""
    if any(k.startswith("features.") for k in state):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return dict(state)


def _heads_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lpips package names its heads ``lin{k}.model.1.weight`` (its index 0 is a dropout);
    here they are ``{k}.weight``."""
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
        renamed[f"{match.group(1)}.weight" if match else key] = value
    return renamed


def load_lpips_vgg(vgg_weights: str | Path | None = None, lpips_weights: str | Path | None = None, *,
                   device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS(VGG16) from local weight files (nothing is downloaded).

    Args:
        vgg_weights: torchvision's VGG16 state dict (default: ``weights_dir()/vgg16-397923af.pth``).
        lpips_weights: the LPIPS v0.1 VGG heads (default: ``weights_dir()/lpips_vgg_v0.1.pth``, then
            the copy inside an installed ``lpips`` package).
        device: where the model runs.

    Returns:
        The LPIPS model, in eval mode.

    Raises:
        WeightsMissingError: a weight file is missing (the message names each and where to put it).
        InputError: a file does not hold the expected weights.
    """
    vgg_path = _find(vgg_weights, [weights_dir() / VGG16_FILE])
    heads_path = _find(lpips_weights, [weights_dir() / LPIPS_HEADS_FILE, _installed_lpips_heads()])
    if vgg_path is None or heads_path is None:
        raise WeightsMissingError(_missing_message(vgg_path is None, heads_path is None, vgg_weights, lpips_weights))
    features, heads = vgg16_features(), lpips_heads()
    _load_into(features, _vgg_state(_read_state_dict(vgg_path)), vgg_path, "a torchvision VGG16 state dict")
    _load_into(heads, _heads_state(_read_state_dict(heads_path)), heads_path, "an LPIPS v0.1 VGG heads file")
    return LPIPS(features, heads).to(device)


# -- images in, distances out --------------------------------------------------------------------------

def _as_batch(images: Any, name: str) -> torch.Tensor:
    """PIL image(s) or a float tensor (C, H, W) / (N, C, H, W) in [0, 1] → (N, 3, H, W) float32 RGB, converted
    as every path converts (``csg.images``: grey to RGB, transparency onto white)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, Sequence) and images and all(isinstance(i, Image.Image) for i in images):
        arrays = [np.asarray(to_rgb(i), dtype=np.float32) / 255.0 for i in images]
        if len({a.shape for a in arrays}) > 1:
            raise InputError(f"{name}: the images have different sizes {[a.shape[1::-1] for a in arrays]}; "
                             "resize them to one size.")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a PIL image, a list of them, or a torch tensor; got {type(images).__name__}.")
    x = images.detach().float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 2, 3, 4):
        raise InputError(f"{name} must have shape (N, C, H, W) or (C, H, W) with C = 1 to 4 (grey, grey and alpha, "
                         f"RGB, RGBA), got {tuple(images.shape)}. "
                         "Channels-last images (N, H, W, 3) need .permute(0, 3, 1, 2) first.")
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise InputError(f"{name} must hold values in [0, 1], got [{x.min():.3g}, {x.max():.3g}]. "
                         "Divide 8-bit images by 255; map [-1, 1] images with (x + 1) / 2.")
    return rgb_channels(x)


@torch.inference_mode()
def lpips_distance(model: LPIPS, image_a: Any, image_b: Any) -> torch.Tensor:
    """LPIPS between two images or batches, one value per pair (lower is closer).

    Args:
        model: from ``load_lpips_vgg``.
        image_a: PIL image(s) or an (N, 3, H, W) tensor in [0, 1].
        image_b: the same; batches pair up row by row, and a single image is compared with every
            image of the other batch.

    Returns:
        (N,) distances.

    Raises:
        InputError: the images are not images, their sizes differ, or the batch sizes do not pair up.
    """
    a, b = _as_batch(image_a, "image_a"), _as_batch(image_b, "image_b")
    if a.shape[2:] != b.shape[2:]:
        raise InputError(f"LPIPS compares images of one size, got {tuple(a.shape[2:])} and {tuple(b.shape[2:])} "
                         "(H, W). Resize one to the other's size first.")
    if min(a.shape[2:]) < MIN_SIDE:
        raise InputError(f"LPIPS(VGG) needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got {tuple(a.shape[2:])}.")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise InputError(f"Batches of {a.shape[0]} and {b.shape[0]} images cannot be paired; "
                         "give equal sizes or one image.")
    a, b = torch.broadcast_tensors(a, b)
    parameter = next(model.parameters())
    to_model = dict(device=parameter.device, dtype=parameter.dtype)
    return model(a.to(**to_model) * 2 - 1, b.to(**to_model) * 2 - 1).float().cpu()


# -- VLM effectiveness ----------------------------------------------------------------------------------

VERDICTS = ("success", "partial", "failure")
VERDICT_SCORE = {"success": 1.0, "partial": 0.5, "failure": 0.0}  # the score of an empty checklist


@dataclass(frozen=True)
class ConceptCheck:
    concept_name: str
    expected_value: str
    present: bool


@dataclass(frozen=True)
class Judgement:
    """The VLM judge's answer about one counterfactual (``csg.vlm.judge_counterfactual``, or
    ``judge_preservation`` for what must not change): per checklist item whether the image shows it,
    and a verdict. Every score of the pack reads judgements as this type (``read_judgement``)."""

    intervention_id: str
    concept_checks: tuple[ConceptCheck, ...]
    verdict: str  # success | partial | failure
    reasoning: str = ""

    @property
    def score(self) -> float:
        """The share of checklist items present. The one rule for an empty checklist (the judge never asks
        one, a hand-written judgement may hold one): the verdict decides, success 1, partial 0.5, failure 0."""
        if not self.concept_checks:
            return VERDICT_SCORE[self.verdict]
        return sum(c.present for c in self.concept_checks) / len(self.concept_checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "intervention_id": self.intervention_id,
            "concept_checks": [{"concept_name": c.concept_name, "expected_value": c.expected_value,
                                "present": "yes" if c.present else "no"} for c in self.concept_checks],
            "verdict": self.verdict,
            "reasoning": self.reasoning,
            "score": self.score,
        }


def _field(item: Any, *names: str) -> Any:
    for name in names:
        value = item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
        if value is not None:
            return value
    return None


def _yes_no(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower() == "yes"
    raise InputError(f"{where}: 'present' must be yes or no, got {value!r}.")


def read_judgement(item: Any, index: int = 0) -> Judgement:
    """A ``Judgement`` from a dict in the judge's JSON shape (``Judgement.to_dict``, or the paper's) or an object
    with the same fields; ``index`` numbers it in errors. The checklist is under ``concept_checks`` or ``checks``,
    each item with ``present`` = yes/no (or a bool).

    Raises:
        InputError: the verdict, the checklist or an answer is malformed.
    """
    if isinstance(item, Judgement):
        return item
    where = f"judgement {index}"
    verdict = _field(item, "verdict")
    verdict = verdict.value if hasattr(verdict, "value") else verdict  # an Enum member reads as its value
    if not isinstance(verdict, str) or verdict.strip().lower() not in VERDICTS:
        raise InputError(f"{where}: 'verdict' must be one of {', '.join(VERDICTS)}, got {verdict!r}.")
    checks = _field(item, "concept_checks", "checks")
    if checks is None:
        checks = ()
    if isinstance(checks, (str, bytes)) or not isinstance(checks, Iterable):
        raise InputError(f"{where}: the checklist must be a list of checks, got {type(checks).__name__}.")
    read = tuple(ConceptCheck(str(_field(check, "concept_name") or ""), str(_field(check, "expected_value") or ""),
                              _yes_no(_field(check, "present"), f"{where}, check {k}"))
                 for k, check in enumerate(checks))
    reasoning = _field(item, "reasoning")
    return Judgement(str(_field(item, "intervention_id") or ""), read, verdict.strip().lower(),
                     reasoning if isinstance(reasoning, str) else "")


def _read_judgements(judgements: Iterable[Any]) -> list[Judgement]:
    read = [read_judgement(item, i) for i, item in enumerate(judgements)]
    if not read:
        raise InputError("There are no judgements to aggregate; run the VLM judge on at least one counterfactual.")
    return read


def vlm_effectiveness(judgements: Iterable[Any]) -> float:
    """VLM-Eff: the mean ``Judgement.score`` over judged counterfactuals, each the fraction of its checklist
    items present (an empty checklist scores its verdict).

    Args:
        judgements: ``Judgement``s, or dicts or objects ``read_judgement`` reads.

    Returns:
        VLM-Eff in [0, 1].

    Raises:
        InputError: there are no judgements, or one is malformed.
    """
    scores = [j.score for j in _read_judgements(judgements)]
    return sum(scores) / len(scores)


def verdict_rates(judgements: Iterable[Any]) -> dict[str, float]:
    """The share of judgements with each verdict; ``rates["success"]`` is the success rate."""
    read = _read_judgements(judgements)
    return {v: sum(j.verdict == v for j in read) / len(read) for v in VERDICTS}


# -- per-counterfactual scores of the evaluation runner (csg.evaluation) -------------------------------

def effectiveness_score(judgement: Any) -> float:
    """One counterfactual's VLM-Eff: the ``Judgement.score`` of its checklist (the changed concepts' new
    values)."""
    return read_judgement(judgement).score


def preservation_score(judgement: Any) -> float:
    """Preservation: the share of the non-descendants of the target that kept their value.

    ``judgement`` is the judge's answer to a checklist of every non-descendant with its *current*
    value (``csg.vlm.judge_preservation``, which asks nothing when the target has no non-descendants);
    its ``Judgement.score``.
    """
    return read_judgement(judgement).score


def causal_consistency_score(judgement: Any, is_target: Sequence[bool]) -> float | None:
    """Causal consistency: the share of the changed descendants the counterfactual shows.

    ``judgement`` is the VLM-Eff judgement, whose checklist follows ``Intervention.edit_concepts``;
    ``is_target[k]`` says whether its k-th item is the intervened concept. None when the
    intervention changes no descendant.
    """
    checks = read_judgement(judgement).concept_checks
    if len(checks) != len(is_target):
        raise InputError(f"The judgement has {len(checks)} checklist items but {len(is_target)} edit concepts "
                         "were given; pass the intervention's edit_concepts in the judge's order.")
    shown = [check.present for check, target in zip(checks, is_target) if not target]
    return sum(shown) / len(shown) if shown else None


@torch.inference_mode()
def masked_lpips_distance(model: LPIPS, image_a: Any, image_b: Any, mask: torch.Tensor) -> float | None:
    """LPIPS(VGG) outside ``mask``: the edit's damage to what it was not meant to touch.

    ``mask`` is (H, W) (or any size, resized by area) with 1 where an edit was meant to happen
    (the union of the edited concepts' masks). Each LPIPS layer's per-pixel distance is averaged
    with weight 1 − mask at that layer's resolution, and the five layers are summed, so with an
    all-zero mask this equals ``lpips_distance``. None when the mask covers the whole image.
    """
    a, b = _as_batch(image_a, "image_a"), _as_batch(image_b, "image_b")
    if a.shape != b.shape or a.shape[0] != 1:
        raise InputError("masked LPIPS compares two single images of one size, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}.")
    if min(a.shape[2:]) < MIN_SIDE:
        raise InputError(f"LPIPS(VGG) needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got {tuple(a.shape[2:])}.")
    if mask.dim() != 2:
        raise InputError(f"The mask must be (H, W), got {tuple(mask.shape)}.")
    parameter = next(model.parameters())
    to_model = dict(device=parameter.device, dtype=parameter.dtype)
    keep = 1.0 - mask.detach().float().clamp(0, 1)[None, None].to(**to_model)
    total = torch.zeros((), **to_model)
    for head, fa, fb in zip(model.heads, model.taps(a.to(**to_model) * 2 - 1), model.taps(b.to(**to_model) * 2 - 1)):
        weight = torch.nn.functional.interpolate(keep, size=fa.shape[2:], mode="area")
        if weight.sum() <= 0:
            return None
        total = total + (head((fa - fb).pow(2)) * weight).sum() / weight.sum()
    return float(total)
