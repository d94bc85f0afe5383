"""Draw a causal graph, and optionally an intervention on it, as a layered picture.

The layout is the classic layered (Sugiyama) one: each concept sits on the row of its
topological generation, so every cause is drawn above its effects. An edge that skips rows gets
invisible waypoints on the rows in between, so it runs between boxes instead of through them.
The order within each row comes from barycenter sweeps (fewest crossings wins), and the
horizontal positions pull each box towards the mean of its neighbours while keeping a fixed gap.

With an intervention the target is amber and shows "old → new", the changed descendants are blue
and show their new value, everything else is grey, and each change the causal check stripped is
noted in red in the box it tried to change, with the reason listed under the graph.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import isotonic_regression

from .errors import InputError
from .graph import CausalGraph, CausalViolation, Intervention, check_intervention

Node = Hashable  # a concept id (str) or a waypoint ("waypoint", edge index, row)

# Layout units are box widths.
WAYPOINT_WIDTH = 0.1
COLUMN_GAP = 0.28

# Pixel sizes at scale 1.
BOX_WIDTH = 190
BOX_PADDING = 10
ROW_GAP = 58
MARGIN = 24
CORNER_RADIUS = 10
NAME_SIZE, VALUE_SIZE, NOTE_SIZE, HEADER_SIZE, LEGEND_SIZE = 17, 15, 13, 18, 13
SUPERSAMPLE = 2  # draw at twice the size and shrink, which anti-aliases lines and arrowheads
MIN_WIDTH = 64

ARROW = "→"  # Pillow's built-in font has no glyph for it, so it is drawn as a vector arrow

INK = (33, 37, 41)
MUTED = (95, 102, 110)
EDGE = (110, 117, 125)
VIOLATION = (224, 49, 49)


@dataclass(frozen=True)
class _Palette:
    fill: tuple[int, int, int]
    outline: tuple[int, int, int]
    label: str


NEUTRAL = _Palette((241, 243, 245), (134, 142, 150), "unchanged")
TARGET = _Palette((255, 232, 204), (240, 140, 0), "intervened target (old → new)")
CHANGED = _Palette((208, 235, 255), (25, 113, 194), "changed descendant (new value)")


# -- layout -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    rows: list[list[Node]]  # left to right, concepts and waypoints
    x: dict[Node, float]  # horizontal centre, in box widths
    routes: list[list[Node]]  # one per distinct edge: cause, waypoints..., effect


def _distinct_edges(graph: CausalGraph) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.cause_id, r.effect_id) for r in graph.relationships))


def _generations(graph: CausalGraph) -> dict[str, int]:
    """Each concept's row: the length of the longest path reaching it from a concept without causes."""
    row_of = dict.fromkeys(graph.ids, 0)
    for cid in graph.topological_order():
        for child in graph.children(cid):
            row_of[child] = max(row_of[child], row_of[cid] + 1)
    return row_of


def _layout(graph: CausalGraph) -> _Layout:
    edges = _distinct_edges(graph)
    row_of: dict[Node, int] = _generations(graph)
    rows: list[list[Node]] = [[] for _ in range(max(row_of.values()) + 1)]
    for cid in graph.ids:  # declaration order is the starting order
        rows[row_of[cid]].append(cid)
    routes = []
    for k, (cause, effect) in enumerate(edges):
        waypoints = [("waypoint", k, row) for row in range(row_of[cause] + 1, row_of[effect])]
        for w in waypoints:
            rows[w[2]].append(w)
        routes.append([cause, *waypoints, effect])
    layers = _Layers.of(rows, routes)
    order = _reduce_crossings(layers)
    rows = [[rows[r][i] for i in row] for r, row in enumerate(order)]
    x = _assign_x(layers.reordered(order))
    return _Layout(rows, {node: float(x[r][i]) for r, row in enumerate(rows) for i, node in enumerate(row)}, routes)


@dataclass(frozen=True)
class _Layers:
    """The rows and the links between adjacent rows as arrays, so each sweep over a row is a few numpy calls.

    Long edges make most of the nodes: the largest graph the limits allow has about 32,000 waypoints, and a
    Python loop over them in every sweep took seconds.
    """

    widths: list[np.ndarray]  # widths[r][i]: the width of the i-th node on row r
    upper: list[np.ndarray]  # upper[r][k]: the index on row r of link k between rows r and r + 1
    lower: list[np.ndarray]  # lower[r][k]: the index on row r + 1 of that link

    @classmethod
    def of(cls, rows: list[list[Node]], routes: list[list[Node]]) -> _Layers:
        index = {node: i for row in rows for i, node in enumerate(row)}
        row_of = {node: r for r, row in enumerate(rows) for node in row}
        pairs: list[list[tuple[int, int]]] = [[] for _ in rows[1:]]
        for route in routes:  # each link joins adjacent rows
            for u, v in zip(route, route[1:]):
                pairs[row_of[u]].append((index[u], index[v]))
        links = [np.array(p, dtype=np.int64).reshape(-1, 2) for p in pairs]
        return cls([np.array([_width(n) for n in row]) for row in rows],
                   [p[:, 0] for p in links], [p[:, 1] for p in links])

    def reordered(self, order: list[np.ndarray]) -> _Layers:
        """The same layers with row r's nodes in the order ``order[r]`` (old indices, left to right)."""
        slot = [np.argsort(o) for o in order]  # slot[r][old index] = new index
        return _Layers([w[o] for w, o in zip(self.widths, order)],
                       [slot[r][u] for r, u in enumerate(self.upper)],
                       [slot[r + 1][v] for r, v in enumerate(self.lower)])

    def neighbours(self, r: int, from_above: bool) -> tuple[np.ndarray, int, np.ndarray]:
        """The links between row r and the fixed row above or below it: (index on row r, that row, index on it)."""
        if from_above:
            return self.lower[r - 1], r - 1, self.upper[r - 1]
        return self.upper[r], r + 1, self.lower[r]


def _mean_by(index: np.ndarray, values: np.ndarray, size: int, fallback: np.ndarray) -> np.ndarray:
    """For each of ``size`` slots, the mean of the ``values`` whose ``index`` is that slot; ``fallback`` where none."""
    counts = np.bincount(index, minlength=size)
    sums = np.bincount(index, weights=values, minlength=size)
    return np.where(counts > 0, sums / np.maximum(counts, 1), fallback)


def _count_crossings(layers: _Layers, position: list[np.ndarray]) -> int:
    """Pairs of links between the same two rows that cross, with each node at ``position[r][index]``."""
    total = 0
    for r, (u, v) in enumerate(zip(layers.upper, layers.lower)):
        a, b = position[r][u], position[r + 1][v]
        lower_ends = b[np.lexsort((b, a))]  # sorted by upper end, then lower end: a crossing is an inversion here
        total += int(np.count_nonzero(np.triu(lower_ends[:, None] > lower_ends[None, :], 1)))
    return total


def _reduce_crossings(layers: _Layers, sweeps: int = 4) -> list[np.ndarray]:
    """Each row's order (old indices, left to right), by barycenter sweeps down and up; the fewest crossings win.

    A node moves to the mean position of its neighbours on the fixed row next to it; one without
    neighbours there holds its place.
    """
    position = [np.arange(len(w)) for w in layers.widths]  # position[r][index]: where that node stands now

    def sort_row(r: int, from_above: bool) -> None:
        moving, fixed_row, fixed = layers.neighbours(r, from_above)
        here = position[r]
        key = _mean_by(here[moving], position[fixed_row][fixed], len(here), fallback=np.arange(len(here)))
        standing = np.argsort(here)  # standing[p]: the node at position p
        here[standing[np.argsort(key, kind="stable")]] = np.arange(len(here))

    best, best_crossings = [p.copy() for p in position], _count_crossings(layers, position)
    for _ in range(sweeps):
        if best_crossings == 0:
            break
        for r in range(1, len(position)):
            sort_row(r, from_above=True)
        for r in range(len(position) - 2, -1, -1):
            sort_row(r, from_above=False)
        crossings = _count_crossings(layers, position)
        if crossings < best_crossings:
            best, best_crossings = [p.copy() for p in position], crossings
    return [np.argsort(p) for p in best]


def _width(node: Node) -> float:
    return 1.0 if isinstance(node, str) else WAYPOINT_WIDTH


def _pack(desired: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """The positions closest (least squares) to ``desired`` that keep each neighbour ``gaps`` apart.

    Subtracting the cumulative gaps turns the spacing constraints into "non-decreasing", which
    is isotonic regression (scipy's pool-adjacent-violators).
    """
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    return isotonic_regression(desired - offsets).x + offsets


def _assign_x(layers: _Layers, sweeps: int = 6) -> list[np.ndarray]:
    """Each row's horizontal centres (rows in their final order), in box widths from the left edge."""
    gaps = [(w[:-1] + w[1:]) / 2 + COLUMN_GAP for w in layers.widths]
    x = [_pack(np.full(len(g) + 1, -g.sum() / 2), g) for g in gaps]

    def settle(r: int, from_above: bool) -> None:
        moving, fixed_row, fixed = layers.neighbours(r, from_above)
        x[r] = _pack(_mean_by(moving, x[fixed_row][fixed], len(x[r]), fallback=x[r]), gaps[r])

    for _ in range(sweeps):
        for r in range(1, len(x)):
            settle(r, from_above=True)
        for r in range(len(x) - 2, -1, -1):
            settle(r, from_above=False)
    left = min(float((row - w / 2).min()) for row, w in zip(x, layers.widths))
    return [row - left for row in x]


def layout_graph(graph: CausalGraph) -> dict[str, tuple[float, float]]:
    """Concept id → (x, y) of its box centre: x in box widths from the left edge, y the row index.

    Row 0 is the top; every cause sits on a smaller row than each of its effects.
    """
    return layout_with_routes(graph)[0]


def layout_with_routes(graph: CausalGraph) -> tuple[dict[str, tuple[float, float]], list[dict[str, object]]]:
    """``layout_graph``'s positions, and each distinct cause → effect edge with the waypoints it bends through.

    A waypoint is (x, row) in the same units; an edge between adjacent rows has none. The
    frontend draws from these, so the node and the PNG preview share one layout.
    """
    layout = _layout(graph)
    row_of = {node: float(r) for r, row in enumerate(layout.rows) for node in row}
    positions = {node: (layout.x[node], row_of[node]) for row in layout.rows for node in row if isinstance(node, str)}
    routes = [{"cause_id": route[0], "effect_id": route[-1],
               "waypoints": [(layout.x[w], row_of[w]) for w in route[1:-1]]} for route in layout.routes]
    return positions, routes


# -- text -----------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(size, 4))


def _arrow_width(font: ImageFont.FreeTypeFont) -> float:
    return font.size * 1.2


def _text_width(text: str, font: ImageFont.FreeTypeFont) -> float:
    parts = text.split(ARROW)
    return sum(font.getlength(p) for p in parts) + (len(parts) - 1) * _arrow_width(font)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy word wrap; a word longer than a whole line is cut between characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while _text_width(word, font) > max_width and len(word) > 1:
            # the longest prefix that fits, by bisection: a scan is quadratic, and hours on a 10,000-character word
            fits = bisect.bisect_right(range(1, len(word) + 1), max_width, key=lambda i: _text_width(word[:i], font))
            cut = max(fits, 1)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if _text_width(candidate, font) <= max_width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines or [""]


def _draw_arrowhead(draw: ImageDraw.ImageDraw, tip: tuple[float, float], tail: tuple[float, float], length: float,
                    colour: tuple[int, int, int]) -> None:
    dx, dy = tip[0] - tail[0], tip[1] - tail[1]
    norm = max((dx * dx + dy * dy) ** 0.5, 1e-6)
    ux, uy = dx / norm, dy / norm
    base = (tip[0] - ux * length, tip[1] - uy * length)
    half = length * 0.5
    draw.polygon([tip, (base[0] - uy * half, base[1] + ux * half), (base[0] + uy * half, base[1] - ux * half)],
                 fill=colour)


def _draw_text(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, font: ImageFont.FreeTypeFont,
               colour: tuple[int, int, int]) -> None:
    """Draw one line, with each "→" drawn as a small vector arrow."""
    _, top, _, bottom = font.getbbox("x")
    middle = y + (top + bottom) / 2
    for i, part in enumerate(text.split(ARROW)):
        if i:
            w = _arrow_width(font)
            start, tip = (x + 0.1 * w, middle), (x + 0.9 * w, middle)
            stroke = max(1, round(font.size / 10))
            draw.line([start, (tip[0] - font.size * 0.25, middle)], fill=colour, width=stroke)
            _draw_arrowhead(draw, tip, start, font.size * 0.45, colour)
            x += w
        draw.text((x, y), part, font=font, fill=colour)
        x += font.getlength(part)


@dataclass(frozen=True)
class _Line:
    text: str
    size: int
    colour: tuple[int, int, int]


def _block(lines: Sequence[_Line], max_width: float, scale: float) -> list[_Line]:
    """Scale and wrap lines to ``max_width`` pixels."""
    out = []
    for line in lines:
        size = round(line.size * scale)
        out.extend(_Line(t, size, line.colour) for t in _wrap(line.text, _font(size), max_width))
    return out


def _block_height(lines: Sequence[_Line], spacing: float) -> float:
    return sum(_line_height(_font(line.size)) + spacing for line in lines) - (spacing if lines else 0)


def _draw_block(draw: ImageDraw.ImageDraw, lines: Sequence[_Line], left: float, top: float, spacing: float,
                centre_width: float | None = None) -> None:
    y = top
    for line in lines:
        font = _font(line.size)
        x = left if centre_width is None else left + (centre_width - _text_width(line.text, font)) / 2
        _draw_text(draw, x, y, line.text, font, line.colour)
        y += _line_height(font) + spacing


# -- what each box says -----------------------------------------------------------------------------

def _stripped(violation: CausalViolation) -> str:
    return f"stripped {ARROW} {violation.new_value}" if violation.new_value else "stripped"


def _box_content(graph: CausalGraph,
                 intervention: Intervention | None) -> tuple[dict[str, list[_Line]], dict[str, _Palette]]:
    changed = {p.concept_id: p for p in intervention.propagated_changes} if intervention else {}
    violations: dict[str, list[CausalViolation]] = {}
    for v in intervention.violations if intervention else ():
        violations.setdefault(v.concept_id, []).append(v)
    content, palette = {}, {}
    for c in graph.concepts:
        if intervention and c.id == intervention.target_concept_id:
            value, palette[c.id] = (f"{intervention.original_value or c.current_value} {ARROW} "
                                    f"{intervention.new_value}", TARGET)
        elif c.id in changed:
            value, palette[c.id] = changed[c.id].new_value, CHANGED
        else:
            value, palette[c.id] = c.current_value, NEUTRAL
        lines = [_Line(c.name, NAME_SIZE, INK), _Line(value, VALUE_SIZE, MUTED)]
        lines += [_Line(_stripped(v), NOTE_SIZE, VIOLATION) for v in violations.get(c.id, ())]
        content[c.id] = lines
    return content, palette


def _header(graph: CausalGraph, intervention: Intervention | None) -> list[_Line]:
    lines = []
    if intervention:
        target = graph.concept(intervention.target_concept_id)
        lines.append(_Line(f"do({target.name} = {intervention.new_value})", HEADER_SIZE, INK))
        if intervention.intervention_description:
            lines.append(_Line(intervention.intervention_description, VALUE_SIZE, MUTED))
    if graph.scene_summary:
        lines.append(_Line(graph.scene_summary, VALUE_SIZE, MUTED))
    return lines


def _violation_reasons(intervention: Intervention | None) -> list[_Line]:
    """Why each change was stripped; the boxes carry only the short note."""
    return [_Line(f"{v.concept_id} {_stripped(v)}: {v.problem}", NOTE_SIZE, VIOLATION)
            for v in (intervention.violations if intervention else ())]


# -- drawing ------------------------------------------------------------------------------------

def _legend_items(intervention: Intervention | None) -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = [("concept: name, value", NEUTRAL), ("cause → effect", "edge")]
    if intervention:
        items = [("intervened target: old → new", TARGET), ("changed descendant: new value", CHANGED),
                 ("unchanged", NEUTRAL), ("cause → effect", "edge")]
        if intervention.violations:
            items.append(("change stripped by the causal check", "violation"))
    return items


def _legend_rows(items: list[tuple[str, object]], max_width: float,
                 scale: float) -> list[list[tuple[str, object, float]]]:
    font = _font(round(LEGEND_SIZE * scale))
    swatch, gap = 26 * scale, 18 * scale
    rows: list[list[tuple[str, object, float]]] = [[]]
    used = 0.0
    for label, kind in items:
        w = swatch + 6 * scale + _text_width(label, font)
        if rows[-1] and used + gap + w > max_width:
            rows.append([])
            used = 0.0
        used += (gap if rows[-1] else 0) + w
        rows[-1].append((label, kind, w))
    return rows


def _draw_legend(draw: ImageDraw.ImageDraw, rows: list[list[tuple[str, object, float]]], left: float, top: float,
                 scale: float) -> None:
    font = _font(round(LEGEND_SIZE * scale))
    swatch, gap, row_height = 26 * scale, 18 * scale, _line_height(font) + 8 * scale
    y = top
    for row in rows:
        x = left
        mid = y + _line_height(font) / 2
        for label, kind, w in row:
            if isinstance(kind, _Palette):
                draw.rounded_rectangle([x, mid - 7 * scale, x + swatch, mid + 7 * scale], radius=4 * scale,
                                       fill=kind.fill, outline=kind.outline, width=max(1, round(2 * scale)))
            elif kind == "edge":
                draw.line([(x, mid), (x + swatch - 8 * scale, mid)], fill=EDGE, width=max(1, round(2 * scale)))
                _draw_arrowhead(draw, (x + swatch, mid), (x, mid), 10 * scale, EDGE)
            else:
                draw.rounded_rectangle([x, mid - 7 * scale, x + swatch, mid + 7 * scale], radius=4 * scale,
                                       fill=NEUTRAL.fill, outline=VIOLATION, width=max(1, round(2 * scale)))
            _draw_text(draw, x + swatch + 6 * scale, y, label, font, MUTED)
            x += w + gap
        y += row_height


def _ports(layout: _Layout) -> tuple[list[float], list[float]]:
    """Where each route leaves its cause and enters its effect, in box widths.

    A box spreads its edges over the middle 60% of its side, in the left-to-right order of the
    nodes at their other ends, so edges do not cross where they meet the box.
    """
    leaving: dict[Node, list[int]] = {}
    entering: dict[Node, list[int]] = {}
    for k, route in enumerate(layout.routes):
        leaving.setdefault(route[0], []).append(k)
        entering.setdefault(route[-1], []).append(k)
    start, end = [0.0] * len(layout.routes), [0.0] * len(layout.routes)
    for ports, groups, neighbour in ((start, leaving, 1), (end, entering, -2)):
        for node, ks in groups.items():
            ks.sort(key=lambda k: layout.x[layout.routes[k][neighbour]])
            for i, k in enumerate(ks):
                ports[k] = layout.x[node] - 0.5 + 0.2 + 0.6 * (i + 1) / (len(ks) + 1)
    return start, end


def _row_gaps(layout: _Layout, gap: float, box_w: float) -> list[float]:
    """Vertical room under each row; edges that travel far sideways get more, so they do not run flat."""
    row_of = {n: r for r, row in enumerate(layout.rows) for n in row}
    reach = [0.0] * len(layout.rows)
    for route in layout.routes:
        for u, v in zip(route, route[1:]):
            reach[row_of[u]] = max(reach[row_of[u]], abs(layout.x[u] - layout.x[v]) * box_w)
    return [min(max(gap, 0.15 * dx), 3 * gap) for dx in reach]


def _draw_edge(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple[int, int, int], width: int,
               head: float) -> None:
    """A polyline whose last point is the arrow's tip; the shaft stops inside the head."""
    *shaft, tip = points
    last = shaft[-1]
    length = max(((tip[0] - last[0]) ** 2 + (tip[1] - last[1]) ** 2) ** 0.5, 1e-6)
    back = 0.8 * head / length
    draw.line(shaft + [(tip[0] - (tip[0] - last[0]) * back, tip[1] - (tip[1] - last[1]) * back)],
              fill=colour, width=width, joint="curve")
    _draw_arrowhead(draw, tip, last, head, colour)


def _draw(graph: CausalGraph, intervention: Intervention | None, scale: float) -> Image.Image:
    layout = _layout(graph)
    box_w, pad, spacing, margin = BOX_WIDTH * scale, BOX_PADDING * scale, 3 * scale, MARGIN * scale
    content, palette = _box_content(graph, intervention)
    boxes = {cid: _block(lines, box_w - 2 * pad, scale) for cid, lines in content.items()}
    box_h = {cid: _block_height(lines, spacing) + 2 * pad for cid, lines in boxes.items()}

    # Vertical plan: header, rows of boxes, stripped-change reasons, legend.
    graph_width = max(layout.x[n] + _width(n) / 2 for n in layout.x) * box_w
    inner_width = max(graph_width, 420 * scale)
    header = _block(_header(graph, intervention), inner_width, scale)
    reasons = _block(_violation_reasons(intervention), inner_width, scale)
    legend = _legend_rows(_legend_items(intervention), inner_width, scale)
    row_heights = [max(box_h[n] for n in row if isinstance(n, str)) for row in layout.rows]
    row_gaps = _row_gaps(layout, ROW_GAP * scale, box_w)
    row_tops = [margin + (_block_height(header, spacing) + 16 * scale if header else 0)]
    for h, gap in zip(row_heights, row_gaps):
        row_tops.append(row_tops[-1] + h + gap)
    reasons_top = row_tops.pop() - row_gaps[-1] + 22 * scale
    legend_top = reasons_top + (_block_height(reasons, spacing) + 10 * scale if reasons else 0)
    height = legend_top + len(legend) * (_line_height(_font(round(LEGEND_SIZE * scale))) + 8 * scale) + margin

    canvas = Image.new("RGB", (round(inner_width + 2 * margin), round(height)), "white")
    draw = ImageDraw.Draw(canvas)
    graph_left = margin + (inner_width - graph_width) / 2
    row_of = {n: r for r, row in enumerate(layout.rows) for n in row}

    def px(x: float) -> float:
        return graph_left + x * box_w

    # Edges first, so boxes sit on top of them. An edge along which the intervention propagates
    # (both ends edited) is drawn in the changed colour.
    edited = ({intervention.target_concept_id, *(p.concept_id for p in intervention.propagated_changes)}
              if intervention else set())
    for route, start, end in zip(layout.routes, *_ports(layout)):
        cause, effect = route[0], route[-1]
        points = [(px(start), row_tops[row_of[cause]] + box_h[cause])]
        for w in route[1:-1]:
            points += [(px(layout.x[w]), row_tops[row_of[w]]),
                       (px(layout.x[w]), row_tops[row_of[w]] + row_heights[row_of[w]])]
        points.append((px(end), row_tops[row_of[effect]]))
        on_path = cause in edited and effect in edited
        _draw_edge(draw, points, CHANGED.outline if on_path else EDGE, max(1, round((3 if on_path else 2) * scale)),
                   11 * scale)

    for cid, lines in boxes.items():
        left, top = px(layout.x[cid] - 0.5), row_tops[row_of[cid]]
        style = palette[cid]
        outline = VIOLATION if any(line.colour == VIOLATION for line in lines) else style.outline
        draw.rounded_rectangle([left, top, left + box_w, top + box_h[cid]], radius=CORNER_RADIUS * scale,
                               fill=style.fill, outline=outline,
                               width=max(1, round((3 if style is TARGET else 2) * scale)))
        _draw_block(draw, lines, left + pad, top + pad, spacing, centre_width=box_w - 2 * pad)

    _draw_block(draw, header, margin, margin, spacing)
    _draw_block(draw, reasons, margin, reasons_top, spacing)
    _draw_legend(draw, legend, margin, legend_top, scale)
    return canvas


def render_graph(graph: CausalGraph, intervention: Intervention | None = None, *,
                 width: int | None = None) -> Image.Image:
    """An RGB picture of ``graph`` laid out cause above effect, with ``intervention`` highlighted.

    The intervention is passed through ``check_intervention`` first, so what is drawn is what the
    editor will do, and every change the check strips is shown in red, with its reason under the graph.

    Args:
        graph: the graph to draw.
        intervention: optional; its target and changes are highlighted.
        width: pixels; scales the whole drawing, text included. None: the canvas fits the graph at a
            size where the text reads comfortably.

    Returns:
        The picture.

    Raises:
        GraphError: the intervention's target is not in the graph.
        InputError: ``width`` is not positive.
    """
    if intervention is not None:
        intervention = check_intervention(graph, intervention)
    if width is None:
        scale = 1.0
    else:
        if not isinstance(width, int) or width < MIN_WIDTH:
            raise InputError(f"render width must be an integer of at least {MIN_WIDTH} pixels, got {width!r}.")
        scale = width / _draw(graph, intervention, 1.0).width
    big = _draw(graph, intervention, scale * SUPERSAMPLE)
    out_width = width or round(big.width / SUPERSAMPLE)
    return big.resize((out_width, max(1, round(big.height * out_width / big.width))), Image.LANCZOS)
