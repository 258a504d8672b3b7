"""The results table: reductions against each decoder's baseline, the Pareto front, the files."""
import pandas as pd
import pytest

from captioning.errors import UserError
from captioning.io import write_json
from captioning.results.table import COLUMNS, build_table, pareto_front, write_results


def _metrics(tmp_path, rows):
    files = []
    for r in rows:
        f = tmp_path / f"{r['variant']}.json"
        write_json(f, {"dataset": "d", "stage": "x", "BLEU_1": 0.5, **r})
        files.append(f)
    return files


ROWS = [
    {"variant": "big-ud-xe", "encoder": "big", "decoder": "ud", "size_mb": 100.0, "CIDEr": 1.0, "latency_ms": 9.0},
    {"variant": "small-ud-xe", "encoder": "small", "decoder": "ud", "size_mb": 10.0, "CIDEr": 0.9, "latency_ms": 2.0},
    {"variant": "tiny-ud-xe", "encoder": "tiny", "decoder": "ud", "size_mb": 20.0, "CIDEr": 0.8, "latency_ms": 1.0},
    {"variant": "big-tf-xe", "encoder": "big", "decoder": "tf", "size_mb": 50.0, "CIDEr": 2.0, "latency_ms": 9.0},
]


def test_reductions_are_against_the_rows_decoder_baseline(tmp_path):
    df = build_table(_metrics(tmp_path, ROWS), ["big-ud-xe", "big-tf-xe"]).set_index("variant")
    assert list(df.reset_index().columns) == COLUMNS
    assert df.loc["big-ud-xe", "size_reduction_pct"] == 0
    assert df.loc["small-ud-xe", "size_reduction_pct"] == pytest.approx(90.0)
    assert df.loc["small-ud-xe", "cider_change_pct"] == pytest.approx(-10.0)
    assert df.loc["big-tf-xe", "cider_change_pct"] == 0


def test_missing_baseline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="baseline variant 'nope'"):
        build_table(_metrics(tmp_path, ROWS), ["nope"])
    with pytest.raises(UserError, match="no baseline variant given"):
        build_table(_metrics(tmp_path, ROWS), ["big-ud-xe"])


def test_pareto_front():
    df = pd.DataFrame({"size_mb": [100, 10, 20, 5], "CIDEr": [1.0, 0.9, 0.8, 0.1]})
    assert pareto_front(df).tolist() == [True, True, False, True]


def test_write_results_files(tmp_path):
    df = write_results(_metrics(tmp_path, ROWS), ["big-ud-xe", "big-tf-xe"], tmp_path / "out")
    assert len(df) == 4
    csv = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == 4
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.count("\n") == 6 and "small-ud-xe" in md
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## ud" in (tmp_path / "out" / "summary.md").read_text()


def test_summary_picks_largest_reduction_within_budget(tmp_path):
    from captioning.results.summary import best_within, summary_markdown

    rows = ROWS + [{"variant": "small-ud-p9", "encoder": "small", "decoder": "ud", "size_mb": 2.0,
                    "CIDEr": 0.985, "latency_ms": 1.0},
                   {"variant": "small-ud-p95", "encoder": "small", "decoder": "ud", "size_mb": 1.0,
                    "CIDEr": 0.95, "latency_ms": 1.0}]
    df = build_table(_metrics(tmp_path, rows), ["big-ud-xe", "big-tf-xe"])
    ud = df[df["decoder"] == "ud"]
    assert best_within(ud, 2.0)["variant"] == "small-ud-p9"     # -1.5%: within 2%, not within 1%
    assert best_within(ud, 1.0)["variant"] == "big-ud-xe"
    text = summary_markdown(df)
    assert "| 2% | `small-ud-p9` | 2.00 | 98.0% |" in text


def test_summary_also_judges_against_the_same_encoders_dense_model(tmp_path):
    from captioning.results.summary import summary_markdown

    rows = [dict(r, stage="baseline" if r["encoder"] == "big" else "encoder", quantization="fp32") for r in ROWS]
    rows.append({"variant": "small-ud-int8", "encoder": "small", "decoder": "ud", "stage": "quantize",
                 "quantization": "int8", "size_mb": 3.0, "CIDEr": 0.89, "latency_ms": 1.0})
    text = summary_markdown(build_table(_metrics(tmp_path, rows), ["big-ud-xe", "big-tf-xe"]))
    assert "Against the dense fp32 model with the same encoder, `small-ud-xe`" in text
    assert "| 2% | `small-ud-int8` | 3.00 | 97.0% | 0.8900 | -1.11% |" in text


def test_latency_file_replaces_the_metrics_latency_and_must_cover_every_variant(tmp_path):
    files = _metrics(tmp_path, ROWS)
    write_json(tmp_path / "lat.json", {r["variant"]: 100.0 + k for k, r in enumerate(ROWS)})
    df = build_table(files, ["big-ud-xe", "big-tf-xe"], tmp_path / "lat.json").set_index("variant")
    assert df.loc["small-ud-xe", "latency_ms"] == 101.0 and df.loc["big-tf-xe", "latency_ms"] == 103.0
    write_json(tmp_path / "lat.json", {"big-ud-xe": 1.0})
    with pytest.raises(UserError, match="no latency for variant 'small-ud-xe'"):
        build_table(files, ["big-ud-xe", "big-tf-xe"], tmp_path / "lat.json")


def test_summary_sets_scst_and_distilled_rows_beside_cross_entropy(tmp_path):
    from captioning.results.summary import summary_markdown

    rows = [dict(r, training="xe", quantization="fp32") for r in ROWS]
    rows += [{"variant": "small-ud-scst", "encoder": "small", "decoder": "ud", "training": "scst", "quantization": "fp32",
              "size_mb": 10.0, "CIDEr": 0.99, "latency_ms": 1.0},
             {"variant": "small-ud-kd", "encoder": "small", "decoder": "ud", "training": "kd", "quantization": "fp32",
              "size_mb": 10.0, "CIDEr": 0.81, "latency_ms": 1.0},
             {"variant": "small-ud-scst-int8", "encoder": "small", "decoder": "ud", "training": "scst",
              "quantization": "int8", "size_mb": 3.0, "CIDEr": 0.5, "latency_ms": 1.0}]
    text = summary_markdown(build_table(_metrics(tmp_path, rows), ["big-ud-xe", "big-tf-xe"]))
    assert "| `small-ud-scst` | scst | 0.9000 | 0.9900 | +10.00% |" in text
    assert "| `small-ud-kd` | kd | 0.9000 | 0.8100 | -10.00% |" in text
    assert "small-ud-scst-int8` | scst" not in text  # only fp32 rows compare training alone
