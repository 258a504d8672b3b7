"""Streaming features from HDF5: the same batches and weights as in memory, with bounded memory."""
import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from captioning.errors import UserError
from captioning.io import load_tensors
from captioning.models import create_decoder, save_decoder
from captioning.training import CaptionData, train_scst, train_xe
from captioning.training.distill import Teacher
from captioning.training.features import H5Features, MemoryFeatures, choose_mode, open_features

from helpers import ROOT, TINY, load_script, make_dataset

bench = load_script("streaming")
KW = dict(batch_size=3, lr=1e-2, seed=4, progress=False, device="cpu")


def assert_same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert x.ids == y.ids
        for k in ("fc", "att", "labels"):
            assert getattr(x, k).dtype == getattr(y, k).dtype and torch.equal(getattr(x, k), getattr(y, k)), k


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """120 images, 9 grid cells of 8 channels, every row different: enough rows that a wrong order shows."""
    return bench.make_dataset(tmp_path_factory.mktemp("mid"), 120, hw=9, c=8, n_val=20)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_ones(mid, workers):
    feats, prep = mid
    mem = CaptionData(feats, prep, 5, "memory")
    stream = CaptionData(feats, prep, 5, "stream", workers=workers)
    assert isinstance(stream.features, H5Features) and isinstance(mem.features, MemoryFeatures)
    for shuffle in (True, False):
        ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert_same_batches(mem.batches("train", 7, shuffle=shuffle, generator=ga),
                            stream.batches("train", 7, shuffle=shuffle, generator=gb))
        assert torch.equal(ga.get_state(), gb.get_state())  # the same draws, in the same number
    assert_same_batches(mem.batches("val", 6, with_labels=False), stream.batches("val", 6, with_labels=False))
    # rows asked out of order, or twice, come back as asked
    rows = np.array([5, 3, 99, 3, 0])
    for x, y in zip(mem.features.read(rows), stream.features.read(rows)):
        assert torch.equal(x, y)
    # a pass stopped early (its readers shut down) leaves the next one whole
    next(stream.batches("train", 7, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert len(list(stream.batches("val", 6, with_labels=False))) == 4


def test_global_rng_untouched_by_reading(mid):
    """Dropout draws from torch's global RNG: reading must not draw from it, or modes would differ."""
    feats, prep = mid
    for features, workers in (("memory", 0), ("stream", 0), ("stream", 2)):
        data = CaptionData(feats, prep, 5, features, workers=workers)
        for split, kw in (("train", dict(shuffle=True, generator=torch.Generator().manual_seed(1))),
                          ("val", dict(with_labels=False))):
            torch.manual_seed(0)
            want = torch.rand(3)
            torch.manual_seed(0)
            list(data.batches(split, 10, **kw))
            assert torch.equal(torch.rand(3), want), (features, workers, split)


def test_fingerprint_is_the_whole_file_hash(mid):
    """The hash resume files were made with (fc as one array); streaming hashes fc block by block."""
    import hashlib

    feats, prep = mid
    with h5py.File(feats) as f, h5py.File(prep / "labels.h5") as lab:
        h = hashlib.sha1()
        for a in (f["ids"][()], f["fc"][()], lab["labels"][()].astype(np.int64), lab["label_start_ix"][()],
                  lab["label_end_ix"][()]):
            h.update(np.ascontiguousarray(a).tobytes())
    want = h.hexdigest()[:16]
    assert CaptionData(feats, prep, 5, "memory").fingerprint() == want
    stream = CaptionData(feats, prep, 5, "stream")
    assert stream.fingerprint() == want
    blocks = list(stream.features.fc_blocks(rows_per_block=7))
    assert len(blocks) == 18 and np.array_equal(np.concatenate(blocks), stream.features.read(np.arange(120))[0].half().numpy())


def test_auto_streams_files_above_the_limit(mid, capsys):
    feats, prep = mid
    mb = feats.stat().st_size / 2 ** 20
    assert choose_mode(feats, "auto", mb * 2)[0] == "memory" and choose_mode(feats, "auto", mb / 2)[0] == "stream"
    assert choose_mode(feats, "memory", 0)[0] == "memory" and choose_mode(feats, "stream", 1e9)[0] == "stream"
    capsys.readouterr()
    assert CaptionData(feats, prep, 5, "auto", mb / 2, workers=2).features.streaming
    assert capsys.readouterr().err.strip().splitlines() == [
        f"features: {feats} streamed from disk, 2 reader processes ({mb:.0f} MiB > memory_limit_mb {mb / 2:g})"]
    assert not CaptionData(feats, prep, 5, "auto", mb * 2).features.streaming
    assert "in memory" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown features mode 'disk'"):
        CaptionData(feats, prep, 5, "disk")


def test_stream_user_errors(tmp_path, mid):
    feats, prep = mid
    with pytest.raises(UserError, match="nope.h5: file not found"):
        CaptionData(tmp_path / "nope.h5", prep, 5, "stream")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5"):
        open_features(tmp_path / "text.h5", "stream")
    with h5py.File(tmp_path / "no_att.h5", "w") as f:
        f["ids"], f["fc"] = np.arange(3), np.zeros((3, 2), np.float16)
    with pytest.raises(UserError, match="missing dataset.*att"):
        open_features(tmp_path / "no_att.h5", "stream")
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f["ids"], f["fc"], f["att"] = np.arange(3), np.zeros((3, 2), np.float16), np.zeros((2, 4, 2), np.float16)
    with pytest.raises(UserError, match="disagree on the image count"):
        open_features(tmp_path / "short.h5", "stream")
    # the file turns bad under a running reader: one line, from the worker process
    gone = tmp_path / "gone"
    f2, p2 = bench.make_dataset(gone, 40, hw=2, c=4, n_val=5)
    data = CaptionData(f2, p2, 5, "stream", workers=2)
    f2.write_bytes(b"garbage")
    with pytest.raises(UserError) as e:
        list(data.batches("train", 5))
    assert "gone/features.h5: not a readable HDF5 file" in str(e.value) and "\n" not in str(e.value)


# ---- training ------------------------------------------------------------------------------------

def test_train_xe_and_scst_give_the_same_weights_in_both_modes(tmp_path):
    feats, prep = make_dataset(tmp_path)
    runs = {}
    for name, how in (("memory", dict(features="memory")), ("stream", dict(features="stream", workers=2)),
                      ("stream0", dict(features="stream", workers=0))):
        out = tmp_path / name / "xe.safetensors"
        runs[name] = (out, train_xe(feats, prep, out, "updown", TINY, epochs=2, **KW, **how))
        scst = train_scst(out, feats, prep, tmp_path / name / "scst.safetensors", epochs=1, sample_n=2,
                          **KW, **how)
        runs[name + "-scst"] = (tmp_path / name / "scst.safetensors", scst)
    ref_w = {k: load_tensors(out)[0] for k, (out, _) in runs.items()}
    for name in ("stream", "stream0"):
        for suffix in ("", "-scst"):
            a, b = ref_w["memory" + suffix], ref_w[name + suffix]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name + suffix
            ra, rb = runs["memory" + suffix][1], runs[name + suffix][1]
            # (the SCST runs start from files equal but for the order of their JSON metadata)
            assert ({**ra["settings"], "init_from": None} == {**rb["settings"], "init_from": None}
                    and ra["best_val_cider"] == rb["best_val_cider"])
            assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]


def test_a_run_resumes_in_the_other_mode(tmp_path, capsys):
    """The reading mode is no setting: a run killed while streaming resumes in memory, same result."""
    feats, prep = make_dataset(tmp_path)
    kw = dict(KW, keep_resume=True)
    a, b = tmp_path / "a" / "xe.safetensors", tmp_path / "b" / "xe.safetensors"
    train_xe(feats, prep, a, "updown", TINY, epochs=2, features="memory", **kw)
    train_xe(feats, prep, b, "updown", TINY, epochs=1, features="stream", workers=2, **kw)
    capsys.readouterr()
    train_xe(feats, prep, b, "updown", TINY, epochs=2, features="memory", **kw)
    assert "resuming" in capsys.readouterr().err
    wa, wb = load_tensors(a)[0], load_tensors(b)[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_teacher_streams_with_the_student(tmp_path):
    feats, prep = make_dataset(tmp_path)
    t_feats = tmp_path / "teacher_feats.h5"
    rng = np.random.default_rng(1)
    with h5py.File(feats) as f, h5py.File(t_feats, "w") as g:
        g["ids"] = f["ids"][()]
        g["att"] = rng.normal(size=(10, 3, 5)).astype(np.float16)
        g["fc"] = g["att"][()].mean(1)
    data = {m: CaptionData(feats, prep, 2, m) for m in ("memory", "stream")}
    torch.manual_seed(0)
    t_path = tmp_path / "teacher.safetensors"
    save_decoder(create_decoder("updown", data["memory"].vocab_size, 5, **TINY), t_path)
    teachers = {m: Teacher(t_path, t_feats, data[m], feats) for m in data}
    assert teachers["stream"].features.streaming and not teachers["memory"].features.streaming
    assert teachers["stream"].fingerprint() == teachers["memory"].fingerprint()
    b = next(data["memory"].batches("train", 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(teachers["memory"].logprobs(b.ids, b.labels), teachers["stream"].logprobs(b.ids, b.labels))
    # distillation gives the same student either way
    outs = []
    for m, how in (("memory", dict(features="memory")), ("stream", dict(features="stream", workers=2))):
        out = tmp_path / m / "kd.safetensors"
        train_xe(feats, prep, out, "updown", TINY, epochs=1, **KW, **how, teacher=t_path, teacher_features=t_feats,
                 kd_weight=0.5, kd_temperature=2.0)
        outs.append(load_tensors(out)[0])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


# ---- memory --------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from captioning.training import CaptionData

    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    def peak_mb(children=False):
        # this program's own peak: VmHWM (ru_maxrss would start at the peak of the process that
        # launched it, as exec keeps that); the forked readers' start with their own lives
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if children else status_mb("VmHWM")

    def epoch(mode, workers):
        data = CaptionData(sys.argv[1], sys.argv[2], 1, mode, workers=workers)
        return sum(len(b.ids) for b in data.batches("train", 50, shuffle=True, with_labels=False,
                                                     generator=torch.Generator().manual_seed(0)))

    out = {"base": status_mb("VmRSS")}  # after the imports: what any run holds
    # the peak only rises: the streamed epochs come first (readers first: they start as copies of this
    # process), the in-memory one last
    for name, mode, workers in (("stream2", "stream", 2), ("stream", "stream", 0), ("memory", "memory", 0)):
        out[name + "_images"] = epoch(mode, workers)
        out[name] = peak_mb()
        out[name + "_readers"] = peak_mb(children=True)
    print(json.dumps(out))
""")


def test_streaming_memory_stays_bounded(tmp_path):
    """An epoch over 600 MB of features: streaming stays within 250 MB of the process's start (its
    fixed costs: the HDF5 library and caches, a few batches, allocator slack, the captions), in its
    reader processes too; an in-memory epoch, measured the same way, does not (so the check can fail)."""
    n, hw, c = 12_000, 49, 512                    # 50 KB of att per image
    feats, prep = bench.make_dataset(tmp_path, n, hw=hw, c=c, n_val=100)
    size_mb = feats.stat().st_size / 2 ** 20
    bound = 250
    assert size_mb > 2 * bound
    r = subprocess.run([sys.executable, "-c", CHILD, str(feats), str(prep)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stream_images"] == out["stream2_images"] == out["memory_images"] == n - 100
    base = out["base"]
    assert out["stream"] - base < bound and out["stream2"] - base < bound, out
    assert out["stream2_readers"] - base < bound, out
    assert out["memory"] - base > 0.95 * size_mb, out
