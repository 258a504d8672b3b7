"""The paper's kind of summary, made hard to flatter: per family, the largest size reduction within a
CIDEr budget, judged against the quality reference and shown with its interval, and the fastest
row within it: the product's aim is a model both small and fast.

Only compression rows compete for a budget: encoder replacement, architecture changes, pruning and
quantization of cross-entropy-trained decoders. SCST and distilled rows change the training, not
the model's size, so they get their own section, each against the same decoder trained by
cross-entropy alone. Pruned rows are also read against the sweep's dense control, which had the
same fine-tuning: what pruning costs, apart from what the extra training gives; architecture
changes, against their parent. With ``seeds`` > 1 the dense references were also trained under
other seeds: their spread is training noise, which the bootstrap over test images does not see, and
an architecture change (a distilled student) is also compared with its parent (the same decoder
without a teacher) seed-averaged, as is each budget's row (when seeded) with the quality reference.
"""
from __future__ import annotations

import math

import pandas as pd

from ..variants import Variant

from ..io import write_text
from .bootstrap import LEVEL, N_RESAMPLES, change_with_interval

BUDGETS = (2.0, 1.0)  # allowed CIDEr loss, in percent of the quality reference's CIDEr
COMPRESSION_STAGES = ("encoder", "architecture", "prune", "quantize")


def compression_rows(g: pd.DataFrame) -> pd.DataFrame:
    """The rows that may fill a budget: compression stages of cross-entropy-trained decoders."""
    return g[g["stage"].isin(COMPRESSION_STAGES) & (g["training"].fillna("xe") == "xe")]


def _within(df: pd.DataFrame, max_loss_pct: float) -> pd.DataFrame:
    """Rows whose CIDEr fell by at most ``max_loss_pct`` percent (point estimate) and that are smaller
    than the baseline: a row no smaller compressed nothing, so it never fills a budget."""
    return df[(df["cider_change_pct"] >= -max_loss_pct) & (df["size_reduction_pct"] > 0)]


def best_within(df: pd.DataFrame, max_loss_pct: float) -> pd.Series | None:
    """The row with the largest size reduction within the budget (its interval is shown beside it)."""
    ok = _within(df, max_loss_pct)
    if ok.empty:
        return None
    return ok.sort_values(["size_reduction_pct", "CIDEr"], ascending=False).iloc[0]


def fastest_within(df: pd.DataFrame, max_loss_pct: float) -> pd.Series | None:
    """The row with the lowest latency within the budget; None when no row within it was timed."""
    ok = _within(df, max_loss_pct).dropna(subset=["latency_ms"])
    if ok.empty:
        return None
    return ok.sort_values(["latency_ms", "variant"]).iloc[0]


def fmt_change(change: float, low: float, high: float) -> str:
    """``-1.23% [-2.50, +0.10]``, marked when the whole interval lies below zero."""
    if math.isnan(change):
        return "undefined (the reference scored 0)"
    text = f"{change:+.2f}%"
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:+.2f}, {high:+.2f}]"
        if high < 0:
            text += " significant loss"
    return text


def summary_markdown(df: pd.DataFrame) -> str:
    per_image = df.attrs.get("cider_per_image", {})
    n_images = len(next(iter(per_image.values()))) if per_image else None
    lines = ["# Summary", "",
             "Size reduction is of the whole model on disk (encoder + decoder + vocabulary, the `.capz` "
             "artifact), against each family's baseline: the big encoder with the dense fp32 decoder. "
             "CIDEr change is against each family's quality reference: the highest CIDEr of any uncompressed "
             "model of the family (dense, fp32, cross-entropy, any encoder, the parent architecture under any "
             "training settings, the dense control included). "
             f"In brackets, the {LEVEL:.0%} interval of the change: a paired bootstrap over the "
             f"{n_images if n_images else '?'} test images, {N_RESAMPLES} resamples; a change whose whole "
             "interval lies below zero is marked as a significant loss. Budgets are filled by compression "
             "rows of cross-entropy decoders only (encoder replacement, architecture changes, pruning, "
             "quantization) smaller than the baseline; SCST and distilled decoders have sections of their "
             "own. Latency is the median per test image (batch 1, beam search, `evaluate.threads` CPU "
             "threads, image decoding excluded), every variant timed in the run's one latency job, so the "
             "ratios compare. The paper (Atliha & Šešok 2022) reached at least 91% at no more than 2% CIDEr "
             "loss.", ""]
    for family, g in df.groupby("family", sort=True):
        lines += [f"## {family}", ""]
        base = g[g["stage"] == "baseline"]
        ref = g[g["variant"] == g["quality_reference"].iloc[0]].iloc[0]
        if not base.empty:
            b = base.iloc[0]
            lines.append(f"- Size reference (baseline): `{b['variant']}`, {b['size_mb']:.2f} MB, CIDEr {b['CIDEr']:.4f}.")
        lines.append(f"- Quality reference: `{ref['variant']}`, {ref['size_mb']:.2f} MB, CIDEr {ref['CIDEr']:.4f}.")
        if not base.empty and base.iloc[0]["variant"] != ref["variant"]:
            b = base.iloc[0]
            lines.append(f"- The baseline scores {(b['CIDEr'] / ref['CIDEr'] - 1) * 100:+.1f}% CIDEr against the "
                         "quality reference: a budget against the baseline would be met for free, so budgets here "
                         "use the quality reference.")
        spread = seed_spread(df, ref["variant"])
        if spread is not None:
            lines.append(f"- Training noise: over {spread['n']} seeds the quality reference scores CIDEr "
                         f"{spread['mean']:.4f} ± {spread['sd']:.4f} (sd, {spread['sd_pct']:.1f}% of the mean; range "
                         f"{spread['min']:.4f}–{spread['max']:.4f}), beside the bootstrap intervals below, which "
                         "cover test-image noise only.")
        lines.append("")
        lines += _budget_rows(df, compression_rows(g), base.iloc[0] if not base.empty else None, per_image)
        lines.append("")
        lines += _control_rows(g, per_image)
    lines += _architecture_rows(df, per_image)
    lines += _training_rows(df, per_image)
    lines += _student_rows(df, per_image)
    lines += _seed_rows(df)
    return "\n".join(lines)


def _seed_group(name: str) -> str:
    """The main-seed variant a row is a seed copy of (itself for a main-seed row)."""
    try:
        return Variant.parse(name).with_seed(0).name
    except ValueError:
        return name


def seed_spread(df: pd.DataFrame, variant: str) -> dict | None:
    """CIDEr of ``variant`` and its seed copies: n, mean, sd (n-1), sd as % of the mean, min, max;
    None without seed copies."""
    cider = df[df["variant"].map(_seed_group) == variant].sort_values("seed")["CIDEr"].dropna()
    if len(cider) < 2:
        return None
    mean, sd = float(cider.mean()), float(cider.std(ddof=1))
    return {"n": len(cider), "mean": mean, "sd": sd, "sd_pct": sd / mean * 100 if mean else math.nan,
            "min": float(cider.min()), "max": float(cider.max()), "values": [float(c) for c in cider]}


def _seed_rows(df: pd.DataFrame) -> list[str]:
    """Every seeded model (dense reference, architecture change or distilled student, each also in its
    quantizations) beside its copies trained under the other seeds."""
    copies = df[df["stage"] == "seed"]
    if copies.empty:
        return []
    rows = []
    for name in sorted(set(copies["variant"].map(_seed_group))):
        s = seed_spread(df, name)
        if s is None:
            continue
        per_seed = ", ".join(f"{c:.4f}" for c in s["values"])
        rows.append(f"| `{name}` | {s['n']} | {per_seed} | {s['mean']:.4f} | {s['sd']:.4f} ({s['sd_pct']:.1f}%) | "
                    f"{(s['max'] - s['min']) / s['mean'] * 100:.1f}% |")
    return ["## Training noise: the dense references, architecture changes and distilled students (and their "
            "quantizations) under several seeds",
            "",
            "The same model trained again under another seed (rows `..._seed<k>`, stage `seed`): never a reference "
            "and never in a budget. A CIDEr change smaller than this spread is within training noise, whatever "
            "its bootstrap interval says.", "",
            "| model | seeds | CIDEr per seed | mean | sd (% of mean) | range (% of mean) |",
            "|---|---|---|---|---|---|", *rows, ""]


def _row_change(r: pd.Series) -> str:
    """A table row's CIDEr change against its quality reference, with its interval."""
    return fmt_change(r["cider_change_pct"], r["cider_change_lo"], r["cider_change_hi"])


def _speed(r: pd.Series, base: pd.Series | None) -> tuple[str, str]:
    """(``12.3``, ``4.1×``): the row's latency in ms and how many times faster than the baseline it
    is; "–" for what was not timed."""
    ms = r.get("latency_ms")
    if ms is None or pd.isna(ms):
        return "–", "–"
    b = None if base is None else base.get("latency_ms")
    return f"{ms:.1f}", "–" if b is None or pd.isna(b) or not ms > 0 else f"{b / ms:.1f}×"


def _budget_rows(df: pd.DataFrame, g: pd.DataFrame, base: pd.Series | None, per_image: dict) -> list[str]:
    """Per budget, the smallest variant within it, and, with seed copies of it and of the quality
    reference, the change of their seed averages: the budget is chosen on the main seed, and one
    seed's draw can pass a 1% budget that the seeds together miss (said below the table). Then the
    fastest (latency per image from the run's one latency job, so the ratios compare), likewise
    judged over the seeds when it has copies."""
    lines = ["| CIDEr loss at most | smallest variant | size (MB) | size reduction | CIDEr | CIDEr change [95% CI] | "
             "latency (ms) | faster than the baseline | seeds | change of the seed averages [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fastest, missed = [], []
    for budget in BUDGETS:
        r = best_within(g, budget)
        if r is None:
            lines.append(f"| {budget:g}% | none | – | – | – | – | – | – | – | – |")
            continue
        n, n_ref, averaged = seeds_change(df, per_image, r["variant"], r["quality_reference"])
        lines.append(f"| {budget:g}% | `{r['variant']}` | {r['size_mb']:.2f} | {r['size_reduction_pct']:.2f}% | "
                     f"{r['CIDEr']:.4f} | {_row_change(r)} | {' | '.join(_speed(r, base))} | {n} and {n_ref} | "
                     f"{'–' if averaged is None else fmt_change(*averaged)} |")
        if averaged is not None and averaged[0] < -budget:
            missed.append(f"- Over the seeds, `{r['variant']}` misses the {budget:g}% budget: its seed average "
                          f"against the quality reference's is {fmt_change(*averaged)}.")
        f = fastest_within(g, budget)
        if f is not None:
            ms, ratio = _speed(f, base)
            n, n_ref, averaged = seeds_change(df, per_image, f["variant"], f["quality_reference"])
            fastest.append(f"- Fastest within {budget:g}%: `{f['variant']}`, {ms} ms per image"
                           + ("" if ratio == "–" else f", {ratio} faster than the baseline")
                           + f", {f['size_reduction_pct']:.2f}% smaller, CIDEr {_row_change(f)}"
                           + ("" if averaged is None else f"; over {n} and {n_ref} seeds {fmt_change(*averaged)}"
                              + (f", which misses the {budget:g}% budget" if averaged[0] < -budget else ""))
                           + ".")
    return lines + ([""] + missed + fastest if missed or fastest else [])


def _control_rows(g: pd.DataFrame, per_image: dict) -> list[str]:
    """Every pruned row against the dense control of its encoder and decoder (same fine-tuning); an
    architecture change's control too, though its stage is "architecture"."""
    lines = []
    for control in _controls(g).sort_values("variant").itertuples(index=False):
        pruned = g[(g["stage"] == "prune") & (g["encoder"] == control.encoder) & (g["decoder"] == control.decoder)]
        pruned = pruned.sort_values(["quantization", "prune_ratio", "prune_method", "variant"])
        if pruned.empty:
            continue
        lines += [f"Pruning against the dense control `{control.variant}` (CIDEr {control.CIDEr:.4f}): the same "
                  "fine-tuning with nothing pruned.", "",
                  "| variant | method | ratio | quantization | size (MB) | CIDEr | change against the control [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        for r in pruned.itertuples(index=False):
            change = change_with_interval(per_image, r.variant, control.variant, r.CIDEr, control.CIDEr)
            lines.append(f"| `{r.variant}` | {r.prune_method} | {r.prune_ratio:g} | {r.quantization} | {r.size_mb:.2f} | "
                         f"{r.CIDEr:.4f} | {fmt_change(*change)} |")
        lines.append("")
    return lines


def _fp32_main(df: pd.DataFrame) -> pd.DataFrame:
    """The fp32 torch rows of the main seed."""
    torch_rows = df["runtime"].fillna("torch") == "torch" if "runtime" in df else True
    return df[(df["quantization"] == "fp32") & (df["stage"] != "seed") & torch_rows]


def _dense_fp32(df: pd.DataFrame) -> pd.DataFrame:
    """The dense fp32 torch rows of the main seed: one row per encoder, decoder and training."""
    fp32 = _fp32_main(df)
    return fp32[fp32["prune_method"].isna()]


def _controls(df: pd.DataFrame) -> pd.DataFrame:
    """The dense controls (ratio 0, fp32, torch, main seed): a parent's, and its slim decoders'."""
    fp32 = _fp32_main(df)
    return fp32[fp32["prune_method"].notna() & (fp32["prune_ratio"] == 0)]


def _seed_averaged(df: pd.DataFrame, per_image: dict, variant: str) -> tuple[int, dict | None]:
    """(number of seeds, per-image CIDEr averaged over them) of ``variant`` and its seed copies;
    None for the scores unless every seed has per-image scores of the same images."""
    names = list(df.loc[df["variant"].map(_seed_group) == variant, "variant"])
    scores = [per_image.get(n) for n in names]
    if not names or any(s is None or set(s) != set(scores[0]) for s in scores):
        return len(names), None
    return len(names), {i: sum(s[i] for s in scores) / len(scores) for i in scores[0]}


def seeds_change(df: pd.DataFrame, per_image: dict, variant: str, ref: str) -> tuple[int, int, tuple | None]:
    """(seeds of ``variant``, seeds of ``ref``, the change of their seed-averaged per-image scores as
    (change %, low, high)); None for the change unless both have several seeds, scored per image."""
    (n, mine), (n_ref, theirs) = (_seed_averaged(df, per_image, v) for v in (variant, ref))
    if min(n, n_ref) < 2 or mine is None or theirs is None:
        return n, n_ref, None
    per_seed = {"row": mine, "ref": theirs}
    mean = {k: sum(v.values()) / len(v) for k, v in per_seed.items()}
    return n, n_ref, change_with_interval(per_seed, "row", "ref", mean["row"], mean["ref"])


def _seeds_change(df: pd.DataFrame, per_image: dict, variant: str, ref: str) -> str:
    """Two table cells: the seeds of ``variant`` and of ``ref``, and the change of their seed averages."""
    n, n_ref, change = seeds_change(df, per_image, variant, ref)
    return f"{n} and {n_ref} | {'–' if change is None else fmt_change(*change)}"


def _architecture_rows(df: pd.DataFrame, per_image: dict) -> list[str]:
    """Each architecture change (dense, fp32, cross-entropy) against its parent on the same encoder,
    and its dense control (the sweep's fine-tuning, nothing pruned) against the parent's. With seed
    copies of both (``seeds`` > 1), also the change of their seed-averaged scores: one seed of each
    is a draw whose training noise can be larger than the change itself."""
    dense = _dense_fp32(df)
    main = dense[dense["training"].fillna("xe") == "xe"]
    main = pd.concat([main, _controls(df)]).assign(tuned=lambda d: d["prune_method"].notna())
    parents = main[main["decoder"] == main["family"]].set_index(["encoder", "decoder", "tuned"])
    rows = []
    for r in main[main["stage"] == "architecture"].sort_values("variant").itertuples(index=False):
        if (r.encoder, r.family, r.tuned) not in parents.index:
            continue
        parent = parents.loc[(r.encoder, r.family, r.tuned)]
        change = change_with_interval(per_image, r.variant, parent["variant"], r.CIDEr, parent["CIDEr"])
        rows.append(f"| `{r.variant}` | `{parent['variant']}` | {r.size_mb:.2f} | {parent['size_mb']:.2f} | "
                    f"{parent['CIDEr']:.4f} | {r.CIDEr:.4f} | {fmt_change(*change)} | "
                    f"{_seeds_change(df, per_image, r.variant, parent['variant'])} |")
    if not rows:
        return []
    return ["## Architecture changes against their parent", "",
            "Each slimmer decoder against the architecture it changes, both dense, fp32 and trained by "
            "cross-entropy on the same encoder, and both again after the dense control's fine-tuning. With "
            "several seeds of both, the last column compares their per-image scores averaged over the seeds.", "",
            "| architecture | parent | size (MB) | parent's size (MB) | CIDEr, parent | CIDEr | change [95% CI] | "
            "seeds | change of the seed averages [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _training_rows(df: pd.DataFrame, per_image: dict) -> list[str]:
    """SCST and distilled decoders beside the same decoder and encoder trained by cross-entropy alone."""
    dense = _dense_fp32(df)
    xe = dense[dense["training"] == "xe"].set_index(["encoder", "decoder"])
    rows = []
    for r in dense[dense["training"].isin(["scst", "kd"])].sort_values(["training", "variant"]).itertuples(index=False):
        if (r.encoder, r.decoder) not in xe.index:
            continue
        ref = xe.loc[(r.encoder, r.decoder)]
        change = change_with_interval(per_image, r.variant, ref["variant"], r.CIDEr, ref["CIDEr"])
        rows.append(f"| `{r.variant}` | {r.training} | {ref['CIDEr']:.4f} | {r.CIDEr:.4f} | {fmt_change(*change)} | "
                    f"{_seeds_change(df, per_image, r.variant, ref['variant'])} |")
    if not rows:
        return []
    return ["## Training: SCST and distillation against cross-entropy alone", "",
            "These rows change how a decoder is trained, not its size; they never fill a compression budget. "
            "With several seeds of both (a distilled student and the same decoder without a teacher), the last "
            "column compares their per-image scores averaged over the seeds.", "",
            "| variant | training | CIDEr, cross-entropy | CIDEr | change [95% CI] | seeds | "
            "change of the seed averages [95% CI] |", "|---|---|---|---|---|---|---|", *rows, ""]


def _student_rows(df: pd.DataFrame, per_image: dict) -> list[str]:
    """Each distilled row (every quantization) against its teacher: how much of the teacher's CIDEr
    the smaller student keeps, and at what size. The teacher may be trained otherwise than by
    cross-entropy (SCST), so these rows stay out of the budgets, whose references are cross-entropy."""
    if "teacher" not in df:
        return []
    by_name = df.set_index("variant")
    students = df[df["teacher"].notna() & (df["stage"] != "seed") & df["teacher"].isin(by_name.index)]
    rows = []
    for r in students.sort_values(["teacher", "variant"]).itertuples(index=False):
        t = by_name.loc[r.teacher]
        change = change_with_interval(per_image, r.variant, r.teacher, r.CIDEr, t["CIDEr"])
        rows.append(f"| `{r.variant}` | `{r.teacher}` | {r.size_mb:.2f} | {r.size_reduction_pct:.2f}% | "
                    f"{t['CIDEr']:.4f} | {r.CIDEr:.4f} | {fmt_change(*change)} |")
    if not rows:
        return []
    return ["## Distilled students against their teachers", "",
            "Size reduction is against the family's baseline, as above; the change is against the teacher, "
            "which is not a quality reference when it was trained by SCST.", "",
            "| student | teacher | size (MB) | size reduction | CIDEr, teacher | CIDEr | change [95% CI] |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def write_summary(df: pd.DataFrame, out) -> None:
    write_text(out, summary_markdown(df))
