"""Data source, loss, cross-entropy training, determinism and resuming, on a tiny fake dataset."""
import json
import os

import pytest
import torch

from captioning.errors import UserError
from captioning.io import load_tensors
from captioning.models import create_decoder, load_decoder, read_decoder_meta
from captioning.models.search import greedy
from captioning.training import CaptionData, train_xe
from captioning.training.checkpoint import run_files
from captioning.training.loop import trim_padding
from captioning.training.validate import cider_d, generate_captions, simple_tokenize
from captioning.training.xe import lr_at, sequence_loss

from helpers import C, CAPS, HW, L, SPLITS, TINY, W, WORDS, make_dataset, overfit  # noqa: F401


# ---- loader ------------------------------------------------------------------------------------

def test_loader_batches(tmp_path):
    feats, prep = make_dataset(tmp_path)
    data = CaptionData(feats, prep, seq_per_img=5)
    assert data.vocab_size == len(WORDS) and data.feat_dim == C
    assert list(data.index("train")) == [0, 1, 2, 3, 4, 5]  # restval counts as train
    g = torch.Generator().manual_seed(0)
    batches = list(data.batches("train", 4, shuffle=True, generator=g))
    assert [len(b.ids) for b in batches] == [4, 2] and data.num_batches("train", 4) == 2
    assert sorted(i for b in batches for i in b.ids) == list(range(100, 106))
    b = batches[0]
    assert b.fc.dtype == b.att.dtype == torch.float32
    assert b.fc.shape == (4, C) and b.att.shape == (4, HW, C) and b.labels.shape == (20, L)
    # every caption comes from its own image: kind 0 says "dog", kind 1 "cat"
    for j, img in enumerate(b.ids):
        words = " ".join(data.decode(b.labels[5 * j:5 * j + 5]))
        assert ("dog" in words) == (img % 2 == 0) and ("cat" in words) == (img % 2 == 1)
    # image 105 has one caption: drawn with replacement, so all five rows are that caption
    one = next(bb for bb in data.batches("train", 6) if 105 in bb.ids)
    j = one.ids.index(105)
    assert data.decode(one.labels[5 * j:5 * j + 5]) == [CAPS[1][0]] * 5
    # same generator seed -> same batches
    again = list(data.batches("train", 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(x.labels, y.labels) and x.ids == y.ids for x, y in zip(batches, again))


def test_max_length_travels_with_the_prepared_data(tmp_path):
    """Validation decodes no longer than the captions were prepared: vocab.json's max_length, else the label width."""
    feats, prep = make_dataset(tmp_path)
    assert CaptionData(feats, prep).max_length == L
    vocab = json.loads((prep / "vocab.json").read_text())
    (prep / "vocab.json").write_text(json.dumps({**vocab, "max_length": 3}))
    data = CaptionData(feats, prep)
    assert data.max_length == 3
    torch.manual_seed(0)
    m = create_decoder("updown", data.vocab_size, data.feat_dim, **TINY)
    with torch.no_grad():  # an end token that is never chosen: every caption runs to the limit
        m.logit.bias[0] = -1e4
    caps = generate_captions(m, data, "val", progress=False)
    assert [len(c["caption"].split()) for c in caps] == [3, 3]
    assert [len(c["caption"].split()) for c in generate_captions(m, data, "val", max_length=5, progress=False)] == [5, 5]


def test_loader_user_errors(tmp_path):
    feats, prep = make_dataset(tmp_path, ids=list(range(200, 210)))
    with pytest.raises(UserError, match="features.h5.*images.json"):
        CaptionData(feats, prep)
    feats, prep = make_dataset(tmp_path / "ok")
    with pytest.raises(UserError, match="not found"):
        CaptionData(tmp_path / "nope.h5", prep)
    with pytest.raises(UserError, match="unknown split"):
        CaptionData(feats, prep).index("dev")
    (prep / "vocab.json").write_text("{")
    with pytest.raises(UserError, match="vocab.json"):
        CaptionData(feats, prep)


# ---- loss and helpers -----------------------------------------------------------------------------

def test_sequence_loss_counts_words_and_first_end_only():
    seq = torch.tensor([[2, 1, 0, 0]])
    lp = torch.full((1, 5, 3), -100.0)
    lp[0, 0, 2], lp[0, 1, 1], lp[0, 2, 0] = -1.0, -2.0, -3.0  # the three counted positions
    assert sequence_loss(lp, seq).item() == pytest.approx(2.0)
    full = torch.tensor([[1, 1]])  # fills every slot: the end token is predicted after it
    lp2 = torch.tensor([[[-9.0, -1.0], [-9.0, -1.0], [-4.0, -9.0]]])
    assert sequence_loss(lp2, full).item() == pytest.approx(2.0)
    assert trim_padding(torch.tensor([[3, 0, 0], [1, 2, 0]])).shape == (2, 2)
    assert [lr_at(e, 1.0, 3, 0.5) for e in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]


def test_cider_d_prefers_the_right_caption(tmp_path):
    refs = {1: ["A dog runs on the grass.", "a dog runs"], 2: ["A cat sits on the mat", "the cat sits"],
            3: ["a red car", "a car parked"]}
    assert simple_tokenize("A Dog, runs!") == "a dog runs"
    good = cider_d([{"image_id": 1, "caption": "a dog runs on the grass"},
                    {"image_id": 2, "caption": "a cat sits on the mat"},
                    {"image_id": 3, "caption": "a red car"}], refs)
    bad = cider_d([{"image_id": 1, "caption": "a cat sits on the mat"},
                   {"image_id": 2, "caption": ""},
                   {"image_id": 3, "caption": "a dog runs"}], refs)
    assert good > 1.0 and bad < 0.5 * good
    with pytest.raises(UserError, match="refs_val.json.*7"):
        cider_d([{"image_id": 7, "caption": "x"}], refs, "refs_val.json")


def test_validation_cider_d_is_pycocoevalcaps():
    """Validation scores with the vectorised CIDEr-D; it must pick epochs as pycocoevalcap's would."""
    from pycocoevalcap.cider.cider import Cider

    refs = {i: [f"a {c} {s} on the {p}" for c, s, p in zip(("red", "blue", "red"), ("dog", "cat", "dog"),
                                                             ("mat", "grass", "grass"))][: 1 + i % 3]
            for i in range(12)}
    caps = [{"image_id": i, "caption": ["A red dog on the mat.", "a cat", "blue cat on grass", ""][i % 4]}
            for i in range(12)]
    want, _ = Cider().compute_score({i: [simple_tokenize(r) for r in refs[i]] for i in refs},
                                    {c["image_id"]: [simple_tokenize(c["caption"])] for c in caps})
    assert cider_d(caps, refs) == pytest.approx(want, rel=1e-12, abs=1e-12) and want > 0


# ---- training ------------------------------------------------------------------------------------

def test_tiny_model_overfits_tiny_dataset(tmp_path):
    feats, prep = make_dataset(tmp_path)
    data = CaptionData(feats, prep, seq_per_img=1)
    torch.manual_seed(0)
    m = create_decoder("updown", data.vocab_size, data.feat_dim, input_encoding_size=32, rnn_size=32,
                       att_hid_size=16, drop_prob=0.0)
    rows = data.index("train")[:2]  # one image of each kind, its first caption
    fc, att = data.fc[rows].float(), data.att[rows].float()
    seq = torch.stack([data.labels[data.start[r]] for r in rows])
    losses = overfit(m, fc, att, seq, 1e-2, 120)
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        out = greedy(m.eval(), fc, att, max_length=L)
    assert data.decode(out) == data.decode(seq) == [CAPS[0][0], CAPS[1][0]]


def test_train_xe_writes_best_model_and_log(tmp_path):
    feats, prep = make_dataset(tmp_path)
    out, log = tmp_path / "m" / "xe.safetensors", tmp_path / "m" / "xe.json"
    res = train_xe(feats, prep, out, "updown", TINY, epochs=3, batch_size=3, lr=1e-2, seed=1,
                   log_json=log, progress=False)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[2]["lr"] == pytest.approx(1e-2) and res["best_val_cider"] == max(h["val_cider"] for h in hist)
    assert json.loads(log.read_text())["history"] == hist
    meta = read_decoder_meta(out)
    assert meta["epoch"] == res["best_epoch"] and meta["val_cider"] == res["best_val_cider"]
    assert meta["vocab_size"] == len(WORDS) and meta["feat_dim"] == C and meta["itow"]["2"] == "dog"
    m = load_decoder(out)
    assert m.config == {"name": "updown", "vocab_size": len(WORDS), "feat_dim": C, **TINY,
                        "embed_rank": None, "factorize_logit": True, "tie_embeddings": False}
    # no temp files; the run files stay as a finished record and a second name of the output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "xe.json", "xe.safetensors", "xe.safetensors.best.safetensors", "xe.safetensors.resume.safetensors"]
    resume, best = run_files(out)
    assert os.path.samefile(best, out)
    tensors, record = load_tensors(resume)
    assert tensors == {} and record["finished"] is True and record["history"] == hist


def test_train_xe_learns_val_captions(tmp_path):
    feats, prep = make_dataset(tmp_path)
    res = train_xe(feats, prep, tmp_path / "xe.safetensors", "updown", dict(TINY, rnn_size=32), epochs=8,
                   batch_size=2, lr=1e-2, seed=0, progress=False)
    assert res["best_val_cider"] > 1.0  # near-perfect on this 2-kind world


def _weights(path):
    return load_tensors(path)[0]


def test_train_xe_is_deterministic_and_resumes_exactly(tmp_path):
    feats, prep = make_dataset(tmp_path)
    kw = dict(batch_size=3, lr=5e-3, seed=3, keep_resume=True, progress=False)
    a, b, c = (tmp_path / n / "xe.safetensors" for n in "abc")
    ra = train_xe(feats, prep, a, "updown", TINY, epochs=2, **kw)
    train_xe(feats, prep, b, "updown", TINY, epochs=2, **kw)
    r1 = train_xe(feats, prep, c, "updown", TINY, epochs=1, **kw)  # "killed" after epoch 1
    rc = train_xe(feats, prep, c, "updown", TINY, epochs=2, **kw)
    assert len(r1["history"]) == 1 and rc["history"][0] == r1["history"][0]
    resume = [_weights(str(p) + ".resume.safetensors") for p in (a, b, c)]
    assert any(k.startswith("optim.") for k in resume[0])
    for other in resume[1:]:
        assert resume[0].keys() == other.keys()
        assert all(torch.equal(resume[0][k], other[k]) for k in resume[0])
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rc["history"]]
    # a resume file made with other settings is ignored, not trusted
    rd = train_xe(feats, prep, c, "updown", TINY, epochs=3, **dict(kw, lr=1e-3))
    assert len(rd["history"]) == 3 and rd["history"][0]["lr"] == pytest.approx(1e-3)
    # ... and so is one made from other features
    feats2, prep2 = make_dataset(tmp_path / "other", seed=1)
    re_ = train_xe(feats2, prep2, c, "updown", TINY, epochs=4, **dict(kw, lr=1e-3))
    assert len(re_["history"]) == 4 and re_["history"][0]["loss"] != rd["history"][0]["loss"]


def test_train_xe_user_errors(tmp_path):
    feats, prep = make_dataset(tmp_path)
    with pytest.raises(UserError, match="unknown decoder"):
        train_xe(feats, prep, tmp_path / "x.safetensors", "nope", {}, epochs=1, progress=False)
    with pytest.raises(UserError, match="vocab_size"):
        train_xe(feats, prep, tmp_path / "x.safetensors", "updown", {"vocab_size": 3}, epochs=1, progress=False)


def test_patience_stops_at_the_plateau_and_a_resumed_run_stops_there_too(tmp_path, capfd):
    feats, prep = make_dataset(tmp_path)
    out = tmp_path / "p" / "xe.safetensors"
    # a learning rate too small to change any caption: val CIDEr-D never beats epoch 1
    kw = dict(batch_size=3, lr=1e-12, seed=0, progress=False, patience=2, keep_resume=True)
    res = train_xe(feats, prep, out, "updown", TINY, epochs=10, **kw)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3] and res["best_epoch"] == 1
    assert "has not improved for 2 epochs since epoch 1; stopping" in capfd.readouterr().err
    again = train_xe(feats, prep, out, "updown", TINY, epochs=10, **kw)
    assert again["history"] == res["history"]  # resumed after epoch 3, and stopped at once
    full = train_xe(feats, prep, tmp_path / "f" / "xe.safetensors", "updown", TINY, epochs=4,
                    **dict(kw, patience=None))
    assert len(full["history"]) == 4  # without patience: every epoch
    with pytest.raises(UserError, match="patience must be at least 1"):
        train_xe(feats, prep, tmp_path / "x.safetensors", "updown", TINY, epochs=2, **dict(kw, patience=0))
