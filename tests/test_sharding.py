"""Sharded feature extraction: n shard files merged equal one extraction; merging refuses shards
that do not belong together; the CLI verbs; the DAG plans one job per shard and a merge."""
import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from captioning.cli import main
from captioning.encoders import create_encoder, save_encoder
from captioning.encoders import features as feats
from captioning.encoders.features import extract_features, merge_features, shard_rows
from captioning.errors import UserError
from helpers import TINY_DAG, job_counts_in, smk, write_config

N = 7
# batch size 1 everywhere: each image is encoded alone whatever shard it is in, so sharded and
# single features are bit-equal (batches of other sizes may round differently)
B = 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """7 images in a prepared dir, a tiny saved encoder, and the single (unsharded) extraction."""
    root = tmp_path_factory.mktemp("shards")
    items = []
    for n in range(N):
        im = Image.new("RGB", (32, 32), (128, 128, 128))
        im.paste(Image.new("RGB", (16, 16), (30 * n, 200 - 20 * n, 90)), (4 + n % 5, 4 + n % 3))
        (root / "img").mkdir(exist_ok=True)
        im.save(root / f"img/{n}.png")
        items.append({"id": 500 + n, "file_path": f"img/{n}.png", "split": "train"})
    (root / "images.json").write_text(json.dumps(items))
    (root / "info.json").write_text(json.dumps({"image_root": str(root)}))
    enc = create_encoder("mobilenetv3_small_050", img_size=32)
    save_encoder(enc, root / "enc.safetensors")
    single = root / "single.h5"
    extract_features(enc, root / "images.json", root, single, batch_size=B, device="cpu")
    return root, enc, single


def assert_same_file(a, b):
    """Every dataset with its dtype, shape, layout and values, and every attr (types included)."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert sorted(fa) == sorted(fb) == ["att", "fc", "ids"]
        for k in fa:
            da, db = fa[k], fb[k]
            assert (da.dtype, da.shape, da.chunks, da.compression, da.maxshape, da.fillvalue) == \
                   (db.dtype, db.shape, db.chunks, db.compression, db.maxshape, db.fillvalue), k
            assert np.array_equal(da[()], db[()]), k
        assert sorted(fa.attrs) == sorted(fb.attrs)
        for k in fa.attrs:
            assert type(fa.attrs[k]) is type(fb.attrs[k]) and fa.attrs[k] == fb.attrs[k], k


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory):
    """The same extraction in 3 shard files: rows [0, 2), [2, 4), [4, 7)."""
    root, enc, _ = data
    out = tmp_path_factory.mktemp("three")
    paths = [out / f"s{i}.h5" for i in range(3)]
    for i, p in enumerate(paths):
        extract_features(enc, root / "images.json", root, p, batch_size=B, device="cpu", shard=(i, 3))
    return paths


def test_shard_rows_are_contiguous_and_cover_everything():
    for total in (1, 7, 10, 123287):
        for n in range(1, min(total, 9) + 1):
            cuts = [shard_rows(total, (i, n)) for i in range(n)]
            assert cuts[0][0] == 0 and cuts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:])) and all(hi > lo for lo, hi in cuts)
    for bad in ((3, 3), (-1, 3), (0, 0), (True, 2)):
        with pytest.raises(UserError, match="needs 0 <= index < count"):
            shard_rows(7, bad)
    with pytest.raises(UserError, match="8 shards of 7 images"):
        shard_rows(7, (0, 8))


def test_merged_shards_equal_the_single_extraction(data, shards, tmp_path, monkeypatch):
    _, _, single = data
    with h5py.File(shards[2]) as f:  # rows [4, 7): the last shard takes the remainder
        assert f["ids"][:].tolist() == [504, 505, 506] and f["att"].chunks == (1, *f["att"].shape[1:])
        assert (f.attrs["shard_index"], f.attrs["shard_count"], f.attrs["shard_first_row"],
                f.attrs["shard_total_rows"]) == (2, 3, 4, N)
        assert f.attrs["timm_name"] == "mobilenetv3_small_050"
    merge_features(shards[::-1], tmp_path / "merged.h5")  # the order given does not matter
    assert_same_file(tmp_path / "merged.h5", single)
    assert [p.name for p in tmp_path.iterdir()] == ["merged.h5"]  # no temporary left behind
    monkeypatch.setattr(feats, "MERGE_BLOCK_BYTES", 1)  # one row per copy: blocks join up exactly
    merge_features(shards, tmp_path / "rows.h5")
    assert_same_file(tmp_path / "rows.h5", single)


def refusal(paths, out, *expected):
    """merge_features fails with a one-line UserError holding ``expected``, and writes nothing."""
    with pytest.raises(UserError) as e:
        merge_features(paths, out)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for x in expected:
        assert str(x) in msg, msg
    assert not out.exists()
    return msg


def test_merge_refuses_shards_that_do_not_belong_together(data, shards, tmp_path):
    root, enc, single = data
    out = tmp_path / "out.h5"
    refusal(shards[:1] + shards[2:], out, shards[0], "shard 1 is missing")
    refusal([shards[0], shards[1], shards[1], shards[2]], out, shards[1], "shard 1 given twice")
    # another encoder architecture, and the same one with other weights
    def shard1(name, encoder=enc, images_json=root / "images.json"):
        extract_features(encoder, images_json, root, tmp_path / name, batch_size=B, device="cpu", shard=(1, 3))
        return [shards[0], tmp_path / name, shards[2]]

    other = shard1("arch.h5", create_encoder("mobilenetv3_small_100", img_size=32))
    refusal(other, out, other[1], f"not from the same extraction as {shards[0]}", "attr timm_name differs")
    reseeded = shard1("weights.h5", create_encoder("mobilenetv3_small_050", img_size=32, seed=1))
    refusal(reseeded, out, reseeded[1], "attr shard_source differs: other encoder weights")
    # an extraction of 6 images: its shard 1 is another total (and other rows)
    (tmp_path / "six.json").write_text(json.dumps(json.loads((root / "images.json").read_text())[:6]))
    six = shard1("six.h5", images_json=tmp_path / "six.json")
    refusal(six, out, six[1], "attr shard_total_rows differs: 6 vs 7")
    # files that are no shards at all
    refusal([single, *shards[1:]], out, single, "not a features shard")
    (tmp_path / "junk.h5").write_text("not hdf5")
    refusal([*shards, tmp_path / "junk.h5"], out, tmp_path / "junk.h5", "not a readable HDF5 file")
    refusal([*shards[:2], tmp_path / "gone.h5"], out, tmp_path / "gone.h5", "not found")


def test_cli_extracts_shards_and_merges_them(data, tmp_path, capsys):
    root, _, single = data
    base = ["extract", "--encoder", str(root / "enc.safetensors"), "--prepared", str(root), "--batch-size", str(B),
            "--device", "cpu"]
    s0, s1, merged = tmp_path / "s0.h5", tmp_path / "s1.h5", tmp_path / "merged.h5"
    r = subprocess.run([sys.executable, "-m", "captioning", *base, "--out", str(s0), "--shard", "0", "--shards", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert main([*base, "--out", str(s1), "--shard", "1", "--shards", "2"]) == 0
    r = subprocess.run([sys.executable, "-m", "captioning", "merge-features", "--out", str(merged), str(s0), str(s1)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r'captioning timing: \{"verb": "merge-features"', r.stderr), r.stderr
    assert_same_file(merged, single)
    # bad calls: exit 2 (main's return is the process's exit status), one line naming the problem
    for argv, expected in [
        (["merge-features", "--out", str(tmp_path / "x.h5"), str(s0)],
         f"captioning merge-features: error: {s0}: its extraction has 2 shards, shard 1 is missing"),
        ([*base, "--out", str(tmp_path / "y.h5"), "--shard", "1"], "--shard and --shards go together"),
        ([*base, "--out", str(tmp_path / "y.h5"), "--shard", "2", "--shards", "2"],
         "shard 2 of 2: needs 0 <= index < count"),
    ]:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_dag_plans_one_job_per_shard_and_a_merge(tmp_path):
    encoders = sorted(TINY_DAG["encoders"])
    write_config(tmp_path, {**TINY_DAG, "extract": {"shards": 3}})
    out = smk(tmp_path, "-n", "-p", "--forceall", "results/table.csv").stdout
    counts = job_counts_in(out)
    assert counts["features_shard"] == 3 * len(encoders) and counts["features"] == len(encoders)
    for enc in encoders:  # each merge reads its encoder's three shards, in order
        shard_files = " ".join(f"work/tiny/features/{enc}.shard{i}.h5" for i in range(3))
        assert f"merge-features --out work/tiny/features/{enc}.h5 {shard_files} " in out
    write_config(tmp_path, TINY_DAG)  # one shard: one extraction job per encoder, as always
    counts = job_counts_in(smk(tmp_path, "-n", "--forceall", "results/table.csv").stdout)
    assert "features_shard" not in counts and counts["features"] == len(encoders)
