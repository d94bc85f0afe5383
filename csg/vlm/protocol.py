"""What every VLM backend offers, and how images are prepared before any backend sees them.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

from ..errors import InputError
from ..images import to_rgb
from .schemas import Schema

MAX_IMAGE_SIDE = 1536  # larger images only cost tokens; the Qwen-VL processors shrink them anyway


@dataclass(frozen=True)
class Turn:
    """One message of the conversation after the system prompt. Images go with the first user turn."""

    role: Literal["user", "assistant"]
    text: str


@runtime_checkable
class VLM(Protocol):
    """A vision-language model that answers a conversation about some images with text.

    ``identity`` names the backend kind and model (e.g. ``"openai:http://host:8000/v1:qwen3-vl"``);
    it keys the answer cache, so it must change when the model does and never contain a secret.
    A cache adds the optional ``forget`` and ``remember`` that ``ask_until_valid`` calls.

    ``schema`` is the JSON Schema the stage's answer must fit (``csg.vlm.schemas``), or None for free
    text. A backend that can constrain its decoding holds the answer to it; one that cannot ignores it
    (the stage parses and re-asks either way). ``structured`` (optional) names how the backend does it,
    one of ``schemas.STRUCTURED_MODES``; the answer cache keys on it.
    """

    @property
    def identity(self) -> str: ...

    def generate(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
                 temperature: float, max_tokens: int, schema: Schema | None = None) -> str: ...


def image_for_vlm(image: Image.Image, max_side: int | None = MAX_IMAGE_SIDE) -> Image.Image:
    """An RGB copy (``csg.images.to_rgb``: transparency on white), no side above ``max_side``."""
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image for the VLM, got {type(image).__name__}. Load it with PIL.Image.open.")
    image = to_rgb(image)
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def image_fingerprint(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels: equal pictures hash equal whatever file they came from."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
