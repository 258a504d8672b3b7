"""Our vectorised CIDEr-D against pycocoevalcap's Cider: real COCO captions, edge cases, fixed df."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.errors import UserError
from captioning.evaluation.cider import CiderD, corpus_cider_d
from captioning.evaluation.metrics import bundled_coco_refs, ptb_tokenize

DATA = Path(__file__).parent / "data"


def test_parity_with_pycocoevalcap_on_real_karpathy_test_captions():
    results = json.loads((DATA / "karpathy_test_captions.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in bundled_coco_refs("val2014")["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    gts = ptb_tokenize({r["image_id"]: refs[r["image_id"]] for r in results})
    res = ptb_tokenize({r["image_id"]: [r["caption"]] for r in results})
    assert len(gts) == 5000

    want_mean, want = Cider().compute_score(gts, res)
    mean, got = corpus_cider_d(gts, res)
    assert mean == pytest.approx(want_mean, abs=1e-9, rel=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert mean == pytest.approx(1.311, abs=5e-4)  # the published CIDEr-D of these captions
    # strings or one-caption lists, as pycocoevalcap takes them
    assert corpus_cider_d(gts, {i: c[0] for i, c in res.items()})[0] == mean


def _sentence(rng, words, lo=0, hi=10):
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


@pytest.mark.parametrize("seed", range(8))
def test_parity_on_random_corpora_with_edge_cases(seed):
    # small vocabularies give repeated n-grams (clipping), empty and one-word sentences (length
    # quirk), unknown words, and n-grams in every image (zero idf)
    rng = random.Random(seed)
    words = list("abcdef")[:rng.randint(2, 6)]
    n_img = rng.choice([1, 2, 7, 30])
    gts = {f"im{i}": [_sentence(rng, words, lo=1) for _ in range(rng.randint(1, 6))] for i in range(n_img)}
    res = {i: [_sentence(rng, words + ["zebra", "xylophone"])] for i in gts}
    want_mean, want = Cider().compute_score(gts, res)
    mean, got = corpus_cider_d(gts, res)
    assert mean == pytest.approx(want_mean, abs=1e-12)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_fixed_document_frequencies_score_each_candidate_alone():
    # pycocoevalcap's score of an image depends only on the references (df) and its own candidate,
    # so many candidates per image, scored in any grouping, must match it one candidate set at a time
    rng = random.Random(0)
    words = "a dog cat on the mat grass runs sits red big".split()
    gts = {i: [_sentence(rng, words, lo=3) for _ in range(5)] for i in range(40)}
    scorer = CiderD(gts)
    cand_sets = [{i: [_sentence(rng, words + ["moon"], lo=1)] for i in gts} for _ in range(4)]
    ids = [i for i in gts for _ in cand_sets]
    cands = [s[i][0] for i in gts for s in cand_sets]
    ours = scorer.scores(ids, cands).reshape(len(gts), len(cand_sets))
    for k, res in enumerate(cand_sets):
        np.testing.assert_allclose(ours[:, k], Cider().compute_score(gts, res)[1], rtol=0, atol=1e-12)
    # batch order and size do not matter
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = scorer.scores([ids[p] for p in perm], [cands[p] for p in perm])
    np.testing.assert_allclose(shuffled, ours.reshape(-1)[perm], rtol=0, atol=1e-12)
    assert scorer.scores(ids[:1], cands[:1])[0] == pytest.approx(ours[0, 0], abs=1e-12)
    assert scorer.scores([], []).shape == (0,)


def test_reference_caption_beats_a_wrong_one():
    gts = {1: ["a dog runs on the grass", "a brown dog runs", "the dog is running on grass"],
           2: ["a cat sits on a mat", "a cat on the mat", "the cat is sitting"],
           3: ["a red car on the road", "a car parked", "a red car"]}
    s = CiderD(gts).scores([1, 1, 1, 1], ["a dog runs on the grass", "a dog runs", "a cat sits on a mat", ""])
    assert s[0] > s[1] > s[2] >= 0 and s[3] == 0.0


def test_user_errors():
    with pytest.raises(UserError, match="no reference captions"):
        CiderD({})
    with pytest.raises(UserError, match="image 'b' has no reference"):
        CiderD({"a": ["x y"], "b": []})
    scorer = CiderD({"a": ["x y"]})
    with pytest.raises(UserError, match="image id 'zz'"):
        scorer.scores(["zz"], ["x"])
    with pytest.raises(UserError, match="only one of"):
        corpus_cider_d({"a": ["x"]}, {"b": ["x"]})
    with pytest.raises(UserError, match="exactly one candidate"):
        corpus_cider_d({"a": ["x"]}, {"a": ["x", "y"]})
