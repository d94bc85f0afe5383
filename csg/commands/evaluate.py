"""``csg-evaluate``: Table 1 on whole datasets, resumable, one process or many.

    csg-evaluate --dataset celeba=celebahq:CelebAMask-HQ/celeba-caption
                 --dataset coco=coco:annotations/captions_val2017.json
                 --per-dataset 75 --seed 0 --vlm-url http://127.0.0.1:8000/v1 --vlm-name Qwen/Qwen3-VL-30B-A3B-Instruct
                 --sdxl PATH --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth --out eval/
    accelerate launch --num_processes 8 -m csg.evaluate ...      # the same, sharded over 8 processes
    accelerate launch --cpu --num_processes 2 --mpirun_hostfile hosts -m csg.evaluate ... --device cpu  # CPUs, MPI

Per item: the VLM extracts the graph and proposes interventions (or the dataset gives them), each
method of ``--methods`` inverts once and edits every intervention, and every counterfactual gets
LPIPS, masked LPIPS, VLM effectiveness, Preservation and Causal consistency (``csg.metrics``).
Results go to ``OUT/results.<rank>.jsonl``, one fsync'ed line per item; a rerun skips the items
finished in any results file, so an interrupted run continues where it stopped, with any number
of processes. At the end, process 0 writes ``table.md``, ``table.csv`` and ``report.html``
(``csg.report``). See docs/evaluation.md.

Exit codes: 0 all items done, 1 some items failed (a rerun retries them), 2 bad input or missing
weights, 130 interrupted (finished items are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..errors import CSGError, InputError, OutputError
from ..evaluation.datasets import DatasetSpec, select
from ..evaluation.results import (
    ResultsWriter,
    check_inputs,
    check_settings,
    load_results,
    results_path,
    settings_id,
)
from ..evaluation.runner import METHODS
from ..output import hold_folder, make_folder
from ..weights import comfyui_root, find_sdxl
from .options import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    add_device_flags,
    add_edit_flags,
    add_lpips_flags,
    add_sdxl_flags,
    add_vlm_flags,
    check_out_folder,
    device_and_dtype,
    edit_params,
    make_vlm,
    report_error,
    seed_number,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csg-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", action="append", required=True, metavar="NAME=KIND:PATH[@IMAGES]",
                      help="KIND: folder (a captions .json/.csv), coco (captions_*.json), celebahq (a folder of "
                           "caption .txt files); IMAGES: the image folder when it is not the default")
    data.add_argument("--per-dataset", type=int, metavar="N", help="items sampled per dataset (default: all)")
    data.add_argument("--seed", type=seed_number, default=0, help="sampling seed, and the inversions' noise seed")
    data.add_argument("--plans", metavar="FILE",
                      help="hand-written graphs and interventions by item id, for items of any dataset (JSON or CSV, "
                           "see docs/evaluation.md); they replace the VLM's extraction and proposals")
    vlm = p.add_argument_group("vision-language model (extractor, manipulator and judge)")
    add_vlm_flags(vlm)
    vlm.add_argument("--vlm-concurrency", type=int, default=4, metavar="N",
                     help="VLM requests in flight per process; also how many items are planned ahead (default 4)")
    models = p.add_argument_group("models")
    add_sdxl_flags(models)
    add_lpips_flags(models)
    edit = p.add_argument_group("editing (defaults: the paper's)")
    edit.add_argument("--methods", default="csg,ddpm,ddim", help="comma-separated subset of csg,ddpm,ddim")
    add_edit_flags(edit)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="DIR")
    run.add_argument("--allow-mixed-settings", action="store_true",
                     help="add results made with other settings to a folder that already has some")
    run.add_argument("--no-report", action="store_true", help="skip table.md/table.csv/report.html at the end")
    add_device_flags(run, "auto (the process's accelerator under accelerate), cpu, cuda:N")
    return p


def versions() -> dict[str, str]:
    out = {"csg": __version__}
    for package in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def file_id(path: str | None) -> str | None:
    """A weight file as the settings record it: its name and size (paths differ between machines)."""
    return None if path is None else f"{Path(path).name} ({Path(path).stat().st_size} bytes)"


def check_launch(environ: Mapping[str, str]) -> None:
    """Refuse an ``accelerate launch`` asked for several processes that started one. Its single-process
    launcher (no ``--multi_gpu``, or ``--cpu`` without ``--mpirun_hostfile``) then still sets
    MASTER_ADDR, for a process group that never forms; without this check the one process would
    quietly do every item."""
    launched_as_group = any(k in environ for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                                   "MV2_COMM_WORLD_SIZE"))
    if "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ and not launched_as_group:
        raise InputError("accelerate launch was asked for several processes but started one. It starts several "
                         "with --multi_gpu (one per GPU; on a machine without GPUs pass --device cpu to csg-evaluate), "
                         "or with --cpu through MPI: add --mpirun_hostfile FILE (a line 'localhost slots=N'; needs "
                         "Open MPI, e.g. apt-get install openmpi-bin). See docs/evaluation.md.")


def log(rank: int, message: str) -> None:
    print(f"csg-evaluate[{rank}]: {message}", file=sys.stderr, flush=True)


def claim_out_folder(state, out: Path, held: ExitStack) -> None:
    """Make ``out`` this launch's own until ``held`` closes: process 0 locks it, and every process learns
    whether it did, so a second launch (or plain run) stops whole, before any weights load.

    One lock per launch rather than per results file: each launch shards the items it finds unfinished
    over its own processes, so two launches of any sizes would do the same items twice."""
    refusal = None
    if state.is_main_process:
        try:
            check_out_folder(out)
            held.enter_context(hold_folder(make_folder(out), "csg-evaluate"))
        except CSGError as exc:
            refusal = exc
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise refusal


def checked_methods(args: argparse.Namespace) -> list[str]:
    """--methods and the VLM flags, checked before anything slow."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise InputError(f"--methods {args.methods!r}: choose from {', '.join(METHODS)} (comma-separated).")
    if args.vlm_concurrency < 1:
        raise InputError(f"--vlm-concurrency must be at least 1, got {args.vlm_concurrency}.")
    if not (args.vlm_url or args.vlm_model):
        raise InputError("The evaluation needs a VLM for the extraction, the proposals and the judge: give --vlm-url "
                         "URL --vlm-name NAME (e.g. a vLLM server, see docs/evaluation.md) or --vlm-model PATH.")
    return methods


def process_state(device: str):
    """This process's place in the launch (accelerate's ``PartialState``)."""
    import torch
    from accelerate import PartialState

    # On a machine without CUDA, accelerate's launcher (torchrun underneath) starts the processes, and
    # cpu=True makes them one gloo group; without it each would think it runs alone.
    return PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def run(args: argparse.Namespace, held: ExitStack) -> int:
    """The evaluation; ``held`` keeps the output folder's lock until the caller closes it."""
    from ..evaluation.runner import Runner
    from ..metrics import load_lpips_vgg

    check_launch(os.environ)
    methods = checked_methods(args)
    params = edit_params(args)
    if "csg" in methods:
        params.check_guidance(params.num_steps)
    items = select([DatasetSpec.parse(d) for d in args.dataset], args.per_dataset, args.seed,
                   Path(args.plans).expanduser() if args.plans else None)
    state = process_state(args.device)
    rank, world = state.process_index, state.num_processes
    device, dtype = device_and_dtype(str(state.device) if args.device == "auto" else args.device, args.dtype)
    comfy = comfyui_root(args.comfyui_root)
    sdxl = find_sdxl(args.sdxl, args.sdxl_config, comfy).check()  # before any weights load
    lpips = load_lpips_vgg(args.lpips_vgg, args.lpips_heads, device=device)  # missing weights fail before --out exists
    out = Path(args.out).expanduser()
    claim_out_folder(state, out, held)  # before SDXL and the VLM load
    settings = {"params": params.to_dict(), "methods": methods, "guidance_scale": args.guidance_scale,
                "dtype": str(dtype).removeprefix("torch."),
                "models": {"sdxl": Path(sdxl.path).name, "vlm": args.vlm_name or Path(args.vlm_model).name,
                           "lpips_vgg": file_id(args.lpips_vgg), "lpips_heads": file_id(args.lpips_heads)},
                "versions": versions()}
    sid = settings_id(settings)
    mine = items_of_this_process(out, items, settings, sid, args.allow_mixed_settings, rank, world)
    failed = 0
    if mine:
        vlm, _ = make_vlm(args, comfy, device)
        host = sdxl.load(device, dtype)
        with ResultsWriter(results_path(out, rank)) as writer:
            runner = Runner(host, vlm, lpips, params, methods, args.guidance_scale, out, writer, settings, sid, rank,
                            args.vlm_concurrency)
            failed = runner.run(mine)
    state.wait_for_everyone()
    if state.is_main_process and not args.no_report:
        write_tables(out, rank)
    return EXIT_FAILURE if failed else 0


def items_of_this_process(out: Path, items: list, settings: dict, sid: str, allow_mixed: bool, rank: int,
                          world: int) -> list:
    """The items not finished in any results file of ``out`` that fall to this process."""
    loaded = load_results(out)
    if loaded.torn:
        log(rank, f"unreadable lines in the results, their items are done again: {', '.join(loaded.torn)}")
    check_settings(loaded, settings, out, allow_mixed)
    check_inputs(loaded, items, sid, out)
    finished = loaded.finished(sid)
    remaining = [item for item in items if item.id not in finished]
    mine = [item for item in remaining if item.shard(world) == rank]
    log(rank, f"{len(items)} items, {len(items) - len(remaining)} already done, {len(mine)} for this process "
              f"({rank + 1} of {world})")
    return mine


def write_tables(out: Path, rank: int) -> None:
    from ..report import write_report

    try:
        paths = write_report(out)
    except OutputError as exc:
        raise OutputError(f"{exc} The results are saved: rerun the same command, or python -m csg.report "
                          f"{out}, to write the report.") from exc
    for path in paths.values():
        log(rank, f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with ExitStack() as held:
            return run(args, held)
    except KeyboardInterrupt:
        print("csg-evaluate: interrupted; finished items are saved, rerun the same command to continue.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except CSGError as exc:
        return report_error("csg-evaluate", exc)


if __name__ == "__main__":
    sys.exit(main())
