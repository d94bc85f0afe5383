"""Does csg-evaluate overlap the VLM with SDXL? Tiny random SDXL on the CPU, a 127.0.0.1 VLM that
answers every request after a fixed delay.

    python benchmarks/evaluation_overlap.py [--items 8] [--concurrency 4] [--steps 8]

1. Calibration: the runner with a VLM that answers at once gives the SDXL time per item (edits of
   every method and the metrics), and the VLM delay is set so that one item's VLM work (its plan,
   then its judgements, through a pool of ``--concurrency`` threads) takes about as long: the
   hardest case to overlap.
2. VLM time per item, measured alone: that same VLM work for one item, no SDXL. Its plan's two calls
   run one after the other, so alone it is slower than the pool's throughput allows; the stricter
   bound is the pool's floor: all of an item's calls x delay / concurrency.
3. The pipelined run. SDXL time per item is taken from this run's own stage timings (so a busy
   machine slows the bound and the run alike), and the wall time per item in steady state is the
   time between the first and the last finished item over the items in between.
   Target: at most 1.15 x max(VLM time, SDXL time), checked against the stricter VLM floor;
   without the overlap it would be their sum.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csg.counterfactual import CSGParams, load_image  # noqa: E402
from csg.diffusers_host import DiffusersSDXLHost  # noqa: E402
from csg.evaluation.datasets import DatasetSpec, select  # noqa: E402
from csg.evaluation.results import ResultsWriter, results_path  # noqa: E402
from csg.evaluation.runner import Runner, plan_item  # noqa: E402
from csg.evaluation.scoring import judge_scores  # noqa: E402
from csg.metrics import LPIPS, lpips_heads, vgg16_features  # noqa: E402
from csg.vlm import OpenAICompatibleVLM  # noqa: E402
from tests.evaluation_fixtures import evaluation_server, write_folder_dataset  # noqa: E402
from tools.random_sdxl import build_sdxl_components  # noqa: E402

METHODS = ("csg", "ddpm", "ddim")


def run_items(host, lpips, params, items, server, out: Path, concurrency: int) -> Runner:
    vlm = OpenAICompatibleVLM(server.base_url, "bench-vlm", backoff=0.01)
    with ResultsWriter(results_path(out, 0)) as writer:
        runner = Runner(host, vlm, lpips, params, METHODS, 7.5, out, writer, {}, "bench", 0, concurrency)
        runner.run(items)
    return runner


def sdxl_seconds(out: Path) -> float:
    """Mean SDXL time per item of a run: its edits of every method and the metrics."""
    timings = [json.loads(line)["timings"] for line in (out / "results.0.jsonl").read_text().splitlines()]
    return sum(sum(t[m] for m in (*METHODS, "metrics")) for t in timings) / len(timings)


def vlm_alone(item, server, concurrency: int, counterfactuals: int) -> float:
    """One item's VLM work with no SDXL: its plan, then a judgement pair per counterfactual."""
    vlm = OpenAICompatibleVLM(server.base_url, "bench-vlm", backoff=0.01)
    image = load_image(item.image)
    started = time.monotonic()
    plan = plan_item(vlm, item)
    with ThreadPoolExecutor(concurrency) as pool:
        jobs = [pool.submit(judge_scores, vlm, image, plan.interventions[k % len(plan.interventions)], plan.graph)
                for k in range(counterfactuals)]
        [job.result() for job in jobs]
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="csg-overlap-"))
    folder = write_folder_dataset(root / "data", args.items, hand_written=False)
    items = select([DatasetSpec.parse(f"bench=folder:{folder}")], None, 0)
    host = DiffusersSDXLHost.from_components(build_sdxl_components("tiny", seed=0))
    lpips = LPIPS(vgg16_features(), lpips_heads())
    params = CSGParams(num_steps=args.steps, warmup=1, max_side=64)

    with evaluation_server(delay=0.0) as server:
        run_items(host, lpips, params, items, server, root / "fast", args.concurrency)
    calibration = sdxl_seconds(root / "fast")
    first_record = json.loads((root / "fast" / "results.0.jsonl").read_text().splitlines()[0])
    counterfactuals = len(first_record["interventions"]) * len(METHODS)
    calls = 2 + -(-2 * counterfactuals // args.concurrency)  # plan (2 serial calls), then the judge rounds
    delay = calibration / calls
    with evaluation_server(delay=delay) as server:
        vlm = vlm_alone(items[0], server, args.concurrency, counterfactuals)
        runner = run_items(host, lpips, params, items, server, root / "overlap", args.concurrency)
    sdxl = sdxl_seconds(root / "overlap")
    times = runner.progress.finish_times
    per_item = (times[-1] - times[0]) / (len(times) - 1)
    whole = (times[-1] - runner.progress.started) / len(times)
    floor = (2 + 2 * counterfactuals) * delay / args.concurrency  # the pool busy all the time
    bound, strict = max(vlm, sdxl), max(floor, sdxl)
    print(f"items {len(items)}, VLM delay {delay * 1000:.0f} ms/request, concurrency {args.concurrency}")
    print(f"SDXL time per item  {sdxl:.2f} s   (edits {', '.join(METHODS)} + metrics, in the pipelined run; "
          f"{calibration:.2f} s in calibration)")
    print(f"VLM time per item   {vlm:.2f} s   (alone: plan + {2 * counterfactuals} judge calls); "
          f"the pool's floor {floor:.2f} s")
    print(f"pipelined per item  {per_item:.2f} s steady state ({per_item / bound:.2f} x max), "
          f"{whole:.2f} s with pipeline fill ({whole / bound:.2f} x max); the sum would be {sdxl + vlm:.2f} s")
    print(f"against max(VLM floor, SDXL) = {strict:.2f} s: {per_item / strict:.2f} x")
    print("PASS" if per_item <= 1.15 * strict else "FAIL", "(target: steady state <= 1.15 x max(VLM floor, SDXL))")


if __name__ == "__main__":
    main()
