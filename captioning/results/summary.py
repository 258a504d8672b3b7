"""The paper's kind of summary: per decoder, the largest size reduction within a CIDEr budget."""
from __future__ import annotations

import pandas as pd

from ..io import write_text

BUDGETS = (2.0, 1.0)  # allowed CIDEr loss, in percent of the baseline's CIDEr


def best_within(df: pd.DataFrame, max_loss_pct: float) -> pd.Series | None:
    """The row with the largest size reduction whose CIDEr fell by at most ``max_loss_pct`` percent."""
    ok = df[df["cider_change_pct"] >= -max_loss_pct]
    if ok.empty:
        return None
    return ok.sort_values(["size_reduction_pct", "CIDEr"], ascending=False).iloc[0]


def summary_markdown(df: pd.DataFrame) -> str:
    lines = ["# Summary", "",
             "Size reduction is of the whole model on disk (encoder + decoder + vocabulary, the `.capz` "
             "artifact), against each decoder's baseline: the big encoder with the dense fp32 decoder. "
             "The paper (Atliha & Šešok 2022) reached at least 91% at no more than 2% CIDEr loss.", ""]
    for dec, g in df.groupby("family", sort=True):
        base = g[g["stage"] == "baseline"]
        lines.append(f"## {dec}")
        lines.append("")
        if not base.empty:
            b = base.iloc[0]
            lines.append(f"Baseline `{b['variant']}`: {b['size_mb']:.2f} MB, CIDEr {b['CIDEr']:.4f}.")
            lines.append("")
        lines += _budget_rows(g)
        lines.append("")
        # A weak baseline makes every replacement look lossless, so also judge compression
        # against the dense fp32 model with the same encoder.
        for enc, ge in g.groupby("encoder", sort=True):
            dense = ge[(ge["stage"] == "encoder") & (ge["quantization"] == "fp32")]
            if dense.empty or len(ge) < 2:
                continue
            d = dense.iloc[0]
            ge = ge.assign(cider_change_pct=(ge["CIDEr"] / d["CIDEr"] - 1.0) * 100.0)
            lines.append(f"Against the dense fp32 model with the same encoder, `{d['variant']}` "
                         f"(CIDEr {d['CIDEr']:.4f}); size reduction still against the baseline:")
            lines.append("")
            lines += _budget_rows(ge)
            lines.append("")
    lines += _training_rows(df)
    return "\n".join(lines)


def _training_rows(df: pd.DataFrame) -> list[str]:
    """SCST and distilled decoders beside the same decoder and encoder trained by cross-entropy alone."""
    dense = df[(df["quantization"] == "fp32") & df["prune_method"].isna()]
    xe = dense[dense["training"] == "xe"].set_index(["encoder", "decoder"])["CIDEr"]
    rows = []
    for _, r in dense[dense["training"].isin(["scst", "kd"])].sort_values(["training", "variant"]).iterrows():
        ref = xe.get((r["encoder"], r["decoder"]))
        if ref is not None:
            rows.append(f"| `{r['variant']}` | {r['training']} | {ref:.4f} | {r['CIDEr']:.4f} | "
                        f"{(r['CIDEr'] / ref - 1.0) * 100.0:+.2f}% |")
    if not rows:
        return []
    return ["## Training: SCST and distillation against cross-entropy alone", "",
            "| variant | training | CIDEr, cross-entropy | CIDEr | change |", "|---|---|---|---|---|",
            *rows, ""]


def _budget_rows(g: pd.DataFrame) -> list[str]:
    lines = ["| CIDEr loss at most | best variant | size (MB) | size reduction | CIDEr | CIDEr change |",
             "|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        r = best_within(g, budget)
        if r is None:
            lines.append(f"| {budget:g}% | none | – | – | – | – |")
        else:
            lines.append(f"| {budget:g}% | `{r['variant']}` | {r['size_mb']:.2f} | "
                         f"{r['size_reduction_pct']:.1f}% | {r['CIDEr']:.4f} | {r['cider_change_pct']:+.2f}% |")
    return lines


def write_summary(df: pd.DataFrame, out) -> None:
    write_text(out, summary_markdown(df))
