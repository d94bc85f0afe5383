"""The cross-attention probabilities CSG's masks (M1) are made of, computed once for every host.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

A host routes the query and key rows it wants captured to ``selected_attention`` from the
cross-attention layers at ``ATTENTION_LEVEL`` (latent/4) in the down and up blocks; it sums the
results over those layers and divides by the number of layers that saw each row. The host keeps
its own attention kernel (SDPA, ComfyUI's attention) for the layer's output: only the few
requested rows pay for an explicit softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ATTENTION_LEVEL = 4  # CSG's cross-attention maps come from the layers at latent/4 resolution


def token_selector(token_columns: Sequence[Sequence[int]], key_length: int, device: torch.device) -> torch.Tensor:
    """(R, key_length) float32, 1 at each row's token columns: a prompt's real tokens, never start,
    end-of-text or padding (an ``AttentionRequest``'s ``token_columns``)."""
    selector = torch.zeros(len(token_columns), key_length)
    for row, columns in enumerate(token_columns):
        selector[row, list(columns)] = 1.0
    return selector.to(device)


def selected_attention(q: torch.Tensor, k: torch.Tensor, heads: int, selector: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """Head-averaged probability that each query attends to its row's selected tokens, (R, Q) float32.

    ``q`` (R, Q, heads * d) and ``k`` (R, L, heads * d) are the projected query and key of the
    captured rows, heads side by side as both hosts' attention layers produce them; ``selector`` is
    (R, L) from ``token_selector``. The softmax runs over all L columns (padding included, as in the
    layer itself); only the selected ones are summed. ``scale`` defaults to 1 / sqrt(d).
    """
    split = lambda x: x.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  (R, heads, *, d)
    query, key = split(q), split(k)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1)  # (R, heads, Q, L)
    return torch.einsum("rhql,rl->rq", probs, selector) / heads


def attention_map_size(latent_height: int, latent_width: int) -> tuple[int, int]:
    """The (h, w) of the captured maps for a latent of this size."""
    return latent_height // ATTENTION_LEVEL, latent_width // ATTENTION_LEVEL
