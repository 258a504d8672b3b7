"""The results plot: one panel per family, each with its own Pareto front and quality reference."""
import math

import numpy as np
import pandas as pd
import pytest

from captioning.results.plot import front_candidates, pareto_figure, pareto_front, plot_pareto, short_label

STAGES = ["baseline", "encoder", "control", "architecture", "prune", "quantize", "scst", "distill"]


def synthetic_table(families=("updown", "transformer")) -> pd.DataFrame:
    """Every stage and quantization present in each family, with a few near-ties on size."""
    rows = []
    for k, fam in enumerate(families):
        scale = 1.0 + 0.3 * k
        base = 1.10 * scale

        def row(enc, stage, quant, size, cider, dstage="xe", dec=fam, fam=fam, scale=scale, base=base):
            rows.append({"variant": f"{enc}-{dec}-{dstage}-{quant}",
                         "family": fam, "stage": stage, "quantization": quant,
                         "size_mb": size * scale, "CIDEr": cider * scale,
                         "quality_reference": f"r50-{fam}-xe-fp32", "reference_cider": base})

        row("r50", "baseline", "fp32", 120.0, 1.10)
        row("r18", "encoder", "fp32", 60.0, 1.095)
        row("lite0", "encoder", "fp32", 25.0, 1.02)
        row("rand", "control", "fp32", 60.0, 1.07)
        row("r18", "architecture", "fp32", 40.0, 1.085, dec=f"{fam}_small")
        row("r18", "prune", "fp32", 30.0, 1.08, dstage="xe_global0.5")
        row("r18", "quantize", "fp16", 30.5, 1.094)
        row("r18", "quantize", "int8", 16.0, 1.089)
        row("lite0", "quantize", "int8", 8.0, 0.98)
        row("r18", "scst", "fp32", 60.0, 1.13, dstage="scst")
        row("r18", "distill", "int8", 15.5, 1.075, dstage="kd")
        row("lite0", "distill", "bf16", 7.9, 0.97, dstage="kd")  # an unknown quantization: the fallback marker
    return pd.DataFrame(rows)


def test_pareto_front_hand_made():
    df = pd.DataFrame({"size_mb": [100, 10, 20, 5, 10, 50],
                       "CIDEr": [1.0, 0.9, 0.8, 0.1, 0.9, 1.0]})
    # 20/0.8 is beaten by 10/0.9; 100/1.0 by 50/1.0 (same CIDEr, smaller); the two 10/0.9 tie, so both stay
    assert pareto_front(df).tolist() == [False, True, False, True, True, True]
    df = pd.DataFrame({"size_mb": [100, 10, 20, 5], "CIDEr": [1.0, 0.9, 0.8, 0.1]})
    assert pareto_front(df).tolist() == [True, True, False, True]


def test_pareto_front_skips_nan_rows():
    df = pd.DataFrame({"size_mb": [1.0, float("nan"), 10.0], "CIDEr": [0.5, 9.9, float("nan")]})
    assert pareto_front(df).tolist() == [True, False, False]


def test_short_label_drops_the_family_part():
    assert short_label("r18-updown-xe-int8", "updown") == "r18-xe-int8"
    assert short_label("r18-updown_small-xe-fp32", "updown") == "r18-small-xe-fp32"
    assert short_label("lite0-tf-xe_global0.9-int8", "tf") == "lite0-xe_global0.9-int8"
    assert short_label("lite0-b-kd-bf16", "b") == "lite0-kd-bf16"  # a family that prefixes another part


@pytest.mark.parametrize("families", [("updown",), ("updown", "transformer"), ("a", "b", "c", "d")])
def test_one_panel_per_family(families):
    fig = pareto_figure(synthetic_table(families))
    axes = fig.axes
    assert [a.get_title().split("\n")[0] for a in axes] == sorted(families)
    for ax in axes:
        assert ax.get_xscale() == "log"
        # the reference line sits at the family's reference CIDEr
        fam = ax.get_title().split("\n")[0]
        ref = synthetic_table(families).query("family == @fam")["reference_cider"].iloc[0]
        hlines = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [ref, ref]]
        assert len(hlines) == 1
        # only the front's points are labelled, each once
        texts = sorted(t.get_text() for t in ax.texts)
        g = synthetic_table(families).query("family == @fam")
        cand = front_candidates(g)
        want = sorted(short_label(v, fam) for v in cand[pareto_front(cand)]["variant"])
        assert texts == want
    assert len(fig.legends) == 3  # stage, quantization, guides


def test_training_rows_are_drawn_but_never_on_the_front():
    """The SCST row beats every row on both axes, yet the front (and its labels) runs through the
    references and compression rows only, as the summary's budgets do."""
    df = synthetic_table(("updown",))
    assert pareto_front(df)[df["stage"] == "scst"].all()
    ax = pareto_figure(df).axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert "r18-scst-fp32" not in labels and "lite0-kd-bf16" not in labels
    assert {"r18-xe-fp32", "r18-xe-int8", "lite0-xe-int8"} <= labels
    # every row is still drawn: one scatter point per row, beside the front's rings
    drawn = sum(len(c.get_offsets()) for c in ax.collections[:-1])
    assert drawn == len(df)


def test_a_quantized_student_keeps_its_training_colour():
    """A distilled decoder in int8 is stage quantize, but it is drawn as distilled, not as compression."""
    from matplotlib.colors import to_rgba

    from captioning.results.plot import STAGE_COLOURS

    df = synthetic_table(("updown",)).assign(training="xe")
    student = {"variant": "lite0-updown_slim-kd-int8", "family": "updown", "stage": "quantize", "training": "kd",
               "quantization": "int8", "size_mb": 5.0, "CIDEr": 1.2, "quality_reference": "r50-updown-xe-fp32",
               "reference_cider": 1.1}
    ax = pareto_figure(pd.concat([df, pd.DataFrame([student])], ignore_index=True)).axes[0]
    hit = [c for c in ax.collections if any(tuple(p) == (5.0, 1.2) for p in c.get_offsets())]
    assert len(hit) == 1
    assert tuple(hit[0].get_facecolor()[0][:3]) == to_rgba(STAGE_COLOURS["distill"])[:3]  # (alpha is the plot's)


def crowded_table(n=20) -> pd.DataFrame:
    """Two families of ``n`` random variants each (seeded), with long names and a dense front."""
    rng = np.random.default_rng(0)
    quants = ["fp32", "fp16", "int8", "q4"]
    rows = []
    for fam in ["updown", "transformer"]:
        for i in range(n):
            size = float(np.exp(rng.uniform(np.log(5), np.log(120))))
            rows.append({"variant": f"e{i}-{fam}-xe_global0.{i % 9}-{quants[i % 4]}", "family": fam,
                         "stage": (STAGES + ["other"])[i % 9], "quantization": quants[i % 4], "size_mb": size,
                         "CIDEr": 0.9 + 0.2 * np.log(size) / np.log(120) + rng.normal(0, 0.02),
                         "quality_reference": f"r50-{fam}-xe-fp32", "reference_cider": 1.08})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("df", [synthetic_table(("updown", "transformer", "aoanet")), crowded_table()],
                         ids=["synthetic", "crowded"])
def test_labels_do_not_overlap_and_stay_in_their_panel(df):
    from matplotlib.text import Text

    fig = pareto_figure(df)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        # the text itself, not a leader line drawn from it (the first call places the annotation)
        boxes = [t.get_window_extent(renderer) and Text.get_window_extent(t, renderer) for t in ax.texts]
        assert len(boxes) >= 3
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
        frame = ax.get_window_extent(renderer).padded(2)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
                   for b in boxes)


def test_png_width_grows_with_families(tmp_path):
    from PIL import Image

    widths = []
    for fams in [("updown",), ("updown", "transformer"), ("updown", "transformer", "aoanet")]:
        out = tmp_path / f"{len(fams)}.png"
        plot_pareto(synthetic_table(fams), out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        widths.append(Image.open(out).size[0])
    assert widths[0] < widths[1] < widths[2]
    assert widths[1] - widths[0] == pytest.approx(5 * 120, abs=2)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def test_same_table_same_png(tmp_path):
    df = synthetic_table()
    plot_pareto(df, tmp_path / "a.png")
    plot_pareto(df, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_nan_rows_and_missing_reference_do_not_crash(tmp_path):
    df = synthetic_table(("updown", "transformer"))
    df.loc[df.index[:3], "CIDEr"] = float("nan")
    df.loc[df.index[5], "size_mb"] = float("nan")
    df.loc[df["family"] == "transformer", "reference_cider"] = float("nan")
    extra = pd.DataFrame([{"variant": "x-empty-xe-fp32", "family": "empty", "stage": "baseline",
                           "quantization": "fp32", "size_mb": math.nan, "CIDEr": math.nan,
                           "quality_reference": None, "reference_cider": math.nan}])
    df = pd.concat([df, extra], ignore_index=True)
    fig = pareto_figure(df)
    by_fam = {a.get_title().split("\n")[0]: a for a in fig.axes}
    assert sorted(by_fam) == ["empty", "transformer", "updown"]
    # no reference: no horizontal line at a single y and no bands
    assert not [ln for ln in by_fam["transformer"].get_lines() if len(set(ln.get_ydata())) == 1
                and len(ln.get_ydata()) == 2 and list(ln.get_xdata()) == [0, 1]]
    assert not by_fam["transformer"].patches
    assert len(by_fam["updown"].patches) == 2  # the 1% and 2% bands
    # the NaN rows are skipped and said so
    assert any("not shown" in t.get_text() for t in by_fam["updown"].texts)
    assert "no scored variants" in [t.get_text() for t in by_fam["empty"].texts]
    plot_pareto(df, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_without_reference_columns(tmp_path):
    df = synthetic_table().drop(columns=["quality_reference", "reference_cider"])
    fig = pareto_figure(df)
    assert len(fig.axes) == 2 and all(not a.patches for a in fig.axes)
    assert len(fig.legends) == 3

