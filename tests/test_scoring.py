"""Scoring many variants in one job: one metrics.json each, cached scores for unchanged captions,
and the `captioning score` verb. METEOR's 12 s start is faked; tests/test_metrics.py covers parity."""
import json

import pytest

from captioning.cli import main
from captioning.errors import UserError
from captioning.evaluation import evaluate, metrics
from captioning.timing import TIMING_PREFIX
from helpers import fake_meteor

REFS = {"images": [{"id": 1}, {"id": 2}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "a dog runs on the grass"},
                        {"image_id": 1, "id": 11, "caption": "a brown dog runs on grass"},
                        {"image_id": 2, "id": 20, "caption": "two cats sleep on a red sofa"},
                        {"image_id": 2, "id": 21, "caption": "cats asleep on a sofa"}]}
GOOD = [{"image_id": 1, "caption": "a dog runs on the grass"}, {"image_id": 2, "caption": "two cats on a sofa"}]
BAD = [{"image_id": 1, "caption": "a plate of food"}, {"image_id": 2, "caption": "a car"}]


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """refs.json, two variant dirs (a: GOOD, b: BAD captions) and a record of what score_many scored."""
    monkeypatch.setattr(metrics, "meteor_scorer", fake_meteor)
    calls = []
    real = metrics.score_many

    def recording(refs, results, **kw):
        calls.append([str(r) for r in results])
        return real(refs, results, **kw)

    monkeypatch.setattr(metrics, "score_many", recording)
    (tmp_path / "refs.json").write_text(json.dumps(REFS))
    for name, caps in (("a", GOOD), ("b", BAD)):
        d = tmp_path / "eval" / name
        d.mkdir(parents=True)
        (d / "captions.json").write_text(json.dumps(caps))
        (d / "variant.json").write_text(json.dumps({"variant": name, "size_mb": 1.5}))
    return tmp_path, calls


def _score(root):
    return evaluate.score_variants(root / "refs.json", [root / "eval/a", root / "eval/b"],
                                   cache_dir=root / "cache", spice=False)


def test_one_metrics_file_per_variant_from_one_scoring_run(scored):
    root, calls = scored
    a, b = _score(root)
    assert calls == [[str(root / "eval/a/captions.json"), str(root / "eval/b/captions.json")]]
    for d, m in (("a", a), ("b", b)):
        assert json.loads((root / "eval" / d / "metrics.json").read_text()) == m
        assert m["variant"] == d and m["size_mb"] == 1.5 and set(metrics.METRICS) <= set(m)
        assert sorted(m["cider_per_image"]) == ["1", "2"]
    assert a["CIDEr"] > b["CIDEr"] and a["CIDEr"] == pytest.approx(sum(a["cider_per_image"].values()) / 2)


def test_unchanged_captions_come_from_the_cache(scored):
    root, calls = scored
    first = _score(root)
    assert _score(root) == first and len(calls) == 1  # nothing changed: no scorer started at all
    (root / "eval/b/captions.json").write_text(json.dumps(GOOD[:1] + BAD[1:]))
    a, b = _score(root)
    assert calls[1] == [str(root / "eval/b/captions.json")]  # only the changed variant
    assert a == first[0] and b["variant"] == "b"
    assert b["cider_per_image"] == {"1": a["cider_per_image"]["1"], "2": first[1]["cider_per_image"]["2"]}
    # the cache is keyed by content: captions identical to a's take a's scores without scoring
    (root / "eval/b/captions.json").write_text(json.dumps(GOOD))
    assert _score(root)[1]["CIDEr"] == a["CIDEr"] and len(calls) == 2
    # a damaged cache entry is scored again, not trusted; identical captions files are scored once
    for f in (root / "cache").glob("*.json"):
        f.write_text("{")
    assert _score(root) == [a, dict(a, variant="b")] and calls[2] == [str(root / "eval/a/captions.json")]


def test_changed_references_rescore_everything(scored):
    root, calls = scored
    _score(root)
    refs = json.loads((root / "refs.json").read_text())
    refs["annotations"][0]["caption"] = "a cat"
    (root / "refs.json").write_text(json.dumps(refs))
    _score(root)
    assert len(calls) == 2 and len(calls[1]) == 2


def test_missing_captions_is_a_user_error(scored):
    root, _ = scored
    (root / "eval/b/captions.json").unlink()
    with pytest.raises(UserError, match="captions.json: file not found"):
        _score(root)
    assert not (root / "eval/a/metrics.json").exists()


def test_score_verb_prints_metrics_of_any_results_file(scored, capsys):
    root, _ = scored
    (root / "good.json").write_text(json.dumps(GOOD))
    (root / "bad.json").write_text(json.dumps(BAD))
    assert main(["score", "--refs", str(root / "refs.json"), "--results", str(root / "good.json"), "--spice", "off"]) == 0
    out, err = capsys.readouterr()
    one = json.loads(out)
    assert set(one) == set(metrics.METRICS) and one["SPICE"] is None and one["BLEU_1"] == pytest.approx(1.0)
    assert err.strip().splitlines()[-1].startswith(TIMING_PREFIX)
    assert main(["score", "--refs", str(root / "refs.json"), "--results", str(root / "good.json"),
                 str(root / "bad.json"), "--spice", "off"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both[str(root / "good.json")] == one and both[str(root / "bad.json")]["CIDEr"] < one["CIDEr"]


def test_score_verb_bad_results_is_one_line(scored, capsys):
    root, _ = scored
    (root / "bad.json").write_text(json.dumps([{"image_id": 99, "caption": "x"}]))
    assert main(["score", "--refs", str(root / "refs.json"), "--results", str(root / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image_id 99 is not in the references" in err


def test_score_verb_cache_goes_with_eval_dirs_only(scored, capsys):
    root, calls = scored
    (root / "good.json").write_text(json.dumps(GOOD))
    assert main(["score", "--refs", str(root / "refs.json"), "--results", str(root / "good.json"),
                 "--cache", str(root / "c")]) == 2
    assert "--cache goes with --eval-dirs" in capsys.readouterr().err and calls == []
