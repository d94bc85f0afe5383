"""Pictures into RGB: the one conversion every path of the pack uses.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

The transparency policy, the same for the edits (CSG, the baselines, the inversion node), the VLM
stages, LPIPS and every node: transparent pixels are composited onto white, as an image viewer
shows them, and the alpha channel is then dropped. A fully opaque alpha changes nothing. Grey
becomes RGB by repeating its channel. PIL's 16-bit, 32-bit integer and float modes are scaled to
8 bits first (``eight_bit``), where ``Image.convert`` would clip them to white.

    to_rgb(picture) -> PIL RGB                     any PIL mode (L, LA, P, RGBA, I;16, F, CMYK, ...)
    rgb_channels(pixels, dim) -> tensor            1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA) channels at dim
    image_to_tensor(image) -> (1, 3, H, W)         one PIL image or float tensor in [0, 1], for the VAE
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import InputError

BACKGROUND = 255  # white, in 8 bits; 1.0 in float pixels


def eight_bit(image: Image.Image) -> Image.Image:
    """An image of PIL's 16-bit, 32-bit integer or float modes scaled to 8-bit grey ("L"), which ``convert``
    would clip instead: 16-bit by 65535, float from [0, 1], 32-bit integers by 65535 when they fit in 16 bits
    (how some Pillow versions decode 16-bit PNGs) and by 2**31 - 1 otherwise. Other modes pass unchanged."""
    if image.mode.startswith("I;16"):
        full = 65535
    elif image.mode == "I":
        full = 65535 if image.getextrema()[1] <= 65535 else 2**31 - 1
    elif image.mode == "F":
        full = 1.0
    else:
        return image
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64) / full, nan=0.0)
    return Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))


def has_alpha(image: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA, ...) or a palette with a transparent entry."""
    return "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB picture of any PIL image, transparency composited onto white.

    Raises:
        InputError: not a PIL image, or one PIL cannot decode or convert to RGB.
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}. Load it with PIL.Image.open.")
    try:
        image = eight_bit(image)
        if has_alpha(image):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (BACKGROUND,) * 4)
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as exc:  # a lazily decoded file, a mode with no RGB
        raise InputError(f"The image (mode {image.mode}) cannot be converted to RGB ({type(exc).__name__}: {exc}). "
                         "Save it as an 8-bit RGB PNG or JPEG.") from exc


def rgb_channels(pixels: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """RGB float pixels in [0, 1] from 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA) channels at ``dim``
    (-3 for channels first, -1 for ComfyUI's channels last), transparency composited onto white.

    Raises:
        InputError: another number of channels.
    """
    channels = pixels.shape[dim]
    if channels not in (1, 2, 3, 4):
        raise InputError(f"Expected 1 (grey), 2 (grey and alpha), 3 (RGB) or 4 (RGBA) channels at dimension {dim}, "
                         f"got shape {tuple(pixels.shape)}.")
    if channels in (2, 4):
        color, alpha = pixels.split([channels - 1, 1], dim=dim)
        pixels = color * alpha + (1.0 - alpha)  # over white
    if pixels.shape[dim] == 1:
        shape = list(pixels.shape)
        shape[dim] = 3
        pixels = pixels.expand(shape)
    return pixels


def image_to_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) float32 RGB in [0, 1] from a PIL image or a (C, H, W) / (1, C, H, W) tensor in [0, 1].

    Raises:
        InputError: neither, a batch of several images, or pixel values outside [0, 1].
    """
    if isinstance(image, Image.Image):
        pixels = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
    if not isinstance(image, torch.Tensor):
        raise InputError(f"Expected a PIL image or a torch tensor, got {type(image).__name__}.")
    pixels = image.float()
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise InputError(f"Expected one image shaped (C, H, W) or (1, C, H, W), got {tuple(image.shape)}.")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0.0 or high > 1.0:
        raise InputError(f"Pixel values must lie in [0, 1]; got [{low:.3g}, {high:.3g}]. Rescale the image.")
    return rgb_channels(pixels).contiguous()
