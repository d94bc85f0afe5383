"""Table 1 and the HTML report from an evaluation folder's ``results.*.jsonl`` files.

    python -m csg.report OUT        # writes OUT/table.md, OUT/table.csv and OUT/report.html

The table has the paper's layout: one row per method, one column group per dataset and the
average, with the mean of each metric, its 95% bootstrap confidence interval (percentile method,
items resampled within each dataset; the average is the mean of the dataset means, as in the
paper, resampled the same way) and n, the number of counterfactuals that have the score (a
metric with no value for a counterfactual, e.g. Preservation when the target has no
non-descendants, leaves it out). Results made with different settings are never pooled: each
settings_id gets its own table.

The HTML report is one self-contained file: every image is embedded as a data URI, there is no
link to anything outside it, and a few lines of inline JavaScript sort the items by any score.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import OutputError
from .evaluation.results import load_results, records_by_settings
from .output import write_text

METRICS = (  # key, column title, higher is better
    ("vlm_effectiveness", "VLM-Eff.", True),
    ("lpips", "LPIPS", False),
    ("preservation", "Preservation", True),
    ("causal_consistency", "Causal cons.", True),
    ("masked_lpips", "Masked LPIPS", False),
)
METHOD_NAMES = {"ddim": "DDIM Inversion", "ddpm": "DDPM Inversion", "csg": "CSG (Ours)"}
AVERAGE = "Average"
BOOTSTRAP_SAMPLES = 2000


def item_scores(records: Sequence[dict], method: str, metric: str) -> dict[str, list[list[float]]]:
    """dataset -> per item, the metric's values over that item's counterfactuals (None left out)."""
    out: dict[str, list[list[float]]] = {}
    for record in records:
        values = [e[metric] for e in record.get("methods", {}).get(method, []) if e.get(metric) is not None]
        if values:
            out.setdefault(record["dataset"], []).append(values)
    return out


def bootstrap(groups: Sequence[list[list[float]]], seed: int = 0) -> tuple[float, float, float, int]:
    """Mean over groups of each group's mean over counterfactuals; 95% CI resampling items per group."""
    rng = np.random.default_rng(seed)
    n = sum(len(v) for items in groups for v in items)
    means = [np.mean([x for v in items for x in v]) for items in groups]
    estimate = float(np.mean(means))
    draws = np.zeros(BOOTSTRAP_SAMPLES)
    for items in groups:
        sums = np.array([sum(v) for v in items], dtype=float)
        counts = np.array([len(v) for v in items], dtype=float)
        picks = rng.integers(0, len(items), size=(BOOTSTRAP_SAMPLES, len(items)))
        draws += sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    draws /= len(groups)
    low, high = np.percentile(draws, [2.5, 97.5])
    return estimate, float(low), float(high), n


def table(records: Sequence[dict]) -> tuple[list[str], list[str], dict]:
    """(datasets + Average, methods, cells): cells[(method, column, metric)] = (mean, low, high, n)."""
    datasets = sorted({r["dataset"] for r in records})
    methods = [m for m in METHOD_NAMES if any(m in r.get("methods", {}) for r in records)]
    cells = {}
    for method in methods:
        for key, _, _ in METRICS:
            scores = item_scores(records, method, key)
            for dataset in datasets:
                if dataset in scores:
                    cells[(method, dataset, key)] = bootstrap([scores[dataset]])
            if scores and len(scores) == len(datasets):
                cells[(method, AVERAGE, key)] = bootstrap([scores[d] for d in datasets])
    return [*datasets, AVERAGE], methods, cells


def _cell(value: tuple[float, float, float, int] | None) -> str:
    if value is None:
        return "–"
    mean, low, high, n = value
    return f"{mean:.3f} [{low:.3f}, {high:.3f}] (n={n})"


def markdown_table(columns: list[str], methods: list[str], cells: dict) -> str:
    header = ["Method"] + [f"{c} {title} {'↑' if up else '↓'}" for c in columns for _, title, up in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = [METHOD_NAMES[method]] + [_cell(cells.get((method, c, k))) for c in columns for k, _, _ in METRICS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def csv_table(columns: list[str], methods: list[str], cells: dict, settings_id: str) -> list[list]:
    rows = []
    for method in methods:
        for column in columns:
            for key, _, _ in METRICS:
                if (method, column, key) in cells:
                    mean, low, high, n = cells[(method, column, key)]
                    rows.append([settings_id, METHOD_NAMES[method], column, key, f"{mean:.6f}", f"{low:.6f}",
                                 f"{high:.6f}", n])
    return rows


# -- HTML ------------------------------------------------------------------------------------------

def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _score(value) -> str:
    return "–" if value is None else f"{value:.3f}"


STYLE = """body{font-family:sans-serif;margin:1.5em}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px;vertical-align:top}
img{max-width:192px;image-rendering:pixelated}
.item{border-top:2px solid #444;margin-top:1em;padding-top:.5em}
.row{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0}
figcaption{font-size:12px}
.graph img{max-width:360px}
button{margin-right:4px}"""
# data-vlmeffectiveness etc.: attribute names without hyphens read back unchanged from element.dataset
SCRIPT = """function sortBy(key,dir){const box=document.getElementById('items');const items=[...box.children];
items.sort((a,b)=>{const x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);
return (isNaN(x)?1:isNaN(y)?-1:dir*(x-y));});items.forEach(i=>box.appendChild(i));}"""


def _item_html(out: Path, record: dict) -> str:
    methods = record["methods"]
    keys = {k: [e.get(k) for m in methods.values() for e in m if e.get(k) is not None] for k, _, _ in METRICS}
    data = " ".join(f'data-{k.replace("_", "")}="{np.mean(v) if v else "nan"}"' for k, v in keys.items())
    parts = [f'<div class="item" {data}><h3>{html.escape(record["item_id"])}</h3>'
             f'<p>{html.escape(record.get("source_prompt", record["caption"]))}</p>']
    for k, intervention in enumerate(record["interventions"]):
        change = (f'{intervention["target_concept_name"]}: {intervention["original_value"]} → '
                  f'{intervention["new_value"]}')
        parts.append(f'<h4>{html.escape(intervention["id"])}: {html.escape(change)}</h4><div class="row">')
        parts.append(f'<figure><img src="{data_uri(out / record["files"]["original"])}" alt="original">'
                     '<figcaption>original</figcaption></figure>')
        for method, entries in methods.items():
            entry = entries[k]
            scores = "<br>".join(f"{title} {_score(entry.get(key))}" for key, title, _ in METRICS)
            verdict = entry.get("verdict") or entry.get("judge_error", "")
            parts.append(f'<figure><img src="{data_uri(out / entry["image"])}" alt="{method}">'
                         f'<figcaption><b>{METHOD_NAMES[method]}</b> {html.escape(str(verdict))}<br>{scores}'
                         '</figcaption></figure>')
        masks = record["files"]["masks"]
        if k < len(masks):
            parts.append(f'<figure><img src="{data_uri(out / masks[k])}" alt="mask"><figcaption>edited region '
                         '(union of CSG masks)</figcaption></figure>')
        parts.append(f'<figure class="graph"><img src="{data_uri(out / record["files"]["graphs"][k])}" '
                     'alt="causal graph"><figcaption>causal graph</figcaption></figure></div>')
    return "".join(parts) + "</div>"


def html_report(out: Path, groups: dict[str, list[dict]], tables: dict[str, str], torn: list[str]) -> str:
    buttons = "".join(f'<button onclick="sortBy(\'{k.replace("_", "")}\',{-1 if up else 1})">best {title}</button>'
                      f'<button onclick="sortBy(\'{k.replace("_", "")}\',{1 if up else -1})">worst {title}</button>'
                      for k, title, up in METRICS)
    body = [f"<h1>Causal counterfactuals: evaluation of {html.escape(str(out.name))}</h1>"]
    if torn:
        body.append("<p>Unreadable lines skipped (their items are redone on a rerun): "
                    f"{html.escape(', '.join(torn))}</p>")
    for sid, records in groups.items():
        body.append(f"<h2>Settings {sid} ({len(records)} items)</h2><pre>{html.escape(tables[sid])}</pre>")
        body.append(f'<div>Sort items: {buttons}</div><div id="items">' if len(groups) == 1 else "<div>")
        body += [_item_html(out, r) for r in sorted(records, key=lambda r: r["item_id"])]
        body.append("</div>")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>csg evaluation</title><style>{STYLE}</style>'
            f'<script>{SCRIPT}</script></head><body>{"".join(body)}</body></html>')


def write_report(out: Path) -> dict[str, Path]:
    """table.md, table.csv and report.html in ``out`` from its results files; returns their paths."""
    loaded = load_results(out)
    groups = records_by_settings(loaded.records)
    tables, rows = {}, []
    for sid, records in groups.items():
        columns, methods, cells = table(records)
        tables[sid] = markdown_table(columns, methods, cells)
        rows += csv_table(columns, methods, cells, sid)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv", "html": out / "report.html"}
    write_text(paths["markdown"], "".join(f"## Settings {sid} ({len(groups[sid])} items)\n\n{tables[sid]}\n"
                                          for sid in groups))
    table_csv = io.StringIO()
    writer = csv.writer(table_csv)
    writer.writerow(["settings_id", "method", "dataset", "metric", "mean", "ci_low", "ci_high", "n"])
    writer.writerows(rows)
    write_text(paths["csv"], table_csv.getvalue())
    write_text(paths["html"], html_report(out, groups, tables, loaded.torn))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m csg.report OUT   (an evaluation folder holding results.*.jsonl)", file=sys.stderr)
        return 2
    try:
        paths = write_report(Path(args[0]))
    except OutputError as exc:
        print(f"csg.report: {exc}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
