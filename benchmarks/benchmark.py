"""Time our CSG against diffusers' LEDITS++ SDXL pipeline on the same random-weight SDXL.

    python benchmarks/benchmark.py                       # full SDXL, fp16, 1024x1024, CUDA, paper settings
    python benchmarks/benchmark.py --size tiny --device cpu --dtype float32 --steps 4   # smoke test
    python benchmarks/benchmark.py --compile none cudagraphs --rows inversion,edit-3,batched,separate,floor

Both methods run in one process on the very same modules (``tools.random_sdxl``, weights random, so
only speed and memory mean anything here). Settings are the paper's: 100 steps, skip 0.15, source
guidance 3.5, edit scale 8, threshold 0.7, warm-up 10 (10% of the steps when --steps is lower),
intersect masks. Rows, each timed after a warm-up run of every code path:

* inversion                     ``csg.abduction.invert``     vs ``pipe.invert``
* edit, 1 concept               ``csg.prediction.edit`` + VAE decode  vs ``pipe(editing_prompt=[1])``
* edit, 3 concepts              same with three concepts (UNet batch 4)
* 3 interventions, batched      ONE loop, 3 x (uncond + 3 concepts) = batch 12; the reference has no
                                batched mode, so it is compared with its three separate calls
* 3 interventions, separate     three ``edit`` calls      vs three ``pipe(...)`` calls
* bare UNet floors              one plain UNet call (no capture) at batch 2 (inversion: uncond +
                                source), 4 (3-concept edit) and 12 (batched), times the step count
                                (an edit's warm-up steps run its uncond rows alone, so an edit can
                                come in a little under its floor)

Ours runs once per ``--compile`` variant: "none" is eager; "default", "reduce-overhead" (CUDA
graphs) and "max-autotune" are ``torch.compile`` modes with inductor; "cudagraphs" is dynamo's
CUDA-graph backend over the eager kernels (no inductor, so it compiles in seconds, not minutes).
Default: eager and "reduce-overhead" on CUDA, eager elsewhere. Each variant is warmed up with
short runs (3 steps) of every row's shapes, which is where compilation happens, so the timed runs
never compile; the warm-up time is printed. Inductor compiles each new shape for minutes on full
SDXL, so choose ``--rows`` to fit a time budget. On CUDA the warm-up also counts host syncs
(``torch.cuda.set_sync_debug_mode``) of an inversion and an edit at two step counts, elsewhere the
host reads that would sync there (``HostReads``): equal counts mean no per-step sync. The summary
checks the issue's targets against the fastest variant.

Ours runs as the CLI does on a GPU: text encoders offloaded (``offload_text_encoders``) and, in an
fp16 run, the VAE in bfloat16 where the GPU supports it (``sdxl_vae_dtype``); ``memory_model.py``
predicts the peaks without a GPU. Peak memory is ``torch.cuda.max_memory_allocated`` over each row
(weights included). Notes on the
reference: it installs explicit (non-SDPA) attention on every layer and leaves it there, so we
save and restore the UNet's processors around it; and its fp16 path breaks with SDXL's upcasting
VAE (see ``reference_state``), so while it runs its VAE is in the run's dtype without upcasting,
and back to ours (bf16 or fp32) afterwards.

On a machine without diffusers and without a package index (our GPU box), carry the wheel:
``pip download diffusers --no-deps -d wheels/`` here, then ``pip install --no-deps wheels/diffusers-*.whl``
there (its own dependencies - huggingface_hub, safetensors, regex, requests, Pillow - come with
transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from csg.abduction import invert  # noqa: E402
from csg.diffusers_host import DiffusersSDXLHost  # noqa: E402
from csg.guidance import ConceptTerm, EditSpec, GuidanceParams  # noqa: E402
from csg.prediction import edit  # noqa: E402
from tools.random_sdxl import SDXLComponents, build_sdxl_components  # noqa: E402

SOURCE_PROMPT = "a portrait photo of a smiling woman astronaut with short brown hair"
INTERVENTIONS = (  # three interventions of three concepts each
    ("old woman", "gray hair", "wrinkled skin"),
    ("young girl", "blond hair", "round face"),
    ("frowning woman", "black hair", "wearing glasses"),
)
IMAGE_SIDE = {"full": 1024, "tiny": 64}
COMPILE_CHOICES = ("none", "default", "reduce-overhead", "max-autotune", "cudagraphs")
ROWS = ("inversion", "edit-1", "edit-3", "batched", "separate", "floor")
ROW_TITLES = {"inversion": "inversion", "edit-1": "edit, 1 concept", "edit-3": "edit, 3 concepts",
              "batched": "3 interventions, batched", "separate": "3 interventions, separate"}
WARMUP_STEPS = 3  # short runs with every shape the timed rows use; compilation happens here
FLOOR_BATCHES = {2: "inversion", 4: "edit, 3 concepts", 12: "3 interventions, batched"}


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
    parser.add_argument("--compile", nargs="+", choices=COMPILE_CHOICES, default=None, metavar="MODE",
                        help="our variants: " + ", ".join(COMPILE_CHOICES)
                        + " (default: none reduce-overhead on CUDA, none elsewhere)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated subset of " + ",".join(ROWS) + " (default: all)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write every row's seconds and peak, the sync counts and the setup to FILE")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or not rows:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    args.rows = tuple(r for r in ROWS if r in rows)
    return args


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


def short(s: Settings, steps: int = WARMUP_STEPS) -> Settings:
    """The same shapes in a few steps, guided from step 1: the warm-up that pays for compilation."""
    return replace(s, steps=steps, warmup=1)


def row_specs(row: str, s: Settings) -> list[list[EditSpec]]:
    """The ``edit`` calls one timed run of ``row`` makes."""
    if row == "edit-1":
        return [[spec(INTERVENTIONS[0][:1], s)]]
    if row == "edit-3":
        return [[spec(INTERVENTIONS[0], s)]]
    if row == "batched":
        return [[spec(prompts, s) for prompts in INTERVENTIONS]]
    return [[spec(prompts, s)] for prompts in INTERVENTIONS]  # separate


def make_host(components: SDXLComponents, variant: str) -> DiffusersSDXLHost:
    """Ours as the CLI runs it (text encoders offloaded), with the variant's compile mode. Run the
    reference first: offloading moves the shared text encoders to the CPU."""
    options = dict(offload_text_encoders=True)
    if variant == "cudagraphs":  # dynamo's CUDA-graph backend over the eager kernels, no inductor
        options.update(compile_unet="default", compile_backend="cudagraphs")
    elif variant != "none":
        options.update(compile_unet=variant)
    return DiffusersSDXLHost.from_components(components, **options)


# Ops that read a tensor's value back to the host; item and is_nonzero reach a dispatch mode undecomposed
# under inference_mode, _local_scalar_dense outside it.
HOST_READ_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                 torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.nonzero.default)


class HostReads(TorchDispatchMode):
    """Counts host reads (``.item()``, ``bool()``, ``nonzero``): off CUDA, the ops that would sync there, so a
    CPU dry run checks the same property."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READ_OPS
        return func(*args, **(kwargs or {}))


def count_syncs(run: Callable[[], object], device: torch.device) -> int:
    """Host syncs (blocking copies, ``.item()``, stream syncs) that ``run`` makes on CUDA; elsewhere its host reads."""
    if device.type != "cuda":
        with HostReads() as reads:
            run()
        return reads.count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


@dataclass
class OursResult:
    rows: dict[str, Timing]  # titled rows, floors included
    warmup_seconds: float
    syncs: dict[str, list[int]]  # run -> its host syncs (off CUDA: host reads) at WARMUP_STEPS and twice the steps


def format_syncs(syncs: dict[str, list[int]]) -> str:
    counts = ", ".join(f"{run} {short} / {long}" for run, (short, long) in syncs.items())
    equal = all(short == long for short, long in syncs.values())
    return (f"host syncs per run at {WARMUP_STEPS} / {2 * WARMUP_STEPS} steps: {counts}"
            + (" (equal: no per-step sync)" if equal else " (they grow with the steps: a per-step sync)"))


def time_ours(host: DiffusersSDXLHost, image: Image.Image, s: Settings, device: torch.device,
              repeats: int, rows: tuple[str, ...] = ROWS) -> OursResult:
    params = GuidanceParams(mask_mode="intersect")

    def inversion(settings: Settings = s):
        return invert(host, image, SOURCE_PROMPT, num_steps=settings.steps, skip=settings.skip,
                      source_guidance=settings.source_guidance, generator=settings.seed)

    def edit_and_decode(inverted, specs: list[EditSpec]):
        latents = edit(host, inverted, specs, params).latents
        return [host.decode_latents(latents[k:k + 1]) for k in range(len(specs))]

    edit_rows = [r for r in rows if r in ("edit-1", "edit-3", "batched", "separate")]
    started = time.perf_counter()
    warm = inversion(short(s))  # every shape once: compiles here, and lazy init / kernel selection
    for row in edit_rows:
        for specs in row_specs(row, short(s))[:1]:
            edit_and_decode(warm, specs)
    floors = floor_runs(host, image, s, device, rows)
    for run in floors.values():
        run(1)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started

    probe = next((r for r in ("edit-3", "edit-1", "batched", "separate") if r in edit_rows), None)
    syncs = {"inversion": []} | ({f"{probe} edit": []} if probe else {})
    for steps in (WARMUP_STEPS, 2 * WARMUP_STEPS):
        inverted = inversion(short(s, steps))
        syncs["inversion"].append(count_syncs(lambda: inversion(short(s, steps)), device))
        if probe:
            syncs[f"{probe} edit"].append(count_syncs(
                lambda: edit(host, inverted, row_specs(probe, short(s, steps))[0], params), device))

    timings: dict[str, Timing] = {}
    inverted = inversion()
    if "inversion" in rows:
        timings[ROW_TITLES["inversion"]] = measure(inversion, device, repeats)
    for row in edit_rows:
        calls = row_specs(row, s)
        timings[ROW_TITLES[row]] = measure(lambda: [edit_and_decode(inverted, c) for c in calls], device, repeats)
    for title, run in floors.items():
        timings[title] = measure(lambda: run(None), device, repeats)
    return OursResult(timings, warmup_seconds, syncs)


def floor_runs(host: DiffusersSDXLHost, image: Image.Image, s: Settings, device: torch.device,
               rows: tuple[str, ...]) -> dict[str, Callable[[int | None], None]]:
    """The bare UNet cost, the floor of each row: plain ``predict_noise`` calls (no capture) at the
    batches the rows use. ``run(n)`` makes n calls (warm-up); ``run(None)`` makes ``s.steps``."""
    if "floor" not in rows:
        return {}
    wanted = {2: "inversion" in rows, 4: "edit-3" in rows or "separate" in rows, 12: "batched" in rows}
    side = image.size[0] // host.vae_scale_factor
    t = torch.tensor(500, device=host.device)
    runs = {}
    for batch, used in wanted.items():
        if not used:
            continue
        latents = torch.randn(batch, 4, side, side, device=host.device)
        conditioning = host.encode_prompts([""] * batch)

        def run(calls: int | None, latents=latents, conditioning=conditioning) -> None:
            for _ in range(s.steps if calls is None else calls):
                host.predict_noise(latents, t, conditioning)

        runs[f"bare UNet b{batch} x{s.steps} ({FLOOR_BATCHES[batch]})"] = run
    return runs


# -- the reference ---------------------------------------------------------------------------------


@contextmanager
def reference_state(components: SDXLComponents, dtype: torch.dtype) -> Iterator[None]:
    """What the reference needs for the duration of its runs, undone afterwards.

    * Its VAE in the run dtype with ``force_upcast`` off. With SDXL's ``force_upcast=True`` its fp16
      path breaks: ``invert`` upcasts the VAE for its extra reconstruction decode and never casts it
      back, so the next ``__call__`` decodes fp16 latents with an fp32 VAE and raises a dtype error.
      (Its fp16 VAE is about as fast as our bf16 one; fp16 would overflow with real SDXL weights.)
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
                   repeats: int, rows: tuple[str, ...] = ROWS) -> dict[str, Timing]:
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusionXL

    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, algorithm_type="sde-dpmsolver++", solver_order=2)
    c = components
    pipe = LEditsPPPipelineStableDiffusionXL(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                             tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                             scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def inversion(settings: Settings = s):
        pipe.invert(image, source_prompt=SOURCE_PROMPT, source_guidance_scale=settings.source_guidance,
                    num_inversion_steps=settings.steps, skip=settings.skip,
                    generator=torch.Generator(device).manual_seed(settings.seed))

    def edit_and_decode(prompts: tuple[str, ...], settings: Settings = s):
        return pipe(editing_prompt=list(prompts), edit_guidance_scale=settings.scale,
                    edit_threshold=settings.threshold, edit_warmup_steps=settings.warmup,
                    use_intersect_mask=True).images

    with reference_state(components, next(c.unet.parameters()).dtype):
        inversion(short(s))  # warm-up at a few steps; then the full inversion the edits use
        for warm in (INTERVENTIONS[0][:1], INTERVENTIONS[0]):
            edit_and_decode(warm, short(s))
        timings = {"inversion": measure(inversion, device, repeats)}
        if "inversion" not in rows:
            timings = {}
        if "edit-1" in rows:
            timings["edit, 1 concept"] = measure(lambda: edit_and_decode(INTERVENTIONS[0][:1]), device, repeats)
        if "edit-3" in rows:
            timings["edit, 3 concepts"] = measure(lambda: edit_and_decode(INTERVENTIONS[0]), device, repeats)
        if "batched" in rows or "separate" in rows:
            separate = measure(lambda: [edit_and_decode(p) for p in INTERVENTIONS], device, repeats)
            # it has no batched mode: its best for three interventions is three calls
            timings.update({ROW_TITLES[r]: separate for r in ("batched", "separate") if r in rows})
        return timings


# -- report ----------------------------------------------------------------------------------------


def format_table(ours: dict[str, Timing], reference: dict[str, Timing] | None) -> str:
    def gib(t: Timing | None) -> str:
        return "-" if t is None or t.peak_gib is None else f"{t.peak_gib:.2f}"

    header = f"{'':48} {'ours s':>9} {'ours GiB':>9} {'ref s':>9} {'ref GiB':>9} {'ours/ref':>9}"
    lines = [header, "-" * len(header)]
    for row, mine in ours.items():
        ref = reference.get(row) if reference else None
        ratio = f"{mine.seconds / ref.seconds:.2f}x" if ref else "-"
        ref_s = f"{ref.seconds:.2f}" if ref else "-"
        lines.append(f"{row:48} {mine.seconds:9.2f} {gib(mine):>9} {ref_s:>9} {gib(ref):>9} {ratio:>9}")
    return "\n".join(lines)


def format_targets(variant: str, ours: dict[str, Timing], reference: dict[str, Timing] | None) -> str:
    """The issue's targets for one of our variants."""
    checks = []

    def check(name: str, value: float | None, limit: float, at_least: bool, unit: str = "x") -> None:
        if value is None:
            return
        ok = value >= limit if at_least else value <= limit
        checks.append(f"  {name}: {value:.2f}{unit} ({'>=' if at_least else '<='} {limit}{unit}) "
                      f"{'PASS' if ok else 'FAIL'}")

    ref = reference or {}
    for title, limit in (("edit, 3 concepts", 2.5), ("inversion", 1.8)):
        if title in ours and title in ref:
            check(f"{title} speed-up over the reference", ref[title].seconds / ours[title].seconds, limit, True)
    peaks = [t.peak_gib for title, t in ours.items() if t.peak_gib is not None and not title.startswith("bare")]
    check("peak memory", max(peaks) if peaks else None, 8.0, False, " GiB")
    batched, separate = ours.get("3 interventions, batched"), ours.get("3 interventions, separate")
    if batched and separate:
        check("batched / three separate runs", batched.seconds / separate.seconds, 0.8, False)
    for title, mine in ours.items():
        if title.startswith("bare UNet"):
            row = ours.get(title.split("(", 1)[1].rstrip(")"))
            if row:
                checks.append(f"  {title.split(' (')[0]}: {row.seconds / mine.seconds:.2f}x is what "
                              f"{title.split('(', 1)[1].rstrip(')')} costs over its floor")
    return f"targets, ours [{variant}]:\n" + ("\n".join(checks) if checks else "  (nothing to check)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warmup = args.warmup if args.warmup is not None else max(1, round(0.1 * args.steps))
    settings = Settings(args.steps, args.skip, args.source_guidance, args.scale, args.threshold, warmup, args.seed)
    variants = args.compile or (["none", "reduce-overhead"] if device.type == "cuda" else ["none"])
    started = time.perf_counter()
    components = build_sdxl_components(args.size, seed=args.seed, device=device, dtype=dtype)
    side = IMAGE_SIDE[args.size]
    image = benchmark_image(side)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    vae_dtype = str(components.vae.dtype).removeprefix("torch.")
    print(f"SDXL {args.size} (random weights), {args.dtype}, VAE {vae_dtype}, {side}x{side} on {device} "
          f"({device_name}), torch {torch.__version__}; built in {time.perf_counter() - started:.1f} s")
    print(f"steps {settings.steps}, skip {settings.skip}, source guidance {settings.source_guidance}, "
          f"scale {settings.scale}, threshold {settings.threshold}, warm-up {settings.warmup}, intersect masks; "
          f"ours: {', '.join(variants)}; rows: {','.join(args.rows)}", flush=True)
    reference = None
    if not args.skip_reference and set(args.rows) - {"floor"}:
        reference = time_reference(components, image, settings, device, args.repeats, args.rows)
    report = dict(device=device_name, torch=torch.__version__, size=args.size, dtype=args.dtype, vae_dtype=vae_dtype,
                  side=side, settings=asdict(settings), rows=list(args.rows),
                  reference={title: asdict(t) for title, t in (reference or {}).items()}, ours={})
    for variant in variants:
        host = make_host(components, variant)
        try:
            result = time_ours(host, image, settings, device, args.repeats, args.rows)
        finally:
            host.use_compiled_unet(None)
            torch._dynamo.reset()  # frees compiled graphs and CUDA-graph pools before the next variant
        print(f"\nours [{variant}] (warm-up {result.warmup_seconds:.1f} s)")
        if result.syncs:
            print(format_syncs(result.syncs))
        print(format_table(result.rows, reference))
        if reference is not None or device.type == "cuda":
            print(format_targets(variant, result.rows, reference), flush=True)
        report["ours"][variant] = dict(warmup_seconds=result.warmup_seconds, syncs=result.syncs,
                                       rows={title: asdict(t) for title, t in result.rows.items()})
    if reference is None:
        print("(reference skipped)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
