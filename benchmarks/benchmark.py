"""Time our CSG against diffusers' LEDITS++ SDXL pipeline on the same random-weight SDXL.

    python benchmarks/benchmark.py                       # full SDXL, fp16, 1024x1024, CUDA, paper settings
    python benchmarks/benchmark.py --size tiny --device cpu --dtype float32 --steps 4   # smoke test

Both methods run in one process on the very same modules (``csg.random_sdxl``, weights random, so
only speed and memory mean anything here). Settings are the paper's: 100 steps, skip 0.15, source
guidance 3.5, edit scale 8, threshold 0.7, warm-up 10 (10% of the steps when --steps is lower),
intersect masks. Rows, each timed after a warm-up run of every code path:

* inversion                     ``csg.abduction.invert``     vs ``pipe.invert``
* edit, 1 concept               ``csg.prediction.edit`` + VAE decode  vs ``pipe(editing_prompt=[1])``
* edit, 3 concepts              same with three concepts (UNet batch 4)
* 3 interventions, batched      ONE loop, 3 x (uncond + 3 concepts) = batch 12; the reference has no
                                batched mode, so it is compared with its three separate calls
* 3 interventions, separate     three ``edit`` calls      vs three ``pipe(...)`` calls

Peak memory is ``torch.cuda.max_memory_allocated`` over each row (weights included). Notes on the
reference: it installs explicit (non-SDPA) attention on every layer and leaves it there, so we
save and restore the UNet's processors around it; and its fp16 path breaks with SDXL's upcasting
VAE (see ``reference_state``), so while it runs its VAE is in the run's dtype without upcasting,
and back to fp32 for ours.

On a machine without diffusers and without a package index (our GPU box), carry the wheel:
``pip download diffusers --no-deps -d wheels/`` here, then ``pip install --no-deps wheels/diffusers-*.whl``
there (its own dependencies - huggingface_hub, safetensors, regex, requests, Pillow - come with
transformers).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from csg.abduction import invert  # noqa: E402
from csg.diffusers_host import DiffusersSDXLHost  # noqa: E402
from csg.guidance import ConceptTerm, EditSpec, GuidanceParams  # noqa: E402
from csg.prediction import edit  # noqa: E402
from csg.random_sdxl import SDXLComponents, build_sdxl_components  # noqa: E402

SOURCE_PROMPT = "a portrait photo of a smiling woman astronaut with short brown hair"
INTERVENTIONS = (  # three interventions of three concepts each
    ("old woman", "gray hair", "wrinkled skin"),
    ("young girl", "blond hair", "round face"),
    ("frowning woman", "black hair", "wearing glasses"),
)
IMAGE_SIDE = {"full": 1024, "tiny": 64}


@dataclass(frozen=True)
class Settings:
    steps: int
    skip: float
    source_guidance: float
    scale: float
    threshold: float
    warmup: int
    seed: int


@dataclass(frozen=True)
class Timing:
    seconds: float
    peak_gib: float | None  # None off CUDA


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="SDXL architecture to build")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip", type=float, default=0.15)
    parser.add_argument("--source-guidance", type=float, default=3.5)
    parser.add_argument("--scale", type=float, default=8.0)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row; the fastest is reported")
    parser.add_argument("--skip-reference", action="store_true", help="time ours only (no diffusers pipeline)")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[], object], device: torch.device, repeats: int) -> Timing:
    """Fastest wall time of ``repeats`` runs, and the peak memory over all of them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Timing(best, peak)


def benchmark_image(side: int) -> Image.Image:
    """The shipped example photo at the benchmark's size (content is irrelevant to random weights)."""
    photo = Image.open(ROOT / "csg" / "examples" / "portrait.png").convert("RGB")
    return photo.resize((side, side), Image.Resampling.LANCZOS)


# -- ours ------------------------------------------------------------------------------------------


def spec(prompts: tuple[str, ...], s: Settings) -> EditSpec:
    return EditSpec(tuple(ConceptTerm(p, scale=s.scale, threshold=s.threshold, warmup=s.warmup) for p in prompts))


def time_ours(host: DiffusersSDXLHost, image: Image.Image, s: Settings, device: torch.device,
              repeats: int) -> dict[str, Timing]:
    params = GuidanceParams(mask_mode="intersect")

    def inversion():
        return invert(host, image, SOURCE_PROMPT, num_steps=s.steps, skip=s.skip, source_guidance=s.source_guidance,
                      generator=s.seed)

    inverted = inversion()

    def edit_and_decode(specs: list[EditSpec]):
        latents = edit(host, inverted, specs, params).latents
        return [host.decode_latents(latents[k:k + 1]) for k in range(len(specs))]

    one, three = [spec(INTERVENTIONS[0][:1], s)], [spec(INTERVENTIONS[0], s)]
    batched = [spec(prompts, s) for prompts in INTERVENTIONS]
    for warm in (one, three, batched):  # first calls pay for lazy init and kernel selection
        edit_and_decode(warm)
    return {
        "inversion": measure(inversion, device, repeats),
        "edit, 1 concept": measure(lambda: edit_and_decode(one), device, repeats),
        "edit, 3 concepts": measure(lambda: edit_and_decode(three), device, repeats),
        "3 interventions, batched": measure(lambda: edit_and_decode(batched), device, repeats),
        "3 interventions, separate": measure(lambda: [edit_and_decode([b]) for b in batched], device, repeats),
    }


# -- the reference ---------------------------------------------------------------------------------


@contextmanager
def reference_state(components: SDXLComponents, dtype: torch.dtype) -> Iterator[None]:
    """What the reference needs for the duration of its runs, undone afterwards.

    * Its VAE in the run dtype with ``force_upcast`` off. With SDXL's ``force_upcast=True`` its fp16
      path breaks: ``invert`` upcasts the VAE for its extra reconstruction decode and never casts it
      back, so the next ``__call__`` decodes fp16 latents with an fp32 VAE and raises a dtype error.
      (This gives it a slightly faster fp16 VAE than ours, which decodes in fp32.)
    * Our attention processors back: it replaces all of them and never restores them.
    """
    unet, vae = components.unet, components.vae
    saved_processors, vae_dtype, force_upcast = unet.attn_processors, vae.dtype, vae.config.force_upcast
    vae.register_to_config(force_upcast=False)
    if vae_dtype != dtype:
        vae.to(dtype=dtype)
    try:
        yield
    finally:
        unet.set_attn_processor(saved_processors)
        vae.register_to_config(force_upcast=force_upcast)
        if vae.dtype != vae_dtype:
            vae.to(dtype=vae_dtype)


def time_reference(components: SDXLComponents, image: Image.Image, s: Settings, device: torch.device,
                   repeats: int) -> dict[str, Timing]:
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusionXL

    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, algorithm_type="sde-dpmsolver++", solver_order=2)
    c = components
    pipe = LEditsPPPipelineStableDiffusionXL(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                             tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                             scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def inversion():
        pipe.invert(image, source_prompt=SOURCE_PROMPT, source_guidance_scale=s.source_guidance,
                    num_inversion_steps=s.steps, skip=s.skip, generator=torch.Generator(device).manual_seed(s.seed))

    def edit_and_decode(prompts: tuple[str, ...]):
        return pipe(editing_prompt=list(prompts), edit_guidance_scale=s.scale, edit_threshold=s.threshold,
                    edit_warmup_steps=s.warmup, use_intersect_mask=True).images

    with reference_state(components, next(c.unet.parameters()).dtype):
        inversion()
        for warm in (INTERVENTIONS[0][:1], INTERVENTIONS[0]):
            edit_and_decode(warm)
        inverted = measure(inversion, device, repeats)
        separate = measure(lambda: [edit_and_decode(p) for p in INTERVENTIONS], device, repeats)
        return {
            "inversion": inverted,
            "edit, 1 concept": measure(lambda: edit_and_decode(INTERVENTIONS[0][:1]), device, repeats),
            "edit, 3 concepts": measure(lambda: edit_and_decode(INTERVENTIONS[0]), device, repeats),
            "3 interventions, batched": separate,  # no batched mode: its best is three calls
            "3 interventions, separate": separate,
        }


# -- report ----------------------------------------------------------------------------------------


def format_table(ours: dict[str, Timing], reference: dict[str, Timing] | None) -> str:
    def gib(t: Timing | None) -> str:
        return "-" if t is None or t.peak_gib is None else f"{t.peak_gib:.2f}"

    header = f"{'':28} {'ours s':>9} {'ours GiB':>9} {'ref s':>9} {'ref GiB':>9} {'ours/ref':>9}"
    lines = [header, "-" * len(header)]
    for row, mine in ours.items():
        ref = reference.get(row) if reference else None
        ratio = f"{mine.seconds / ref.seconds:.2f}x" if ref else "-"
        ref_s = f"{ref.seconds:.2f}" if ref else "-"
        lines.append(f"{row:28} {mine.seconds:9.2f} {gib(mine):>9} {ref_s:>9} {gib(ref):>9} {ratio:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warmup = args.warmup if args.warmup is not None else max(1, round(0.1 * args.steps))
    settings = Settings(args.steps, args.skip, args.source_guidance, args.scale, args.threshold, warmup, args.seed)
    started = time.perf_counter()
    components = build_sdxl_components(args.size, seed=args.seed, device=device, dtype=dtype)
    host = DiffusersSDXLHost.from_components(components)
    side = IMAGE_SIDE[args.size]
    image = benchmark_image(side)
    print(f"SDXL {args.size} (random weights), {args.dtype}, {side}x{side} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}; "
          f"built in {time.perf_counter() - started:.1f} s")
    print(f"steps {settings.steps}, skip {settings.skip}, source guidance {settings.source_guidance}, "
          f"scale {settings.scale}, threshold {settings.threshold}, warm-up {settings.warmup}, intersect masks")
    ours = time_ours(host, image, settings, device, args.repeats)
    reference = None if args.skip_reference else time_reference(components, image, settings, device, args.repeats)
    print(format_table(ours, reference))
    if reference is None:
        print("(reference skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
