"""The results table and summary: size against the baseline, CIDEr against the quality reference,
intervals from per-image scores, and which rows may fill a budget."""
import numpy as np
import pandas as pd
import pytest

from captioning.errors import UserError
from captioning.io import write_json
from captioning.results.summary import best_within, compression_rows, fastest_within, summary_markdown
from captioning.results.table import COLUMNS, build_table, quality_references, write_results

N_IMAGES = 40


def _metrics(tmp_path, rows, per_image=False):
    """One metrics file per row; with ``per_image``, per-image CIDEr-D scores whose mean is the row's CIDEr."""
    files = []
    base = np.random.default_rng(0).uniform(0.5, 1.5, N_IMAGES)  # shared image difficulty
    for k, r in enumerate(rows):
        r = {"dataset": "d", "BLEU_1": 0.5, "training": "xe", "quantization": "fp32", **r}
        if per_image:
            noise = np.random.default_rng(k + 1).normal(1.0, 0.01, N_IMAGES)
            s = base * noise
            s *= r["CIDEr"] / s.mean()
            r["cider_per_image"] = {str(i): float(v) for i, v in enumerate(s)}
        f = tmp_path / f"{r['variant']}.json"
        write_json(f, r)
        files.append(f)
    return files


def row(variant, encoder, stage, size, cider, **kw):
    decoder = kw.pop("decoder", "ud")
    return {"variant": variant, "encoder": encoder, "decoder": decoder, "stage": stage, "size_mb": size,
            "CIDEr": cider, "latency_ms": 1.0, **kw}


# The big baseline is weaker than the small encoder's dense model, and the control beats both.
ROWS = [
    row("big-ud-xe", "big", "baseline", 100.0, 0.8),
    row("small-ud-xe", "small", "encoder", 10.0, 0.9),
    row("small-ud-ctl", "small", "control", 10.0, 1.0, prune_method="global", prune_ratio=0.0),
    row("small-ud-p5", "small", "prune", 6.0, 0.99, prune_method="global", prune_ratio=0.5),
    row("small-ud-p9", "small", "prune", 2.0, 0.985, prune_method="global", prune_ratio=0.9),
    row("small-ud-p95", "small", "prune", 1.0, 0.95, prune_method="global", prune_ratio=0.95),
    row("small-ud-int8", "small", "quantize", 3.0, 0.995, quantization="int8"),
    row("small-ud-scst", "small", "scst", 10.0, 1.2, training="scst"),
    row("small-ud-scst8", "small", "quantize", 3.0, 1.19, training="scst", quantization="int8"),
    row("big-tf-xe", "big", "baseline", 50.0, 2.0, decoder="tf"),
]
BASELINES = ["big-ud-xe", "big-tf-xe"]


def test_size_against_the_baseline_cider_against_the_quality_reference(tmp_path):
    df = build_table(_metrics(tmp_path, ROWS), BASELINES).set_index("variant")
    assert list(df.reset_index().columns) == COLUMNS
    assert df.loc["small-ud-p9", "size_reduction_pct"] == pytest.approx(98.0)
    # the control is the best uncompressed model; SCST (1.2) is not uncompressed-by-cross-entropy
    assert set(df.loc[df["family"] == "ud", "quality_reference"]) == {"small-ud-ctl"}
    assert df.loc["small-ud-p9", "reference_cider"] == 1.0
    assert df.loc["small-ud-p9", "cider_change_pct"] == pytest.approx(-1.5)
    assert df.loc["big-ud-xe", "cider_change_pct"] == pytest.approx(-20.0)   # not 0: the baseline is weak
    assert df.loc["big-tf-xe", "cider_change_pct"] == 0 and df.loc["big-tf-xe", "quality_reference"] == "big-tf-xe"
    assert df[["cider_change_lo", "cider_change_hi"]].isna().all().all()  # no per-image scores, no interval


def test_quality_reference_only_from_uncompressed_rows(tmp_path):
    rows = [r for r in ROWS if r["variant"] != "small-ud-ctl"]
    df = build_table(_metrics(tmp_path, rows), BASELINES)
    refs = quality_references(df)
    assert refs["ud"]["variant"] == "small-ud-xe"   # not the int8 row (0.995), nor SCST (1.2), nor pruned (0.99)


def test_a_tuned_parent_may_be_the_reference_and_a_row_no_smaller_never_fills_a_budget(tmp_path):
    # A dropout-only variant of the parent (stage "tuning") beats every other uncompressed row; an
    # architecture row as big as the baseline (a wider decoder) scores within the budget.
    rows = ROWS + [row("small-ud_d2-xe", "small", "tuning", 10.0, 1.1, decoder="ud_d2", family="ud"),
                   row("small-ud_wide-xe", "small", "architecture", 100.0, 1.095, decoder="ud_wide", family="ud")]
    df = build_table(_metrics(tmp_path, rows), BASELINES)
    assert quality_references(df)["ud"]["variant"] == "small-ud_d2-xe"
    ud = compression_rows(df[df["family"] == "ud"])
    assert "small-ud_d2-xe" not in set(ud["variant"])        # not compression
    assert best_within(ud, 1.0) is None                     # the wide row is -0.45% but 0% smaller
    assert best_within(ud, 11.0)["variant"] == "small-ud-p9"  # 0.985 / 1.1: -10.45%, 98% smaller

    rows = [dict(r, CIDEr=0.0) if r["stage"] in ("baseline", "encoder", "control") and r["decoder"] == "ud" else r
            for r in ROWS]
    with pytest.raises(UserError, match=r"^decoder family 'ud': its quality reference '.*' has CIDEr 0\.0"):
        build_table(_metrics(tmp_path, rows), BASELINES)
    rows = [r for r in ROWS if r["decoder"] == "tf"] + [row("big-ud-xe", "big", "prune", 1.0, 0.5)]
    with pytest.raises(UserError, match="decoder family 'ud': no uncompressed model"):
        build_table(_metrics(tmp_path, rows), BASELINES)


def test_missing_baseline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="baseline variant 'nope'"):
        build_table(_metrics(tmp_path, ROWS), ["nope"])
    with pytest.raises(UserError, match="no baseline variant given"):
        build_table(_metrics(tmp_path, ROWS), ["big-ud-xe"])


def test_intervals_from_per_image_scores(tmp_path):
    df = build_table(_metrics(tmp_path, ROWS, per_image=True), BASELINES).set_index("variant")
    ref = df.loc["small-ud-ctl"]
    assert ref["cider_change_lo"] == ref["cider_change_hi"] == 0.0        # the reference against itself
    p9 = df.loc["small-ud-p9"]
    assert p9["cider_change_lo"] < p9["cider_change_pct"] < p9["cider_change_hi"]
    assert p9["cider_change_hi"] - p9["cider_change_lo"] < 2.0              # paired: ~1% noise per image
    assert df.loc["small-ud-p95", "cider_change_hi"] < 0                   # -5%: a significant loss


def test_summary_budgets_take_compression_rows_only(tmp_path):
    df = build_table(_metrics(tmp_path, ROWS), BASELINES)
    ud = compression_rows(df[df["family"] == "ud"])
    assert set(ud["variant"]) == {"small-ud-xe", "small-ud-p5", "small-ud-p9", "small-ud-p95", "small-ud-int8"}
    assert best_within(ud, 2.0)["variant"] == "small-ud-p9"    # -1.5%: within 2%
    assert best_within(ud, 1.0)["variant"] == "small-ud-int8"  # -0.5%; p9 is not within 1%
    text = summary_markdown(df)
    assert "- Quality reference: `small-ud-ctl`, 10.00 MB, CIDEr 1.0000." in text
    assert "- Size reference (baseline): `big-ud-xe`, 100.00 MB, CIDEr 0.8000." in text
    assert "The baseline scores -20.0% CIDEr against the quality reference" in text
    assert "| 2% | `small-ud-p9` | 2.00 | 98.00% | 0.9850 | -1.50% |" in text
    assert "| 1% | `small-ud-int8` | 3.00 | 97.00% | 0.9950 | -0.50% |" in text


def test_summary_gives_latency_against_the_baseline_and_the_fastest_row_within_each_budget(tmp_path):
    ms = {"big-ud-xe": 40.0, "small-ud-p9": 8.0, "small-ud-int8": 5.0, "small-ud-p5": 4.0}
    rows = [dict(r, latency_ms=ms.get(r["variant"], 20.0)) for r in ROWS]
    rows.append(row("small-ud_fat-xe", "small", "architecture", 120.0, 1.0, decoder="ud_fat", family="ud",
                    latency_ms=1.0))  # the fastest, but not smaller
    df = build_table(_metrics(tmp_path, rows), BASELINES)
    ud = compression_rows(df[df["family"] == "ud"])
    assert fastest_within(ud, 2.0)["variant"] == "small-ud-p5"    # -1.0%
    assert fastest_within(ud, 0.6)["variant"] == "small-ud-int8"  # -0.5%; p5 (-1.0%) is not within
    text = summary_markdown(df)
    assert "| 2% | `small-ud-p9` | 2.00 | 98.00% | 0.9850 | -1.50% | 8.0 | 5.0× |" in text
    assert "- Fastest within 2%: `small-ud-p5`, 4.0 ms per image, 10.0× faster than the baseline, 94.00% smaller, " \
           "CIDEr -1.00%." in text
    for r in rows:
        r["latency_ms"] = None  # not timed: dashes, no fastest line
    text = summary_markdown(build_table(_metrics(tmp_path, rows), BASELINES))
    assert "| 2% | `small-ud-p9` | 2.00 | 98.00% | 0.9850 | -1.50% | – | – |" in text and "Fastest" not in text


def test_summary_shows_intervals_and_marks_significant_losses(tmp_path):
    rows = ROWS + [row("small-ud-p8", "small", "prune", 1.5, 0.982, prune_method="global", prune_ratio=0.8)]
    text = summary_markdown(build_table(_metrics(tmp_path, rows, per_image=True), BASELINES))
    ud = text[text.index("## ud"):]
    line = next(x for x in ud.splitlines() if x.startswith("| 2% |"))
    assert "`small-ud-p8`" in line and "-1.80% [" in line and "significant loss |" in line
    # the pruning sweep against its control: same fine-tuning, nothing pruned
    assert "Pruning against the dense control `small-ud-ctl` (CIDEr 1.0000)" in text
    p5 = next(x for x in text.splitlines() if x.startswith("| `small-ud-p5` |"))
    assert "| global | 0.5 | fp32 | 6.00 | 0.9900 | -1.00% [" in p5


def test_summary_sets_scst_and_distilled_rows_beside_cross_entropy(tmp_path):
    rows = ROWS + [row("small-ud-kd", "small", "distill", 10.0, 0.81, training="kd")]
    text = summary_markdown(build_table(_metrics(tmp_path, rows), BASELINES))
    training = text[text.index("## Training"):]
    assert "| `small-ud-scst` | scst | 0.9000 | 1.2000 | +33.33% |" in training
    assert "| `small-ud-kd` | kd | 0.9000 | 0.8100 | -10.00% |" in training
    assert "small-ud-scst8" not in training          # only fp32 rows compare training alone
    assert "small-ud-scst" not in text[:text.index("## Training")]  # never in a budget


def test_summary_sets_each_distilled_row_beside_its_teacher(tmp_path):
    rows = ROWS + [row("small-ud-kd", "small", "distill", 10.0, 1.08, training="kd", teacher="small-ud-scst"),
                   row("small-ud-kd8", "small", "quantize", 4.0, 1.14, training="kd", quantization="int8",
                       teacher="small-ud-scst"),
                   row("small-ud-kd-lost", "small", "distill", 10.0, 1.0, training="kd", teacher="absent")]
    df = build_table(_metrics(tmp_path, rows, per_image=True), BASELINES)
    text = summary_markdown(df)
    students = text[text.index("## Distilled students"):]
    assert "| `small-ud-kd` | `small-ud-scst` | 10.00 | 90.00% | 1.2000 | 1.0800 | -10.00% [" in students
    assert "| `small-ud-kd8` | `small-ud-scst` | 4.00 | 96.00% | 1.2000 | 1.1400 | -5.00% [" in students
    assert "small-ud-kd-lost" not in students  # a teacher not in the table: nothing to compare with
    assert "small-ud-kd8" not in text[:text.index("## Training")]  # an SCST teacher's gain fills no budget
    assert "teacher" in df.columns and pd.isna(df.set_index("variant").loc["small-ud-p5", "teacher"])


def test_latency_file_replaces_the_metrics_latency_and_must_cover_every_variant(tmp_path):
    files = _metrics(tmp_path, ROWS)
    write_json(tmp_path / "lat.json", {r["variant"]: 100.0 + k for k, r in enumerate(ROWS)})
    df = build_table(files, BASELINES, tmp_path / "lat.json").set_index("variant")
    assert df.loc["small-ud-xe", "latency_ms"] == 101.0 and df.loc["big-tf-xe", "latency_ms"] == 109.0
    write_json(tmp_path / "lat.json", {"big-ud-xe": 1.0})
    with pytest.raises(UserError, match="no latency for variant 'small-ud-xe'"):
        build_table(files, BASELINES, tmp_path / "lat.json")


def test_write_results_files(tmp_path):
    df = write_results(_metrics(tmp_path, ROWS, per_image=True), BASELINES, tmp_path / "out")
    assert len(df) == len(ROWS)
    csv = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == len(ROWS)
    assert csv["cider_change_lo"].notna().all()
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.count("\n") == len(ROWS) + 2 and "small-ud-xe" in md
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## ud" in (tmp_path / "out" / "summary.md").read_text()


def test_a_change_against_a_zero_control_is_undefined_not_nan(tmp_path):
    from captioning.results.summary import fmt_change

    assert fmt_change(float("nan"), float("nan"), float("nan")) == "undefined (the reference scored 0)"
    assert fmt_change(-1.5, -2.0, -1.0) == "-1.50% [-2.00, -1.00] significant loss"
    assert fmt_change(-1.5, -3.0, 0.5) == "-1.50% [-3.00, +0.50]"
    rows = [dict(r, CIDEr=0.0) if r["variant"] == "small-ud-ctl" else r for r in ROWS]
    text = summary_markdown(build_table(_metrics(tmp_path, rows), BASELINES))
    assert "| `small-ud-p5` | global | 0.5 | fp32 | 6.00 | 0.9900 | undefined (the reference scored 0) |" in text
    assert "nan" not in text


def test_seed_copies_measure_training_noise_and_never_serve_as_reference(tmp_path):
    """Copies of the dense references under other seeds: their spread is in the summary; even when a
    copy scores highest it is not the quality reference, not in a budget, not in the SCST section."""
    seeded = [row("small-ud-xe_global0_seed1-fp32", "small", "seed", 10.0, 1.1, prune_method="global",
                  prune_ratio=0.0, seed=1),
              row("small-ud-xe_global0_seed2-fp32", "small", "seed", 10.0, 0.9, prune_method="global",
                  prune_ratio=0.0, seed=2),
              row("small-ud-xe_seed1-fp32", "small", "seed", 10.0, 0.95, seed=1)]
    rows = [dict(r, variant="small-ud-xe_global0-fp32", seed=0) if r["variant"] == "small-ud-ctl"
            else dict(r, variant="small-ud-xe-fp32", seed=0) if r["variant"] == "small-ud-xe" else r
            for r in ROWS] + seeded
    df = build_table(_metrics(tmp_path, rows), BASELINES)
    assert set(df.loc[df["family"] == "ud", "quality_reference"]) == {"small-ud-xe_global0-fp32"}
    assert "seed" not in set(compression_rows(df)["stage"])
    text = summary_markdown(df)
    # the quality reference over 3 seeds: 1.0, 1.1, 0.9 -> mean 1.0, sd 0.1
    assert ("- Training noise: over 3 seeds the quality reference scores CIDEr 1.0000 ± 0.1000 "
            "(sd, 10.0% of the mean; range 0.9000–1.1000)") in text
    noise = text[text.index("## Training noise"):]
    assert "| `small-ud-xe_global0-fp32` | 3 | 1.0000, 1.1000, 0.9000 | 1.0000 | 0.1000 (10.0%) | 20.0% |" in noise
    assert "| `small-ud-xe-fp32` | 2 | 0.9000, 0.9500 |" in noise
    training = text[text.index("## Training: SCST"):text.index("## Training noise")]
    assert "| `small-ud-scst` | scst | 0.9000 | 1.2000 | +33.33% |" in training  # against seed 0 alone
    assert "_seed" not in text[:text.index("## Training noise")]


def test_a_budget_row_is_also_judged_over_the_seeds(tmp_path):
    """The budget is filled on the main seed; with seed copies of its row and of the quality reference
    the table gives the change of their seed averages, and says when that misses the budget."""
    ctl = dict(prune_method="global", prune_ratio=0.0)
    names = {"small-ud-ctl": "small-ud-xe_global0-fp32", "small-ud-int8": "small-ud-xe_global0-int8"}
    rows = [dict(r, variant=names[r["variant"]], seed=0, **ctl) if r["variant"] in names else r for r in ROWS]
    rows = [dict(r, latency_ms=0.5) if r["variant"] == "small-ud-xe_global0-int8" else r for r in rows]  # the fastest
    rows += [row(f"small-ud-xe_global0_seed{k}-{q}", "small", "seed", size, cider, seed=k, quantization=q, **ctl)
             for k in (1, 2) for q, size, cider in (("fp32", 10.0, 1.0), ("int8", 3.0, 0.95))]
    df = build_table(_metrics(tmp_path, rows, per_image=True), BASELINES)
    ud = summary_markdown(df).split("## ud")[1]
    # the main seed passes 1% (-0.5%); over 3 seeds (0.995, 0.95, 0.95 against 1.0 thrice) it is -3.5%
    line = next(x for x in ud.splitlines() if x.startswith("| 1% |"))
    assert line.startswith("| 1% | `small-ud-xe_global0-int8` | 3.00 | 97.00% | 0.9950 | -0.50% [")
    assert "| 3 and 3 | -3.50% [" in line and line.endswith("significant loss |")
    assert ("- Over the seeds, `small-ud-xe_global0-int8` misses the 1% budget: its seed average against the "
            "quality reference's is -3.50% [") in ud
    # the fastest within either budget is the same row, judged over the seeds too
    assert ("- Fastest within 1%: `small-ud-xe_global0-int8`, 0.5 ms per image, 2.0× faster than the baseline, "
            "97.00% smaller, CIDEr -0.50% [") in ud
    assert ud.count("; over 3 and 3 seeds -3.50% [") == 2 and "significant loss, which misses the 1% budget." in ud
    # 2% goes to a pruned row, which has no seed copies
    assert next(x for x in ud.splitlines() if x.startswith("| 2% |")).endswith("| 1 and 3 | – |")
    assert "misses the 2% budget: " not in ud and "which misses the 2% budget." in ud  # the fastest line's
    alone = [r for r in rows if "_seed" not in r["variant"]]
    ud = summary_markdown(build_table(_metrics(tmp_path / "alone", alone, per_image=True), BASELINES)).split("## ud")[1]
    table = [x for x in ud.splitlines() if x.startswith("| 1% |") or x.startswith("| CIDEr loss at most |")]
    assert table[0].count("|") == 11 and table[0].endswith("| seeds | change of the seed averages [95% CI] |")
    assert table[1].endswith("| 1 and 1 | – |") and "Over the seeds" not in ud and "seeds -" not in ud


def test_a_pruned_architecture_change_is_read_against_its_own_control(tmp_path):
    """A wider decoder pruned in the sweep: its control has stage "architecture" (never a reference),
    and its pruned rows are still set beside that control."""
    wide = dict(decoder="ud_w", family="ud")
    rows = ROWS + [
        row("small-ud_w-ctl", "small", "architecture", 20.0, 1.1, prune_method="global", prune_ratio=0.0, **wide),
        row("small-ud_w-p5", "small", "prune", 12.0, 1.045, prune_method="global", prune_ratio=0.5, **wide),
    ]
    df = build_table(_metrics(tmp_path, rows), BASELINES)
    assert set(df.loc[df["family"] == "ud", "quality_reference"]) == {"small-ud-ctl"}  # not the wide one (1.1)
    text = summary_markdown(df)
    assert "Pruning against the dense control `small-ud_w-ctl` (CIDEr 1.1000)" in text
    assert "| `small-ud_w-p5` | global | 0.5 | fp32 | 12.00 | 1.0450 | -5.00% |" in text


def test_no_seed_copies_no_noise_section(tmp_path):
    text = summary_markdown(build_table(_metrics(tmp_path, ROWS), BASELINES))
    assert "Training noise" not in text


def test_summary_sets_each_architecture_change_beside_its_parent_and_averages_seeds(tmp_path):
    """A slim decoder against its parent on the same encoder, alone and, with seed copies of both,
    as the change of their seed-averaged scores; quantized and pruned slim rows stay out."""
    slim = dict(decoder="ud_slim", family="ud")
    rows = [dict(r, variant="small-ud-xe-fp32") if r["variant"] == "small-ud-xe" else r for r in ROWS] + [
        row("small-ud_slim-xe-fp32", "small", "architecture", 5.0, 0.81, **slim),
        row("small-ud_slim-xe-int8", "small", "quantize", 1.5, 0.80, quantization="int8", **slim),
        row("small-ud-xe_seed1-fp32", "small", "seed", 10.0, 0.80, seed=1),
        row("small-ud-xe_seed2-fp32", "small", "seed", 10.0, 0.85, seed=2),
        row("small-ud_slim-xe_seed1-fp32", "small", "seed", 5.0, 0.79, seed=1, **slim),
        row("small-ud_slim-xe_seed2-fp32", "small", "seed", 5.0, 0.80, seed=2, **slim),
        row("small-tf_slim-xe-fp32", "small", "architecture", 20.0, 1.9, decoder="tf_slim", family="tf"),  # no small tf
    ]
    text = summary_markdown(build_table(_metrics(tmp_path, rows, per_image=True), BASELINES))
    section = text[text.index("## Architecture changes"):text.index("## Training")]
    line = next(x for x in section.splitlines() if x.startswith("| `small-ud_slim-xe-fp32`"))
    # alone: 0.81 against 0.90 (-10%); averaged over 3 seeds: 0.80 against 0.85 (-5.88%)
    assert line.startswith("| `small-ud_slim-xe-fp32` | `small-ud-xe-fp32` | 5.00 | 10.00 | 0.9000 | 0.8100 | -10.00% [")
    assert "| 3 and 3 | -5.88% [" in line and line.count("significant loss") == 2
    assert "small-ud_slim-xe-int8" not in section and "_seed" not in section and "tf_slim" not in section

    alone = [r for r in rows if "_seed" not in r["variant"]]
    text = summary_markdown(build_table(_metrics(tmp_path / "alone", alone, per_image=True), BASELINES))
    assert "| 1 and 1 | – |" in text[text.index("## Architecture changes"):]


def test_a_slim_decoders_dense_control_is_set_beside_its_parents_control(tmp_path):
    """Given the control's fine-tuning, a slim decoder is an architecture change still: compared with
    the parent trained as long, never a quality reference; its int8 row fills a budget."""
    slim = dict(decoder="ud_slim", family="ud")
    ctl = dict(prune_method="global", prune_ratio=0.0)
    rows = ROWS + [
        row("small-ud_slim-xe", "small", "architecture", 5.0, 0.85, **slim),
        row("small-ud_slim-ctl", "small", "architecture", 5.0, 1.05, **slim, **ctl),
        row("small-ud_slim-ctl8", "small", "quantize", 1.5, 0.995, quantization="int8", **slim, **ctl),
    ]
    df = build_table(_metrics(tmp_path, rows, per_image=True), BASELINES)
    assert set(df.loc[df["family"] == "ud", "quality_reference"]) == {"small-ud-ctl"}  # not the slim one (1.05)
    text = summary_markdown(df)
    section = text[text.index("## Architecture changes"):text.index("## Training")]
    assert "| `small-ud_slim-xe` | `small-ud-xe` | 5.00 | 10.00 | 0.9000 | 0.8500 | -5.56% [" in section
    assert "| `small-ud_slim-ctl` | `small-ud-ctl` | 5.00 | 10.00 | 1.0000 | 1.0500 | +5.00% [" in section
    assert "ctl8" not in section
    assert best_within(compression_rows(df[df["family"] == "ud"]), 1.0)["variant"] == "small-ud_slim-ctl8"


def test_summary_averages_a_distilled_student_and_the_same_decoder_without_a_teacher_over_seeds(tmp_path):
    """A distilled student against the same decoder trained without a teacher, alone and, with seed
    copies of both, as the change of their seed-averaged scores; SCST rows (one seed) get none."""
    slim = dict(decoder="ud_slim", family="ud")
    kd = dict(training="kd", teacher="small-ud-scst", **slim)
    rows = [dict(r, variant="small-ud-xe-fp32") if r["variant"] == "small-ud-xe" else r for r in ROWS] + [
        row("small-ud_slim-xe-fp32", "small", "architecture", 5.0, 0.80, seed=0, **slim),
        row("small-ud_slim-kd-fp32", "small", "distill", 5.0, 0.84, seed=0, **kd),
        row("small-ud_slim-xe_seed1-fp32", "small", "seed", 5.0, 0.82, seed=1, **slim),
        row("small-ud_slim-xe_seed2-fp32", "small", "seed", 5.0, 0.81, seed=2, **slim),
        row("small-ud_slim-kd_seed1-fp32", "small", "seed", 5.0, 0.80, seed=1, **kd),
        row("small-ud_slim-kd_seed2-fp32", "small", "seed", 5.0, 0.81, seed=2, **kd),
    ]
    text = summary_markdown(build_table(_metrics(tmp_path, rows, per_image=True), BASELINES))
    section = text[text.index("## Training: SCST"):text.index("## Distilled students")]
    line = next(x for x in section.splitlines() if x.startswith("| `small-ud_slim-kd-fp32`"))
    # alone: 0.84 against 0.80 (+5%); averaged over 3 seeds: 0.8167 against 0.81 (+0.82%)
    assert line.startswith("| `small-ud_slim-kd-fp32` | kd | 0.8000 | 0.8400 | +5.00% [")
    assert line.endswith("| 3 and 3 | +0.82% [+0.51, +1.14] |")
    assert "| `small-ud-scst` | scst | 0.9000 | 1.2000 | +33.33% [" in section and "| 1 and 1 | – |" in section
    assert "_seed" not in section
    noise = text[text.index("## Training noise"):]
    assert "| `small-ud_slim-kd-fp32` | 3 | 0.8400, 0.8000, 0.8100 |" in noise


def test_no_architecture_change_no_architecture_section(tmp_path):
    assert "## Architecture changes" not in summary_markdown(build_table(_metrics(tmp_path, ROWS), BASELINES))
