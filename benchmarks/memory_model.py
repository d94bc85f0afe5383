"""Peak GPU memory of our counterfactual path on full-size SDXL, modelled on the CPU without a GPU.

    python benchmarks/memory_model.py                                   # fp16 1024x1024, as the benchmark runs it
    python benchmarks/memory_model.py --keep-text-encoders --vae-dtype float32   # without the two savings

The models live on PyTorch's ``meta`` device, where every op computes shapes and no data, so full
SDXL runs in seconds on a laptop. A dispatch mode adds up the bytes of every live tensor storage
(each rounded up to the CUDA caching allocator's 512-byte blocks) and keeps the peak: that is
``torch.cuda.max_memory_allocated`` without the kernels' workspaces (cuDNN, cuBLAS) and without
allocator fragmentation, so a GPU reports somewhat more. SDPA is modelled as the fused kernel CUDA
runs: on meta tensors it would otherwise take the math path and hold the full score matrix.

Rows match ``benchmarks/benchmark.py``'s (inversion, edits with 1 and 3 concepts, 3 interventions
batched, each edit with its VAE decodes), split into the denoising loop and the VAE part; "resident"
is what stays allocated between calls (the weights). Memory does not depend on the step count, so a
few steps are modelled. Text encoders that are offloaded are built on the CPU (uninitialised) so
that ``offload_text_encoders`` lends real CPU weights to the meta device, as it does to a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # run as a script from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmark import IMAGE_SIDE, INTERVENTIONS, SOURCE_PROMPT, Settings, benchmark_image, spec  # noqa: E402

from csg.abduction import invert  # noqa: E402
from csg.diffusers_host import DiffusersSDXLHost, scaled_linear_alphas_cumprod  # noqa: E402
from csg.guidance import GuidanceParams  # noqa: E402
from csg.prediction import edit  # noqa: E402
from tools.random_sdxl import build_sdxl_components  # noqa: E402

CUDA_BLOCK = 512  # the caching allocator's rounding of every allocation
GIB = 2**30
TARGET_GIB = 8.0


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the live storages of ``device`` tensors that ops create under this mode, and their peak."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._finalizers: dict[int, weakref.finalize] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._finalizers:  # a view or an in-place result: no new memory
            return
        size = -(-storage.nbytes() // CUDA_BLOCK) * CUDA_BLOCK
        self.live += size
        self.peak = max(self.peak, self.live)
        self._finalizers[key] = weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._finalizers.pop(key, None)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == self.device:
                self._track(value)
        return out


class FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` allocating only its output, as CUDA's fused kernels do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, value = args[0], args[2]
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class RowMemory:
    loop_gib: float  # peak while denoising (inversion: VAE encode included)
    vae_gib: float | None  # peak while decoding
    peak_gib: float


def model_memory(size: str = "full", dtype: torch.dtype = torch.float16, vae_dtype: torch.dtype = torch.bfloat16,
                 offload_text_encoders: bool = True, steps: int = 4) -> tuple[float, dict[str, RowMemory]]:
    """Resident GiB and each row's peaks (weights included), from a run on the meta device."""
    settings = Settings(steps=steps, skip=0.15, source_guidance=3.5, scale=8.0, threshold=0.7, warmup=1, seed=0)
    image = benchmark_image(IMAGE_SIDE[size])
    params = GuidanceParams(mask_mode="intersect")
    tracker = LiveStorageBytes()

    def peak_of(run: Callable[[], object]) -> tuple[float, object]:
        tracker.reset_peak()
        result = run()
        return tracker.peak / GIB, result

    with tracker, FusedAttention():
        components = build_sdxl_components(size, device="meta", dtype=dtype)
        components.vae.to(vae_dtype)
        if offload_text_encoders:  # real CPU weights to lend (their values do not matter here)
            for encoder in (components.text_encoder, components.text_encoder_2):
                encoder.to_empty(device="cpu")
        host = DiffusersSDXLHost.from_components(components, offload_text_encoders=offload_text_encoders)
        host.alphas_cumprod = scaled_linear_alphas_cumprod()  # the schedule is computed on the CPU
        resident = tracker.live / GIB

        inversion_gib, inversion = peak_of(lambda: invert(
            host, image, SOURCE_PROMPT, num_steps=settings.steps, skip=settings.skip,
            source_guidance=settings.source_guidance, generator=settings.seed))
        rows = {"inversion": RowMemory(inversion_gib, None, inversion_gib)}
        for title, interventions in (("edit, 1 concept", [INTERVENTIONS[0][:1]]),
                                     ("edit, 3 concepts", [INTERVENTIONS[0]]),
                                     ("3 interventions, batched", list(INTERVENTIONS))):
            specs = [spec(prompts, settings) for prompts in interventions]
            loop_gib, result = peak_of(lambda: edit(host, inversion, specs, params))
            vae_gib, _ = peak_of(lambda latents=result.latents: [host.decode_latents(latents[k:k + 1])
                                                                for k in range(len(specs))])
            rows[title] = RowMemory(loop_gib, vae_gib, max(loop_gib, vae_gib))
            del result
    return resident, rows


def format_rows(resident: float, rows: dict[str, RowMemory]) -> str:
    header = f"{'':28} {'loop GiB':>9} {'VAE GiB':>9} {'peak GiB':>9}"
    lines = [header, "-" * len(header), f"{'resident (weights)':28} {'':>9} {'':>9} {resident:9.2f}"]
    for title, row in rows.items():
        vae = "-" if row.vae_gib is None else f"{row.vae_gib:.2f}"
        lines.append(f"{title:28} {row.loop_gib:9.2f} {vae:>9} {row.peak_gib:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="SDXL architecture to model")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--vae-dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                        help="the VAE's dtype (bfloat16: what an fp16 run picks on a bf16-capable GPU)")
    parser.add_argument("--keep-text-encoders", action="store_true",
                        help="keep the text encoders on the GPU (no offload_text_encoders)")
    parser.add_argument("--steps", type=int, default=4,
                        help="denoising steps to model (memory does not grow with them)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the resident and per-row GiB to FILE")
    args = parser.parse_args(argv)
    resident, rows = model_memory(args.size, getattr(torch, args.dtype), getattr(torch, args.vae_dtype),
                                  not args.keep_text_encoders, args.steps)
    side = IMAGE_SIDE[args.size]
    print(f"modelled allocated memory: SDXL {args.size}, UNet {args.dtype}, VAE {args.vae_dtype}, {side}x{side}, "
          f"text encoders {'on the GPU' if args.keep_text_encoders else 'offloaded'}")
    print(format_rows(resident, rows))
    peak = max(row.peak_gib for row in rows.values())
    print(f"peak {peak:.2f} GiB ({'<=' if peak <= TARGET_GIB else '>'} the {TARGET_GIB} GiB target, "
          "before kernel workspaces and fragmentation)")
    if args.json:
        report = dict(size=args.size, dtype=args.dtype, vae_dtype=args.vae_dtype,
                      text_encoders_offloaded=not args.keep_text_encoders, resident_gib=resident, peak_gib=peak,
                      rows={title: asdict(row) for title, row in rows.items()})
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
