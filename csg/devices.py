"""The device and dtype a model runs in: one choice for SDXL (the CLI, ``csg-evaluate``) and the VLM.

"auto" picks the accelerator, else the CPU. The "auto" dtype is the precision the model ships in where
the device has it: SDXL's fp16 weights on CUDA (its VAE decodes in bf16 or fp32, ``sdxl_vae_dtype``),
Qwen-VL's bf16 on CUDA (fp16 on GPUs without bf16, and on Apple's MPS); fp32 everywhere else.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .errors import InputError

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_device(name: Any = "auto") -> torch.device:
    """``name`` (auto, cpu, cuda, cuda:N, mps or a ``torch.device``) as a device this PyTorch can use."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"Unknown device {name!r}. Use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this PyTorch build sees no CUDA GPU. Use --device cpu (slow) or install "
                         "the CUDA build of torch.")
    return device


def auto_dtype(device: torch.device, model: Literal["sdxl", "vlm"]) -> torch.dtype:
    if device.type == "cuda":
        if model == "vlm" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return torch.float16 if device.type == "mps" and model == "vlm" else torch.float32


def resolve_device_dtype(device: Any = "auto", dtype: Any = "auto",
                         model: Literal["sdxl", "vlm"] = "sdxl") -> tuple[torch.device, torch.dtype]:
    """The device and dtype asked for; "auto" (or None) as the module docstring says. ``dtype`` is a
    ``torch.dtype`` or its name (bfloat16, float16, float32, or bf16, fp16, fp32)."""
    device = resolve_device(device)
    if dtype is None or dtype == "auto":
        return device, auto_dtype(device, model)
    given = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, DTYPE_NAMES.get(dtype, dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"Unknown dtype {given!r}; use 'auto', 'bfloat16', 'float16' or 'float32'.")
    return device, dtype
