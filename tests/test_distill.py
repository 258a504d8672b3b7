"""Knowledge distillation: the word-level KD loss, sequence-level KD, the frozen teacher, and train_xe with a teacher."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from captioning.errors import UserError
from captioning.io import load_tensors
from captioning.models import create_decoder, load_decoder, read_decoder_meta
from captioning.training import CaptionData, train_xe
from captioning.models.search import beam_search
from captioning.training.amp import MixedPrecision
from captioning.training.distill import SEQUENCE_KD_BEAM, DistillStep, Teacher, kd_loss, token_mask, with_teacher_captions
from captioning.training.loop import trim_padding
from captioning.training.xe import sequence_loss
from captioning.training.checkpoint import file_sha256
from helpers import SPLITS, TINY, W, make_dataset

torch.set_num_threads(1)
BIG_C = 10  # the teacher's "big encoder" feature size; the student's is test_training.C = 6
KW = dict(batch_size=3, lr=1e-2, seed=4, progress=False)
SWAP = {"dog": "cat", "cat": "dog", "runs": "sits", "sits": "runs", "grass": "mat", "mat": "grass"}


def make_teacher_features(path, ids=None, seed=7):
    """Another encoder's features of the same images: other size, other values, same two kinds."""
    rng = np.random.default_rng(seed)
    n = len(SPLITS)
    centers = rng.normal(size=(2, 3, BIG_C))
    att = np.stack([centers[i % 2] + 0.3 * rng.normal(size=(3, BIG_C)) for i in range(n)]).astype(np.float16)
    with h5py.File(path, "w") as f:
        f["ids"] = np.array(ids if ids is not None else range(100, 100 + n), dtype=np.int64)
        f["fc"] = att.mean(1)
        f["att"] = att
    return path


def swapped_copy(prep, dst):
    """The same images and vocabulary with dog/cat, runs/sits, grass/mat swapped in every caption."""
    shutil.copytree(prep, dst)
    perm = np.arange(len(W) + 1)
    for a, b in SWAP.items():
        perm[W[a]] = W[b]
    with h5py.File(dst / "labels.h5", "r+") as f:
        f["labels"][...] = perm[f["labels"][()]]
    for split in ("val", "test"):
        refs = json.loads((dst / f"refs_{split}.json").read_text())
        for a in refs["annotations"]:
            a["caption"] = " ".join(SWAP.get(w, w) for w in a["caption"].lower().rstrip(".").split())
        (dst / f"refs_{split}.json").write_text(json.dumps(refs))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Student features + prepared captions, the teacher's features, and a teacher trained on them.

    The teacher learnt *swapped* captions ("a cat runs" for a dog), so that its pull on the student
    is visible against the references' pull.
    """
    root = tmp_path_factory.mktemp("kd")
    feats, prep = make_dataset(root)
    t_feats = make_teacher_features(root / "big.h5")
    teacher = root / "teacher.safetensors"
    res = train_xe(t_feats, swapped_copy(prep, root / "swapped"), teacher, "updown", dict(TINY, rnn_size=32),
                   epochs=8, **dict(KW, batch_size=2))
    assert res["best_val_cider"] > 1.0  # it did learn its captions
    return feats, prep, t_feats, teacher


# ---- the loss ---------------------------------------------------------------------------------

def test_kd_loss_zero_for_same_distribution_positive_otherwise_and_masked():
    g = torch.Generator().manual_seed(0)
    seq = torch.tensor([[3, 1, 0, 0], [2, 2, 2, 1]])
    a = torch.randn(2, 5, 6, generator=g).log_softmax(-1)
    b = torch.randn(2, 5, 6, generator=g).log_softmax(-1)
    for t in (1.0, 2.0):
        assert kd_loss(a, a.clone(), seq, t).item() == pytest.approx(0.0, abs=1e-6)
        assert kd_loss(a, b, seq, t).item() > 0.01
    # only positions the XE loss counts: row 0 stops after its end token at position 2
    assert token_mask(seq).tolist() == [[True, True, True, False, False], [True] * 5]
    b2 = b.clone()
    b2[0, 3:] = a[0, 3:]
    assert kd_loss(a, b2, seq).item() == pytest.approx(kd_loss(a, b, seq).item())
    b2[0, 2] = a[0, 2]
    assert kd_loss(a, b2, seq).item() < kd_loss(a, b, seq).item()
    # the formula by hand: T^2 * mean over counted positions of sum_k p_k (log p_k - log q_k), softened by T
    t = 3.0
    p, q = (b / t).log_softmax(-1), (a / t).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    m = token_mask(seq).float()
    assert kd_loss(a, b, seq, t).item() == pytest.approx((t * t * (kl * m).sum() / m.sum()).item(), rel=1e-5)
    # a teacher giving some classes probability 0 is fine (no NaN)
    b3 = b.clone()
    b3[..., 0] = float("-inf")
    assert torch.isfinite(kd_loss(a, b3.log_softmax(-1), seq))


def test_gradient_flows_only_into_the_student(world):
    feats, prep, t_feats, teacher_path = world
    data = CaptionData(feats, prep, seq_per_img=2)
    teacher = Teacher(teacher_path, t_feats, data, feats)
    torch.manual_seed(0)
    student = create_decoder("updown", data.vocab_size, data.feat_dim, **TINY)
    b = next(data.batches("train", 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    target = teacher.logprobs(b.ids, b.labels)
    assert not target.requires_grad and not teacher.decoder.training
    assert torch.equal(target, teacher.logprobs(b.ids, b.labels))  # eval mode: no dropout
    kd_loss(student(b.fc, b.att, b.labels), target, b.labels, 2.0).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert sum(p.grad.abs().sum().item() for p in student.parameters()) > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.decoder.parameters())


# ---- training with a teacher ------------------------------------------------------------------------

def test_kd_weight_zero_is_exactly_plain_xe(world, tmp_path):
    feats, prep, t_feats, teacher = world
    plain = train_xe(feats, prep, tmp_path / "plain.safetensors", "updown", TINY, epochs=2, **KW)
    kd = train_xe(feats, prep, tmp_path / "kd.safetensors", "updown", TINY, epochs=2, **KW,
                  teacher=teacher, teacher_features=t_feats, kd_weight=0.0, kd_temperature=2.0)
    wa, wb = load_tensors(tmp_path / "plain.safetensors")[0], load_tensors(tmp_path / "kd.safetensors")[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in plain["history"]] == [h["loss"] for h in kd["history"]]
    assert all(h["kd_loss"] > 0 for h in kd["history"]) and "kd_loss" not in plain["history"][0]
    meta = read_decoder_meta(tmp_path / "kd.safetensors")
    assert meta["teacher"] == {"path": str(teacher), "sha256": file_sha256(teacher)}
    assert meta["kd_weight"] == 0.0 and meta["kd_temperature"] == 2.0
    assert "teacher" not in read_decoder_meta(tmp_path / "plain.safetensors")


def _val_kl(student_path, teacher_path, feats, prep, t_feats):
    """KL(teacher || student) on the val images' reference captions, with the student's last-epoch weights."""
    data = CaptionData(feats, prep, seq_per_img=5)
    teacher = Teacher(teacher_path, t_feats, data, feats)
    student = load_decoder(student_path)  # the best epoch's config ...
    tensors = load_tensors(str(student_path) + ".resume.safetensors")[0]  # ... and the last epoch's weights
    student.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    b = next(data.batches("val", 10, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        return kd_loss(student(b.fc, b.att, b.labels), teacher.logprobs(b.ids, b.labels), b.labels).item()


def test_teacher_pulls_the_student_towards_its_distribution(world, tmp_path):
    feats, prep, t_feats, teacher = world
    kw = dict(KW, batch_size=2, keep_resume=True)
    cfg = dict(TINY, rnn_size=32)
    plain, distilled = tmp_path / "plain.safetensors", tmp_path / "kd.safetensors"
    train_xe(feats, prep, plain, "updown", cfg, epochs=6, **kw)
    kd = train_xe(feats, prep, distilled, "updown", cfg, epochs=6, **kw,
                  teacher=teacher, teacher_features=t_feats, kd_weight=0.9, kd_temperature=2.0)
    kls = [h["kd_loss"] for h in kd["history"]]
    assert kls[-1] < 0.5 * kls[0] and all(x > y for x, y in zip(kls, kls[1:]))
    # the distilled student ends far closer to the teacher than the same student trained without it
    assert _val_kl(distilled, teacher, feats, prep, t_feats) < 0.5 * _val_kl(plain, teacher, feats, prep, t_feats)


def test_teacher_user_errors(world, tmp_path):
    feats, prep, t_feats, teacher = world
    out = tmp_path / "x.safetensors"
    bad_ids = make_teacher_features(tmp_path / "other_ids.h5", ids=range(200, 210))
    with pytest.raises(UserError, match=r"other_ids\.h5.*image ids differ from .*features\.h5"):
        train_xe(feats, prep, out, "updown", TINY, epochs=1, teacher=teacher, teacher_features=bad_ids, **KW)
    with pytest.raises(UserError, match="both a teacher"):
        train_xe(feats, prep, out, "updown", TINY, epochs=1, teacher=teacher, **KW)
    with pytest.raises(UserError, match="kd_weight"):
        train_xe(feats, prep, out, "updown", TINY, epochs=1, teacher=teacher, teacher_features=t_feats,
                 kd_weight=1.5, **KW)
    # the teacher must be the one of those features: here the student's 6-d features with the 10-d teacher
    with pytest.raises(UserError, match=r"teacher\.safetensors: teacher expects 10-d"):
        train_xe(feats, prep, out, "updown", TINY, epochs=1, teacher=teacher, teacher_features=feats, **KW)
    with pytest.raises(UserError, match="not found"):
        train_xe(feats, prep, out, "updown", TINY, epochs=1, teacher=tmp_path / "none.safetensors",
                 teacher_features=t_feats, **KW)
    assert not out.exists()


def test_distillation_is_deterministic_and_resumes_exactly(world, tmp_path):
    feats, prep, t_feats, teacher = world
    kw = dict(KW, keep_resume=True, teacher=teacher, teacher_features=t_feats, kd_weight=0.5, kd_temperature=2.0)
    a, b = tmp_path / "a" / "kd.safetensors", tmp_path / "b" / "kd.safetensors"
    ra = train_xe(feats, prep, a, "updown", TINY, epochs=2, **kw)
    r1 = train_xe(feats, prep, b, "updown", TINY, epochs=1, **kw)  # "killed" after epoch 1
    rb = train_xe(feats, prep, b, "updown", TINY, epochs=2, **kw)
    assert rb["history"][0] == r1["history"][0] and ra["history"] == [
        dict(h, seconds=g["seconds"]) for h, g in zip(rb["history"], ra["history"])]
    wa, wb = (load_tensors(str(p) + ".resume.safetensors")[0] for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra["settings"]["kd"]["teacher_sha256"] == file_sha256(teacher)
    # another kd_weight is another run: its resume file is not trusted
    rc = train_xe(feats, prep, b, "updown", TINY, epochs=3, **dict(kw, kd_weight=0.2))
    assert len(rc["history"]) == 3 and rc["history"][0]["loss"] != ra["history"][0]["loss"]


# ---- sequence-level distillation --------------------------------------------------------------------

def test_teacher_captions_are_its_beam_search_and_kept(world):
    feats, prep, t_feats, teacher_path = world
    data = CaptionData(feats, prep)
    teacher = Teacher(teacher_path, t_feats, data, feats)
    ids = [int(i) for i in data.ids[:4]]
    caps = teacher.captions(ids, 6)
    fc, att = teacher.features.read(np.arange(4))
    assert torch.equal(caps, beam_search(teacher.decoder, fc, att, SEQUENCE_KD_BEAM, 6))
    # the teacher learnt swapped captions: its dog images get "cat" (and the reverse)
    words = [set(c.split()) for c in data.decode(caps)]
    assert any(w & set(SWAP) for w in words)
    # kept: asked again (in another order, with repeats) it gives the same rows without decoding
    teacher.decoder = None
    assert torch.equal(teacher.captions(ids[::-1] + ids[:1], 6), torch.cat([caps.flip(0), caps[:1]]))


def test_with_teacher_captions_lays_each_images_rows_out_together():
    labels = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 4, 4], [5, 0, 0]])  # 2 images x 2 references
    teach = torch.tensor([[7, 7, 7, 7], [8, 0, 0, 0]])
    assert with_teacher_captions(labels, teach).tolist() == [
        [1, 2, 0, 0], [3, 0, 0, 0], [7, 7, 7, 7], [4, 4, 4, 0], [5, 0, 0, 0], [8, 0, 0, 0]]


def test_sequence_step_is_the_weighted_cross_entropy_to_references_and_teacher_captions(world):
    feats, prep, t_feats, teacher_path = world
    data = CaptionData(feats, prep, seq_per_img=2)
    teacher = Teacher(teacher_path, t_feats, data, feats)
    torch.manual_seed(0)
    student = create_decoder("updown", data.vocab_size, data.feat_dim, **TINY).eval()
    b = next(data.batches("train", 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    b.labels = trim_padding(b.labels)
    step = DistillStep(MixedPrecision(False, "cpu", "kd"), teacher, 0.3, 2.0, sequence_loss, "sequence", 6)
    loss, numbers = step(student, b)
    teach = trim_padding(teacher.captions(b.ids, 6))
    xe_refs = sequence_loss(student(b.fc, b.att, b.labels), b.labels)
    xe_teach = sequence_loss(student(b.fc, b.att, teach), teach)
    assert numbers["kd_loss"] == pytest.approx(xe_teach.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * xe_refs.item() + 0.3 * xe_teach.item(), rel=1e-5)
    with pytest.raises(UserError, match="unknown distillation mode 'phrase'"):
        DistillStep(None, teacher, 0.3, 2.0, sequence_loss, "phrase")


def test_sequence_distillation_teaches_the_teachers_captions(world, tmp_path):
    """With most of the weight on the swapped teacher's captions, the student says what the teacher says."""
    feats, prep, t_feats, teacher = world
    kw = dict(KW, batch_size=2, keep_resume=True)
    out = tmp_path / "seq.safetensors"
    res = train_xe(feats, prep, out, "updown", dict(TINY, rnn_size=32), epochs=10, **kw,
                   teacher=teacher, teacher_features=t_feats, kd_weight=0.9, kd_mode="sequence")
    assert res["settings"]["kd"]["kd_mode"] == "sequence"
    assert read_decoder_meta(out)["kd_mode"] == "sequence"
    xe_teacher = [h["kd_loss"] for h in res["history"]]
    assert xe_teacher[-1] < 0.5 * xe_teacher[0]
    data = CaptionData(feats, prep)
    rows = data.index("val")
    fc, att = data.features.read(rows)
    student = load_decoder(out).eval()  # the best epoch's config, the last epoch's weights (the val
    tensors = load_tensors(str(out) + ".resume.safetensors")[0]  # CIDEr-D of swapped captions stays 0)
    student.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    mine = beam_search(student, fc, att, 3, 6)
    theirs = Teacher(teacher, t_feats, data, feats).captions([int(i) for i in data.ids[rows]], 6)
    assert (mine == theirs).all(1).float().mean() >= 0.8
    with pytest.raises(UserError, match="unknown distillation mode"):
        train_xe(feats, prep, tmp_path / "x.safetensors", "updown", TINY, epochs=1, **KW, teacher=teacher,
                 teacher_features=t_feats, kd_mode="phrase")
