"""Data source, loss, cross-entropy training, determinism and resuming, on a tiny fake dataset."""
import json

import h5py
import numpy as np
import pytest
import torch

from captioning.errors import UserError
from captioning.io import load_tensors
from captioning.models import create_decoder, load_decoder, read_decoder_meta
from captioning.models.search import greedy
from captioning.training import CaptionData, train_xe
from captioning.training.xe import cider_d, lr_at, sequence_loss, simple_tokenize, trim_padding

WORDS = ["a", "dog", "cat", "on", "the", "grass", "mat", "runs", "sits", "red"]
W = {w: i + 1 for i, w in enumerate(WORDS)}
# Two kinds of image; captions depend on the kind, features too.
CAPS = {0: ["a dog runs on the grass", "a red dog runs", "the dog runs on grass", "a dog on the grass", "dog runs"],
        1: ["a cat sits on the mat", "the cat sits", "a red cat on a mat", "a cat on the mat", "cat sits on mat"]}
SPLITS = ["train", "train", "restval", "train", "train", "train", "val", "val", "test", "test"]
L, C, HW = 7, 6, 4


def make_dataset(root, n_caps=(5, 5, 3, 5, 5, 1, 5, 5, 5, 5), ids=None, seed=0):
    """features.h5 and a prepared dir in the formats the earlier stages write."""
    rng = np.random.default_rng(seed)
    prep = root / "prepared"
    prep.mkdir(parents=True, exist_ok=True)
    n = len(SPLITS)
    img_ids = list(range(100, 100 + n))
    kinds = [i % 2 for i in range(n)]
    images = [{"id": i, "file_path": f"img/{i}.jpg", "split": s} for i, s in zip(img_ids, SPLITS)]
    (prep / "images.json").write_text(json.dumps(images))
    (prep / "vocab.json").write_text(json.dumps({"itow": {str(i): w for w, i in W.items()}}))
    labels, start, end = [], [], []
    for k, nc in zip(kinds, n_caps):
        start.append(len(labels))
        for j in range(nc):
            row = [W[w] for w in CAPS[k][j % 5].split()][:L]
            labels.append(row + [0] * (L - len(row)))
        end.append(len(labels))
    with h5py.File(prep / "labels.h5", "w") as f:
        f["labels"] = np.array(labels, dtype=np.int32)
        f["label_start_ix"] = np.array(start, dtype=np.int64)
        f["label_end_ix"] = np.array(end, dtype=np.int64)
    for split in ("val", "test"):
        anns = [{"image_id": i, "id": 10 * i + j, "caption": CAPS[k][j].capitalize() + "."}
                for i, k, s in zip(img_ids, kinds, SPLITS) if s == split for j in range(5)]
        refs = {"images": [{"id": a["image_id"]} for a in anns[::5]], "annotations": anns}
        (prep / f"refs_{split}.json").write_text(json.dumps(refs))
    centers = rng.normal(size=(2, HW, C))
    att = np.stack([centers[k] + 0.3 * rng.normal(size=(HW, C)) for k in kinds]).astype(np.float16)
    feats = root / "features.h5"
    with h5py.File(feats, "w") as f:
        f["ids"] = np.array(ids if ids is not None else img_ids, dtype=np.int64)
        f["fc"] = att.mean(1)
        f["att"] = att
    return feats, prep


TINY = dict(input_encoding_size=16, rnn_size=16, att_hid_size=8, drop_prob=0.1)


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


# ---- training ------------------------------------------------------------------------------------

def test_tiny_model_overfits_tiny_dataset(tmp_path):
    feats, prep = make_dataset(tmp_path)
    data = CaptionData(feats, prep, seq_per_img=1)
    torch.manual_seed(0)
    m = create_decoder("updown", data.vocab_size, data.feat_dim, input_encoding_size=32, rnn_size=32,
                       att_hid_size=16, drop_prob=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    rows = data.index("train")[:2]  # one image of each kind, its first caption
    fc, att = data.fc[rows].float(), data.att[rows].float()
    seq = torch.stack([data.labels[data.start[r]] for r in rows])
    losses = []
    for _ in range(120):
        loss = sequence_loss(m(fc, att, seq), seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        out = greedy(m.eval(), fc, att, max_len=L)
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
    assert not (tmp_path / "m" / "xe.safetensors.resume.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["xe.json", "xe.safetensors"]  # no temp files


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
