"""What ``csg-counterfactual`` and ``csg-evaluate`` share: their flags, ``CSGParams`` from those flags, the
VLM and device they ask for, and their exit codes."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..devices import resolve_device_dtype
from ..errors import CSGError, GraphError, InputError, OutputError, WeightsMissingError
from ..weights import find_vlm

EXIT_USAGE = 2  # missing weights and bad input, like argparse's own usage errors
EXIT_FAILURE = 1  # the run itself failed (e.g. the VLM answered unusably)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
MAX_VLM_TIMEOUT, MAX_VLM_RETRIES = 3600.0, 10  # the ComfyUI server node's limits


def report_error(program: str, exc: CSGError) -> int:
    """Print one of our errors for the user and return its exit code."""
    print(f"{program}: {exc}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, (WeightsMissingError, InputError, GraphError, OutputError)) else EXIT_FAILURE


def seed_number(text: str) -> int:
    """An argparse type: a seed torch accepts (0 to 2**63 - 1), refused with a usage error (exit 2) otherwise."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0 to 2**63 - 1") from None
    return seed


# -- the flags -------------------------------------------------------------------------------------


def add_vlm_flags(group) -> None:
    group.add_argument("--vlm-model", metavar="PATH", help="local transformers model folder (Qwen3-VL)")
    group.add_argument("--vlm-url", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--vlm-name", metavar="NAME", help="the model name the server expects")
    group.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    group.add_argument("--vlm-cache", metavar="DIR", help="keep the VLM's answers here and reuse them on reruns")
    group.add_argument("--vlm-structured", default="auto", metavar="MODE",
                       help="hold each answer to its stage's JSON Schema while it is decoded: auto (the schema, else "
                            "a JSON object, else plain text, as the server allows; default), schema or json (only "
                            "that), off (plain text, repaired and re-asked)")
    group.add_argument("--vlm-timeout", type=float, metavar="SECONDS",
                       help=f"how long to wait for one answer of the --vlm-url server (default 300, at most "
                            f"{MAX_VLM_TIMEOUT:.0f})")
    group.add_argument("--vlm-retries", type=int, metavar="N",
                       help=f"extra tries after a refused connection, a timeout or a busy --vlm-url server (default "
                            f"2, at most {MAX_VLM_RETRIES})")


def add_sdxl_flags(group) -> None:
    group.add_argument("--sdxl", metavar="PATH", help="SDXL diffusers folder or single .safetensors checkpoint")
    group.add_argument("--sdxl-config", metavar="DIR", help="SDXL config+tokenizer folder for a single-file checkpoint")
    group.add_argument("--comfyui-root", metavar="DIR", help="ComfyUI folder to search models/ in (or COMFYUI_PATH)")


def add_lpips_flags(group) -> None:
    group.add_argument("--lpips-vgg", metavar="FILE",
                       help="torchvision's vgg16-397923af.pth (default: under TORCH_HOME)")
    group.add_argument("--lpips-heads", metavar="FILE", help="the lpips package's weights/v0.1/vgg.pth")


def add_edit_flags(group) -> None:
    """The CSG and baseline settings, the paper's defaults; both tools take the same ones."""
    group.add_argument("--steps", type=int, default=100)
    group.add_argument("--skip", type=float, default=0.15)
    group.add_argument("--source-guidance", type=float, default=3.5)
    group.add_argument("--scale", type=float, default=8.0, help="edit guidance scale per concept")
    group.add_argument("--threshold", type=float, default=0.7, help="mask quantile lambda")
    group.add_argument("--warmup", type=int, default=10)
    group.add_argument("--cooldown", type=int, default=None, help="first step without guidance again (default: none)")
    group.add_argument("--concept-scale", action="append", default=[], metavar="CONCEPT=SCALE",
                       help="edit scale of one concept (name or id); repeatable")
    group.add_argument("--reverse", action="append", default=[], metavar="CONCEPT",
                       help="push this concept away from its original value instead of towards the new one; "
                            "repeatable")
    group.add_argument("--mask-mode", choices=("intersect", "cross_attention", "noise"), default="intersect")
    group.add_argument("--protect-non-descendants", action="store_true",
                       help="keep edit masks off the regions of concepts the intervention must not change")
    group.add_argument("--exact", action="store_true", help="exact-reconstruction inversion")
    group.add_argument("--guidance-scale", type=float, default=7.5, help="target CFG of the ddpm/ddim baselines")
    group.add_argument("--max-side", type=int, default=1024, help="downscale larger photos to this longer side")


def add_device_flags(group, device_help: str) -> None:
    group.add_argument("--device", default="auto", help=device_help)
    group.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")


# -- what the flags ask for ------------------------------------------------------------------------


def edit_params(args: argparse.Namespace):
    """The ``CSGParams`` of ``add_edit_flags``' flags and ``--seed``."""
    from ..counterfactual import CSGParams, parse_concept_scales

    return CSGParams(num_steps=args.steps, skip=args.skip, source_guidance=args.source_guidance, scale=args.scale,
                     threshold=args.threshold, warmup=args.warmup, cooldown=args.cooldown,
                     concept_scales=parse_concept_scales(args.concept_scale, "--concept-scale"),
                     reverse=tuple(args.reverse), mask_mode=args.mask_mode,
                     non_descendant_protection=args.protect_non_descendants, exact=args.exact, seed=args.seed,
                     max_side=args.max_side)


def device_and_dtype(device: str, dtype: str):
    """The SDXL side's device and dtype (the VLM's "auto" dtype is its own, ``csg.devices``)."""
    return resolve_device_dtype(device, dtype, model="sdxl")


def check_vlm_options(args: argparse.Namespace) -> None:
    """How long to wait for the VLM server and how often to retry: checked before anything slow."""
    if (args.vlm_timeout is not None or args.vlm_retries is not None) and not args.vlm_url:
        raise InputError("--vlm-timeout and --vlm-retries are for a VLM server; give its --vlm-url (a local "
                         "--vlm-model needs neither).")
    if args.vlm_timeout is not None and not (math.isfinite(args.vlm_timeout)
                                             and 0 < args.vlm_timeout <= MAX_VLM_TIMEOUT):
        raise InputError(f"--vlm-timeout must be a number of seconds above 0 and at most {MAX_VLM_TIMEOUT:.0f}, "
                         f"got {args.vlm_timeout}.")
    if args.vlm_retries is not None and not 0 <= args.vlm_retries <= MAX_VLM_RETRIES:
        raise InputError(f"--vlm-retries must be a whole number from 0 to {MAX_VLM_RETRIES}, got {args.vlm_retries}.")


def make_vlm(args: argparse.Namespace, comfy: Path | None, device):
    """The VLM backend the arguments ask for (or the one found locally), and how the report names it."""
    if args.vlm_url:
        if not args.vlm_name:
            raise InputError("--vlm-url needs --vlm-name (the model name the server serves).")
        if args.api_key_env and not os.environ.get(args.api_key_env):
            raise InputError(f"--api-key-env {args.api_key_env}: that environment variable is not set.")
        from ..vlm import OpenAICompatibleVLM

        waiting = {name: value for name, value in (("timeout", args.vlm_timeout), ("retries", args.vlm_retries))
                   if value is not None}  # the backend's defaults otherwise
        backend = OpenAICompatibleVLM(args.vlm_url, args.vlm_name, api_key_env=args.api_key_env,
                                      structured=args.vlm_structured, **waiting)
        name = f"{backend.url} ({backend.model})"
    else:
        folder = find_vlm(args.vlm_model, comfy)
        from ..vlm import TransformersVLM

        backend, name = TransformersVLM(folder, device=device, structured=args.vlm_structured), str(folder)
    if args.vlm_cache:
        from ..vlm import CachedVLM

        backend = CachedVLM(backend, Path(args.vlm_cache).expanduser())
    return backend, name


def check_out_folder(out: Path) -> None:
    """An --out that cannot become a folder fails before anything slow (it is only created once there is
    something to save)."""
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file, not a folder. Choose a folder (it is created if missing).")
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    except OSError as exc:  # e.g. a name too long for the file system
        raise InputError(f"--out {out} cannot be a folder here ({exc.strerror}). Choose another folder.") from exc
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing.is_dir() else "is a file"  # os.access knows read-only mounts
        raise InputError(f"--out {out}: cannot create or write there ({existing} {problem}). "
                         "Choose a folder you can write to.")


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
