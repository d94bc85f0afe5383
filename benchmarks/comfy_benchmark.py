"""Time a counterfactual through the ComfyUI nodes against ComfyUI's own sampler on the same UNet rows.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/comfy_benchmark.py
    ... --size 128 --steps 10 --warmup 2 --repeats 2 --profile

The model is the random-weight SDXL test checkpoint (``tools/sdxl_checkpoint.py``, built into
~/.cache/csg-tests on first use), loaded as CheckpointLoaderSimple loads it; ``--model full`` builds
the full SDXL UNet instead (in memory, random weights, in the dtype ComfyUI picks for the device, fp16
on a GPU) and ``--model tiny`` the tests' narrow one (``tools/comfy_sdxl.py``), both with
SDXL's text encoders and VAE, for a GPU run and a CPU dry run. The example portrait is
inverted once with the Causal Inversion node (the paper's skip 0.15 and source guidance 3.5, fewer
steps). Then two things are timed, each after one untimed run, their runs interleaved:

* ours: the Causal Counterfactual node on the example intervention (do(age = old), 3 changed
  concepts, scale 8, threshold 0.7, intersect masks): prompt encoding, sampling through
  ``guider.sample`` with the preview callback, VAE decode, masks and mask previews;
* the floor: what ComfyUI's own nodes take for the same UNet rows on the same model: CLIP Text
  Encode of the uncond and the three concept prompts, SamplerCustomAdvanced with a CFGGuider over the
  inversion's sigmas, VAE Decode. The warm-up steps run 1 row (cfg 1, positive only), the guided
  steps 4 rows in one batch (3 positive conds combined, plus the negative, at cfg 8): the very row
  counts CSG evaluates. Its sampler is dpmpp_2m, which calls the model once per step as ours does.

The ratio ours / floor is what CSG adds over plain ComfyUI sampling: the attention capture on the
latent/4 cross-attention layers, the masks, the per-row latent routing, the mask outputs. With
``--profile`` one more run of each is profiled (cProfile) and the time is split by where it goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tools.comfy_sdxl import UNET_CONFIG, build_comfy_sdxl, node_output, pack_module  # noqa: E402
from tools.comfyui_harness import import_comfy_like_main  # noqa: E402
from tools.sdxl_checkpoint import SMALL_SDXL_UNET, ensure_checkpoint  # noqa: E402

EXAMPLES = ROOT / "csg" / "examples"
SOURCE_PROMPT = "a portrait photo of a smiling woman astronaut with short brown hair"
TARGET_RATIO = 1.15
MODELS = ("test-checkpoint", "full", "tiny")
FULL_SDXL_UNET = dict(SMALL_SDXL_UNET, channel_mult=[1, 2, 4])  # SDXL base's UNet (model_detection.py's SDXL)

# Where the time goes: (label, cProfile function name, file fragment), cumulative times.
PROFILE_PARTS = (
    ("UNet forward (apply_model)", "apply_model", "model_base.py"),
    ("  attention capture (selected_attention)", "selected_attention", "csg/attention.py"),
    ("CSG combination and masks (guided_epsilon)", "guided_epsilon", "csg/guidance.py"),
    ("text encoding", "encode_from_tokens", "comfy/sd.py"),  # ComfyUI's scheduled encoding calls it too
    ("VAE decode", "decode", "comfy/sd.py"),
    ("latent preview callback", "callback", "latent_preview.py"),
    ("model loading (load_models_gpu)", "load_models_gpu", "model_management.py"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 32)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="CSG warm-up steps (unguided)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, more threads than free cores thrash)")
    parser.add_argument("--profile", action="store_true", help="also profile one run of each")
    parser.add_argument("--model", choices=MODELS, default="test-checkpoint",
                        help="the cached test checkpoint, or full / tiny SDXL UNets built in memory")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the runs' seconds, the ratio and the setup to FILE")
    return parser.parse_args(argv)


def load_model(name: str) -> tuple[object, object, object, str]:
    """MODEL, CLIP and VAE, as ComfyUI objects, and what they are."""
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models

    if name == "test-checkpoint":
        checkpoint = ensure_checkpoint()
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        return model, clip, vae, f"checkpoint {checkpoint.name}"
    unet = FULL_SDXL_UNET if name == "full" else UNET_CONFIG
    dtype = comfy.model_management.unet_dtype(supported_dtypes=comfy.supported_models.SDXL.supported_inference_dtypes)
    built = build_comfy_sdxl(0, dict(unet, dtype=dtype))
    return built.model, built.clip, built.vae, f"{name} SDXL UNet built in memory, {str(dtype).removeprefix('torch.')}"


def timed(runs: tuple[Callable[[], object], ...], repeats: int) -> list[list[float]]:
    """Seconds of each run, ``repeats`` times, interleaved so that a shared machine's load falls on both."""
    for run in runs:
        run()  # untimed: first-call costs (allocations, lazy imports)
    seconds = [[] for _ in runs]
    for _ in range(repeats):
        for run, times in zip(runs, seconds):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
    return seconds


def profile_parts(run: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """Total seconds of one profiled run and the cumulative seconds of each of ``PROFILE_PARTS``."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(run)
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    parts = {}
    for label, name, fragment in PROFILE_PARTS:
        # Recursive or nested entries of one function are counted once: the outermost has the cumulative time.
        parts[label] = max([v[3] for (file, _, fn), v in stats.items() if fn == name and fragment in file] or [0.0])
    return total, parts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_comfy_like_main()
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, Noise_RandomNoise, SamplerCustomAdvanced

    import nodes as comfy_nodes

    csg_nodes, sampling, graph_module = (pack_module(m) for m in ("nodes.csg_nodes", "nodes.comfy_sampling",
                                                                   "csg.graph"))
    started = time.perf_counter()
    model, clip, vae, what = load_model(args.model)
    print(f"{what} loaded in {time.perf_counter() - started:.1f} s; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {model.load_device}")

    graph = graph_module.CausalGraph.from_dict(json.loads((EXAMPLES / "portrait_graph.json").read_text()))
    intervention = graph_module.Intervention.from_dict(
        json.loads((EXAMPLES / "portrait_intervention.json").read_text()))
    photo = Image.open(EXAMPLES / "portrait.png").convert("RGB").resize((args.size, args.size), Image.LANCZOS)
    image = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0)[None]
    started = time.perf_counter()
    inversion = node_output(csg_nodes.CausalInversion.execute(model, clip, vae, image, SOURCE_PROMPT, args.steps, 0.15,
                                                              3.5, False, 3, 0))[0]
    print(f"inversion ({args.steps} steps, {args.size}x{args.size}) took {time.perf_counter() - started:.1f} s")

    def ours():
        return csg_nodes.CausalCounterfactual.execute(model, clip, vae, inversion, intervention, 8.0, 0.7,
                                                      args.warmup, "intersect", False, False, causal_graph=graph)

    concepts = [c.prompt for c in intervention.edit_concepts(graph)]
    sigmas = sampling.inversion_sigmas(inversion)
    latent = sampling.inversion_latent(inversion, model.model.latent_format)

    def floor():
        encode = comfy_nodes.CLIPTextEncode()
        negative = encode.encode(clip, "")[0]
        positive = sum((encode.encode(clip, p)[0] for p in concepts), [])  # 3 conds: 3 rows in one batch
        unguided, guided = comfy.samplers.CFGGuider(model), comfy.samplers.CFGGuider(model)
        unguided.set_conds(negative, negative)
        unguided.set_cfg(1.0)  # 1 row per warm-up step
        guided.set_conds(positive, negative)
        guided.set_cfg(8.0)  # 4 rows per guided step
        sampler = comfy.samplers.sampler_object("dpmpp_2m")
        sample = SamplerCustomAdvanced().sample
        warm = sample(Noise_RandomNoise(0), unguided, sampler, sigmas[:args.warmup + 1], latent)[0]
        out = sample(Noise_EmptyNoise(), guided, sampler, sigmas[args.warmup:], warm)[0]
        return comfy_nodes.VAEDecode().decode(vae, out)

    rows = f"{args.warmup} x 1 + {args.steps - args.warmup} x {1 + len(concepts)}"
    print(f"counterfactual: {len(concepts)} concepts ({', '.join(concepts)}), {args.steps} steps, warm-up "
          f"{args.warmup}; UNet rows per run {rows}")
    ours_s, floor_s = timed((ours, floor), args.repeats)
    ours_m, floor_m = statistics.median(ours_s), statistics.median(floor_s)
    ratio = ours_m / floor_m
    print(f"\n{'':44}{'median s':>10}{'runs':>22}")
    print(f"{'ours: Causal Counterfactual node':44}{ours_m:10.2f}{'  ' + ', '.join(f'{s:.2f}' for s in ours_s):>22}")
    print(f"{'floor: CLIPTextEncode+SamplerCustomAdvanced':44}{floor_m:10.2f}"
          f"{'  ' + ', '.join(f'{s:.2f}' for s in floor_s):>22}")
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"ours / floor: {ratio:.3f}x (target <= {TARGET_RATIO}x) {verdict}")
    report = dict(model=what, device=str(model.load_device), torch=torch.__version__, side=args.size,
                  steps=args.steps, warmup=args.warmup, unet_rows=rows, ours_s=ours_s, floor_s=floor_s,
                  ratio=ratio, target=TARGET_RATIO)

    if args.profile:
        print("\nprofile (cProfile, one run each; cumulative seconds, nested parts indented):")
        print(f"{'':48}{'ours':>8}{'floor':>8}")
        ours_total, ours_parts = profile_parts(ours)
        floor_total, floor_parts = profile_parts(floor)
        print(f"{'total':48}{ours_total:8.2f}{floor_total:8.2f}")
        for label, _, _ in PROFILE_PARTS:
            print(f"{label:48}{ours_parts[label]:8.2f}{floor_parts[label]:8.2f}")
        top = [label for label, _, _ in PROFILE_PARTS if not label.startswith(" ")]
        rest = [total - sum(parts[label] for label in top) for total, parts in ((ours_total, ours_parts),
                                                                            (floor_total, floor_parts))]
        print(f"{'everything else':48}{rest[0]:8.2f}{rest[1]:8.2f}")
        report["profile"] = dict(ours=dict(total=ours_total, **ours_parts), floor=dict(total=floor_total,
                                                                                      **floor_parts))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
