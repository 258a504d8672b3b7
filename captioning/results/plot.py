"""The results plot: CIDEr against size, one panel per decoder family.

Each panel shows one family's variants (x: size on disk, log scale; y: CIDEr), marker shape by
quantization and colour by stage (a distilled or SCST decoder's by its training, also when
quantized), the family's quality reference as a horizontal line with the 1% and 2% loss bands
below it, and the family's own Pareto front as a step line whose points are labelled with their
variant name (less the family part). The front runs through the rows the
summary's budgets may pick, and the references: SCST, distilled and other-engine rows are drawn,
but a better training recipe is not a smaller model, so they never sit on it (seed copies, had a
table passed them, would be drawn the same way; ``write_results`` leaves them out). Rows without a
CIDEr or a positive size are left out, and a note in the panel's corner says how many.

Drawn on a bare Agg canvas (no pyplot state), so the same table always gives the same PNG.
"""
from __future__ import annotations

import math

import pandas as pd

from ..io import atomic_path
from ..variants import REFERENCE_STAGES
from .summary import COMPRESSION_STAGES

PANEL_W, PANEL_H = 5.0, 4.2   # inches per panel
LEGEND_W = 2.1                # inches for the legend column on the right
MAX_COLS = 3
DPI = 120

STAGE_COLOURS = {
    "baseline": "#000000",
    "encoder": "#1f77b4",
    "control": "#7f7f7f",
    "tuning": "#17becf",
    "architecture": "#9467bd",
    "prune": "#ff7f0e",
    "quantize": "#2ca02c",
    "scst": "#d62728",
    "distill": "#8c564b",
}
OTHER_COLOUR = "#e377c2"
QUANT_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
OTHER_MARKER = "X"
REF_COLOUR = "#333333"
BAND1_COLOUR = "#9ecae1"      # within 1% of the reference
BAND2_COLOUR = "#fdd0a2"      # 1-2% below the reference
FRONT_COLOUR = "#444444"


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """True for rows that no other row beats on both size (smaller) and CIDEr (higher).

    A row is beaten when another is at least as good on both and strictly better on one;
    rows with a NaN size or CIDEr are never on the front and never beat another."""
    size = pd.to_numeric(df["size_mb"], errors="coerce")
    cider = pd.to_numeric(df["CIDEr"], errors="coerce")
    ok = size.notna() & cider.notna()
    keep = []
    for i in df.index:
        if not ok[i]:
            keep.append(False)
            continue
        s, c = size[i], cider[i]
        beaten = (ok & (size <= s) & (cider >= c) & ((size < s) | (cider > c))).any()
        keep.append(not bool(beaten))
    return pd.Series(keep, index=df.index, dtype=bool)


def front_candidates(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a family's front may run through: dense references and compression rows of
    cross-entropy-trained decoders (every row when the table has no stage column)."""
    if "stage" not in df.columns:
        return df
    keep = df["stage"].isin(REFERENCE_STAGES + COMPRESSION_STAGES)
    if "training" in df.columns:
        keep &= df["training"].fillna("xe") == "xe"
    return df[keep]


def short_label(variant: str, family: str) -> str:
    """The variant name less its family part: 'r18-updown-xe-fp32' in family updown -> 'r18-xe-fp32';
    a family variant 'updown_small' keeps its own suffix: 'r18-small-xe-fp32'."""
    parts = str(variant).split("-")
    fam = str(family)
    out = []
    for p in parts:
        if p == fam:
            continue
        if fam and p.startswith(fam + "_"):
            out.append(p[len(fam) + 1:])
            continue
        out.append(p)
    return "-".join(out) or str(variant)


def _ordered(values, known) -> list:
    present = list(dict.fromkeys(str(v) for v in values if not _missing(v)))
    return [k for k in known if k in present] + sorted(v for v in present if v not in known)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


TRAINING_STAGES = {"kd": "distill", "scst": "scst"}  # training -> the stage whose colour it is drawn in


def _colour(stage) -> str:
    return STAGE_COLOURS.get(str(stage), OTHER_COLOUR)


def _marker(quant) -> str:
    return QUANT_MARKERS.get(str(quant), OTHER_MARKER)


def _reference(g: pd.DataFrame) -> tuple[float | None, str | None]:
    ref = None
    if "reference_cider" in g.columns:
        vals = pd.to_numeric(g["reference_cider"], errors="coerce").dropna()
        if not vals.empty:
            ref = float(vals.iloc[0])
    name = None
    if "quality_reference" in g.columns:
        names = g["quality_reference"].dropna()
        if not names.empty:
            name = str(names.iloc[0])
    return ref, name


def _limits(g: pd.DataFrame, ref: float | None):
    xs = g["size_mb"].astype(float)
    ys = g["CIDEr"].astype(float).tolist()
    if ref is not None:
        ys += [ref, 0.98 * ref]
    xlo, xhi = float(xs.min()), float(xs.max())
    # room on both sides for labels: a factor of 1.6 in log space, more when there is a single point
    f = 1.6 if xhi / xlo > 1.5 else 2.5
    ylo, yhi = min(ys), max(ys)
    span = yhi - ylo if yhi > ylo else max(abs(yhi) * 0.1, 0.05)
    return (xlo / f, xhi * f), (ylo - 0.16 * span, yhi + 0.18 * span)


# Label offsets (points, from the labelled point to the label's near corner) tried in order; the first
# four sit next to the point, the rest further out with a leader line. Up-left of a front point comes
# first: no variant lies there (it would beat the point), so that is where the room is.
_OFFSETS = [(-7, 6), (7, 6), (7, -12), (-7, -12)] + [
    off for d in (12, 24, 36, 48, 60)
    for off in ((-7 - d // 2, 6 + d), (7, 6 + d), (-7 - d, 6), (7 + d // 2, -12 - d), (-7, -12 - d), (7 + d, -12))]


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _annotate(ax, text, x, y, dx, dy, leader: bool):
    return ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5,
                       ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
                       va="bottom" if dy > 0 else "top", color="#111111", zorder=6, annotation_clip=False,
                       bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
                       arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#777777", "shrinkA": 0, "shrinkB": 4}
                       if leader else None)


def _distance(box, x, y) -> float:
    """From display point (x, y) to the nearest point of ``box``."""
    dx = max(box.x0 - x, 0.0, x - box.x1)
    dy = max(box.y0 - y, 0.0, y - box.y1)
    return math.hypot(dx, dy)


def _place_labels(ax, renderer, pts, labels, markers, lines):
    """Annotate each data point (x, y) with its label at the first offset that costs nothing, else the
    cheapest. Cost: overlapping a label placed earlier or a marker, sitting nearer another marker than
    its own (a reader would pin it to the wrong point), leaving the panel, and (a little) crossing a line.
    ``markers``: display (x, y) of every point drawn; ``lines``: thin display boxes of every line."""
    from matplotlib.transforms import Bbox

    r_own, r_other = 6 * DPI / 72, 10 * DPI / 72
    placed = []
    axbox = ax.get_window_extent(renderer)
    for (x, y), text in zip(pts, labels):
        px, py = ax.transData.transform((x, y))
        others = [(mx, my) for mx, my in markers if math.hypot(mx - px, my - py) > 0.5]
        best, best_cost = None, None
        for k, (dx, dy) in enumerate(_OFFSETS):
            ann = _annotate(ax, text, x, y, dx, dy, leader=False)
            box = ann.get_window_extent(renderer)
            inside = Bbox.intersection(box, axbox)
            outside = box.width * box.height - (inside.width * inside.height if inside is not None else 0.0)
            own = _distance(box, px, py)
            cost = (3 * sum(_overlap(box, p) for p in placed)
                    + 3 * _overlap(box, Bbox([[px - r_own, py - r_own], [px + r_own, py + r_own]]))
                    + sum(_overlap(box, Bbox([[mx - r_other, my - r_other], [mx + r_other, my + r_other]]))
                          for mx, my in others)
                    + 200 * sum(1 for mx, my in others if _distance(box, mx, my) < own)
                    + 4 * max(outside, 0.0)
                    + 1.0 * sum(_overlap(box, ln) for ln in lines))
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, box, k), cost
            else:
                ann.remove()
            if cost == 0:
                break
        ann, box, k = best
        if k >= 4:   # beyond the four places next to its point: draw a leader to it
            ann.remove()
            _annotate(ax, text, x, y, *_OFFSETS[k], leader=True)
        placed.append(box)


def _draw_panel(ax, family: str, g: pd.DataFrame, n_skipped: int, stages, quants):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ref, ref_name = _reference(g)
    title = str(family)
    if ref is not None:
        name = f"{short_label(ref_name, family)} " if ref_name else ""
        title += f"\nreference {name}(CIDEr {ref:.3f})"
    ax.set_title(title, fontsize=9)
    ax.set_xscale("log")
    # plain numbers at 1, 2, 5 x 10^k: readable whether the sizes span one decade or four
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("size on disk (MB, log scale)", fontsize=8)
    ax.set_ylabel("CIDEr", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    if n_skipped:
        ax.text(0.99, 0.01, f"{n_skipped} row(s) without CIDEr/size not shown", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=6, color="#777777")
    if g.empty:
        ax.text(0.5, 0.5, "no scored variants", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        return [], []
    (xlo, xhi), (ylo, yhi) = _limits(g, ref)
    segments = []   # the lines drawn, as axis-aligned segments in data space, for label placement
    if ref is not None:
        segments.append(((xlo, ref), (xhi, ref)))
        ax.axhspan(0.99 * ref, ref, color=BAND1_COLOUR, alpha=0.45, lw=0, zorder=0)
        ax.axhspan(0.98 * ref, 0.99 * ref, color=BAND2_COLOUR, alpha=0.45, lw=0, zorder=0)
        ax.axhline(ref, color=REF_COLOUR, ls="--", lw=1.0, zorder=1)
    for q in quants:
        for s in stages:
            sub = g[(g["_quant"] == q) & (g["_stage"] == s)]
            if not sub.empty:
                ax.scatter(sub["size_mb"], sub["CIDEr"], marker=_marker(q), c=_colour(s), s=36,
                           edgecolors="white", linewidths=0.5, alpha=0.9, zorder=3)
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    cand = front_candidates(g)
    if cand.empty:
        return [], segments
    front = cand[pareto_front(cand)].sort_values(["size_mb", "CIDEr"], ascending=[True, False], kind="stable")
    fx = front["size_mb"].tolist()
    fy = front["CIDEr"].tolist()
    # the best CIDEr reachable at each size: held flat until the next front point, then to the edge
    ax.step(fx + [xhi], fy + [fy[-1]], where="post", color=FRONT_COLOUR, lw=1.2, zorder=2)
    for x0, x1, y0, y1 in zip(fx, fx[1:] + [xhi], fy, fy[1:] + [fy[-1]]):
        segments += [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1))]
    ax.scatter(fx, fy, s=110, facecolors="none", edgecolors=FRONT_COLOUR, linewidths=1.0, zorder=4)
    labels = [short_label(v, family) for v in front["variant"]]
    return list(zip(zip(fx, fy), labels)), segments


def _legends(fig, stages, quants, has_ref: bool, x0: float, y0: float):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    stage_h = [Line2D([], [], ls="", marker="o", ms=7, mfc=_colour(s), mec="white",
                      label=s if s in STAGE_COLOURS else f"{s} (other)") for s in stages]
    quant_h = [Line2D([], [], ls="", marker=_marker(q), ms=7, mfc="#555555", mec="white",
                      label=q if q in QUANT_MARKERS else f"{q} (other)") for q in quants]
    guide_h = [Line2D([], [], color=FRONT_COLOUR, lw=1.2, marker="o", ms=9, mfc="none", mec=FRONT_COLOUR,
                      label="Pareto front of the\nreferences and compression\nrows (labelled points)")]
    if has_ref:
        guide_h += [Line2D([], [], color=REF_COLOUR, ls="--", lw=1.0, label="quality reference"),
                    Patch(facecolor=BAND1_COLOUR, alpha=0.45, label="within 1% of it"),
                    Patch(facecolor=BAND2_COLOUR, alpha=0.45, label="1–2% below it")]
    y, gap = y0, 0.25 / fig.get_figheight()
    kw = {"loc": "upper left", "fontsize": 7.5, "title_fontsize": 8, "frameon": False, "alignment": "left",
          "handletextpad": 0.4, "borderaxespad": 0.0}
    renderer = fig.canvas.get_renderer()
    for title, handles in (("stage (colour)", stage_h), ("quantization (shape)", quant_h), ("guides", guide_h)):
        if not handles:
            continue
        leg = fig.legend(handles=handles, title=title, bbox_to_anchor=(x0, y), **kw)
        box = leg.get_window_extent(renderer).transformed(fig.transFigure.inverted())
        y = box.y0 - gap
    return y


def _legend_height(stages, quants, has_ref: bool) -> float:
    """Inches the legend column needs, measured on a scratch figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tall = 30.0
    fig = Figure(figsize=(LEGEND_W, tall), dpi=DPI)
    FigureCanvasAgg(fig)
    return (1.0 - _legends(fig, stages, quants, has_ref, x0=0.0, y0=1.0)) * tall


def pareto_figure(df: pd.DataFrame):
    """The figure plot_pareto saves: one panel (Axes) per family, in sorted family order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    df = df.copy()
    fam_col = "family" if "family" in df.columns else "decoder"
    df["_family"] = df[fam_col].where(df[fam_col].notna(), "unknown").astype(str)
    df["_stage"] = df["stage"].where(df["stage"].notna(), "unknown").astype(str) if "stage" in df else "unknown"
    if "training" in df:  # a distilled or SCST decoder keeps its training's colour in every quantization
        trained = df["training"].map(TRAINING_STAGES)
        df["_stage"] = trained.where(trained.notna(), df["_stage"])
    df["_quant"] = (df["quantization"].where(df["quantization"].notna(), "unknown").astype(str)
                    if "quantization" in df else "unknown")
    df["size_mb"] = pd.to_numeric(df["size_mb"], errors="coerce")
    df["CIDEr"] = pd.to_numeric(df["CIDEr"], errors="coerce")
    usable = df["size_mb"].notna() & df["CIDEr"].notna() & (df["size_mb"] > 0)

    families = sorted(df["_family"].unique()) or ["(no variants)"]
    stages = _ordered(df.loc[usable, "_stage"], list(STAGE_COLOURS))
    quants = _ordered(df.loc[usable, "_quant"], list(QUANT_MARKERS))
    n = len(families)
    ncols = min(n, MAX_COLS)
    nrows = math.ceil(n / ncols)
    has_ref = any(_reference(df[usable & (df["_family"] == fam)])[0] is not None for fam in families)
    width = PANEL_W * ncols + LEGEND_W
    height = max(PANEL_H * nrows, 0.75 + _legend_height(stages, quants, has_ref))
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # fixed margins (in inches) so label placement below sees the final axes positions
    fig.subplots_adjust(left=0.6 / width, right=(width - LEGEND_W - 0.15) / width,
                        bottom=0.55 / height, top=1 - 0.75 / height,
                        wspace=0.25, hspace=0.45)
    # centred over the panels, not the legend column
    fig.suptitle("CIDEr against size, per decoder family (upper left is better)", fontsize=10,
                 x=(0.6 + (width - LEGEND_W - 0.15)) / 2 / width)
    to_label = []
    for i, fam in enumerate(families):
        ax = axes[i // ncols][i % ncols]
        rows = df[df["_family"] == fam]
        g = rows[usable.loc[rows.index]]
        to_label.append((ax, g, *_draw_panel(ax, fam, g, len(rows) - len(g), stages, quants)))
    for j in range(n, nrows * ncols):
        fig.delaxes(axes[j // ncols][j % ncols])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax, g, pts, segments in to_label:
        if not pts:
            continue
        # every marker and every line is an obstacle (a line as a thin box)
        w = 1.5
        markers = [tuple(m) for m in ax.transData.transform(g[["size_mb", "CIDEr"]].to_numpy(dtype=float))]
        lines = []
        for a, b in segments:
            (ax0, ay0), (ax1, ay1) = ax.transData.transform([a, b])
            lines.append(Bbox([[min(ax0, ax1) - w, min(ay0, ay1) - w], [max(ax0, ax1) + w, max(ay0, ay1) + w]]))
        _place_labels(ax, renderer, [p for p, _ in pts], [t for _, t in pts], markers, lines)
    _legends(fig, stages, quants, has_ref, x0=(width - LEGEND_W + 0.05) / width, y0=1 - 0.75 / height)
    return fig


def plot_pareto(df: pd.DataFrame, out) -> None:
    """Write the per-family CIDEr-against-size plot to ``out`` (PNG), atomically."""
    fig = pareto_figure(df)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
