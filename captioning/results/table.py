"""Collect every variant's metrics into the results table, its Markdown twin and the Pareto plot."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..io import atomic_path, read_json, write_text

ID_COLS = ["variant", "dataset", "encoder", "decoder", "family", "stage", "training", "prune_method", "prune_ratio",
           "sparsity", "quantization"]
SIZE_COLS = ["params", "nonzero_params", "size_mb", "floor_mb", "size_reduction_pct"]
QUALITY_COLS = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
                "cider_change_pct"]
COLUMNS = ID_COLS + SIZE_COLS + QUALITY_COLS + ["latency_ms"]


def build_table(metric_files, baselines: list[str], latency_file=None) -> pd.DataFrame:
    """One row per variant. Size reduction and CIDEr change are against the baseline of the
    row's decoder family (the big encoder with the dense fp32 decoder), as in the paper.
    ``latency_file``: {variant: ms} from ``measure_artifacts``, replacing the metrics' own latency."""
    rows = [read_json(f) for f in metric_files]
    if latency_file is not None:
        latency = read_json(latency_file)
        missing = [r["variant"] for r in rows if r.get("variant") not in latency]
        if missing:
            raise UserError(f"{latency_file}: no latency for variant '{missing[0]}'")
        rows = [{**r, "latency_ms": latency[r["variant"]]} for r in rows]
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    df["family"] = df["family"].fillna(df["decoder"])
    base = {}
    for name in baselines:
        hit = df.loc[df["variant"] == name]
        if hit.empty:
            raise UserError(f"baseline variant '{name}' is not among the evaluated variants")
        base[hit.iloc[0]["family"]] = hit.iloc[0]
    missing = set(df["family"]) - set(base)
    if missing:
        raise UserError(f"no baseline variant given for decoder(s) {sorted(missing)}")
    base_size = df["family"].map(lambda d: base[d]["size_mb"])
    base_cider = df["family"].map(lambda d: base[d]["CIDEr"])
    df["size_reduction_pct"] = (1.0 - df["size_mb"] / base_size) * 100.0
    df["cider_change_pct"] = (df["CIDEr"] / base_cider - 1.0) * 100.0
    df = df[COLUMNS].sort_values(["decoder", "stage", "encoder", "variant"], kind="stable")
    return df.reset_index(drop=True)


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """True for rows that no other row beats on both size (smaller) and CIDEr (higher)."""
    keep = []
    for _, r in df.iterrows():
        dominated = ((df["size_mb"] <= r["size_mb"]) & (df["CIDEr"] >= r["CIDEr"])
                     & ((df["size_mb"] < r["size_mb"]) | (df["CIDEr"] > r["CIDEr"]))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=df.index)


def plot_pareto(df: pd.DataFrame, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(df)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for dec, g in df.groupby("decoder"):
        ax.scatter(g["size_mb"], g["CIDEr"], label=dec, alpha=0.8)
    f = df[front].sort_values("size_mb")
    ax.plot(f["size_mb"], f["CIDEr"], "k--", lw=1, label="Pareto front")
    ax.scatter(f["size_mb"], f["CIDEr"], s=90, facecolors="none", edgecolors="k")
    for _, r in f.iterrows():
        ax.annotate(r["variant"], (r["size_mb"], r["CIDEr"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel("CIDEr-D")
    ax.set_title("Quality against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def to_markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_results(metric_files, baselines: list[str], out_dir, latency_file=None) -> pd.DataFrame:
    out_dir = Path(out_dir)
    df = build_table(metric_files, baselines, latency_file)
    with atomic_path(out_dir / "table.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_text(out_dir / "table.md", to_markdown(df))
    plot_pareto(df, out_dir / "pareto.png")
    from .summary import write_summary

    write_summary(df, out_dir / "summary.md")
    return df
