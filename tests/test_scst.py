"""Self-critical training on the tiny fake dataset: reward, learning, baselines, determinism, zeros, resume."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from captioning.errors import UserError
from captioning.evaluation.cider import CiderD
from captioning.io import load_tensors
from captioning.models import load_decoder, read_decoder_meta, save_decoder
from captioning.models.search import sample
from captioning.training import CaptionData, train_xe
from captioning.training.checkpoint import run_files
from captioning.training.amp import MixedPrecision
import captioning.training.scst as scst_module
from captioning.training.scst import SCSTStep, leave_one_out_mean, scst_loss, train_references, train_scst

from helpers import CAPS, TINY, make_dataset

FAST = dict(batch_size=3, lr=1e-2, max_length=8, sample_n=4, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A fake dataset and a weak cross-entropy model (2 epochs): room for SCST to improve."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("scst")
    feats, prep = make_dataset(root)
    xe = root / "xe.safetensors"
    train_xe(feats, prep, xe, "updown", TINY, epochs=2, batch_size=3, lr=1e-2, seed=0, progress=False)
    yield feats, prep, xe
    torch.set_num_threads(threads)


def _final_weights(out):
    """The weights after the last epoch (out_path holds the best-by-val epoch instead)."""
    tensors, _ = load_tensors(str(out) + ".resume.safetensors")
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


# ---- reward and loss ------------------------------------------------------------------------------

def test_training_references_and_reward(base):
    feats, prep, _ = base
    data = CaptionData(feats, prep)
    refs = train_references(data)
    assert sorted(refs) == list(range(100, 106))            # train + restval, not val/test
    assert refs[101] == CAPS[1] and refs[102] == CAPS[0][:3] and refs[105] == [CAPS[1][0]]
    scorer = CiderD(refs)
    rng = np.random.default_rng(0)
    words = " ".join(CAPS[0] + CAPS[1]).split()
    for img, kind in ((100, 0), (101, 1), (105, 1)):
        own = scorer.scores([img], [CAPS[kind][0]])[0]
        rand = scorer.scores([img] * 20, [" ".join(rng.choice(words, 6)) for _ in range(20)])
        assert own > 1.0 and own > rand.max()
        assert own > scorer.scores([img], [CAPS[1 - kind][0]])[0]   # the other kind's caption


def test_baseline_and_loss_push_the_right_way():
    r = np.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    np.testing.assert_allclose(leave_one_out_mean(r, 3), [4.0, 3.5, 1.5, 1.5, 1.5, 0.0])
    lp = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.5, 0.5, 1.0]])).requires_grad_()
    loss = scst_loss(lp, torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0)     # +1 and -1 advantages on equal log-probs
    assert (lp.grad[0] < 0).all() and (lp.grad[1] > 0).all()   # descent raises the winner's log-prob


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_scst_raises_the_expected_reward(base, tmp_path, baseline):
    """The quantity SCST maximises: mean CIDEr-D of sampled captions, estimated from 200 samples per image."""
    feats, prep, xe = base
    data = CaptionData(feats, prep)
    scorer = CiderD(train_references(data))
    rows = data.index("train")
    fc, att, ids = data.fc[rows].float(), data.att[rows].float(), data.ids[rows].tolist()

    def expected_reward(decoder):
        with torch.no_grad():
            seq, _ = sample(decoder.eval(), fc, att, 200, max_length=8, generator=torch.Generator().manual_seed(1))
        return scorer.scores(np.repeat(ids, 200).tolist(), data.decode(seq)).mean()

    out = tmp_path / "scst.safetensors"
    res = train_scst(xe, feats, prep, out, epochs=20, baseline=baseline, keep_resume=True,
                     **dict(FAST, batch_size=2, sample_n=8))
    before = expected_reward(load_decoder(xe))
    after_model = load_decoder(xe)
    after_model.load_state_dict(_final_weights(out))
    after = expected_reward(after_model)
    assert after > before + 0.15, (before, after)
    assert len(res["history"]) == 20 and all(np.isfinite(h["loss"]) for h in res["history"])


def test_sample_dropout_off_samples_the_test_time_model(base, monkeypatch):
    """Off, a step samples exactly what the eval-mode decoder samples (same generator); on, dropout
    changes the samples. Either way the decoder is left in train mode and gradients reach it."""
    feats, prep, xe = base
    data = CaptionData(feats, prep)
    rows = data.index("train")
    batch = SimpleNamespace(fc=data.fc[rows].float(), att=data.att[rows].float(), ids=data.ids[rows].tolist())
    scorer = CiderD(train_references(data))
    decoder = load_decoder(xe)
    for m in decoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.9  # heavy dropout, so that on and off cannot sample alike by chance
    seen = {}

    def spy(*args, **kwargs):
        seen["seq"], lp = sample(*args, **kwargs)
        return seen["seq"], lp
    monkeypatch.setattr(scst_module, "sample", spy)

    def step_samples(dropout):
        step = SCSTStep(MixedPrecision(False, "cpu", "scst"), data, scorer, 6, "mean", 8, "cpu", dropout)
        step.start_epoch(5)
        decoder.zero_grad()
        loss, _ = step(decoder.train(), batch)
        loss.backward()
        assert decoder.training  # back in train mode for the optimizer step
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
        return seen["seq"]

    with torch.no_grad():
        expected, _ = sample(decoder.eval(), batch.fc, batch.att, 6, max_length=8,
                             generator=torch.Generator().manual_seed(5 + 2))
    assert torch.equal(step_samples(False), expected)
    assert not torch.equal(step_samples(True), expected)


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_train_scst_writes_best_model_log_and_metadata(base, tmp_path, baseline):
    feats, prep, xe = base
    out, log = tmp_path / "m" / "scst.safetensors", tmp_path / "m" / "scst.json"
    res = train_scst(xe, feats, prep, out, epochs=3, baseline=baseline, seed=2, log_json=log, **FAST)
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert set(hist[0]) == {"epoch", "lr", "loss", "reward", "baseline", "val_cider", "seconds"}
    assert all(0 <= h["reward"] and 0 <= h["baseline"] for h in hist)
    assert res["best_val_cider"] == max(h["val_cider"] for h in hist)
    assert json.loads(log.read_text())["history"] == hist
    meta, xe_meta = read_decoder_meta(out), read_decoder_meta(xe)
    assert meta["stage"] == "scst" and meta["baseline"] == baseline and meta["sample_n"] == 4
    assert meta["epoch"] == res["best_epoch"] and meta["val_cider"] == res["best_val_cider"]
    assert meta["itow"] == xe_meta["itow"] and meta["vocab_size"] == xe_meta["vocab_size"]
    assert meta["feat_dim"] == xe_meta["feat_dim"] and meta["config"] == xe_meta["config"]
    assert meta["init_val_cider"] == xe_meta["val_cider"] == res["init_val_cider"]
    assert meta["init_from"]["path"] == str(xe) and len(meta["init_from"]["sha256"]) == 64
    resume, best = run_files(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["scst.json", "scst.safetensors", best.name, resume.name]
    assert load_tensors(resume)[0] == {}  # only a finished record is left


def test_train_scst_is_deterministic_and_resumes_exactly(base, tmp_path):
    feats, prep, xe = base
    kw = dict(FAST, seed=3, keep_resume=True)
    a, b, c = (tmp_path / n / "scst.safetensors" for n in "abc")
    ra = train_scst(xe, feats, prep, a, epochs=2, **kw)
    train_scst(xe, feats, prep, b, epochs=2, **kw)
    r1 = train_scst(xe, feats, prep, c, epochs=1, **kw)          # "killed" after epoch 1
    rc = train_scst(xe, feats, prep, c, epochs=2, **kw)
    assert rc["history"][0] == r1["history"][0]
    weights = [_final_weights(p) for p in (a, b, c)]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ra["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in rc["history"]]
    assert not torch.equal(weights[0]["logit.weight"], load_tensors(xe)[0]["logit.weight"])  # it did train
    # another seed samples other captions; a resume file made with other settings is ignored
    rd = train_scst(xe, feats, prep, c, epochs=2, **dict(kw, seed=4))
    assert len(rd["history"]) == 2 and rd["history"][0]["reward"] != ra["history"][0]["reward"]


def test_pruned_weights_stay_zero(base, tmp_path):
    feats, prep, xe = base
    tensors, meta = load_tensors(xe)
    decoder = load_decoder(xe)
    with torch.no_grad():                            # zero the smaller half of every matrix
        for p in decoder.parameters():
            if p.dim() >= 2:
                p[p.abs() <= p.abs().flatten().median()] = 0.0
    pruned = tmp_path / "pruned.safetensors"
    save_decoder(decoder, pruned, {k: v for k, v in meta.items() if k not in ("format", "config")}
                 | {"stage": "prune", "sparsity": 0.5})
    zeros = {n: p == 0 for n, p in decoder.state_dict().items()}

    out = tmp_path / "scst.safetensors"
    train_scst(pruned, feats, prep, out, epochs=2, keep_resume=True, **FAST)
    for w in (_final_weights(out), load_tensors(out)[0]):
        assert all((w[n][z] == 0).all() for n, z in zeros.items())
        assert all(not torch.equal(w[n][~zeros[n]], decoder.state_dict()[n][~zeros[n]])
                   for n in ("logit.weight", "embed.weight"))                   # the rest did train
    assert read_decoder_meta(out)["sparsity"] == pytest.approx(0.5, abs=0.01)  # measured, not copied

    free = tmp_path / "free.safetensors"
    train_scst(pruned, feats, prep, free, epochs=2, keep_resume=True, keep_zeros=False, **FAST)
    w = _final_weights(free)
    assert any((w[n][z] != 0).any() for n, z in zeros.items())   # the test above could fail


def test_user_errors(base, tmp_path):
    feats, prep, xe = base
    out = tmp_path / "x.safetensors"
    with pytest.raises(UserError, match="baseline 'best'"):
        train_scst(xe, feats, prep, out, baseline="best", **FAST)
    with pytest.raises(UserError, match="sample_n 1.*mean"):
        train_scst(xe, feats, prep, out, baseline="mean", **dict(FAST, sample_n=1))
    with pytest.raises(UserError, match="not found"):
        train_scst(tmp_path / "nope.safetensors", feats, prep, out, **FAST)
    other = tmp_path / "prep2"
    shutil.copytree(prep, other)
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["itow"]["2"] = "puppy"
    (other / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="vocabulary"):
        train_scst(xe, feats, other, out, **FAST)
