"""Every GPU row of issue 18 in two calls of at most 8 minutes, raw output and a summary in one folder.

    benchmarks/gpu/run.sh --call 1 --out OUT     # diffusers: LEDITS++, floors, memory, batching, syncs (eager)
    benchmarks/gpu/run.sh --call 2 --out OUT     # the compiled variant's floors, and the ComfyUI path
    benchmarks/gpu/run.sh --call 1 --out OUT --size tiny    # the same code paths on the CPU: a dry run

Each call runs the existing benchmarks (``benchmark.py``, ``memory_model.py``, ``comfy_benchmark.py``)
as subprocesses, each with ``--json``, keeps their output in ``OUT/callN-<step>.log`` and their results
in ``OUT/callN-<step>.json``, then rewrites ``OUT/summary.json`` and ``OUT/summary.md`` from every
result in the folder and prints the targets. A dry run (``--size tiny``, on the CPU) reports each
target as "dry run" beside the check it would make: CPU figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CALL_BUDGET_S = 8 * 60
EAGER_ROWS = "inversion,edit-3,batched,separate,floor"


def steps_of(size: str) -> list[tuple[str, list[str]]]:
    """(step name, its command line after the interpreter), per call."""
    full = size == "full"
    device = ["--device", "cuda", "--dtype", "float16"] if full else ["--device", "cpu", "--dtype", "float32"]
    steps = [] if full else ["--steps", "4"]  # the warm-up runs 3 steps
    memory_dtypes = [] if full else ["--dtype", "float32", "--vae-dtype", "float32"]
    comfy = (["--model", "full", "--size", "1024", "--steps", "100", "--warmup", "10", "--repeats", "2",
              "--threads", "0"] if full else
             ["--model", "tiny", "--size", "64", "--steps", "4", "--warmup", "1", "--repeats", "1", "--threads", "2"])
    return {
        "1": [("memory-model", ["benchmarks/memory_model.py", "--size", size, *memory_dtypes]),
              ("diffusers", ["benchmarks/benchmark.py", "--size", size, *device, *steps, "--compile", "none",
                             "--rows", EAGER_ROWS])],
        "2": [("compiled", ["benchmarks/benchmark.py", "--size", size, *device, *steps, "--skip-reference",
                            "--compile", "cudagraphs" if full else "none", "--rows", "inversion,edit-3,floor"]),
              ("comfyui", ["benchmarks/comfy_benchmark.py", *comfy])],
    }


def run_step(out: Path, call: str, name: str, command: list[str], env: dict, deadline: float) -> bool:
    log, result = out / f"call{call}-{name}.log", out / f"call{call}-{name}.json"
    result.unlink(missing_ok=True)
    print(f"== call {call}, {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, *command, "--json", str(result)], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
            if time.perf_counter() > deadline:
                process.kill()
                sink.write(f"\nkilled: call {call} ran past its {CALL_BUDGET_S} s budget\n")
        code = process.wait()
    print(f"== {name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
    return code == 0 and result.is_file()


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def targets(out: Path) -> list[dict]:
    """Every target of the issue from the results in ``out``, with its value, limit and verdict."""
    memory, diffusers = load(out, "call1-memory-model"), load(out, "call1-diffusers")
    compiled, comfy = load(out, "call2-compiled"), load(out, "call2-comfyui")
    dry = any(r and (r.get("size") == "tiny" or "tiny" in str(r.get("model", ""))) for r in (diffusers, comfy))
    rows = []

    def target(name: str, value: float | None, limit: float, at_least: bool, unit: str, note: str = "",
               missing: str = "") -> None:
        check = None if value is None else ("PASS" if (value >= limit if at_least else value <= limit) else "FAIL")
        verdict = ("NOT RUN" + (f" ({missing})" if missing else "") if value is None and check is None
                   else f"dry run ({check} on this CPU)" if dry else check)
        rows.append(dict(target=name, value=value, limit=f"{'>=' if at_least else '<='} {limit}{unit}",
                         unit=unit, verdict=verdict, note=note))

    ref = (diffusers or {}).get("reference", {})
    # Keyed by call as well: in a dry run call 2's variant is eager too, and must not hide call 1's rows.
    variants = {f"{variant}, call {call}": result for call, results in (("1", diffusers), ("2", compiled))
                for variant, result in (results or {}).get("ours", {}).items()}
    eager = variants.get("none, call 1", {}).get("rows", {})
    for title, limit in (("inversion", 1.8), ("edit, 3 concepts", 2.5)):
        value = ref[title]["seconds"] / eager[title]["seconds"] if title in ref and title in eager else None
        target(f"{title}: speed-up over diffusers LEDITS++ (eager)", value, limit, True, "x",
               missing="call 1")
    for variant, result in variants.items():
        for title, batch in (("inversion", 2), ("edit, 3 concepts", 4)):
            floor = next((t for key, t in result["rows"].items() if key.startswith(f"bare UNet b{batch} ")), None)
            value = result["rows"][title]["seconds"] / floor["seconds"] if floor and title in result["rows"] else None
            target(f"{title} over its bare-UNet floor [{variant}]", value, 1.1, False, "x")
    peaks = [eager[t]["peak_gib"] for t in ("inversion", "edit, 3 concepts") if t in eager]
    measured = max(peaks) if peaks and None not in peaks else None
    modelled = max(memory["rows"][t]["peak_gib"] for t in ("inversion", "edit, 3 concepts")) if memory else None
    error = (f"memory model {modelled:.2f} GiB, error {100 * (measured - modelled) / modelled:+.1f} %"
             if measured is not None and modelled else f"memory model {modelled:.2f} GiB" if modelled else "")
    target("peak memory, inversion + 3-concept edit", measured, 8.0, False, " GiB", error,
           missing="CUDA only" if diffusers else "call 1")
    if "3 interventions, batched" in eager and "3 interventions, separate" in eager:
        floors = {b: next((t["seconds"] for k, t in eager.items() if k.startswith(f"bare UNet b{b} ")), None)
                  for b in (4, 12)}
        best = (f"bare UNet b12 / 3 x b4 = {floors[12] / (3 * floors[4]):.2f}x: the most batching can save"
                if all(floors.values()) else "")
        target("3 interventions batched / three separate runs", eager["3 interventions, batched"]["seconds"]
               / eager["3 interventions, separate"]["seconds"], 0.8, False, "x", best)
    else:
        target("3 interventions batched / three separate runs", None, 0.8, False, "x", missing="call 1")
    syncs = variants.get("none, call 1", {}).get("syncs")
    equal = None if not syncs else float(all(a == b for a, b in syncs.values()))
    target("host syncs equal at two step counts (1 = equal)", equal, 1.0, True, "",
           ", ".join(f"{k} {a} / {b}" for k, (a, b) in syncs.items()) if syncs else "", missing="call 1")
    target("ComfyUI node / SamplerCustomAdvanced + CFGGuider", comfy["ratio"] if comfy else None, 1.15, False, "x",
           comfy["model"] if comfy else "", missing="call 2")
    return rows


def write_summary(out: Path) -> list[dict]:
    rows = targets(out)
    setup = {name: {k: v for k, v in (load(out, name) or {}).items() if k in ("device", "torch", "size", "model")}
             for name in ("call1-diffusers", "call2-comfyui")}
    (out / "summary.json").write_text(json.dumps(dict(setup=setup, targets=rows), indent=1) + "\n")
    lines = ["# GPU run summary", "", *(f"- {name}: {s}" for name, s in setup.items() if s), "",
             "| target | value | limit | verdict | note |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.2f}{r['unit']}"
        lines.append(f"| {r['target']} | {value} | {r['limit']} | {r['verdict']} | {r['note']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--call", choices=("1", "2"), required=True, help="which half of the rows to run")
    parser.add_argument("--out", type=Path, required=True, help="folder for the raw output and the summary")
    parser.add_argument("--size", choices=("full", "tiny"), default="full",
                        help="full SDXL on CUDA, or tiny configs on the CPU (a dry run)")
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="ComfyUI checkout for call 2 (default: $COMFYUI_PATH, else .comfyui/ in the repo)")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if args.call == "2":
        comfyui = args.comfyui or Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui")
        if not (comfyui / "comfy" / "samplers.py").is_file():
            print(f"No ComfyUI checkout at {comfyui}: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH, or copy "
                  "its sampling code into .comfyui/ with benchmarks/gpu/prepare.sh /path/to/ComfyUI.", file=sys.stderr)
            return 2
        env["COMFYUI_PATH"] = str(comfyui.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + CALL_BUDGET_S
    ok = all([run_step(args.out, args.call, name, command, env, deadline)
              for name, command in steps_of(args.size)[args.call]])
    print(f"\ntargets (from every call's results in {args.out}):")
    for r in write_summary(args.out):
        value = "-" if r["value"] is None else f"{r['value']:.2f}{r['unit']}"
        print(f"  {r['target']}: {value} ({r['limit']}) {r['verdict']}" + (f"; {r['note']}" if r["note"] else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
