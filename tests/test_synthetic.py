"""The synthetic dataset: deterministic, well-formed, and its captions tell the truth about the images."""
import hashlib
import re
from pathlib import Path

import pytest
from PIL import Image

from captioning.data.karpathy import image_path, load_karpathy
from captioning.data.synthetic import LABEL_NAMES, generate
from captioning.errors import UserError

N = dict(n_train=20, n_val=5, n_test=5, img_size=64)


def _digest(root: Path) -> dict:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    path = generate(root / "a", seed=0, **N)
    return path


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    again = generate(tmp_path / "b", seed=0, **N)
    other = generate(tmp_path / "c", seed=1, **N)
    a, b, c = _digest(synth.parent), _digest(again.parent), _digest(other.parent)
    assert len(a) == 30 + 2 and a == b
    assert a["dataset_synth.json"] != c["dataset_synth.json"]
    assert sum(a[k] != c[k] for k in a) >= 30  # every image differs too


def test_val_test_do_not_depend_on_n_train(synth, tmp_path):
    other = load_karpathy(generate(tmp_path / "d", seed=0, n_train=3, n_val=5, n_test=5, img_size=64))
    mine = load_karpathy(synth)
    strip = lambda im: [s["raw"] for s in im["sentences"]]  # noqa: E731
    mine_test = [strip(im) for im in mine["images"] if im["split"] != "train"]
    other_test = [strip(im) for im in other["images"] if im["split"] != "train"]
    assert mine_test == other_test


def test_format_splits_and_images(synth):
    data = load_karpathy(synth)
    assert data["dataset"] == "synth"
    imgs = data["images"]
    assert [im["split"] for im in imgs] == ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    assert len({im["cocoid"] for im in imgs}) == 30
    root = synth.parent / "images"
    for im in imgs:
        assert im["filepath"] == im["split"]
        with Image.open(image_path(im, root)) as pic:
            assert pic.size == (64, 64) and pic.mode == "RGB"
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]


def test_five_distinct_clean_captions(synth):
    sentids = []
    for im in load_karpathy(synth)["images"]:
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for s in im["sentences"]:
            assert s["tokens"] == s["raw"].lower().rstrip(".").split()
            assert all(t.isalpha() and t.islower() for t in s["tokens"])
            assert 3 <= len(s["tokens"]) <= 16
            assert s["imgid"] == im["imgid"]
            sentids.append(s["sentid"])
    assert len(set(sentids)) == len(sentids) == 150


def test_objects_json_matches_images(synth):
    from captioning.io import read_json

    objs = read_json(synth.parent / "objects.json")
    data = load_karpathy(synth)
    assert objs["label_names"] == LABEL_NAMES and len(LABEL_NAMES) == 80
    assert [o["cocoid"] for o in objs["images"]] == [im["cocoid"] for im in data["images"]]
    for entry, im in zip(objs["images"], data["images"]):
        assert 1 <= len(entry["objects"]) <= 4
        want = set()
        for o in entry["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            want |= {LABEL_NAMES.index(o["shape"]), LABEL_NAMES.index(o["color"]),
                     LABEL_NAMES.index(f"{o['color']} {o['shape']}")}
        assert entry["labels"] == sorted(want)
        # every colour and shape named in a caption is really there
        colours = {o["color"] for o in entry["objects"]}
        for s in im["sentences"]:
            named = {t for t in s["tokens"] if t in LABEL_NAMES[8:16]}
            assert named <= colours


REL = re.compile(r"^(?:there is )?(?:a|an) (?:(?:small|little|large|big) )?(\w+) (\w+) (?:is )?"
                 r"(to the left of|to the right of|above|below|next to) "
                 r"(?:a|an) (?:(?:small|little|large|big) )?(\w+) (\w+)$")


def _holds(rel, a, b, img_size):
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    if rel == "to the left of":
        return ax1 <= bx0
    if rel == "to the right of":
        return ax0 >= bx1
    if rel == "above":
        return ay1 <= by0
    if rel == "below":
        return ay0 >= by1
    gap = max(bx0 - ax1, ax0 - bx1)  # next to: side by side, overlapping rows, close
    return 0 <= gap <= 0.25 * img_size and ay0 < by1 and by0 < ay1


def test_relations_are_true(tmp_path):
    path = generate(tmp_path / "r", n_train=40, n_val=0, n_test=0, img_size=96, seed=3)
    from captioning.io import read_json

    objs = read_json(path.parent / "objects.json")["images"]
    checked = 0
    for im, entry in zip(load_karpathy(path)["images"], objs):
        for s in im["sentences"]:
            m = REL.match(" ".join(s["tokens"]))
            if not m:
                continue
            ca, sa, rel, cb, sb = m.groups()
            A = [o["bbox"] for o in entry["objects"] if (o["color"], o["shape"]) == (ca, sa)]
            B = [o["bbox"] for o in entry["objects"] if (o["color"], o["shape"]) == (cb, sb)]
            assert any(_holds(rel, a, b, 96) for a in A for b in B if a is not b), (s["raw"], entry)
            checked += 1
    assert checked >= 10


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="n_train"):
        generate(tmp_path, n_train=-1)
    with pytest.raises(UserError, match="img_size"):
        generate(tmp_path, img_size=8)
