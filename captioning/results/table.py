"""Collect every variant's metrics into the results table, its Markdown twin and the Pareto plot.

Two references per decoder family, because one model cannot serve both honestly:

- size: the family's **baseline**, the big encoder with the dense fp32 decoder (as in the paper);
- quality: the family's **quality reference**, the highest CIDEr of any uncompressed model of the
  family (dense, fp32, cross-entropy, any encoder, the sweep's dense control included, and a
  variant_of entry that changes only training settings such as dropout). A weak big encoder, extra
  fine-tuning or an under-tuned parent cannot flatter a compressed row against it.

Every CIDEr change comes with a 95% interval: a paired bootstrap over the test images
(``bootstrap``), from the per-image CIDEr-D scores each evaluation keeps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..io import atomic_path, read_json, write_text
from ..variants import REFERENCE_STAGES
from .bootstrap import change_with_interval

ID_COLS = ["variant", "dataset", "encoder", "decoder", "family", "stage", "training", "prune_method", "prune_ratio",
           "sparsity", "quantization", "runtime", "seed", "teacher"]
SIZE_COLS = ["params", "nonzero_params", "size_mb", "floor_mb", "size_reduction_pct"]
QUALITY_COLS = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
                "quality_reference", "reference_cider", "cider_change_pct", "cider_change_lo", "cider_change_hi"]
COLUMNS = ID_COLS + SIZE_COLS + QUALITY_COLS + ["latency_ms"]


def quality_references(df: pd.DataFrame) -> dict[str, pd.Series]:
    """{family: its highest-CIDEr uncompressed row}; a family without one, or whose best has CIDEr 0, is a UserError."""
    refs = {}
    for family, g in df.groupby("family", sort=True):
        cand = g[g["stage"].isin(REFERENCE_STAGES) & (g["quantization"] == "fp32")
                 & (g["training"].fillna("xe") == "xe")].dropna(subset=["CIDEr"])
        if cand.empty:
            raise UserError(f"decoder family '{family}': no uncompressed model (stage {', '.join(REFERENCE_STAGES)}) "
                            "to measure CIDEr changes against")
        best = cand.sort_values(["CIDEr", "variant"], ascending=[False, True], kind="stable").iloc[0]
        if not best["CIDEr"] > 0:
            raise UserError(f"decoder family '{family}': its quality reference '{best['variant']}' has CIDEr "
                            f"{best['CIDEr']}; no change can be measured against it (train it longer)")
        refs[family] = best
    return refs


def build_table(metric_files, baselines: list[str], latency_file=None) -> pd.DataFrame:
    """One row per variant: size reduction against the family's baseline, CIDEr change (with its 95%
    interval) against the family's quality reference (see the module docstring).

    ``latency_file``: {variant: ms} from ``measure_artifacts``, replacing the metrics' own latency.
    The per-image CIDEr-D scores stay beside the table, in ``df.attrs["cider_per_image"]``
    ({variant: {image id: score}}), for the summary's own comparisons.
    """
    rows = [read_json(f) for f in metric_files]
    per_image = {r.get("variant"): r.pop("cider_per_image") for r in rows if "cider_per_image" in r}
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
    df["runtime"] = df["runtime"].fillna("torch")  # metrics written before runtime was a dimension
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
    df["size_reduction_pct"] = (1.0 - df["size_mb"] / base_size) * 100.0
    refs = quality_references(df)
    df["quality_reference"] = df["family"].map(lambda f: refs[f]["variant"])
    df["reference_cider"] = df["family"].map(lambda f: refs[f]["CIDEr"])
    changes = [change_with_interval(per_image, r.variant, r.quality_reference, r.CIDEr, r.reference_cider)
               for r in df.itertuples(index=False)]
    df[["cider_change_pct", "cider_change_lo", "cider_change_hi"]] = np.array(changes, dtype=np.float64).reshape(-1, 3)
    df = df[COLUMNS].sort_values(["decoder", "stage", "encoder", "variant"], kind="stable").reset_index(drop=True)
    df.attrs["cider_per_image"] = per_image
    return df


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
    from .plot import plot_pareto

    plot_pareto(df[df["stage"] != "seed"], out_dir / "pareto.png")  # a seed copy sits on its reference
    from .summary import write_summary

    write_summary(df, out_dir / "summary.md")
    return df
