"""What the counterfactual core needs from a model host, and nothing more.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

The core works in discrete-time variance-preserving terms: integer timesteps t of the training
schedule, alpha-bar_t = ``alphas_cumprod[t]``, x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) n,
and epsilon prediction. A host that works in sigma space (ComfyUI's k-diffusion view) converts at
its own boundary, so the sampler math exists once.

Two hosts implement this: ``csg.diffusers_host.DiffusersSDXLHost`` and the ComfyUI host in
``nodes/``. Both keep SDPA attention and compute explicit softmax probabilities only for the
cross-attention layers and token columns an ``AttentionRequest`` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class AttentionRequest:
    """Cross-attention probabilities to capture during one noise prediction.

    ``token_columns[i]`` lists the token positions whose probabilities are summed for batch row
    ``rows[i]``; the host returns one map per entry, in this order. Only a prompt's real tokens
    belong here, never start, end-of-text or padding tokens.
    """

    rows: tuple[int, ...]
    token_columns: tuple[tuple[int, ...], ...]


@runtime_checkable
class DiffusionHost(Protocol):
    """A text-conditioned epsilon-prediction latent diffusion model (SDXL)."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32, on ``device``
    vae_scale_factor: int  # image pixels per latent pixel
    latent_multiple: int  # latent sides must be divisible by this for the UNet
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> object:
        """Conditioning for a batch of rows, one per prompt; "" is the unconditional row.

        The result is opaque to the core: it is only passed back to ``predict_noise``. A prompt's row
        must not depend on the other prompts of the batch (encode each distinct prompt on its own):
        exact mode gives back x0 only when an edit's source row is the inversion's, bit for bit.
        """

    def token_indices(self, prompt: str) -> list[int]:
        """Positions of the prompt's real tokens in its encoded sequence.

        Raises ``csg.errors.InputError`` when the tokenizer would truncate the prompt.
        """

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        conditioning: object,
        attention: AttentionRequest | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 epsilon for every row of ``latents`` (B, C, h, w) at ``timestep``.

        ``timestep`` is a Python int or a 0-dim integer tensor on ``device`` (the latter avoids a
        host-to-device copy per step). ``conditioning`` comes from ``encode_prompts`` with B rows.
        Size-dependent conditioning (SDXL's micro-conditioning: original and target size (H, W),
        crop (0, 0)) is derived from the latent shape.

        With ``attention``, also returns float32 maps of shape (len(attention.rows), h/4, w/4): the
        softmax probabilities of the requested columns, summed over those columns and averaged
        over heads and over the cross-attention layers at latent/4 resolution in the down and up
        blocks (the mid block excluded). Everything stays on the device: no host syncs.
        """

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] to scaled latents (B, C, H/f, W/f)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to (B, 3, H, W) RGB in [0, 1]."""
