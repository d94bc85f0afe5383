"""The evaluation runner: every sampled item through the VLM stages and every editing method,
scored per counterfactual, one atomic results line per item (``csg.evaluation.results``).

Per item: the VLM extracts the graph from the image and its caption and proposes interventions
(unless the dataset gives them by hand); each method inverts the image once and edits every
intervention from that inversion (CSG batches them in one sampling loop); LPIPS and masked LPIPS
are computed on the spot, and the judge is asked about every counterfactual.

The VLM is a pool of ``vlm_concurrency`` threads shared by two kinds of work: the plan (graph +
proposals) of the next items, submitted ahead, and the judgements of the items already edited.
So while SDXL edits item k, the VLM plans item k+1.. and judges item k-1: with enough
concurrency the wall time per item approaches the larger of the two, not their sum.

Scale-out: with ``accelerate launch``, each process takes the items whose id hashes to its rank
among those not yet finished in ANY results file, and appends to its own ``results.<rank>.jsonl``.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..counterfactual import CSGParams, baseline_counterfactuals, counterfactuals, load_image
from ..errors import OutputError
from ..metrics import LPIPS
from ..output import make_folder, save_image
from ..plan import Plan, make_plan
from ..render import render_graph
from .datasets import Item, read_hand_written
from .results import ResultsWriter
from .scoring import edit_region, image_scores, judge_scores

METHODS = ("csg", "ddpm", "ddim")
MAX_ITEMS_JUDGED = 2  # edited items waiting for the judge; a crash loses at most these and the one being edited


@dataclass
class Edited:
    """An item whose counterfactuals exist and whose judgements are on their way."""

    item: Item
    record: dict
    judgements: list[tuple[dict, Future]]  # (its entry in the record, the judge's answer)
    started: float
    timings: dict[str, float]
    remaining: int  # judge answers still to come


def safe_name(text: str) -> str:
    """A file name for an item id: its readable characters plus a short hash, so two ids never share one."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "item"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One stderr line per finished item: its stage times, the running mean and the ETA."""

    def __init__(self, total: int, rank: int):
        self.total, self.rank = total, rank
        self.done, self.started = 0, time.monotonic()
        self.finish_times: list[float] = []  # time.monotonic() of each finished item

    def item(self, item_id: str, timings: dict[str, float], failed: str | None = None) -> None:
        self.done += 1
        self.finish_times.append(time.monotonic())
        elapsed = self.finish_times[-1] - self.started
        per_item = elapsed / self.done
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        bar = "#" * (20 * self.done // max(self.total, 1))
        status = f"FAILED: {failed}" if failed else stages
        print(f"csg-evaluate[{self.rank}] [{bar:<20}] {self.done}/{self.total} {item_id}: {status} | "
              f"{per_item:.1f}s/item, ETA {format_seconds(per_item * (self.total - self.done))}",
              file=sys.stderr, flush=True)


def plan_item(vlm, item: Item) -> tuple[Plan, float]:
    """The plan of one item (hand-written, or from the VLM: extract, then propose) and the seconds it took."""
    started = time.monotonic()
    graph, interventions = read_hand_written(item.graph, item.interventions)
    plan = make_plan(vlm, load_image(item.image), item.caption or None, graph, interventions)
    return plan, time.monotonic() - started


@dataclass
class Runner:
    host: Any  # DiffusionHost
    vlm: Any  # csg.vlm.VLM, shared by every thread (the HTTP backend is thread-safe)
    lpips: LPIPS
    params: CSGParams
    methods: Sequence[str]
    guidance_scale: float
    out: Path
    writer: ResultsWriter
    settings: dict
    settings_id: str
    rank: int = 0
    vlm_concurrency: int = 4

    def run(self, items: Sequence[Item]) -> int:
        """Evaluate ``items``; returns how many failed (their lines carry the error, and a rerun retries them)."""
        self.progress = Progress(len(items), self.rank)
        self._lock = threading.Lock()
        self._judging = threading.Semaphore(MAX_ITEMS_JUDGED)
        self._write_errors: list[BaseException] = []
        self._failed = 0
        with ThreadPoolExecutor(max_workers=self.vlm_concurrency, thread_name_prefix="csg-vlm") as pool:
            plans: deque[tuple[Item, Future]] = deque()
            queue = deque(items)

            def refill() -> None:
                while queue and len(plans) < self.vlm_concurrency:
                    item = queue.popleft()
                    plans.append((item, pool.submit(plan_item, self.vlm, item)))

            refill()
            try:
                self._loop(pool, plans, refill)
            except KeyboardInterrupt:  # drop the queued VLM work; the requests already sent end by themselves
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        self._raise_write_error()
        return self._failed

    def _loop(self, pool: ThreadPoolExecutor, plans: deque, refill) -> None:
        """Edit the items in order as their plans arrive; a failed item is recorded and the loop goes on."""
        while plans:
            self._raise_write_error()
            item, future = plans.popleft()
            started = time.monotonic()
            self._judging.acquire()  # released when the item's line is written
            try:
                plan, seconds = future.result()
                waited = time.monotonic() - started
                refill()
                self.edit(pool, item, plan, {"plan": seconds, "wait for VLM": waited})
            except OutputError:  # a full disk or a lost folder: every next item would fail the same way
                raise
            except Exception as exc:  # one bad item must not end a run of hundreds: record it, go on
                self._judging.release()
                refill()
                self._failed += 1
                with self._lock:
                    self.writer.append(self.base_record(item) | {"error": f"{type(exc).__name__}: {exc}"})
                    self.progress.item(item.id, {}, failed=f"{type(exc).__name__}: {exc}")

    def _raise_write_error(self) -> None:
        if self._write_errors:
            raise self._write_errors[0]

    def base_record(self, item: Item) -> dict:
        return {"item_id": item.id, "dataset": item.dataset, "image": str(item.image), "caption": item.caption,
                "inputs_id": item.inputs_id, "settings_id": self.settings_id, "settings": self.settings,
                "rank": self.rank, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def edit(self, pool: ThreadPoolExecutor, item: Item, plan: Plan, timings: dict[str, float]) -> None:
        """Every method's counterfactuals of one item, their images and image scores; the judge's questions go
        to the pool, and the item's line is written when its last answer arrives (``judged``)."""
        started = time.monotonic()
        folder = self.out / "items" / safe_name(item.id)
        make_folder(folder)
        rel = lambda path: str(path.relative_to(self.out))  # noqa: E731
        image = load_image(item.image)
        outputs: dict[str, list] = {}
        for method in self.methods:
            t0 = time.monotonic()
            if method == "csg":
                outputs[method] = counterfactuals(self.host, image, plan.graph, plan.interventions,
                                                  source_prompt=plan.source_prompt, params=self.params)
            else:
                outputs[method] = baseline_counterfactuals(self.host, image, plan.interventions, method=method,
                                                           source_prompt=plan.source_prompt, params=self.params,
                                                           guidance_scale=self.guidance_scale)
            timings[method] = time.monotonic() - t0
        t0 = time.monotonic()
        source = next(iter(outputs.values()))[0].source_image
        save_image(source, folder / "original.png")
        record = self.base_record(item) | {
            "graph": plan.graph.to_dict(), "source_prompt": plan.source_prompt,
            "interventions": [i.to_dict() for i in plan.interventions],
            "files": {"original": rel(folder / "original.png"), "graphs": [], "masks": []}, "methods": {}}
        regions = []
        for k, intervention in enumerate(plan.interventions):
            graph_png = folder / f"graph_{k + 1}.png"
            save_image(render_graph(plan.graph, intervention), graph_png)
            record["files"]["graphs"].append(rel(graph_png))
            region = edit_region(outputs["csg"][k].masks, source.size) if "csg" in outputs else None
            if region is not None:
                mask_png = folder / f"mask_{k + 1}.png"
                save_image(Image.fromarray((region * 255).round().to(torch.uint8).cpu().numpy()), mask_png)
                record["files"]["masks"].append(rel(mask_png))
            regions.append(region)
        judgements = []
        for method, results in outputs.items():
            entries = record["methods"][method] = []
            for k, (intervention, result) in enumerate(zip(plan.interventions, results)):
                path = folder / f"{method}_{k + 1}.png"
                save_image(result.image, path)
                entry = {"intervention_id": intervention.id, "image": rel(path),
                         **image_scores(self.lpips, source, result.image, regions[k])}
                entries.append(entry)
                judgements.append((entry, pool.submit(judge_scores, self.vlm, result.image, intervention, plan.graph)))
        timings["metrics"] = time.monotonic() - t0
        edited = Edited(item, record, judgements, started, timings, remaining=len(judgements))
        for _, future in judgements:
            future.add_done_callback(lambda _, edited=edited: self.judged(edited))

    def judged(self, edited: Edited) -> None:
        """A judge thread's answer arrived; the last one of an item writes the item's line."""
        with self._lock:
            edited.remaining -= 1
            if edited.remaining:
                return
            try:
                self.finish(edited)
            except BaseException as exc:  # a callback's exception would vanish; the main thread raises it
                self._write_errors.append(exc)
            finally:
                self._judging.release()

    def finish(self, edited: Edited) -> None:
        """Scores from the judge into the record, then the record's line (called under the lock)."""
        for entry, future in edited.judgements:
            try:
                entry.update(future.result())
            except Exception as exc:  # the judge gave up on this image: the scores stay empty, the reason is kept
                entry.update({"vlm_effectiveness": None, "verdict": None, "causal_consistency": None,
                              "preservation": None, "judge_error": f"{type(exc).__name__}: {exc}"})
        edited.timings["until written"] = time.monotonic() - edited.started
        edited.record["timings"] = edited.timings
        self.writer.append(edited.record)
        self.progress.item(edited.item.id, edited.timings)
